// PNG, JPEG and WebP decoding against images encoded here with libpng, libjpeg and libwebp,
// and the CSV manifest and class-folder listings. The end-to-end check that an image set gives the same
// features as the idx files it came from is in tests/python/test_images.py.
#include <gtest/gtest.h>
#include <jpeglib.h>
#include <png.h>
#include <webp/encode.h>

#include <cstdio>
#include <cstring>
#include <fstream>

#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/datasets/augment.h"
#include "canopy/datasets/images.h"
#include "support/test_support.h"

namespace canopy::datasets {
namespace {

// Writes interleaved 8-bit pixels [H, W, C] (C = 1, 2, 3 or 4) as PNG.
void write_png(const std::string& path, const std::vector<std::uint8_t>& hwc, int h, int w, int c) {
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  image.width = w;
  image.height = h;
  image.format = c == 1   ? PNG_FORMAT_GRAY
                 : c == 2 ? PNG_FORMAT_GA
                 : c == 3 ? PNG_FORMAT_RGB
                          : PNG_FORMAT_RGBA;
  ASSERT_NE(png_image_write_to_file(&image, path.c_str(), 0, hwc.data(), 0, nullptr), 0) << image.message;
}

// A PNG as libpng's full API writes it: rows of samples as stored (16-bit big-endian), any
// bit depth, colour type and interlacing, a gAMA chunk (gamma > 0), a palette and a tRNS.
struct PngSpec {
  int w = 0, h = 0, bit_depth = 8, colour_type = PNG_COLOR_TYPE_RGB;
  bool adam7 = false;
  double gamma = 0;
  std::vector<png_color> palette;
  std::vector<png_byte> trns;
  std::string exif;  // an eXIf chunk's bytes (TIFF-laid-out)
};
void write_png_rows(const std::string& path, const PngSpec& spec, const std::vector<std::uint8_t>& data) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  ASSERT_EQ(setjmp(png_jmpbuf(png)), 0);
  png_init_io(png, f);
  png_set_IHDR(png, info, spec.w, spec.h, spec.bit_depth, spec.colour_type,
               spec.adam7 ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  if (spec.gamma > 0) png_set_gAMA(png, info, spec.gamma);
  if (!spec.palette.empty())
    png_set_PLTE(png, info, spec.palette.data(), static_cast<int>(spec.palette.size()));
  if (!spec.trns.empty())
    png_set_tRNS(png, info, spec.trns.data(), static_cast<int>(spec.trns.size()), nullptr);
  if (!spec.exif.empty())
    png_set_eXIf_1(png, info, static_cast<png_uint_32>(spec.exif.size()),
                   reinterpret_cast<png_bytep>(const_cast<char*>(spec.exif.data())));
  png_write_info(png, info);
  const std::size_t row = data.size() / spec.h;
  std::vector<png_bytep> rows;
  for (int y = 0; y < spec.h; ++y) rows.push_back(const_cast<std::uint8_t*>(data.data()) + row * y);
  png_write_image(png, rows.data());
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  std::fclose(f);
}

// TIFF-laid-out EXIF data of one IFD entry, the orientation (a SHORT), in either byte order.
std::string exif_orientation_bytes(int orientation, bool little_endian) {
  const auto u16 = [&](int v) {
    return little_endian ? std::string{static_cast<char>(v & 0xFF), static_cast<char>(v >> 8)}
                         : std::string{static_cast<char>(v >> 8), static_cast<char>(v & 0xFF)};
  };
  const auto u32 = [&](int v) { return little_endian ? u16(v) + u16(0) : u16(0) + u16(v); };
  return std::string(little_endian ? "II" : "MM") + u16(42) + u32(8) + u16(1) + u16(0x0112) + u16(3) +
         u32(1) + u16(orientation) + u16(0) + u32(0);
}

void write_jpeg(const std::string& path, const std::vector<std::uint8_t>& hwc, int h, int w, int c,
                const std::string& exif = "") {
  jpeg_compress_struct cinfo;
  jpeg_error_mgr jerr;
  cinfo.err = jpeg_std_error(&jerr);
  jpeg_create_compress(&cinfo);
  std::FILE* f = std::fopen(path.c_str(), "wb");
  jpeg_stdio_dest(&cinfo, f);
  cinfo.image_width = w;
  cinfo.image_height = h;
  cinfo.input_components = c;
  cinfo.in_color_space = c == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(&cinfo);
  jpeg_set_quality(&cinfo, 95, TRUE);
  jpeg_start_compress(&cinfo, TRUE);
  if (!exif.empty()) {
    const std::string app1 = std::string("Exif\0\0", 6) + exif;
    jpeg_write_marker(&cinfo, JPEG_APP0 + 1, reinterpret_cast<const JOCTET*>(app1.data()),
                      static_cast<unsigned>(app1.size()));
  }
  while (cinfo.next_scanline < cinfo.image_height) {
    JSAMPROW row = const_cast<std::uint8_t*>(hwc.data()) + cinfo.next_scanline * w * c;
    jpeg_write_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_compress(&cinfo);
  jpeg_destroy_compress(&cinfo);
  std::fclose(f);
}

// A smooth test picture (JPEG-friendly), [H, W, C].
std::vector<std::uint8_t> picture(int h, int w, int c) {
  std::vector<std::uint8_t> out(static_cast<std::size_t>(h * w * c));
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      for (int k = 0; k < c; ++k)
        out[(y * w + x) * c + k] = static_cast<std::uint8_t>(20 + (x * 100) / w + (y * 80) / h + k * 30);
    }
  }
  return out;
}

at::Tensor chw(const std::vector<std::uint8_t>& hwc, int h, int w, int c, int keep) {
  at::Tensor t = at::empty({h, w, c}, at::kByte);
  std::memcpy(t.data_ptr<std::uint8_t>(), hwc.data(), hwc.size());
  return t.slice(2, 0, keep).permute({2, 0, 1}).contiguous();
}

// decode_image(path) is `want`, bitwise; where it is not, the largest difference is said.
void expect_decodes_to(const std::string& path, const at::Tensor& want) {
  const at::Tensor got = decode_image(path);
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_TRUE(testing::bitwise_equal(got, want))
      << (got.to(at::kInt) - want.to(at::kInt)).abs().max().item<int>();
}

TEST(Images, PngDecodesExactlyInEveryColourType) {
  testing::TempDir dir;
  for (int c : {1, 2, 3, 4}) {
    SCOPED_TRACE("channels " + std::to_string(c));
    const auto px = picture(9, 13, c);
    write_png(dir.file("p.png"), px, 9, 13, c);
    const int keep = c <= 2 ? 1 : 3;  // alpha dropped, colour values kept as stored
    expect_decodes_to(dir.file("p.png"), chw(px, 9, 13, c, keep));
  }
}

// The values stored, as PIL reads them (tests/python/test_images.py checks them against PIL
// itself): no gamma applied, 16-bit samples' high byte, palettes and low bit depths expanded,
// interlaced rows in place.
TEST(Images, PngGivesTheStoredValuesAsPilReadsThem) {
  testing::TempDir dir;
  const int h = 7, w = 11;
  std::vector<std::uint8_t> rgb16(h * w * 3 * 2), grey16(h * w * 2);
  for (std::size_t i = 0; i < rgb16.size(); ++i) rgb16[i] = static_cast<std::uint8_t>(i * 37 + 11);
  for (std::size_t i = 0; i < grey16.size(); ++i) grey16[i] = static_cast<std::uint8_t>(i * 53 + 5);
  const auto high_bytes = [](const std::vector<std::uint8_t>& v) {
    std::vector<std::uint8_t> out;
    for (std::size_t i = 0; i < v.size(); i += 2) out.push_back(v[i]);
    return out;
  };
  const auto px = picture(h, w, 3);
  struct Case {
    const char* what;
    PngSpec spec;
    std::vector<std::uint8_t> data, want;
    int c;
  };
  // 2-bit grey: four pixels a byte, 0..3 scaled to 0, 85, 170, 255.
  std::vector<std::uint8_t> grey2, grey2_want;
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < 12; x += 4) {
      std::uint8_t b = 0;
      for (int k = 0; k < 4; ++k) {
        const int v = (x + k + y) % 4;
        b = static_cast<std::uint8_t>(b | (v << (6 - 2 * k)));
        if (x + k < w) grey2_want.push_back(static_cast<std::uint8_t>(v * 85));
      }
      grey2.push_back(b);
    }
  }
  // A 4-entry palette with a tRNS: the colours, the transparency dropped.
  const std::vector<png_color> palette = {{200, 10, 10}, {10, 200, 10}, {10, 10, 200}, {90, 90, 90}};
  std::vector<std::uint8_t> indices, indexed_want;
  for (int i = 0; i < h * w; ++i) {
    indices.push_back(static_cast<std::uint8_t>(i % 4));
    for (const auto v : {palette[i % 4].red, palette[i % 4].green, palette[i % 4].blue})
      indexed_want.push_back(v);
  }
  const std::vector<Case> cases = {
      {"8-bit RGB with gAMA 1.0 (linear light): no gamma applied",
       {w, h, 8, PNG_COLOR_TYPE_RGB, false, 1.0, {}, {}, {}},
       px,
       px,
       3},
      {"8-bit RGB with gAMA 1/1.8, interlaced",
       {w, h, 8, PNG_COLOR_TYPE_RGB, true, 1 / 1.8, {}, {}, {}},
       px,
       px,
       3},
      {"16-bit RGB: the high bytes",
       {w, h, 16, PNG_COLOR_TYPE_RGB, false, 0, {}, {}, {}},
       rgb16,
       high_bytes(rgb16),
       3},
      {"16-bit grey: the high bytes (PIL clips at 255)",
       {w, h, 16, PNG_COLOR_TYPE_GRAY, false, 0, {}, {}, {}},
       grey16,
       high_bytes(grey16),
       1},
      {"2-bit grey", {w, h, 2, PNG_COLOR_TYPE_GRAY, false, 0, {}, {}, {}}, grey2, grey2_want, 1},
      {"a palette with a tRNS",
       {w, h, 8, PNG_COLOR_TYPE_PALETTE, false, 0, palette, {0, 128, 255, 7}, {}},
       indices,
       indexed_want,
       3},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.what);
    write_png_rows(dir.file("p.png"), k.spec, k.data);
    expect_decodes_to(dir.file("p.png"), chw(k.want, h, w, k.c, k.c));
  }
}

