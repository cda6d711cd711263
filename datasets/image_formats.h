// Decoders of the image formats beyond PNG, JPEG and WebP that PIL and torchvision's
// ImageFolder read (BMP, Netpbm, GIF, TIFF), and the helpers every decoder shares. Internal
// to canopy::datasets: read_image (canopy/datasets/images.h) tells the formats apart.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>

#include "canopy/datasets/images.h"

namespace canopy::datasets::decoders {

// [H, W, C] interleaved bytes -> uint8 [C, H, W] in memory of its own, keeping the first
// `keep` channels.
at::Tensor to_chw(const std::uint8_t* data, std::int64_t h, std::int64_t w, std::int64_t c,
                  std::int64_t keep);
// The same from rows as a file holds them: `stride` bytes apart, the last row first when
// `bottom_up`, `step` bytes a pixel, output channel k taken from the pixel's byte order[k]
// (k < channels, at most 3).
at::Tensor planes_from_rows(const std::uint8_t* data, std::int64_t h, std::int64_t w, std::size_t step,
                            std::size_t stride, const std::array<int, 3>& order, std::int64_t channels,
                            bool bottom_up);
// A DataError when width x height is more than `max_pixels` (0: no limit).
void check_pixels(const std::string& path, std::uint64_t width, std::uint64_t height,
                  std::int64_t max_pixels);
// CMYK pixels (4 bytes each) to RGB in their first 3 bytes as PIL's Image.convert("RGB") makes
// them: each channel (255 - K) - C (255 - K) / 255, rounded as PIL's MULDIV255. `inverted`: the
// four values are stored inverted (Adobe's CMYK JPEGs, PIL's "CMYK;I").
void cmyk_to_rgb(std::uint8_t* px, std::int64_t n, bool inverted);

// Each decodes the file at `path` (whose first bytes said its format) to PIL's
// Image.open(path).convert("RGB") pixels, one channel where PIL's mode is grey ("1", "L"), or
// throws a DataError naming the file and what is wrong with it.
DecodedImage decode_bmp(const std::string& path, std::int64_t max_pixels);
DecodedImage decode_netpbm(const std::string& path, std::int64_t max_pixels);
DecodedImage decode_gif(const std::string& path, std::int64_t max_pixels);
DecodedImage decode_tiff(const std::string& path, std::int64_t max_pixels);

}  // namespace canopy::datasets::decoders
