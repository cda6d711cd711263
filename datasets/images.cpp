#include "canopy/datasets/images.h"

#include <jerror.h>
#include <jpeglib.h>
#include <png.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/csv.h"

namespace canopy::datasets {

namespace {

// [H, W, C] interleaved bytes -> uint8 [C, H, W], keeping the first `keep` channels, in
// memory of its own (clone, not contiguous(): a one-channel view already counts as
// contiguous and would still point into `data`).
at::Tensor to_chw(const std::uint8_t* data, std::int64_t h, std::int64_t w, std::int64_t c,
                  std::int64_t keep) {
  at::Tensor hwc = at::from_blob(const_cast<std::uint8_t*>(data), {h, w, c}, at::kByte);
  return hwc.slice(2, 0, keep).permute({2, 0, 1}).clone(at::MemoryFormat::Contiguous);
}

// An image of more pixels than `max_pixels` (0: no limit) is refused before it is decoded.
void check_pixels(const std::string& path, std::uint64_t width, std::uint64_t height,
                  std::int64_t max_pixels) {
  CANOPY_CHECK(max_pixels <= 0 || width * height <= static_cast<std::uint64_t>(max_pixels), DataError,
               "image '", path, "' is ", width, " x ", height, " = ", width * height,
               " pixels, more than data.max_image_pixels = ", max_pixels,
               " (a guard against decompression bombs, as in PIL); raise it, or set 0 for no limit, "
               "if the image is real");
}

at::Tensor decode_png(const std::string& path, std::int64_t max_pixels) {
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  CANOPY_CHECK(png_image_begin_read_from_file(&image, path.c_str()) != 0, DataError, "cannot decode PNG '",
               path, "': ", image.message);
  try {
    check_pixels(path, image.width, image.height, max_pixels);
  } catch (...) {
    png_image_free(&image);
    throw;
  }
  // 8-bit sRGB output, grey or RGB, with alpha when the file has it (dropped below, not
  // composited: the colour values are kept as stored, as PIL's convert("RGB") does).
  const bool color = (image.format & PNG_FORMAT_FLAG_COLOR) != 0;
  const bool alpha = (image.format & PNG_FORMAT_FLAG_ALPHA) != 0;
  image.format =
      color ? (alpha ? PNG_FORMAT_RGBA : PNG_FORMAT_RGB) : (alpha ? PNG_FORMAT_GA : PNG_FORMAT_GRAY);
  // In 64 bits: PNG_IMAGE_SIZE computes in 32 and wraps for images over 4 GiB (libpng then
  // refuses them, after the wrapped buffer was allocated and zeroed).
  std::vector<std::uint8_t> buffer(static_cast<std::size_t>(image.width) * image.height *
                                   PNG_IMAGE_SAMPLE_CHANNELS(image.format));
  if (png_image_finish_read(&image, nullptr, buffer.data(), 0, nullptr) == 0) {
    const std::string message = image.message;
    png_image_free(&image);
    throw DataError(detail::str_cat("cannot decode PNG '", path, "': ", message));
  }
  const std::int64_t channels = PNG_IMAGE_SAMPLE_CHANNELS(image.format);
  return to_chw(buffer.data(), image.height, image.width, channels, color ? 3 : 1);
}

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_error_exit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// Warnings (extraneous bytes, ...) are not errors, except a premature end of the data: libjpeg
// would fill the missing rows with grey and carry on.
void jpeg_warning(j_common_ptr cinfo, int level) {
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) jpeg_error_exit(cinfo);
}

// CMYK pixels (4 bytes each, as libjpeg gives them) to RGB in their first 3 bytes, as PIL's
// JPEG reader and Image.convert("RGB") make them: the values read inverted, as Adobe writes
// them (PIL's "CMYK;I", which it assumes for every CMYK JPEG), then each channel
// (255 - K) - C (255 - K) / 255, rounded as PIL's MULDIV255.
void cmyk_to_rgb(std::uint8_t* px, std::int64_t n) {
  const auto muldiv255 = [](int a, int b) {
    const int t = a * b + 128;
    return ((t >> 8) + t) >> 8;
  };
  for (std::int64_t i = 0; i < n; ++i, px += 4) {
    const int nk = px[3];  // 255 - K, with K stored inverted
    for (int ch = 0; ch < 3; ++ch) px[ch] = static_cast<std::uint8_t>(nk - muldiv255(255 - px[ch], nk));
  }
}

at::Tensor decode_jpeg(const std::string& path, std::int64_t max_pixels) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  CANOPY_CHECK(f, DataError, "cannot open image '", path, "': ", std::strerror(errno));
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_error_exit;
  err.mgr.emit_message = jpeg_warning;
  err.message[0] = '\0';
  std::uint8_t* volatile pixels = nullptr;  // malloc'd: nothing with a destructor lives across setjmp
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    std::fclose(f);
    std::free(pixels);
    throw DataError(detail::str_cat("cannot decode JPEG '", path, "': ", err.message));
  }
  jpeg_create_decompress(&cinfo);
  jpeg_stdio_src(&cinfo, f);
  jpeg_read_header(&cinfo, TRUE);
  const bool grey = cinfo.jpeg_color_space == JCS_GRAYSCALE;
  // CMYK (and YCCK, which libjpeg turns into CMYK), as print and product photos have them.
  const bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  try {
    check_pixels(path, cinfo.image_width, cinfo.image_height, max_pixels);
  } catch (...) {
    jpeg_destroy_decompress(&cinfo);
    std::fclose(f);
    throw;
  }
  cinfo.out_color_space = grey ? JCS_GRAYSCALE : cmyk ? JCS_CMYK : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  const std::size_t row = static_cast<std::size_t>(cinfo.output_width) * cinfo.output_components;
  pixels = static_cast<std::uint8_t*>(std::malloc(row * cinfo.output_height));
  if (!pixels) {
    std::strcpy(err.message, "out of memory");
    std::longjmp(err.jump, 1);
  }
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW r = pixels + row * cinfo.output_scanline;
    jpeg_read_scanlines(&cinfo, &r, 1);
  }
  jpeg_finish_decompress(&cinfo);
  const std::int64_t h = cinfo.output_height, w = cinfo.output_width, c = cinfo.output_components;
  jpeg_destroy_decompress(&cinfo);
  std::fclose(f);
  if (cmyk) cmyk_to_rgb(pixels, h * w);
  at::Tensor out = to_chw(pixels, h, w, c, cmyk ? 3 : c);
  std::free(pixels);
  return out;
}

}  // namespace

