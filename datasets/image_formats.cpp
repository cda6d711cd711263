#include "image_formats.h"

#include <gif_lib.h>
#include <tiffio.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include <ATen/ops/empty.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"

namespace canopy::datasets::decoders {

namespace {

std::uint32_t le16(const std::string& b, std::size_t at) {
  return static_cast<std::uint8_t>(b[at]) | (static_cast<std::uint8_t>(b[at + 1]) << 8);
}
std::uint32_t le32(const std::string& b, std::size_t at) { return le16(b, at) | (le16(b, at + 2) << 16); }

std::string hex(std::uint32_t v) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%X", v);
  return text;
}

// An image of palette indices (or grey values) as PIL holds a "P" (or "L") image, and what
// convert("RGB") makes of it: each index through the palette, an index past its end black.
struct Indexed {
  std::int64_t width = 0, height = 0;
  std::vector<std::uint8_t> index;    // [height * width]
  std::vector<std::uint8_t> palette;  // RGB triples; empty: grey, the index is the value
  at::Tensor to_pixels() const {
    if (palette.empty()) return to_chw(index.data(), height, width, 1, 1);
    // Per channel; past the palette's end: black, as PIL.
    std::array<std::array<std::uint8_t, 256>, 3> table{};
    for (std::size_t i = 0; i < std::min<std::size_t>(palette.size() / 3, 256); ++i)
      for (int c = 0; c < 3; ++c) table[c][i] = palette[i * 3 + c];
    at::Tensor out = at::empty({3, height, width}, at::kByte);
    std::uint8_t* planes = out.data_ptr<std::uint8_t>();
    for (int c = 0; c < 3; ++c)
      for (std::size_t i = 0; i < index.size(); ++i) planes[c * index.size() + i] = table[c][index[i]];
    return out;
  }
};

// ---------------------------------------------------------------------------------------
// BMP, as PIL's BmpImagePlugin reads it.

// A palette of grey entries that PIL reads as grey ("L", or "1" for two entries): entry i is
// (i, i, i), or for two entries black and white.
bool is_grey_ramp(const std::string& b, std::size_t at, std::uint32_t colours, std::uint32_t padding) {
  if (colours > 256) return false;
  for (std::uint32_t i = 0; i < colours; ++i) {
    const std::uint32_t want = colours == 2 ? i * 255 : i;
    const std::size_t e = at + std::size_t{i} * padding;
    if (e + 3 > b.size()) return false;
    for (int ch = 0; ch < 3; ++ch)
      if (static_cast<std::uint8_t>(b[e + ch]) != want) return false;
  }
  return true;
}

// BI_RLE8 / BI_RLE4 data from `at` into indices, in file row order (bottom row first), as
// PIL's BmpRleDecoder: every row must be reached.
std::vector<std::uint8_t> decode_bmp_rle(const std::string& path, const std::string& b, std::size_t at,
                                         std::int64_t width, std::int64_t height, bool rle4) {
  const std::size_t total = static_cast<std::size_t>(width * height);
  std::vector<std::uint8_t> data;
  data.reserve(total);
  std::int64_t x = 0;
  while (data.size() < total && at + 2 <= b.size()) {
    const std::uint8_t count = b[at], byte = b[at + 1];
    at += 2;
    if (count) {  // a run of one index (RLE4: two, alternating)
      const std::int64_t n = std::min<std::int64_t>(count, std::max<std::int64_t>(0, width - x));
      for (std::int64_t i = 0; i < n && data.size() < total; ++i)
        data.push_back(rle4 ? (i % 2 ? byte & 0x0F : byte >> 4) : byte);
      x += n;
    } else if (byte == 0) {  // end of row
      while (data.size() % width) data.push_back(0);
      x = 0;
    } else if (byte == 1) {  // end of image
      break;
    } else if (byte == 2) {  // skip right and up
      if (at + 2 > b.size()) break;
      const std::size_t skip =
          static_cast<std::uint8_t>(b[at]) + static_cast<std::uint8_t>(b[at + 1]) * width;
      at += 2;
      data.resize(data.size() + std::min(total - data.size(), skip), 0);
      x = static_cast<std::int64_t>(data.size() % width);
    } else {  // `byte` indices as written, padded to a 16-bit boundary of the file
      const std::size_t n = std::min<std::size_t>(total - data.size(), byte);
      const std::size_t bytes = rle4 ? (n + 1) / 2 : n, got = std::min(bytes, b.size() - at);
      for (std::size_t i = 0; i < got; ++i) {
        const std::uint8_t v = b[at + i];
        if (!rle4) {
          data.push_back(v);
        } else {
          data.push_back(v >> 4);
          if (i * 2 + 1 < n) data.push_back(v & 0x0F);
        }
      }
      at += got;
      if (got < bytes || data.size() == total) break;
      x += byte;
      if (at % 2) ++at;
    }
  }
  CANOPY_CHECK(data.size() == total, DataError, "cannot decode BMP '", path, "': its ",
               rle4 ? "RLE4" : "RLE8", " data ends after ", data.size(), " of ", total,
               " pixels (cut short or damaged)");
  return data;
}

// A DataError for `path`, "cannot decode <format> '<path>': <what>".
template <typename... Args>
DataError decode_error(const char* format, const std::string& path, const Args&... what) {
  return DataError(canopy::detail::str_cat("cannot decode ", format, " '", path, "': ", what...));
}

// Sides are signed 32-bit numbers in BMP and read as such in Netpbm: more is a damaged header
// (and would overflow width x height where data.max_image_pixels = 0).
void check_sides(const char* format, const std::string& path, std::int64_t width, std::int64_t height,
                 std::int64_t max_pixels) {
  if (width <= 0 || height <= 0 || width > 0x7FFFFFFF || height > 0x7FFFFFFF)
    throw decode_error(format, path, "its size is ", width, " x ", height);
  check_pixels(path, static_cast<std::uint64_t>(width), static_cast<std::uint64_t>(height), max_pixels);
}

// What a BMP's headers say, as PIL's BmpImagePlugin reads them.
struct BmpLayout {
  std::size_t offset = 0;      // of the pixel data
  std::size_t palette_at = 0;  // of the palette, after the headers (and a V3 header's masks)
  std::int64_t width = 0, height = 0;
  std::uint32_t bits = 0, compression = 0, colours = 0, padding = 4;  // palette entry bytes
  bool top_down = false;
  std::array<std::uint32_t, 4> masks{};  // r, g, b, a
  std::size_t stride() const { return ((width * bits + 31) >> 3) & ~std::size_t{3}; }
};

BmpLayout read_bmp_layout(const std::string& path, const std::string& b) {
  const auto fail = [&](const auto&... what) { return decode_error("BMP", path, what...); };
  if (b.size() < 18) throw fail("the file is cut short (", b.size(), " bytes)");
  BmpLayout l;
  l.offset = le32(b, 10);
  const std::uint32_t header = le32(b, 14);
  if (header != 12 && header != 40 && header != 52 && header != 56 && header != 64 && header != 108 &&
      header != 124)
    throw fail("its header of ", header, " bytes is none of the BMP versions (12, 40, 52, 56, 64, 108, 124)");
  if (b.size() < 14 + header) throw fail("the file is cut short in its header");
  l.palette_at = 14 + header;
  if (header == 12) {  // OS/2 1.x
    l.width = le16(b, 18);
    l.height = le16(b, 20);
    l.bits = le16(b, 24);
    l.padding = 3;
  } else {
    l.top_down = static_cast<std::uint8_t>(b[25]) == 0xFF;  // a negative height, as PIL tells it
    l.width = le32(b, 18);
    l.height = l.top_down ? (std::int64_t{1} << 32) - le32(b, 22) : le32(b, 22);
    l.bits = le16(b, 28);
    l.compression = le32(b, 30);
    l.colours = le32(b, 46);
    if (l.compression == 3) {
      if (header >= 52) {
        for (std::uint32_t i = 0; i < (header >= 56 ? 4U : 3U); ++i) l.masks[i] = le32(b, 54 + 4 * i);
      } else {  // the three masks follow a 40-byte header
        if (b.size() < 66) throw fail("the file is cut short in its colour masks");
        for (int i = 0; i < 3; ++i) l.masks[i] = le32(b, 54 + 4 * i);
        l.palette_at += 12;
      }
    }
  }
  if (l.colours == 0) l.colours = l.bits < 32 ? 1U << l.bits : 0;
  if (l.offset == 14 + header && l.bits <= 8) l.offset += std::size_t{l.padding} * l.colours;
  if (l.bits != 1 && l.bits != 4 && l.bits != 8 && l.bits != 16 && l.bits != 24 && l.bits != 32)
    throw fail(l.bits, " bits per pixel: PIL and canopy read 1, 4, 8, 16, 24 and 32");
  return l;
}

// The compression and, for 16-, 24- and 32-bit pixels, the masks that make red, green and
// blue, as PIL supports them (its masks for uncompressed pixels filled in).
void check_bmp_compression(const std::string& path, BmpLayout& l) {
  const auto fail = [&](const auto&... what) { return decode_error("BMP", path, what...); };
  if (l.compression == 3) {
    const std::array<std::uint32_t, 3> rgb{l.masks[0], l.masks[1], l.masks[2]};
    bool known = false;
    if (l.bits == 32) {
      static const std::array<std::array<std::uint32_t, 4>, 8> kLayouts{{
          {0xFF0000, 0xFF00, 0xFF, 0x0},
          {0xFF000000, 0xFF0000, 0xFF00, 0x0},
          {0xFF000000, 0xFF00, 0xFF, 0x0},
          {0xFF000000, 0xFF0000, 0xFF00, 0xFF},
          {0xFF, 0xFF00, 0xFF0000, 0xFF000000},
          {0xFF0000, 0xFF00, 0xFF, 0xFF000000},
          {0xFF000000, 0xFF00, 0xFF, 0xFF0000},
          {0x0, 0x0, 0x0, 0x0},
      }};
      known = std::find(kLayouts.begin(), kLayouts.end(), l.masks) != kLayouts.end();
      if (l.masks == std::array<std::uint32_t, 4>{}) l.masks = {0xFF0000, 0xFF00, 0xFF, 0};  // PIL: BGRA
    } else if (l.bits == 24) {
      known = rgb == std::array<std::uint32_t, 3>{0xFF0000, 0xFF00, 0xFF};
    } else if (l.bits == 16) {
      known = rgb == std::array<std::uint32_t, 3>{0xF800, 0x7E0, 0x1F} ||
              rgb == std::array<std::uint32_t, 3>{0x7C00, 0x3E0, 0x1F};
    }
    if (!known)
      throw fail("its colour masks (red ", hex(l.masks[0]), ", green ", hex(l.masks[1]), ", blue ",
                 hex(l.masks[2]), ", alpha ", hex(l.masks[3]), ") are not a layout PIL reads, for ", l.bits,
                 " bits per pixel");
  } else if (l.compression == 1 || l.compression == 2) {
    if (l.bits > 8) throw fail("RLE compression of ", l.bits, "-bit pixels");
  } else if (l.compression != 0) {
    throw fail("compression ", l.compression, " (",
               l.compression == 4   ? "JPEG"
               : l.compression == 5 ? "PNG"
                                    : "unknown",
               "): PIL and canopy read uncompressed, RLE and bit-field BMPs");
  } else if (l.bits == 16) {
    l.masks = {0x7C00, 0x3E0, 0x1F, 0};
  } else {
    l.masks = {0xFF0000, 0xFF00, 0xFF, 0};
  }
}

// The uncompressed rows must all be in the file.
void check_bmp_rows(const std::string& path, const std::string& b, const BmpLayout& l) {
  if (l.offset > b.size() || (b.size() - l.offset) / l.stride() < static_cast<std::size_t>(l.height))
    throw decode_error("BMP", path, "the file is cut short: ", l.height, " rows of ", l.stride(),
                       " bytes from byte ", l.offset, ", ", b.size(), " bytes in all");
}

// 1-, 4- and 8-bit pixels (uncompressed or RLE): indices through the palette, or grey.
at::Tensor bmp_palette_pixels(const std::string& path, const std::string& b, const BmpLayout& l) {
  if (l.colours == 0 || l.colours > 65536)
    throw decode_error("BMP", path, "a palette of ", l.colours, " colours");
  Indexed img;
  img.width = l.width;
  img.height = l.height;
  const bool grey = is_grey_ramp(b, l.palette_at, l.colours, l.padding);
  if (!grey) {
    if (l.palette_at + std::size_t{l.padding} * l.colours > b.size())
      throw decode_error("BMP", path, "the file is cut short in its palette");
    for (std::uint32_t i = 0; i < std::min<std::uint32_t>(l.colours, 256); ++i)
      for (int ch = 2; ch >= 0; --ch)
        img.palette.push_back(b[l.palette_at + std::size_t{i} * l.padding + ch]);
  }
  const std::int64_t width = l.width, height = l.height;
  // The file's rows run bottom up unless top_down.
  const auto row_of = [&](std::int64_t y) { return l.top_down ? y : height - 1 - y; };
  img.index.resize(static_cast<std::size_t>(width * height));
  if (l.compression == 1 || l.compression == 2) {
    if (l.offset > b.size())
      throw decode_error("BMP", path, "its pixel data starts at ", l.offset, ", past the end of the file");
    const std::vector<std::uint8_t> rows =
        decode_bmp_rle(path, b, l.offset, width, height, l.compression == 2);
    for (std::int64_t y = 0; y < height; ++y)
      std::copy_n(&rows[row_of(y) * width], width, &img.index[y * width]);
  } else {
    check_bmp_rows(path, b, l);
    for (std::int64_t y = 0; y < height; ++y) {
      const auto* row = reinterpret_cast<const std::uint8_t*>(b.data() + l.offset + y * l.stride());
      std::uint8_t* out = &img.index[row_of(y) * width];
      if (l.bits == 8) {
        std::memcpy(out, row, static_cast<std::size_t>(width));
        continue;
      }
      for (std::int64_t x = 0; x < width; ++x)
        out[x] = static_cast<std::uint8_t>(l.bits == 4 ? (row[x / 2] >> (x % 2 ? 0 : 4)) & 0x0F
                                                       : (row[x / 8] >> (7 - x % 8)) & 1);
    }
  }
  if (grey && l.colours <= 2)  // PIL's "1": 0 black, anything else white
    for (auto& v : img.index) v = v ? 255 : 0;
  return img.to_pixels();
}

// 16-, 24- and 32-bit pixels: each channel by its mask. 8-bit masks are the byte; 5- and 6-bit
// ones are scaled as PIL's BGR;15 and BGR;16 unpackers scale them (v * 255 / max, rounded down).
at::Tensor bmp_rgb_pixels(const std::string& path, const std::string& b, const BmpLayout& l) {
  check_bmp_rows(path, b, l);
  const std::size_t stride = l.stride(), bytes = l.bits / 8;
  std::array<int, 3> shift{}, width_bits{};
  for (int ch = 0; ch < 3; ++ch) {
    std::uint32_t m = l.masks[ch];
    while (m && !(m & 1)) {
      m >>= 1;
      ++shift[ch];
    }
    while (m & 1) {
      m >>= 1;
      ++width_bits[ch];
    }
  }
  const auto* data = reinterpret_cast<const std::uint8_t*>(b.data() + l.offset);
  if (width_bits == std::array<int, 3>{8, 8, 8})  // each channel a byte of the pixel: no unpacking
    return planes_from_rows(data, l.height, l.width, bytes, stride,
                            {shift[0] / 8, shift[1] / 8, shift[2] / 8}, 3, !l.top_down);
  std::vector<std::uint8_t> rgb(static_cast<std::size_t>(l.width * l.height * 3));
  for (std::int64_t y = 0; y < l.height; ++y) {
    const std::uint8_t* row = data + (l.top_down ? y : l.height - 1 - y) * stride;
    std::uint8_t* out = &rgb[y * l.width * 3];
    for (std::int64_t x = 0; x < l.width; ++x, row += bytes, out += 3) {
      std::uint32_t v = 0;
      for (std::size_t i = 0; i < bytes; ++i) v |= std::uint32_t{row[i]} << (8 * i);
      for (int ch = 0; ch < 3; ++ch) {
        const std::uint32_t max = (1U << width_bits[ch]) - 1, c = (v >> shift[ch]) & max;
        out[ch] = static_cast<std::uint8_t>(width_bits[ch] == 8 ? c : c * 255 / max);
      }
    }
  }
  return to_chw(rgb.data(), l.height, l.width, 3, 3);
}

}  // namespace

