#include "canopy/datasets/images.h"

#include <jerror.h>
#include <jpeglib.h>
#include <png.h>
#include <webp/decode.h>
#include <webp/demux.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <string_view>

#include <ATen/ops/empty.h>
#include <ATen/ops/flip.h>
#include <ATen/ops/from_blob.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/csv.h"
#include "image_formats.h"

namespace canopy::datasets {

namespace decoders {

at::Tensor to_chw(const std::uint8_t* data, std::int64_t h, std::int64_t w, std::int64_t c,
                  std::int64_t keep) {
  return planes_from_rows(data, h, w, static_cast<std::size_t>(c), static_cast<std::size_t>(w * c), {0, 1, 2},
                          keep, false);
}

at::Tensor planes_from_rows(const std::uint8_t* data, std::int64_t h, std::int64_t w, std::size_t step,
                            std::size_t stride, const std::array<int, 3>& order, std::int64_t channels,
                            bool bottom_up) {
  at::Tensor out = at::empty({channels, h, w}, at::kByte);
  std::uint8_t* planes = out.data_ptr<std::uint8_t>();
  const std::size_t plane = static_cast<std::size_t>(h * w);
  for (std::int64_t c = 0; c < channels; ++c) {
    std::uint8_t* dst = planes + c * plane;
    for (std::int64_t y = 0; y < h; ++y, dst += w) {
      const std::uint8_t* src =
          data + static_cast<std::size_t>(bottom_up ? h - 1 - y : y) * stride + order[c];
      if (step == 1) {
        std::memcpy(dst, src, static_cast<std::size_t>(w));
      } else {
        for (std::int64_t x = 0; x < w; ++x) dst[x] = src[x * step];
      }
    }
  }
  return out;
}

void check_pixels(const std::string& path, std::uint64_t width, std::uint64_t height,
                  std::int64_t max_pixels) {
  CANOPY_CHECK(max_pixels <= 0 || width * height <= static_cast<std::uint64_t>(max_pixels), DataError,
               "image '", path, "' is ", width, " x ", height, " = ", width * height,
               " pixels, more than data.max_image_pixels = ", max_pixels,
               " (a guard against decompression bombs, as in PIL); raise it, or set 0 for no limit, "
               "if the image is real");
}

void cmyk_to_rgb(std::uint8_t* px, std::int64_t n, bool inverted) {
  const auto muldiv255 = [](int a, int b) {
    const int t = a * b + 128;
    return ((t >> 8) + t) >> 8;
  };
  for (std::int64_t i = 0; i < n; ++i, px += 4) {
    const int nk = inverted ? px[3] : 255 - px[3];  // 255 - K
    for (int ch = 0; ch < 3; ++ch) {
      const int c = inverted ? 255 - px[ch] : px[ch];
      px[ch] = static_cast<std::uint8_t>(nk - muldiv255(c, nk));
    }
  }
}

}  // namespace decoders

namespace {

using decoders::check_pixels;
using decoders::to_chw;

// The orientation (1-8) TIFF-laid-out EXIF data records in its first IFD (tag 0x0112); 1
// when it records none, or a value PIL's ImageOps.exif_transpose would not act on.
int orientation_in_exif(const std::uint8_t* d, std::size_t n) {
  if (n >= 6 && std::memcmp(d, "Exif\0\0", 6) == 0) {  // the APP1 header, kept by some WebP writers
    d += 6;
    n -= 6;
  }
  if (n < 8) return 1;
  const bool le = d[0] == 'I' && d[1] == 'I';
  if (!le && !(d[0] == 'M' && d[1] == 'M')) return 1;
  const auto u16 = [&](std::size_t at) -> std::uint32_t {
    return le ? d[at] | (d[at + 1] << 8) : (d[at] << 8) | d[at + 1];
  };
  const auto u32 = [&](std::size_t at) -> std::uint32_t {
    return le ? u16(at) | (u16(at + 2) << 16) : (u16(at) << 16) | u16(at + 2);
  };
  if (u16(2) != 42) return 1;
  const std::uint64_t ifd = u32(4);
  if (ifd + 2 > n) return 1;
  const std::uint32_t entries = u16(ifd);
  for (std::uint32_t i = 0; i < entries; ++i) {
    const std::uint64_t e = ifd + 2 + 12ULL * i;
    if (e + 12 > n) break;
    if (u16(e) != 0x0112) continue;
    const std::uint32_t type = u16(e + 2);
    const std::uint32_t v = type == 3 ? u16(e + 8) : type == 4 ? u32(e + 8) : 0;  // SHORT (as written), LONG
    return v >= 1 && v <= 8 ? static_cast<int>(v) : 1;
  }
  return 1;
}

struct PngError {
  std::jmp_buf jump;
  char message[256];
};

void png_error_exit(png_structp png, png_const_charp message) {
  auto* err = static_cast<PngError*>(png_get_error_ptr(png));
  std::snprintf(err->message, sizeof err->message, "%s", message);
  std::longjmp(err->jump, 1);
}

// Warnings (an ancillary chunk's bad CRC, an unknown chunk, ...) are not errors, as in PIL.
void png_warning_ignored(png_structp, png_const_charp) {}

// The values stored, as PIL's Image.open(...).convert("RGB") reads them and torchvision's
// ImageFolder gives them: palettes expanded, 1/2/4-bit grey scaled to 8 bits, alpha and tRNS
// dropped (the colours kept, not composited), no gamma correction (a gAMA chunk is left
// unapplied, as PIL leaves it), 16-bit samples reduced to their high byte (PIL's reading of
// 16-bit RGB; its convert("RGB") of 16-bit grey clips at 255 instead, and would whiten a
// depth map or an X-ray: canopy takes the high byte there too).
DecodedImage decode_png(const std::string& path, std::int64_t max_pixels) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  CANOPY_CHECK(f, DataError, "cannot open image '", path, "': ", std::strerror(errno));
  PngError err;
  err.message[0] = '\0';
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &err, png_error_exit, png_warning_ignored);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) {
    png_destroy_read_struct(png ? &png : nullptr, nullptr, nullptr);
    std::fclose(f);
    throw DataError(detail::str_cat("cannot decode PNG '", path, "': out of memory"));
  }
  // malloc'd: nothing with a destructor lives across setjmp.
  std::uint8_t* volatile pixels = nullptr;
  png_bytep* volatile rows = nullptr;
  if (setjmp(err.jump)) {
    png_destroy_read_struct(&png, &info, nullptr);
    std::fclose(f);
    std::free(pixels);
    std::free(rows);
    throw DataError(detail::str_cat("cannot decode PNG '", path, "': ", err.message));
  }
  png_init_io(png, f);
  png_read_info(png, info);
  const std::uint32_t width = png_get_image_width(png, info), height = png_get_image_height(png, info);
  if (max_pixels > 0 && static_cast<std::uint64_t>(width) * height > static_cast<std::uint64_t>(max_pixels)) {
    png_destroy_read_struct(&png, &info, nullptr);
    std::fclose(f);
    check_pixels(path, width, height, max_pixels);
  }
  int orientation = 1;
  png_uint_32 exif_size = 0;
  png_bytep exif = nullptr;
  if (png_get_eXIf_1(png, info, &exif_size, &exif) != 0) orientation = orientation_in_exif(exif, exif_size);
  const int colour_type = png_get_color_type(png, info);
  const bool colour = (colour_type & PNG_COLOR_MASK_COLOR) != 0;
  if (png_get_bit_depth(png, info) == 16) png_set_strip_16(png);
  if (colour_type == PNG_COLOR_TYPE_PALETTE)
    png_set_palette_to_rgb(png);  // its tRNS becomes alpha: dropped below
  if (colour_type == PNG_COLOR_TYPE_GRAY) png_set_expand_gray_1_2_4_to_8(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const std::size_t row = png_get_rowbytes(png, info);
  const std::int64_t channels = png_get_channels(png, info);
  pixels = static_cast<std::uint8_t*>(std::malloc(row * height));
  rows = static_cast<png_bytep*>(std::malloc(sizeof(png_bytep) * height));
  if (!pixels || !rows) png_error(png, "out of memory");
  for (std::uint32_t y = 0; y < height; ++y) rows[y] = pixels + row * y;
  png_read_image(png, rows);
  png_destroy_read_struct(&png, &info, nullptr);
  std::fclose(f);
  std::free(rows);
  at::Tensor out = to_chw(pixels, height, width, channels, colour ? 3 : 1);
  std::free(pixels);
  return {out, orientation};
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

DecodedImage decode_jpeg(const std::string& path, std::int64_t max_pixels) {
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
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);  // EXIF, for its orientation
  jpeg_read_header(&cinfo, TRUE);
  int orientation = 1;
  for (jpeg_saved_marker_ptr m = cinfo.marker_list; m; m = m->next) {
    if (m->marker == JPEG_APP0 + 1 && m->data_length >= 6 && std::memcmp(m->data, "Exif\0\0", 6) == 0) {
      orientation = orientation_in_exif(m->data, m->data_length);  // PIL reads the first
      break;
    }
  }
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
  if (cmyk)
    decoders::cmyk_to_rgb(pixels, h * w,
                          /*inverted=*/true);  // PIL's "CMYK;I", which it assumes for every CMYK JPEG
  at::Tensor out = to_chw(pixels, h, w, c, cmyk ? 3 : c);
  std::free(pixels);
  return {out, orientation};
}