bool is_hidden_entry(const std::string& name) { return !name.empty() && name[0] == '.'; }

bool is_image_file_name(const std::string& name) {
  const auto dot = name.rfind('.');
  if (dot == std::string::npos) return false;
  const std::string ext = lower_ascii(name.substr(dot + 1));
  return ext == "png" || ext == "jpg" || ext == "jpeg";
}

at::Tensor decode_image(const std::string& path, std::int64_t max_pixels) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  CANOPY_CHECK(f, DataError, "cannot open image '", path, "': ", std::strerror(errno));
  unsigned char magic[8] = {0};
  const std::size_t got = std::fread(magic, 1, sizeof magic, f);
  std::fclose(f);
  if (got == 8 && png_sig_cmp(magic, 0, 8) == 0) return decode_png(path, max_pixels);
  if (got >= 3 && magic[0] == 0xFF && magic[1] == 0xD8 && magic[2] == 0xFF)
    return decode_jpeg(path, max_pixels);
  throw DataError(detail::str_cat("image '", path, "' is neither PNG nor JPEG (", got, " byte(s) read)"));
}

namespace {

// The manifest's path column: `path`, else `file_name` (Hugging Face imagefolder's metadata
// names it so); npos when it has neither.
std::size_t path_column_of(const std::vector<std::string>& fields) {
  for (const char* name : {"path", "file_name"}) {
    const auto it = std::find(fields.begin(), fields.end(), name);
    if (it != fields.end()) return static_cast<std::size_t>(it - fields.begin());
  }
  return std::string::npos;
}

// Reads a manifest and sets `col` to its path column; with `labels`, it must have a label
// column too (a JSON list of labels is one: known once the first record is read whole).
Csv read_manifest_table(const TableFile& file, bool labels, std::size_t& col) {
  const bool json = file.format == TableFormat::json;
  const std::string wanted =
      detail::str_cat(json ? "the records must have" : "the header must name",
                      " a column path (or file_name, as Hugging Face's imagefolder metadata names it)",
                      labels ? " and a label column" : "");
  std::string path_name;
  const CsvHeaderCheck header = [&](const std::vector<std::string>& fields, const std::string& where,
                                    const std::string& line) {
    col = path_column_of(fields);
    if (col != std::string::npos) path_name = fields[col];
    const std::string other = json ? "" : separator_hint(fields, line);
    CANOPY_CHECK(col != std::string::npos, DataError, where, ": ", wanted, ", got '", printable(line), "'",
                 other, other.empty() ? "" : "; canopy reads comma-separated manifests: save it with commas");
  };
  Csv csv = read_table(file, "image list", header);
  col = column_after_lists(csv, path_name, "path");
  CANOPY_CHECK(!labels || csv.header.size() + csv.list_keys.size() >= 2, DataError, file.path, ": ", wanted,
               ", got '", printable(join(csv.header, ",")),
               csv.list_keys.empty() ? "" : " and lists " + join(csv.list_keys, ","), "'");
  CANOPY_CHECK(!csv.rows.empty(), DataError, "image list '", file.path, "' has ",
               json ? "no records" : "a header but no rows");
  return csv;
}

// Each row's path, relative to the manifest's folder unless absolute.
std::vector<std::string> manifest_paths(const Csv& csv, std::size_t col) {
  const std::string base = parent_path(csv.path);
  std::vector<std::string> paths;
  paths.reserve(csv.rows.size());
  for (std::size_t i = 0; i < csv.rows.size(); ++i) {
    const std::string& p = csv.rows[i][col];
    CANOPY_CHECK(!p.empty(), DataError, csv.path, ":", csv.lines[i], ": empty ", csv.header[col]);
    paths.push_back(p[0] == '/' || base.empty() ? p : join_path(base, p));
  }
  return paths;
}

}  // namespace