DecodedImage decode_bmp(const std::string& path, std::int64_t max_pixels) {
  const std::string b = read_file(path);
  BmpLayout layout = read_bmp_layout(path, b);
  check_sides("BMP", path, layout.width, layout.height, max_pixels);
  check_bmp_compression(path, layout);
  return {layout.bits <= 8 ? bmp_palette_pixels(path, b, layout) : bmp_rgb_pixels(path, b, layout), 1};
}

// ---------------------------------------------------------------------------------------
// Netpbm (PBM, PGM, PPM; binary and plain), as PIL's PpmImagePlugin reads it.

namespace {

bool is_pnm_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

// PIL's rounding: Python's round() of v / maxval * out_max, halves to even.
std::uint32_t scale_sample(std::uint32_t v, std::uint32_t maxval, std::uint32_t out_max) {
  return std::min<std::uint32_t>(
      out_max, static_cast<std::uint32_t>(std::nearbyint(static_cast<double>(v) / maxval * out_max)));
}

// A plain (P1-P3) file's samples from `at` into `px`: numbers in text, comments anywhere; a
// PBM's digits need no blank between them (1 black, 0 white); others through `to_byte`.
template <typename ToByte>
void read_plain_samples(const std::string& path, const std::string& b, std::size_t at, char kind,
                        std::int64_t maxval, const ToByte& to_byte, std::vector<std::uint8_t>& px) {
  const auto fail = [&](const auto&... what) { return decode_error("Netpbm image", path, what...); };
  const std::size_t count = px.size();
  std::size_t i = 0;
  while (i < count && at < b.size()) {
    const char c = b[at];
    if (is_pnm_space(c)) {
      ++at;
    } else if (c == '#') {
      while (at < b.size() && b[at] != '\r' && b[at] != '\n') ++at;
    } else if (kind == '1') {
      if (c != '0' && c != '1') throw fail("'", c, "' in a plain PBM's data (0 or 1 expected)");
      px[i++] = c == '1' ? 0 : 255;
      ++at;
    } else {
      std::size_t end = at;
      while (end < b.size() && b[end] >= '0' && b[end] <= '9' && end - at <= 10) ++end;
      if (end == at || end - at > 10 || (end < b.size() && !is_pnm_space(b[end]) && b[end] != '#'))
        throw fail("'", b.substr(at, std::min<std::size_t>(12, b.size() - at)),
                   "' in its data is not a sample");
      const std::int64_t v = std::stoll(b.substr(at, end - at));
      if (v > maxval) throw fail("sample ", v, " is above maxval ", maxval);
      px[i++] = to_byte(static_cast<std::uint32_t>(v));
      at = end;
    }
  }
  if (i < count) throw fail("the file is cut short: ", i, " of ", count, " samples");
}

}  // namespace