// Lossless WebP gives its pixels back exactly (an RGBA one its colours, alpha dropped); lossy
// WebP is close. Bitwise against PIL in tests/python/test_images.py.
TEST(Images, WebPDecodes) {
  testing::TempDir dir;
  const int h = 21, w = 17;
  const auto write = [&](const std::string& name, std::uint8_t* bytes, std::size_t n) {
    ASSERT_GT(n, 0U);
    std::ofstream(dir.file(name), std::ios::binary).write(reinterpret_cast<const char*>(bytes), n);
    WebPFree(bytes);
  };
  const auto px = picture(h, w, 3), rgba = picture(h, w, 4);
  std::uint8_t* out = nullptr;
  write("lossless.webp", out, WebPEncodeLosslessRGB(px.data(), w, h, w * 3, &out));
  write("alpha.webp", out, WebPEncodeLosslessRGBA(rgba.data(), w, h, w * 4, &out));
  write("lossy.webp", out, WebPEncodeRGB(px.data(), w, h, w * 3, 90, &out));
  expect_decodes_to(dir.file("lossless.webp"), chw(px, h, w, 3, 3));
  expect_decodes_to(dir.file("alpha.webp"), chw(rgba, h, w, 4, 3));
  const at::Tensor lossy = decode_image(dir.file("lossy.webp"));
  ASSERT_EQ(lossy.sizes(), (at::IntArrayRef{3, h, w}));
  EXPECT_LT((lossy.to(at::kFloat) - chw(px, h, w, 3, 3).to(at::kFloat)).abs().mean().item<double>(), 3.0);
  // Told apart by content: a WebP named .png is read as WebP.
  std::rename(dir.file("lossless.webp").c_str(), dir.file("l.png").c_str());
  expect_decodes_to(dir.file("l.png"), chw(px, h, w, 3, 3));
  const std::string bytes = read_file(dir.file("l.png"));
  std::ofstream(dir.file("cut.webp"), std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { decode_image(dir.file("cut.webp")); },
                                              {"cannot decode WebP", "cut.webp"}));
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { decode_image(dir.file("lossy.webp"), 100); },
                                      {"lossy.webp", "17 x 21 = 357 pixels", "max_image_pixels = 100"}));
}