ImageList read_image_table(const TableFile& file, const TableFile& names) {
  std::size_t col = 0;
  const Csv csv = read_manifest_table(file, true, col);
  ImageList out;
  static_cast<LabelColumns&>(out) = read_label_columns(csv, names, col, [](const TableFile& t) {
    std::size_t names_col = 0;
    return read_manifest_table(t, true, names_col);
  });
  out.paths = manifest_paths(csv, col);
  return out;
}

std::vector<std::string> read_image_table_paths(const TableFile& file) {
  std::size_t col = 0;
  const Csv csv = read_manifest_table(file, false, col);  // sets col: read before manifest_paths' arguments
  return manifest_paths(csv, col);
}

ImageList read_image_folders(const std::string& dir, const std::string& class_dir) {
  CANOPY_CHECK(is_directory(dir), DataError, "image folder '", dir, "' is not a directory");
  const std::string names_dir = class_dir.empty() ? dir : class_dir;
  std::vector<std::string> classes;
  for (const auto& name : list_dir(names_dir)) {
    if (!is_hidden_entry(name) && is_directory(join_path(names_dir, name))) classes.push_back(name);
  }
  std::sort(classes.begin(), classes.end());
  CANOPY_CHECK(!classes.empty(), DataError, "image folder '", names_dir, "' has no class sub-directories");
  for (const auto& c : classes) {
    check_name(c, "image folder '" + names_dir + "'", "class folder name", "rename the folder");
  }
  ImageList out;
  out.label_order = {"class"};
  out.class_names["class"] = classes;
  auto& labels = out.labels["class"];
  std::vector<std::string> here;
  for (const auto& name : list_dir(dir)) {
    if (!is_hidden_entry(name) && is_directory(join_path(dir, name))) here.push_back(name);
  }
  std::sort(here.begin(), here.end());
  for (const auto& cls : here) {
    const auto it = std::lower_bound(classes.begin(), classes.end(), cls);
    CANOPY_CHECK(it != classes.end() && *it == cls, DataError, "image folder '", join_path(dir, cls),
                 "' is a class that '", names_dir, "' lacks (its classes: ", join(classes, ", "), ")");
    std::vector<std::string> files;
    for (const auto& f : list_dir(join_path(dir, cls))) {
      if (!is_hidden_entry(f) && is_image_file_name(f)) files.push_back(f);
    }
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      out.paths.push_back(join_path(join_path(dir, cls), f));
      labels.push_back(it - classes.begin());
    }
  }
  CANOPY_CHECK(!out.paths.empty(), DataError, "image folder '", dir, "' holds no .png, .jpg or .jpeg files");
  return out;
}

}  // namespace canopy::datasets