DecodedImage decode_netpbm(const std::string& path, std::int64_t max_pixels) {
  const std::string b = read_file(path);
  const auto fail = [&](const auto&... what) { return decode_error("Netpbm image", path, what...); };
  std::size_t at = 0;
  std::string magic;
  while (at < b.size() && magic.size() < 6 && !is_pnm_space(b[at])) magic += b[at++];
  if (at < b.size() && magic.size() < 6) ++at;
  if (magic.size() != 2 || magic[0] != 'P' || magic[1] < '1' || magic[1] > '6')
    throw fail("'", magic, "' files (a float or CMYK map) are not read: PBM, PGM and PPM (P1 to P6) are");
  const char kind = magic[1];
  // A header token: blanks skipped, '#' to the end of its line a comment, one blank after it
  // consumed (the data of a binary file starts there).
  const auto token = [&]() -> std::int64_t {
    std::string t;
    while (at < b.size() && t.size() <= 10) {
      const char c = b[at++];
      if (is_pnm_space(c)) {
        if (t.empty()) continue;
        break;
      }
      if (c == '#') {  // to the end of its line (the line's end consumed)
        while (at < b.size() && b[at] != '\r' && b[at] != '\n') ++at;
        if (at < b.size()) ++at;
        continue;
      }
      t += c;
    }
    if (t.empty()) throw fail("the header ends early");
    if (t.size() > 10 || !std::all_of(t.begin(), t.end(), [](char c) { return c >= '0' && c <= '9'; }))
      throw fail("'", t, "' in its header is not a size");
    return std::stoll(t);
  };
  const std::int64_t width = token(), height = token();
  const bool bitmap = kind == '1' || kind == '4';
  const std::int64_t maxval = bitmap ? 1 : token();
  if (!bitmap && (maxval <= 0 || maxval >= 65536)) throw fail("maxval ", maxval, " is outside 1 to 65535");
  check_sides("Netpbm image", path, width, height, max_pixels);
  const std::int64_t channels = kind == '3' || kind == '6' ? 3 : 1;
  const std::size_t count = static_cast<std::size_t>(width * height * channels);
  // Grey above 8 bits is PIL's 32-bit "I" image (scaled to 0-65535), whose convert("RGB")
  // clips at 255: canopy takes its high byte, as for a 16-bit PNG.
  const bool wide_grey = channels == 1 && maxval > 255;
  const auto to_byte = [&](std::uint32_t v) {
    return static_cast<std::uint8_t>(wide_grey ? scale_sample(v, maxval, 65535) >> 8
                                               : scale_sample(v, maxval, 255));
  };
  std::vector<std::uint8_t> px(count);
  if (kind == '4') {
    const std::size_t stride = static_cast<std::size_t>((width + 7) / 8);
    if ((b.size() - at) / stride < static_cast<std::size_t>(height))
      throw fail("the file is cut short: ", height, " rows of ", stride, " bytes expected");
    for (std::int64_t y = 0; y < height; ++y)
      for (std::int64_t x = 0; x < width; ++x)
        px[y * width + x] =
            (static_cast<std::uint8_t>(b[at + y * stride + x / 8]) >> (7 - x % 8)) & 1 ? 0 : 255;
  } else if (kind >= '5') {
    const std::size_t in = maxval < 256 ? 1 : 2;
    if (maxval == 255 && (b.size() - at) >= count)  // the samples are the values
      return {planes_from_rows(reinterpret_cast<const std::uint8_t*>(b.data() + at), height, width,
                               static_cast<std::size_t>(channels), static_cast<std::size_t>(width * channels),
                               {0, 1, 2}, channels, false),
              1};
    if ((b.size() - at) / in < count)
      throw fail("the file is cut short: ", count, " samples of ", in, " byte(s) expected");
    for (std::size_t i = 0; i < count; ++i) {
      const auto* d = reinterpret_cast<const std::uint8_t*>(b.data() + at + i * in);
      const std::uint32_t v = in == 1 ? d[0] : (d[0] << 8) | d[1];
      px[i] = to_byte(v);
    }
  } else {
    read_plain_samples(path, b, at, kind, maxval, to_byte, px);
  }
  return {to_chw(px.data(), height, width, channels, channels), 1};
}