// The orientation read from a JPEG's APP1 and a PNG's eXIf, in both byte orders, and the
// pixels turned as PIL's ImageOps.exif_transpose turns them (worked by hand on a 2 x 3 image;
// against PIL itself in tests/python/test_images.py).
TEST(Images, ExifOrientationIsReadAndApplied) {
  testing::TempDir dir;
  const auto px = picture(8, 16, 3);
  for (const bool le : {true, false}) {
    for (const int o : {1, 3, 6, 8}) {
      SCOPED_TRACE(std::string(le ? "II " : "MM ") + std::to_string(o));
      write_jpeg(dir.file("o.jpg"), px, 8, 16, 3, exif_orientation_bytes(o, le));
      EXPECT_EQ(read_image(dir.file("o.jpg")).orientation, o);
      PngSpec spec{16, 8, 8, PNG_COLOR_TYPE_RGB, false, 0, {}, {}, exif_orientation_bytes(o, le)};
      write_png_rows(dir.file("o.png"), spec, px);
      const DecodedImage png = read_image(dir.file("o.png"));
      EXPECT_EQ(png.orientation, o);
      EXPECT_TRUE(testing::bitwise_equal(png.pixels, chw(px, 8, 16, 3, 3)));  // as stored
    }
  }
  write_jpeg(dir.file("none.jpg"), px, 8, 16, 3);
  EXPECT_EQ(read_image(dir.file("none.jpg")).orientation, 1);
  write_jpeg(dir.file("bad.jpg"), px, 8, 16, 3, exif_orientation_bytes(9, true));  // no such orientation
  EXPECT_EQ(read_image(dir.file("bad.jpg")).orientation, 1);
  // [[a b c], [d e f]] as 1, 2, 3 / 4, 5, 6, one channel.
  const at::Tensor img = at::arange(1, 7, at::kByte).reshape({1, 2, 3});
  const std::map<int, std::vector<std::uint8_t>> want = {
      {1, {1, 2, 3, 4, 5, 6}}, {2, {3, 2, 1, 6, 5, 4}}, {3, {6, 5, 4, 3, 2, 1}}, {4, {4, 5, 6, 1, 2, 3}},
      {5, {1, 4, 2, 5, 3, 6}}, {6, {4, 1, 5, 2, 6, 3}}, {7, {6, 3, 5, 2, 4, 1}}, {8, {3, 6, 2, 5, 1, 4}}};
  for (const auto& [o, values] : want) {
    const at::Tensor got = apply_exif_orientation(img, o).contiguous();
    EXPECT_EQ(got.size(1), o >= 5 ? 3 : 2) << o;
    EXPECT_EQ(std::vector<std::uint8_t>(got.data_ptr<std::uint8_t>(), got.data_ptr<std::uint8_t>() + 6),
              values)
        << "orientation " << o;
  }
}