// The orientation an extended WebP's EXIF chunk records (after the image data, so the whole
// file is walked); 1 without one.
int webp_orientation(const std::uint8_t* d, std::size_t n) {
  for (std::size_t at = 12; at + 8 <= n;) {
    const std::uint64_t size =
        d[at + 4] | (d[at + 5] << 8) | (d[at + 6] << 16) | (std::uint64_t{d[at + 7]} << 24);
    if (std::memcmp(d + at, "EXIF", 4) == 0)
      return orientation_in_exif(d + at + 8, std::min<std::uint64_t>(size, n - at - 8));
    at += 8 + size + (size & 1);
  }
  return 1;
}

DecodedImage decode_webp(const std::string& path, std::int64_t max_pixels) {
  const std::string bytes = read_file(path);
  const auto* data = reinterpret_cast<const std::uint8_t*>(bytes.data());
  WebPBitstreamFeatures features;
  const VP8StatusCode status = WebPGetFeatures(data, bytes.size(), &features);
  CANOPY_CHECK(status == VP8_STATUS_OK, DataError, "cannot decode WebP '", path, "': ",
               status == VP8_STATUS_NOT_ENOUGH_DATA ? "the file is cut short" : "not a valid WebP header");
  check_pixels(path, static_cast<std::uint64_t>(features.width), static_cast<std::uint64_t>(features.height),
               max_pixels);
  if (features.has_animation) {
    // The first frame on the canvas, as PIL reads an animated WebP (libwebp's animation
    // decoder, RGBA; the colours kept as stored).
    WebPAnimDecoderOptions options;
    WebPAnimDecoderOptionsInit(&options);
    options.color_mode = MODE_RGBA;
    const WebPData in{data, bytes.size()};
    std::unique_ptr<WebPAnimDecoder, void (*)(WebPAnimDecoder*)> decoder(WebPAnimDecoderNew(&in, &options),
                                                                         WebPAnimDecoderDelete);
    WebPAnimInfo info;
    std::uint8_t* frame = nullptr;
    int timestamp = 0;
    CANOPY_CHECK(decoder && WebPAnimDecoderGetInfo(decoder.get(), &info) &&
                     WebPAnimDecoderGetNext(decoder.get(), &frame, &timestamp),
                 DataError, "cannot decode WebP '", path, "': its first frame is damaged or cut short");
    return {to_chw(frame, info.canvas_height, info.canvas_width, 4, 3), webp_orientation(data, bytes.size())};
  }
  int w = 0, h = 0;
  // RGB, alpha dropped with the colours kept as stored (PIL's convert("RGB") of its RGBA).
  std::uint8_t* pixels = WebPDecodeRGB(data, bytes.size(), &w, &h);
  CANOPY_CHECK(pixels != nullptr, DataError, "cannot decode WebP '", path,
               "': the image data is damaged or cut short");
  at::Tensor out = to_chw(pixels, h, w, 3, 3);
  WebPFree(pixels);
  return {out, webp_orientation(data, bytes.size())};
}