// ---------------------------------------------------------------------------------------
// GIF: the first frame, as PIL's GifImagePlugin gives it (giflib decodes).

namespace {

struct GifCloser {
  void operator()(GifFileType* g) const {
    int ignored = 0;
    DGifCloseFile(g, &ignored);
  }
};

// PIL reads a palette whose entry i is (i, i, i) as none: the image is grey.
bool is_identity_palette(const ColorMapObject* map) {
  for (int i = 0; i < map->ColorCount; ++i) {
    const GifColorType& c = map->Colors[i];
    if (c.Red != i || c.Green != i || c.Blue != i) return false;
  }
  return true;
}

}  // namespace

DecodedImage decode_gif(const std::string& path, std::int64_t max_pixels) {
  int error = 0;
  std::unique_ptr<GifFileType, GifCloser> gif(DGifOpenFileName(path.c_str(), &error));
  const auto fail = [&](int code) {
    const char* what = GifErrorString(code);
    return DataError(
        canopy::detail::str_cat("cannot decode GIF '", path, "': ", what ? what : "unknown error",
                                code == D_GIF_ERR_READ_FAILED ? " (the file is cut short)" : ""));
  };
  if (!gif) throw fail(error);
  int transparency = -1;
  for (;;) {
    GifRecordType type = UNDEFINED_RECORD_TYPE;
    if (DGifGetRecordType(gif.get(), &type) == GIF_ERROR) throw fail(gif->Error);
    if (type == TERMINATE_RECORD_TYPE) throw decode_error("GIF", path, "it holds no image");
    if (type == EXTENSION_RECORD_TYPE) {
      int code = 0;
      GifByteType* block = nullptr;
      if (DGifGetExtension(gif.get(), &code, &block) == GIF_ERROR) throw fail(gif->Error);
      if (code == GRAPHICS_EXT_FUNC_CODE && block && block[0] >= 4 && (block[1] & 1)) transparency = block[4];
      while (block)
        if (DGifGetExtensionNext(gif.get(), &block) == GIF_ERROR) throw fail(gif->Error);
      continue;
    }
    if (type != IMAGE_DESC_RECORD_TYPE) continue;
    if (DGifGetImageDesc(gif.get()) == GIF_ERROR) throw fail(gif->Error);
    const GifImageDesc& frame = gif->Image;
    // PIL's canvas: the logical screen, grown to hold the frame; outside the frame, the
    // transparent index where there is one, else index 0.
    Indexed img;
    img.width = std::max<std::int64_t>(gif->SWidth, std::int64_t{frame.Left} + frame.Width);
    img.height = std::max<std::int64_t>(gif->SHeight, std::int64_t{frame.Top} + frame.Height);
    check_pixels(path, img.width, img.height, max_pixels);
    img.index.assign(static_cast<std::size_t>(img.width * img.height),
                     static_cast<std::uint8_t>(transparency >= 0 ? transparency : 0));
    // The frame's own palette, else the file's; PIL passes over one that is the identity ramp
    // (entry i grey i): the frame's own then gives way to the file's, and with neither left the
    // image is grey, the index its value.
    const ColorMapObject* map =
        frame.ColorMap && !is_identity_palette(frame.ColorMap) ? frame.ColorMap : nullptr;
    if (!map && gif->SColorMap && !is_identity_palette(gif->SColorMap)) map = gif->SColorMap;
    if (map)
      for (int i = 0; i < map->ColorCount; ++i)
        img.palette.insert(img.palette.end(),
                           {map->Colors[i].Red, map->Colors[i].Green, map->Colors[i].Blue});
    // Interlaced rows arrive in four passes: every 8th from 0, every 8th from 4, every 4th
    // from 2, every 2nd from 1. Each is decoded into its place on the canvas.
    static constexpr int kStart[4] = {0, 4, 2, 1}, kStep[4] = {8, 8, 4, 2};
    std::vector<int> order;
    if (frame.Interlace) {
      for (int pass = 0; pass < 4; ++pass)
        for (int y = kStart[pass]; y < frame.Height; y += kStep[pass]) order.push_back(y);
    } else {
      for (int y = 0; y < frame.Height; ++y) order.push_back(y);
    }
    for (const int y : order)
      if (frame.Width > 0 && DGifGetLine(gif.get(), &img.index[(frame.Top + y) * img.width + frame.Left],
                                         frame.Width) == GIF_ERROR)
        throw fail(gif->Error);
    return {img.to_pixels(), 1};
  }
}