TEST(Images, JpegDecodesCloseToWhatWasEncoded) {
  testing::TempDir dir;
  for (int c : {1, 3}) {
    SCOPED_TRACE("channels " + std::to_string(c));
    const auto px = picture(32, 40, c);
    write_jpeg(dir.file("p.jpg"), px, 32, 40, c);
    const at::Tensor got = decode_image(dir.file("p.jpg"));
    const at::Tensor want = chw(px, 32, 40, c, c);
    ASSERT_EQ(got.sizes(), want.sizes());
    const double err = (got.to(at::kFloat) - want.to(at::kFloat)).abs().mean().item<double>();
    EXPECT_LT(err, 3.0) << "quality-95 JPEG differs from its source by " << err << " per pixel on average";
  }
  // Told apart by content, not name.
  std::rename(dir.file("p.jpg").c_str(), dir.file("p.png").c_str());
  EXPECT_EQ(decode_image(dir.file("p.png")).size(0), 3);
}

TEST(Images, BrokenFilesAreClearErrors) {
  testing::TempDir dir;
  std::ofstream(dir.file("text.png")) << "not an image at all";
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { decode_image(dir.file("text.png")); },
                                      {"text.png", "none of PNG, JPEG, WebP, BMP, GIF, TIFF or Netpbm"}));
  // Formats PIL reads and canopy does not are named, with the way to convert them.
  for (const auto& [bytes, format] :
       std::vector<std::pair<std::string, std::string>>{{std::string("\x00\x00\x00\x1c"
                                                                     "ftypheic",
                                                                     12),
                                                         "a HEIC file"},
                                                        {std::string("\x00\x00\x00\x1c"
                                                                     "ftypavif",
                                                                     12),
                                                         "an AVIF file"}}) {
    std::ofstream(dir.file("other.jpg"), std::ios::binary) << bytes;
    EXPECT_TRUE(testing::throws_with<DataError>(
        [&] { decode_image(dir.file("other.jpg")); },
        {"other.jpg", format, "canopy reads PNG, JPEG, WebP, BMP, GIF, TIFF and Netpbm", "convert"}));
  }
  // BMP, GIF, TIFF and Netpbm headers too short to hold an image: each decoder's own error.
  for (const auto& [bytes, said] : std::vector<std::pair<std::string, std::string>>{
           {"GIF89a\x01\x00\x01\x00", "cannot decode GIF"},
           {"BM\x3a\x00\x00\x00", "cannot decode BMP"},
           {std::string("II*\x00\x08\x00\x00\x00", 8), "cannot decode TIFF"},
           {"P6\n3 2\n255\n\x01\x02", "cannot decode Netpbm image"}}) {
    std::ofstream(dir.file("short.png"), std::ios::binary) << bytes;
    EXPECT_TRUE(
        testing::throws_with<DataError>([&] { decode_image(dir.file("short.png")); }, {"short.png", said}))
        << said;
  }
  EXPECT_TRUE(testing::throws_with<DataError>([&] { decode_image(dir.file("none.png")); },
                                              {"cannot open", "none.png", "No such file or directory"}));
  for (const char* name : {"cut.png", "cut.jpg"}) {
    const auto px = picture(64, 64, 3);
    if (std::string(name) == "cut.png")
      write_png(dir.file(name), px, 64, 64, 3);
    else
      write_jpeg(dir.file(name), px, 64, 64, 3);
    const std::string bytes = read_file(dir.file(name));
    std::ofstream(dir.file(name), std::ios::binary) << bytes.substr(0, bytes.size() / 3);
    EXPECT_TRUE(
        testing::throws_with<DataError>([&] { decode_image(dir.file(name)); }, {"cannot decode", name}))
        << name;
  }
}