// What a file that is none of the formats read is, from its first bytes ("" when unknown), to say so.
std::string other_image_format(const unsigned char* m, std::size_t n) {
  const auto starts = [&](std::string_view prefix, std::size_t at = 0) {
    return n >= at + prefix.size() && std::memcmp(m + at, prefix.data(), prefix.size()) == 0;
  };
  using namespace std::string_view_literals;  // "\x00..."sv keeps its zero bytes
  if (starts("ftypavif"sv, 4) || starts("ftypavis"sv, 4)) return "AVIF";
  for (const auto brand : {"ftypheic"sv, "ftypheix"sv, "ftyphevc"sv, "ftypmif1"sv, "ftypmsf1"sv})
    if (starts(brand, 4)) return "HEIC";
  if (starts("\xFF\x0A"sv) || starts("\x00\x00\x00\x0CJXL "sv)) return "JPEG XL";
  return "";
}

// torchvision's ImageFolder's extensions (IMG_EXTENSIONS), any case: what a class folder's
// images are; in the order messages name them.
const std::vector<std::string>& folder_extensions() {
  static const std::vector<std::string> kFolder = {"png", "jpg",  "jpeg", "webp", "bmp",
                                                   "tif", "tiff", "ppm",  "pgm"};
  return kFolder;
}
const std::set<std::string>& readable_extensions() {
  static const std::set<std::string> kReadable(folder_extensions().begin(), folder_extensions().end());
  return kReadable;
}