// ---------------------------------------------------------------------------------------
// TIFF: the first page, as PIL's TiffImagePlugin gives it (libtiff decodes), turned as its
// Orientation tag says (PIL applies it when the image is loaded).

namespace {

struct TiffCloser {
  void operator()(TIFF* t) const { TIFFClose(t); }
};

struct TiffMessages {
  std::string first_error;
};

int tiff_error(TIFF*, void* user, const char* module, const char* fmt, va_list ap) {
  auto* messages = static_cast<TiffMessages*>(user);
  if (messages->first_error.empty()) {
    char text[512];
    std::vsnprintf(text, sizeof text, fmt, ap);
    messages->first_error = module ? canopy::detail::str_cat(module, ": ", text) : text;
  }
  return 1;
}

int tiff_warning(TIFF*, void*, const char*, const char*, va_list) { return 1; }  // as PIL: not errors

// Whether the sample after the colour ones is an associated (premultiplied) alpha.
bool associated_alpha(TIFF* tif, std::uint16_t spp, std::uint16_t colours) {
  std::uint16_t count = 0;
  std::uint16_t* types = nullptr;
  return spp == colours + 1 && colours < 4 && TIFFGetField(tif, TIFFTAG_EXTRASAMPLES, &count, &types) &&
         count == 1 && types[0] == EXTRASAMPLE_ASSOCALPHA;
}

// What a TIFF's first page holds, checked against what canopy reads.
struct TiffLayout {
  std::uint32_t width = 0, height = 0;
  std::uint16_t spp = 1, bits = 1, photometric = 0, planar = PLANARCONFIG_CONTIG;
  std::uint16_t orientation = ORIENTATION_TOPLEFT;
  std::uint16_t colours = 0;  // samples that make the colour: 1 grey or palette, 3 RGB, 4 CMYK
  bool grey = false, premultiplied = false;
  bool separate() const { return planar == PLANARCONFIG_SEPARATE; }
  std::uint16_t planes() const { return separate() ? spp : 1; }
  std::size_t per_pixel() const { return separate() ? 1 : spp; }  // samples per pixel in a plane
  std::size_t row_bytes(std::uint32_t columns) const {
    return (std::size_t{columns} * per_pixel() * bits + 7) / 8;
  }
};

// A TIFF opened with its errors kept (libtiff's handlers, per handle), for messages.
struct TiffFile {
  std::string path;
  TiffMessages messages;
  std::unique_ptr<TIFF, TiffCloser> tif;
  template <typename... Args>
  DataError fail(const Args&... what) const {
    return decode_error("TIFF", path, what...);
  }
  DataError libtiff_fail(const std::string& doing) const {
    return fail(doing, messages.first_error.empty() ? "" : ": ", messages.first_error);
  }
};

TiffLayout read_tiff_layout(const TiffFile& f, std::int64_t max_pixels) {
  TIFF* tif = f.tif.get();
  TiffLayout l;
  std::uint16_t format = SAMPLEFORMAT_UINT, compression = COMPRESSION_NONE;
  TIFFGetField(tif, TIFFTAG_IMAGEWIDTH, &l.width);
  TIFFGetField(tif, TIFFTAG_IMAGELENGTH, &l.height);
  TIFFGetFieldDefaulted(tif, TIFFTAG_SAMPLESPERPIXEL, &l.spp);
  TIFFGetFieldDefaulted(tif, TIFFTAG_BITSPERSAMPLE, &l.bits);
  TIFFGetFieldDefaulted(tif, TIFFTAG_SAMPLEFORMAT, &format);
  TIFFGetFieldDefaulted(tif, TIFFTAG_PLANARCONFIG, &l.planar);
  TIFFGetFieldDefaulted(tif, TIFFTAG_COMPRESSION, &compression);
  TIFFGetFieldDefaulted(tif, TIFFTAG_ORIENTATION, &l.orientation);
  if (!TIFFGetField(tif, TIFFTAG_PHOTOMETRIC, &l.photometric))
    throw f.fail("it has no PhotometricInterpretation tag");
  if (l.width == 0 || l.height == 0) throw f.fail("its size is ", l.width, " x ", l.height);
  check_pixels(f.path, l.width, l.height, max_pixels);
  const std::string convert =
      " (in Python: PIL.Image.open(path).convert(\"RGB\").save(new_path_ending_in_png) where PIL reads it)";
  if (format != SAMPLEFORMAT_UINT)
    throw f.fail(format == SAMPLEFORMAT_IEEEFP ? "floating-point" : "signed",
                 " samples: canopy reads unsigned ones; convert it", convert);
  if (l.photometric == PHOTOMETRIC_YCBCR && compression == COMPRESSION_JPEG) {
    TIFFSetField(tif, TIFFTAG_JPEGCOLORMODE, JPEGCOLORMODE_RGB);  // as PIL: libjpeg makes RGB
    l.photometric = PHOTOMETRIC_RGB;
  }
  // What each pixel's samples are: grey (1 and an ignored alpha), RGB (3 and an alpha), a
  // palette index, CMYK.
  l.grey = l.photometric == PHOTOMETRIC_MINISWHITE || l.photometric == PHOTOMETRIC_MINISBLACK;
  l.colours = l.grey || l.photometric == PHOTOMETRIC_PALETTE ? 1
              : l.photometric == PHOTOMETRIC_RGB             ? 3
              : l.photometric == PHOTOMETRIC_SEPARATED       ? 4
                                                             : 0;
  if (l.colours == 0)
    throw f.fail("photometric interpretation ", l.photometric,
                 l.photometric == PHOTOMETRIC_YCBCR ? " (YCbCr without JPEG compression)" : "",
                 ": canopy reads grey, RGB, palette and CMYK TIFFs; convert it", convert);
  if (l.spp < l.colours || l.spp > l.colours + 1)
    throw f.fail(l.spp, " samples per pixel for photometric interpretation ", l.photometric, " (", l.colours,
                 " or ", l.colours + 1, " expected",
                 l.spp > 4 ? "; a multispectral image? canopy reads grey, RGB, palette and CMYK" : "", ")");
  const bool bits_ok =
      l.bits == 8 ||
      (l.bits == 16 && l.photometric != PHOTOMETRIC_PALETTE && l.photometric != PHOTOMETRIC_SEPARATED) ||
      ((l.bits == 1 || l.bits == 2 || l.bits == 4) && l.colours == 1);
  if (!bits_ok)
    throw f.fail(l.bits, " bits per sample for photometric interpretation ", l.photometric, convert);
  l.premultiplied = l.bits == 8 && associated_alpha(tif, l.spp, l.colours);
  return l;
}

// The samples as stored, unpacked by libtiff: [plane][row][column * samples in a plane] of
// `bits` each, rows whole bytes; strips or tiles.
std::vector<std::uint8_t> read_tiff_samples(const TiffFile& f, const TiffLayout& l) {
  TIFF* tif = f.tif.get();
  const std::size_t row_bytes = l.row_bytes(l.width);
  std::vector<std::uint8_t> raw(row_bytes * l.height * l.planes());
  if (!TIFFIsTiled(tif)) {
    for (std::uint16_t p = 0; p < l.planes(); ++p)
      for (std::uint32_t y = 0; y < l.height; ++y)
        if (TIFFReadScanline(tif, &raw[(p * l.height + y) * row_bytes], y, p) < 0)
          throw f.libtiff_fail(canopy::detail::str_cat("reading row ", y));
    return raw;
  }
  std::uint32_t tw = 0, th = 0;
  TIFFGetField(tif, TIFFTAG_TILEWIDTH, &tw);
  TIFFGetField(tif, TIFFTAG_TILELENGTH, &th);
  const tmsize_t tile_size = TIFFTileSize(tif);
  if (tw == 0 || th == 0 || tile_size <= 0) throw f.libtiff_fail("its tiles");
  const std::size_t tile_row = l.row_bytes(tw);
  std::vector<std::uint8_t> tile(static_cast<std::size_t>(tile_size));
  for (std::uint16_t p = 0; p < l.planes(); ++p)
    for (std::uint32_t y0 = 0; y0 < l.height; y0 += th)
      for (std::uint32_t x0 = 0; x0 < l.width; x0 += tw) {
        if (TIFFReadTile(tif, tile.data(), x0, y0, 0, p) < 0) throw f.libtiff_fail("reading a tile");
        // Whole bytes of the tile's columns: tiles are multiples of 16 pixels wide, so a
        // tile's first column starts a byte at any bit depth.
        const std::size_t from = std::size_t{x0} * l.per_pixel() * l.bits / 8;
        const std::size_t n = std::min(tile_row, row_bytes - from);
        for (std::uint32_t y = y0; y < std::min(l.height, y0 + th); ++y)
          std::memcpy(&raw[(p * l.height + y) * row_bytes + from], &tile[(y - y0) * tile_row], n);
      }
  return raw;
}

// The samples to PIL's pixels: palette, straight from the rows, or converted one by one.
at::Tensor tiff_pixels(const TiffFile& f, const TiffLayout& l, const std::vector<std::uint8_t>& raw) {
  const std::size_t row_bytes = l.row_bytes(l.width);
  const auto sample = [&](std::uint32_t y, std::uint32_t x, std::uint16_t s) -> std::uint32_t {
    const std::size_t plane = l.separate() ? s : 0;
    const std::size_t index = l.separate() ? x : std::size_t{x} * l.spp + s;
    const std::uint8_t* row = &raw[(plane * l.height + y) * row_bytes];
    if (l.bits == 8) return row[index];
    if (l.bits == 16) {  // native byte order, libtiff swapped it
      std::uint16_t v = 0;
      std::memcpy(&v, row + index * 2, 2);
      return v;
    }
    const std::size_t bit = index * l.bits;
    return (row[bit / 8] >> (8 - l.bits - bit % 8)) & ((1U << l.bits) - 1);
  };
  const std::int64_t w = l.width, h = l.height;
  if (l.photometric == PHOTOMETRIC_PALETTE) {
    std::uint16_t *red = nullptr, *green = nullptr, *blue = nullptr;
    if (!TIFFGetField(f.tif.get(), TIFFTAG_COLORMAP, &red, &green, &blue))
      throw f.fail("a palette image without a colour map");
    Indexed img;
    img.width = w;
    img.height = h;
    for (std::uint32_t i = 0; i < (1U << l.bits); ++i)  // PIL keeps each 16-bit entry's high byte
      img.palette.insert(img.palette.end(),
                         {static_cast<std::uint8_t>(red[i] >> 8), static_cast<std::uint8_t>(green[i] >> 8),
                          static_cast<std::uint8_t>(blue[i] >> 8)});
    img.index.resize(static_cast<std::size_t>(w * h));
    for (std::uint32_t y = 0; y < l.height; ++y)
      for (std::uint32_t x = 0; x < l.width; ++x)
        img.index[std::size_t{y} * l.width + x] = static_cast<std::uint8_t>(sample(y, x, 0));
    return img.to_pixels();
  }
  if (l.bits == 8 && !l.separate() && l.photometric != PHOTOMETRIC_MINISWHITE &&
      l.photometric != PHOTOMETRIC_SEPARATED && !l.premultiplied)  // the samples are the values
    return planes_from_rows(raw.data(), h, w, l.spp, row_bytes, {0, 1, 2}, l.grey ? 1 : 3, false);
  const std::int64_t channels = l.colours;
  std::vector<std::uint8_t> px(static_cast<std::size_t>(w * h * channels));
  const std::uint32_t max = (1U << l.bits) - 1;
  for (std::uint32_t y = 0; y < l.height; ++y)
    for (std::uint32_t x = 0; x < l.width; ++x) {
      // An associated (premultiplied) alpha is divided out, as PIL reads it ("RGBa", "La"):
      // each colour v * 255 / alpha, rounded down and clipped; 0 where alpha is 0.
      const std::uint32_t alpha = l.premultiplied ? sample(y, x, l.colours) : 255;
      for (std::int64_t c = 0; c < channels; ++c) {
        const std::uint32_t v = sample(y, x, static_cast<std::uint16_t>(c));
        // 16 bits: the high byte (PIL: of RGB; it clips 16-bit grey at 255); fewer than 8:
        // scaled to 0-255.
        std::uint32_t out = l.bits == 16 ? v >> 8 : l.bits == 8 ? v : v * 255 / max;
        if (l.photometric == PHOTOMETRIC_MINISWHITE) out = 255 - out;
        if (l.premultiplied) out = alpha == 0 ? 0 : std::min<std::uint32_t>(255, out * 255U / alpha);
        px[(std::size_t{y} * l.width + x) * channels + c] = static_cast<std::uint8_t>(out);
      }
    }
  if (channels == 4) cmyk_to_rgb(px.data(), w * h, /*inverted=*/false);
  return to_chw(px.data(), h, w, channels, std::min<std::int64_t>(channels, 3));
}

}  // namespace

DecodedImage decode_tiff(const std::string& path, std::int64_t max_pixels) {
  TiffFile f{path, {}, nullptr};
  std::unique_ptr<TIFFOpenOptions, void (*)(TIFFOpenOptions*)> options(TIFFOpenOptionsAlloc(),
                                                                       TIFFOpenOptionsFree);
  TIFFOpenOptionsSetErrorHandlerExtR(options.get(), tiff_error, &f.messages);
  TIFFOpenOptionsSetWarningHandlerExtR(options.get(), tiff_warning, &f.messages);
  f.tif.reset(TIFFOpenExt(path.c_str(), "rm", options.get()));
  if (!f.tif) throw f.libtiff_fail("not readable");
  const TiffLayout layout = read_tiff_layout(f, max_pixels);
  const at::Tensor pixels = tiff_pixels(f, layout, read_tiff_samples(f, layout));
  // Orientation 1-8 as EXIF's (the tag is EXIF's 0x0112): PIL turns the image at load.
  return {apply_exif_orientation(pixels, layout.orientation), 1};
}

}  // namespace canopy::datasets::decoders