TEST(Images, CsvManifestWithIndexNameAndRealLabels) {
  testing::TempDir dir;
  make_dirs(dir.file("img"));
  std::ofstream(dir.file("train.csv"))
      << "path,kind,score,level\nimg/a.png,cat,0.5,2\n\"img/b, c.png\",dog,1.25,0\n"
      << dir.file("img/d.png") << ",cat,2,1\n";
  std::ofstream(dir.file("test.csv")) << "path,kind,score,level\nimg/e.png,dog,3,1\n";
  const ImageList train = read_image_csv(dir.file("train.csv"));
  EXPECT_EQ(train.paths, (std::vector<std::string>{dir.file("img/a.png"), dir.file("img/b, c.png"),
                                                   dir.file("img/d.png")}));
  EXPECT_EQ(train.label_order, (std::vector<std::string>{"kind", "score", "level"}));
  EXPECT_EQ(train.labels.at("kind"), (std::vector<std::int64_t>{0, 1, 0}));
  EXPECT_EQ(train.class_names.at("kind"), (std::vector<std::string>{"cat", "dog"}));
  EXPECT_EQ(train.float_labels.at("score"), (std::vector<double>{0.5, 1.25, 2.0}));
  EXPECT_EQ(train.labels.at("level"), (std::vector<std::int64_t>{2, 0, 1}));
  const ImageList test = read_image_csv(dir.file("test.csv"), dir.file("train.csv"));
  EXPECT_EQ(test.labels.at("kind"), (std::vector<std::int64_t>{1})) << "numbered by the training CSV's names";
  std::ofstream(dir.file("bad.csv")) << "path,kind,score,level\nimg/e.png,bird,3,1\n";
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { read_image_csv(dir.file("bad.csv"), dir.file("train.csv")); }, {"'bird'", "cat, dog"}));
  // A real-valued column with a missing value written as NaN (or an overflow, inf): refused,
  // naming the row (before, its mean and standard deviation were NaN, and the cache's manifest
  // that records them could not be read back).
  for (const char* v : {"NaN", "inf", "1e999"}) {
    std::ofstream(dir.file("nan.csv")) << "path,kind,score\nimg/a.png,cat,0.5\nimg/b.png,dog," << v << "\n";
    EXPECT_TRUE(testing::throws_with<DataError>([&] { read_image_csv(dir.file("nan.csv")); },
                                                {"nan.csv: row 2 has score '", "not a finite number"}))
        << v;
  }
  std::ofstream(dir.file("short.csv")) << "path,kind\nimg/a.png\n";
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_image_csv(dir.file("short.csv")); },
                                              {"short.csv:2", "1 fields"}));
  // A UTF-8 byte-order mark (Excel's "CSV UTF-8") and Windows line ends are read through.
  std::ofstream(dir.file("excel.csv")) << "\xEF\xBB\xBFpath,kind\r\nimg/a.png,cat\r\nimg/e.png,dog\r\n";
  const ImageList excel = read_image_csv(dir.file("excel.csv"));
  EXPECT_EQ(excel.label_order, (std::vector<std::string>{"kind"}));
  EXPECT_EQ(excel.class_names.at("kind"), (std::vector<std::string>{"cat", "dog"}));
  std::ofstream(dir.file("nohead.csv")) << "file,kind\na.png,x\n";
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { read_image_csv(dir.file("nohead.csv")); },
                                      {"header must name a column path (or file_name", "'file,kind'"}));
  std::ofstream(dir.file("paths.csv")) << "path\nimg/a.png\n";
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_image_csv(dir.file("paths.csv")); },
                                              {"and a label column", "got 'path'"}))
      << "training needs a label column";
  EXPECT_EQ(read_image_table_paths({dir.file("paths.csv"), TableFormat::csv}),
            std::vector<std::string>{dir.file("img/a.png")})
      << "predict needs only the paths";
  // Semicolons, as spreadsheets save "CSV" in locales with a decimal comma, and tabs: named.
  std::ofstream(dir.file("semi.csv")) << "path;kind\nimg/a.png;cat\n";
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { read_image_csv(dir.file("semi.csv")); },
      {"got 'path;kind' (its fields are separated by ';')", "save it with commas"}));
  std::ofstream(dir.file("tabs.csv")) << "path\tkind\nimg/a.png\tcat\n";
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { read_image_csv(dir.file("tabs.csv")); }, {"separated by tabs"}));
}

