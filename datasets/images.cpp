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

namespace {

// One CSV line into fields; "quoted, fields" with "" for a quote.
std::vector<std::string> csv_fields(const std::string& line) {
  std::vector<std::string> out(1);
  bool quoted = false;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        out.back() += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        out.back() += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      out.emplace_back();
    } else {
      out.back() += c;
    }
  }
  for (auto& f : out) f = trim(f);
  return out;
}

struct Csv {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
};

Csv read_csv(const std::string& path) {
  std::ifstream in(path);
  CANOPY_CHECK(in, DataError, "cannot open image list '", path, "': ", std::strerror(errno));
  Csv csv;
  std::string line;
  std::int64_t n = 0;
  while (read_text_line(in, line, n)) {
    if (trim(line).empty()) continue;
    auto fields = csv_fields(line);
    if (csv.header.empty()) {
      // A spreadsheet in a locale whose decimal mark is a comma saves "CSV" with semicolons.
      const char* other = fields.size() > 1                      ? ""
                          : line.find(';') != std::string::npos  ? " (its fields are separated by ';')"
                          : line.find('\t') != std::string::npos ? " (its fields are separated by tabs)"
                                                                 : "";
      CANOPY_CHECK(fields.size() >= 2 && fields[0] == "path", DataError, path, ":", n,
                   ": the header must be path,<label>[,<label>...], got '", printable(line), "'", other,
                   *other ? "; canopy reads comma-separated manifests: save it with commas" : "");
      csv.header = std::move(fields);
      continue;
    }
    CANOPY_CHECK(fields.size() == csv.header.size(), DataError, path, ":", n, ": ", fields.size(),
                 " fields, the header has ", csv.header.size());
    CANOPY_CHECK(!fields[0].empty(), DataError, path, ":", n, ": empty path");
    csv.rows.push_back(std::move(fields));
  }
  CANOPY_CHECK(!csv.header.empty(), DataError, "image list '", path, "' is empty");
  return csv;
}

// Label and class names are written into JSON (cards, metrics) and HDF5 as UTF-8.
void check_name(const std::string& name, const std::string& where, const char* what, const char* mend) {
  const std::string bad = utf8_problem(name);
  CANOPY_CHECK(bad.empty(), DataError, where, ": the ", what, " ", bad, "; canopy writes names as UTF-8 (",
               mend, ")");
}
constexpr const char* kConvertCsv = "convert the file, e.g. iconv -f latin1 -t utf-8";

bool all_parse(const std::vector<std::vector<std::string>>& rows, std::size_t col, bool integer) {
  for (const auto& r : rows) {
    const std::string& v = r[col];
    if (v.empty()) return false;
    char* end = nullptr;
    if (integer) {
      const long long x = std::strtoll(v.c_str(), &end, 10);
      if (*end != '\0' || x < 0) return false;
    } else {
      std::strtod(v.c_str(), &end);
      if (*end != '\0') return false;
    }
  }
  return true;
}

}  // namespace

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

ImageList read_image_csv(const std::string& path, const std::string& name_source) {
  const Csv csv = read_csv(path);
  CANOPY_CHECK(!csv.rows.empty(), DataError, "image list '", path, "' has a header but no rows");
  const std::string base = parent_path(path);
  ImageList out;
  for (const auto& r : csv.rows)
    out.paths.push_back(r[0][0] == '/' || base.empty() ? r[0] : join_path(base, r[0]));
  const Csv names = name_source.empty() || name_source == path ? csv : read_csv(name_source);
  CANOPY_CHECK(names.header == csv.header, DataError, "image lists '", name_source, "' and '", path,
               "' have different headers (", join(names.header, ","), " vs ", join(csv.header, ","), ")");
  for (std::size_t col = 1; col < csv.header.size(); ++col) {
    const std::string& label = csv.header[col];
    CANOPY_CHECK(!label.empty() && !out.labels.count(label) && !out.float_labels.count(label), DataError,
                 path, ": label column '", label, "' is empty or repeated");
    check_name(label, path + ":1", "label column", kConvertCsv);
    out.label_order.push_back(label);
    if (all_parse(names.rows, col, true) && all_parse(csv.rows, col, true)) {
      auto& v = out.labels[label];
      for (const auto& r : csv.rows) v.push_back(std::strtoll(r[col].c_str(), nullptr, 10));
    } else if (all_parse(names.rows, col, false) && all_parse(csv.rows, col, false)) {
      // strtod reads "nan" and "inf" (and 1e999 as inf): a real label must be a finite number,
      // or its mean and standard deviation, the targets' scale, are not numbers.
      auto& v = out.float_labels[label];
      for (std::size_t i = 0; i < csv.rows.size(); ++i) {
        const std::string& text = csv.rows[i][col];
        v.push_back(std::strtod(text.c_str(), nullptr));
        CANOPY_CHECK(std::isfinite(v.back()), DataError, path, ": row ", i + 1, " has ", label, " '", text,
                     "', not a finite number: a real-valued label column must hold finite numbers (fill or "
                     "drop that row)");
      }
    } else {
      std::set<std::string> found;
      for (std::size_t i = 0; i < names.rows.size(); ++i) {
        if (found.insert(names.rows[i][col]).second) {
          check_name(names.rows[i][col],
                     detail::str_cat(name_source.empty() ? path : name_source, ": row ", i + 1), "class name",
                     kConvertCsv);
        }
      }
      std::vector<std::string> classes(found.begin(), found.end());
      auto& v = out.labels[label];
      for (std::size_t i = 0; i < csv.rows.size(); ++i) {
        const auto it = std::lower_bound(classes.begin(), classes.end(), csv.rows[i][col]);
        CANOPY_CHECK(it != classes.end() && *it == csv.rows[i][col], DataError, path, ": row ", i + 1,
                     " has ", label, " '", csv.rows[i][col], "', which '", name_source,
                     "' never uses (its classes: ", join(classes, ", "), ")");
        v.push_back(it - classes.begin());
      }
      out.class_names[label] = classes;
    }
  }
  return out;
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