// Other images, which ImageFolder leaves out of a class folder: left out too, and said.
const std::set<std::string>& left_out_image_extensions() {
  static const std::set<std::string> kLeftOut = {"gif",  "pbm", "pnm", "dib", "heic", "heif",
                                                 "avif", "jxl", "jp2", "ico", "tga"};
  return kLeftOut;
}

}  // namespace

bool is_hidden_entry(const std::string& name) { return !name.empty() && name[0] == '.'; }

std::string file_extension(const std::string& path) {
  const auto slash = path.rfind('/');
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  const auto dot = name.rfind('.');
  return dot == std::string::npos || dot == 0 ? "" : lower_ascii(name.substr(dot + 1));
}

at::Tensor decode_image(const std::string& path, std::int64_t max_pixels) {
  return read_image(path, max_pixels).pixels;
}

at::Tensor apply_exif_orientation(const at::Tensor& chw, int orientation) {
  // PIL's ImageOps.exif_transpose: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90
  // clockwise, 7 transverse, 8 rotate 90 counter-clockwise.
  switch (orientation) {
    case 2:
      return chw.flip({2});
    case 3:
      return chw.flip({1, 2});
    case 4:
      return chw.flip({1});
    case 5:
      return chw.transpose(1, 2).contiguous();
    case 6:
      return chw.transpose(1, 2).flip({2});
    case 7:
      return chw.transpose(1, 2).flip({1, 2});
    case 8:
      return chw.transpose(1, 2).flip({1});
    default:
      return chw;
  }
}

DecodedImage read_image(const std::string& path, std::int64_t max_pixels) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  CANOPY_CHECK(f, DataError, "cannot open image '", path, "': ", std::strerror(errno));
  unsigned char magic[12] = {0};
  const std::size_t got = std::fread(magic, 1, sizeof magic, f);
  std::fclose(f);
  if (got >= 8 && png_sig_cmp(magic, 0, 8) == 0) return decode_png(path, max_pixels);
  if (got >= 3 && magic[0] == 0xFF && magic[1] == 0xD8 && magic[2] == 0xFF)
    return decode_jpeg(path, max_pixels);
  if (got == 12 && std::memcmp(magic, "RIFF", 4) == 0 && std::memcmp(magic + 8, "WEBP", 4) == 0)
    return decode_webp(path, max_pixels);
  const auto starts = [&](const char* prefix, std::size_t n) {
    return got >= n && std::memcmp(magic, prefix, n) == 0;
  };
  if (starts("BM", 2)) return decoders::decode_bmp(path, max_pixels);
  if (starts("GIF8", 4)) return decoders::decode_gif(path, max_pixels);
  if (starts("II*\0", 4) || starts("MM\0*", 4) || starts("II+\0", 4) || starts("MM\0+", 4))  // + : BigTIFF
    return decoders::decode_tiff(path, max_pixels);
  if (got >= 2 && magic[0] == 'P' && magic[1] != 0 && std::strchr("0123456fy", magic[1]))
    return decoders::decode_netpbm(path, max_pixels);
  const std::string other = other_image_format(magic, got);
  CANOPY_CHECK(other.empty(), DataError, "image '", path, "' is ",
               std::strchr("AEIOU", other[0]) ? "an " : "a ", other,
               " file: canopy reads PNG, JPEG, WebP, BMP, GIF, TIFF and Netpbm; convert it (in Python: "
               "PIL.Image.open(path).convert(\"RGB\").save(new_path_ending_in_png))");
  throw DataError(detail::str_cat("image '", path, "' is none of PNG, JPEG, WebP, BMP, GIF, TIFF or Netpbm (",
                                  got, " byte(s) read)"));
}