// Hugging Face's imagefolder metadata: metadata.jsonl / metadata.csv beside the images, the path
// in a column file_name (anywhere), the other columns features; a JSON list of labels is a
// multi-label source. Read as the CSV manifest with path first is.
TEST(Images, JsonManifestsAndFileNameColumns) {
  testing::TempDir dir;
  make_dirs(dir.file("train"));
  std::ofstream(dir.file("train/metadata.jsonl"))
      << R"({"kind": "cat", "file_name": "a.png", "score": 0.5, "level": 2, "tags": ["indoor"], "box": {"x": 1}})"
      << "\n"
      << R"({"file_name": "b.png", "kind": "dog", "score": 1.25, "level": 0, "tags": [], "box": {"x": 2}})"
      << "\n"
      << R"({"kind": "cat", "score": 2, "level": 1, "tags": ["outdoor", "indoor"], "box": null, "file_name": ")"
      << dir.file("d.png") << "\"}\n";
  std::ofstream(dir.file("train/metadata.csv"))
      << "kind,file_name,score,level\ncat,a.png,0.5,2\ndog,b.png,1.25,0\n"
      << "cat," << dir.file("d.png") << ",2,1\n";
  const ImageList json = read_image_table({dir.file("train/metadata.jsonl"), TableFormat::json});
  const ImageList csv = read_image_table({dir.file("train/metadata.csv"), TableFormat::csv});
  const std::vector<std::string> paths{dir.file("train/a.png"), dir.file("train/b.png"), dir.file("d.png")};
  EXPECT_EQ(json.paths, paths);
  EXPECT_EQ(csv.paths, paths);
  EXPECT_EQ(csv.label_order, (std::vector<std::string>{"kind", "score", "level"}));
  EXPECT_EQ(json.label_order, (std::vector<std::string>{"kind", "score", "level", "tags"}));
  for (const auto& l : {"kind", "level"}) EXPECT_EQ(json.labels.at(l), csv.labels.at(l)) << l;
  EXPECT_EQ(json.float_labels.at("score"), csv.float_labels.at("score"));
  EXPECT_EQ(json.class_names.at("kind"), (std::vector<std::string>{"cat", "dog"}));
  EXPECT_EQ(json.bit_names.at("tags"), (std::vector<std::string>{"indoor", "outdoor"}));
  EXPECT_EQ(json.labels.at("tags"), (std::vector<std::int64_t>{1, 0, 3}));
  EXPECT_EQ(json.left_out, std::vector<std::string>{"box"});
  // A test manifest, keys in another order, numbered by the training manifest's names.
  std::ofstream(dir.file("test.json")) << R"([{"tags": ["outdoor"], "level": 1, "score": 3, "kind": "dog",)"
                                       << R"( "box": {}, "file_name": "e.png"}])";
  const ImageList test = read_image_table({dir.file("test.json"), TableFormat::json},
                                          {dir.file("train/metadata.jsonl"), TableFormat::json});
  EXPECT_EQ(test.paths, std::vector<std::string>{dir.file("e.png")});
  EXPECT_EQ(test.labels.at("kind"), std::vector<std::int64_t>{1});
  EXPECT_EQ(test.labels.at("tags"), std::vector<std::int64_t>{2});
  EXPECT_EQ(read_image_table_paths({dir.file("test.json"), TableFormat::json}),
            std::vector<std::string>{dir.file("e.png")});
  // A list of labels is a label column: a manifest of file_name and tags alone trains (before,
  // refused as having no label column: the check saw only the keys of one value).
  std::ofstream(dir.file("tagsonly.jsonl")) << R"({"file_name": "a.png", "tags": ["x"]})"
                                            << "\n"
                                            << R"({"file_name": "b.png", "tags": ["y", "x"]})"
                                            << "\n";
  const ImageList tags_only = read_image_table({dir.file("tagsonly.jsonl"), TableFormat::json});
  EXPECT_EQ(tags_only.label_order, std::vector<std::string>{"tags"});
  EXPECT_EQ(tags_only.labels.at("tags"), (std::vector<std::int64_t>{1, 3}));
  std::ofstream(dir.file("boxonly.jsonl")) << R"({"file_name": "a.png", "box": {"x": 1}})"
                                           << "\n";
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        read_image_table({dir.file("boxonly.jsonl"), TableFormat::json});
      },
      {"boxonly.jsonl: the records must have a column path (or file_name",
       "and a label column, got 'file_name'"}));
  std::ofstream(dir.file("nopath.jsonl")) << R"({"image": "a.png", "kind": "cat"})"
                                          << "\n";
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        read_image_table({dir.file("nopath.jsonl"), TableFormat::json});
      },
      {"nopath.jsonl:1: the records must have a column path (or file_name", "got 'image,kind'"}));
  std::ofstream(dir.file("emptypath.jsonl")) << R"({"path": "a.png", "kind": "cat"})"
                                             << "\n"
                                             << R"({"path": null, "kind": "dog"})"
                                             << "\n";
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        read_image_table({dir.file("emptypath.jsonl"), TableFormat::json});
      },
      {"emptypath.jsonl:2: empty path"}));
}

// Files of one byte (listings read names, not contents) at paths under `dir`, folders made.
void touch_files(const testing::TempDir& dir, std::initializer_list<const char*> paths) {
  for (const char* p : paths) {
    make_dirs(parent_path(dir.file(p)));
    std::ofstream(dir.file(p)) << "x";
  }
}

TEST(Images, ClassFoldersNumberClassesBySortedName) {
  testing::TempDir dir;
  // Hidden entries are left out: a notebook's checkpoints folder, macOS's ._ resource forks.
  make_dirs(dir.file("test/.git"));
  touch_files(dir, {"train/zebra/1.PNG", "train/ant/b.jpg", "train/ant/a.jpeg", "train/ant/notes.txt",
                    "train/ant/._a.jpeg", "train/.ipynb_checkpoints/c.png", "test/ant/x.png"});
  const ImageList train = read_image_folders(dir.file("train"));
  EXPECT_EQ(train.paths, (std::vector<std::string>{dir.file("train/ant/a.jpeg"), dir.file("train/ant/b.jpg"),
                                                   dir.file("train/zebra/1.PNG")}));
  EXPECT_EQ(train.labels.at("class"), (std::vector<std::int64_t>{0, 0, 1}));
  EXPECT_EQ(train.class_names.at("class"), (std::vector<std::string>{"ant", "zebra"}));
  EXPECT_EQ(train.not_images, (std::map<std::string, std::int64_t>{{".txt", 1}}));
  EXPECT_EQ(read_image_folders(dir.file("test"), dir.file("train")).labels.at("class"),
            (std::vector<std::int64_t>{0}));
  make_dirs(dir.file("test/bee"));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { read_image_folders(dir.file("test"), dir.file("train")); }, {"bee", "ant, zebra"}));
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { read_image_folders(dir.file("nope")); }, {"not a directory"}));
  // A training class without images is refused, as torchvision's ImageFolder refuses it; a
  // test split may lack a class.
  make_dirs(dir.file("train/bee"));
  std::ofstream(dir.file("train/bee/README")) << "x";
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_image_folders(dir.file("train")); },
                                              {"class folder '" + dir.file("train/bee") + "' holds no images",
                                               "only other files (1 without extension)"}));
  make_dirs(dir.file("test/ant"));
  std::ofstream(dir.file("train/bee/b.webp")) << "x";
  EXPECT_EQ(read_image_folders(dir.file("test"), dir.file("train")).paths.size(), 1U);
}

// Sub-folders of a class are read, in torchvision's ImageFolder order (sorted(os.walk(...)):
// a folder's files before its sub-folders' when its path sorts first), through symbolic links;
// a link back up is refused.
TEST(Images, ClassFoldersReadTheirSubFoldersInTorchvisionsOrder) {
  testing::TempDir dir;
  touch_files(dir, {"train/cat/b.png", "train/cat/a/x.png", "train/cat/a b/y.jpg", "train/cat/a/z/q.webp",
                    "train/cat/Z.png", "train/dog/k.png", "other/m.png"});
  make_symlink(dir.file("other"), dir.file("train/dog/linked"));
  const ImageList train = read_image_folders(dir.file("train"));
  EXPECT_EQ(train.paths,
            (std::vector<std::string>{dir.file("train/cat/Z.png"), dir.file("train/cat/b.png"),
                                      dir.file("train/cat/a/x.png"), dir.file("train/cat/a b/y.jpg"),
                                      dir.file("train/cat/a/z/q.webp"), dir.file("train/dog/k.png"),
                                      dir.file("train/dog/linked/m.png")}));
  EXPECT_EQ(train.labels.at("class"), (std::vector<std::int64_t>{0, 0, 0, 0, 0, 1, 1}));
  make_symlink(dir.file("train/cat"), dir.file("train/cat/a/z/up"));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { read_image_folders(dir.file("train")); },
      {"'" + dir.file("train/cat/a/z/up") + "' leads back to", "a symbolic link loop"}));
  remove_symlink(dir.file("train/cat/a/z/up"));
  // ImageFolder's other extensions are images; a GIF or HEIC, which it leaves out, is left out
  // and counted.
  touch_files(dir, {"train/dog/scan.TIFF", "train/dog/m.bmp", "train/dog/n.pgm", "train/dog/o.ppm",
                    "train/dog/linked/anim.gif", "train/dog/old.gif", "train/dog/phone.heic"});
  const ImageList more = read_image_folders(dir.file("train"));
  EXPECT_EQ(std::vector<std::string>(more.paths.begin() + 5, more.paths.end()),
            (std::vector<std::string>{dir.file("train/dog/k.png"), dir.file("train/dog/m.bmp"),
                                      dir.file("train/dog/n.pgm"), dir.file("train/dog/o.ppm"),
                                      dir.file("train/dog/scan.TIFF"), dir.file("train/dog/linked/m.png")}));
  EXPECT_EQ(more.left_out_images, (std::map<std::string, std::int64_t>{{".gif", 2}, {".heic", 1}}));
  EXPECT_EQ(more.first_left_out, dir.file("train/dog/old.gif"));
  EXPECT_EQ(
      describe_left_out_images(more.left_out_images, more.first_left_out),
      "left out images torchvision's ImageFolder leaves out too (2 .gif, 1 .heic; the first: " +
          dir.file("train/dog/old.gif") +
          "): a folder's images are its .png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff, .ppm and .pgm files; "
          "list the others in a manifest (data.source = image-csv) to read GIF, PBM and PNM files");
}