ImageFiles find_image_files(const std::string& dir) {
  CANOPY_CHECK(is_directory(dir), DataError, "image folder '", dir, "' is not a directory");
  // torchvision's order: sorted(os.walk(dir, followlinks=True)), each folder's files sorted;
  // with each folder, its files of formats canopy does not decode.
  struct Folder {
    std::string path;
    std::vector<std::string> images, left_out;
    bool operator<(const Folder& o) const { return path < o.path; }
  };
  std::vector<Folder> folders;
  ImageFiles out;
  // Each folder with the real paths of the folders above it, to refuse a symlink loop.
  std::vector<std::pair<std::string, std::vector<std::string>>> todo{{dir, {real_path(dir)}}};
  while (!todo.empty()) {
    auto [d, above] = std::move(todo.back());
    todo.pop_back();
    Folder folder{d, {}, {}};
    for (const auto& name : list_dir(d)) {
      if (is_hidden_entry(name)) continue;
      const std::string p = join_path(d, name);
      if (is_directory(p)) {
        const std::string real = real_path(p);
        CANOPY_CHECK(std::find(above.begin(), above.end(), real) == above.end(), DataError, "image folder '",
                     dir, "': '", p, "' leads back to '", real, "' above it (a symbolic link loop)");
        auto chain = above;
        chain.push_back(real);
        todo.emplace_back(p, std::move(chain));
        continue;
      }
      const std::string ext = file_extension(name);
      if (readable_extensions().count(ext)) {
        folder.images.push_back(p);
      } else if (left_out_image_extensions().count(ext)) {
        folder.left_out.push_back(p);
        ++out.left_out_images["." + ext];
      } else {
        ++out.not_images[ext.empty() ? "" : "." + ext];
      }
    }
    folders.push_back(std::move(folder));
  }
  std::sort(folders.begin(), folders.end());
  for (auto& f : folders) {
    out.paths.insert(out.paths.end(), f.images.begin(), f.images.end());
    if (out.first_left_out.empty() && !f.left_out.empty()) out.first_left_out = f.left_out.front();
  }
  return out;
}

std::string folder_image_extensions(const std::string& last_joiner) {
  std::vector<std::string> dotted;
  for (const auto& e : folder_extensions()) dotted.push_back("." + e);
  const std::string last = dotted.back();
  dotted.pop_back();
  return join(dotted, ", ") + " " + last_joiner + " " + last;
}

std::string describe_counts(const std::map<std::string, std::int64_t>& counts) {
  std::vector<std::string> parts;
  for (const auto& [ext, n] : counts)
    parts.push_back(detail::str_cat(n, " ", ext.empty() ? "without extension" : ext));
  return join(parts, ", ");
}

std::string describe_left_out_images(const std::map<std::string, std::int64_t>& counts,
                                     const std::string& first) {
  if (counts.empty()) return "";
  return detail::str_cat("left out images torchvision's ImageFolder leaves out too (",
                         describe_counts(counts), "; the first: ", first, "): a folder's images are its ",
                         folder_image_extensions("and"),
                         " files; list the others in a manifest (data.source = image-csv) to read GIF, PBM "
                         "and PNM files");
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
  const bool training = class_dir.empty() || class_dir == dir;
  for (const auto& cls : here) {
    const auto it = std::lower_bound(classes.begin(), classes.end(), cls);
    CANOPY_CHECK(it != classes.end() && *it == cls, DataError, "image folder '", join_path(dir, cls),
                 "' is a class that '", names_dir, "' lacks (its classes: ", join(classes, ", "), ")");
    ImageFiles files = find_image_files(join_path(dir, cls));
    // As torchvision's ImageFolder refuses it: a head would learn a class it never saw.
    CANOPY_CHECK(
        !training || !files.paths.empty(), DataError, "class folder '", join_path(dir, cls),
        "' holds no images (", folder_image_extensions("or"), ")",
        files.left_out_images.empty()
            ? ""
            : ", only images ImageFolder leaves out (" + describe_counts(files.left_out_images) + ")",
        files.not_images.empty() ? "" : ", only other files (" + describe_counts(files.not_images) + ")",
        ": a head would have a class it never saw; add its images or remove the folder");
    for (auto& p : files.paths) {
      out.paths.push_back(std::move(p));
      labels.push_back(it - classes.begin());
    }
    for (const auto& [ext, n] : files.not_images) out.not_images[ext] += n;
    for (const auto& [ext, n] : files.left_out_images) out.left_out_images[ext] += n;
    if (out.first_left_out.empty()) out.first_left_out = files.first_left_out;
  }
  CANOPY_CHECK(!out.paths.empty(), DataError, "image folder '", dir, "' holds no ",
               folder_image_extensions("or"), " files");
  return out;
}

}  // namespace canopy::datasets