// The crop box is torchvision's RandomResizedCrop.get_params: cases worked by hand, and the
// area and aspect ratio every box keeps.
TEST(Augment, TheCropBoxIsTorchvisionsRandomResizedCrop) {
  std::vector<double> u(kCropDraws, 0.0);
  // A quarter of a 64x64 image, aspect 1 (u = 0.5 is log-ratio 0), at row floor(0.5 x 33).
  u[1] = 0.5;
  u[2 * kCropTries] = 0.5;  // the row
  CropBox b = random_resized_crop_box(64, 64, 0.25, 0.25, u.data());
  EXPECT_EQ(std::vector<std::int64_t>({b.y0, b.x0, b.h, b.w}), std::vector<std::int64_t>({16, 0, 32, 32}));
  // The whole area at aspect 4/3 does not fit (74 columns): the next try, aspect 1, does.
  u.assign(kCropDraws, 0.0);
  u[1] = 1.0;
  u[3] = 0.5;
  b = random_resized_crop_box(64, 64, 1.0, 1.0, u.data());
  EXPECT_EQ(std::vector<std::int64_t>({b.y0, b.x0, b.h, b.w}), std::vector<std::int64_t>({0, 0, 64, 64}));
  // 64 wide, 16 high: no box of the whole area fits; the center crop at aspect 4/3.
  b = random_resized_crop_box(16, 64, 1.0, 1.0, u.data());
  EXPECT_EQ(std::vector<std::int64_t>({b.y0, b.x0, b.h, b.w}), std::vector<std::int64_t>({0, 21, 16, 21}));
  // Random draws: every box inside the image; one from a try keeps its area fraction and
  // aspect ratio up to rounding; with crop_scale 1,1 a square image is kept whole.
  const at::Tensor draws = at::rand({2000, kCropDraws}, at::TensorOptions().dtype(at::kDouble)).contiguous();
  for (std::int64_t i = 0; i < draws.size(0); ++i) {
    const double* r = draws.data_ptr<double>() + i * kCropDraws;
    b = random_resized_crop_box(28, 28, 0.35, 1.0, r);
    ASSERT_TRUE(b.y0 >= 0 && b.x0 >= 0 && b.y0 + b.h <= 28 && b.x0 + b.w <= 28 && b.h > 0 && b.w > 0);
    if (b.h == 28 && b.w == 28) continue;  // a fallback, or a try that kept all
    const double area = static_cast<double>(b.h * b.w) / (28.0 * 28.0);
    const double aspect = static_cast<double>(b.w) / static_cast<double>(b.h);
    EXPECT_GE(area, 0.35 * 0.85) << b.h << "x" << b.w;
    EXPECT_TRUE(aspect > 0.75 * 0.9 && aspect < 4.0 / 3.0 * 1.1) << b.h << "x" << b.w;
    b = random_resized_crop_box(28, 28, 1.0, 1.0, r);
    ASSERT_EQ(b.h * b.w, 28 * 28) << "crop_scale 1,1 keeps the whole image";
  }
}

// crop_scale = 1,1, no flip, no jitter: every view is the image itself, bitwise.
TEST(Augment, AViewThatKeepsTheWholeImageIsTheImage) {
  const at::Tensor images = at::randn({6, 3, 28, 28});
  const at::Tensor ids = at::arange(6, at::TensorOptions().dtype(at::kLong));
  AugmentConfig config;
  config.crop_scale = {1.0, 1.0};
  config.flip = false;
  config.jitter = 0;
  PreprocessConfig pre;
  for (std::int64_t view = 1; view <= 3; ++view) {
    EXPECT_TRUE(at::equal(augment_view(images, ids, view, config, pre), images)) << "view " << view;
  }
  config.crop_scale = {0.5, 1.0};
  EXPECT_FALSE(at::equal(augment_view(images, ids, 1, config, pre), images)) << "a smaller crop changes it";
}

}  // namespace
}  // namespace canopy::datasets
