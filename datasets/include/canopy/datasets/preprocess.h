// Image preprocessing as the trunk expects it: scale to [0, 1], resize (a square, or the
// shorter side), crop the centre, replicate or check channels, normalise per channel. Everything comes from
// the config and is part of the description that the cache fingerprint hashes.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace canopy::datasets {

struct PreprocessConfig {
  std::int64_t resize = 0;  // output height and width; 0 keeps the input size
  // Or the shorter side resized to this and the longer in proportion, int(S x long / short), as
  // torchvision's Resize(S) sizes it; 0: not. Then a centre crop of center_crop x center_crop, as
  // torchvision's CenterCrop takes it (an image smaller than it padded with zeros); 0: none.
  // Resize(256) + CenterCrop(224) is the ImageNet evaluation's preprocessing.
  std::int64_t resize_shorter = 0;
  std::int64_t center_crop = 0;
  std::int64_t channels = 3;      // 1-channel input is replicated to this many channels
  std::vector<double> mean{0.5};  // one value, or one per channel
  std::vector<double> std{0.5};
  // Resize with antialiasing (F.interpolate(..., antialias=True), as torchvision's Resize and
  // PIL do): what shrinking an image needs; without it bilinear reads only the 2x2 input pixels
  // nearest each output pixel.
  bool antialias = false;
};

void validate_preprocess_config(const PreprocessConfig& config);

// uint8 [N, H, W] or [N, C, H, W] -> float32 [N, channels, H', W'] (bilinear, antialiased
// with `antialias`): H' = W' = center_crop or resize when set, else the size resize_shorter
// gives or the input's.
at::Tensor preprocess_images(const at::Tensor& images, const PreprocessConfig& config);
// The size torchvision's Resize(`shorter`) gives an image of h x w: {height, width}.
std::pair<std::int64_t, std::int64_t> shorter_side_size(std::int64_t h, std::int64_t w, std::int64_t shorter);
// Where torchvision's CenterCrop starts a crop of `crop` in `have`: int(round((have - crop) / 2))
// with Python's round, half to even (have >= crop).
std::int64_t center_crop_offset(std::int64_t have, std::int64_t crop);
// `mean` or `std` as float32 [1, channels, 1, 1] (one value for every channel, or one each), as
// preprocess_images subtracts and divides by it (and the model file of canopy export holds it).
at::Tensor channel_values(const std::vector<double>& values, std::int64_t channels);

// A canonical one-line description, e.g. "scale=1/255;resize=64;interp=bilinear;channels=3;mean=0.5;std=0.5"
// (interp=bilinear-aa with antialias).
std::string describe(const PreprocessConfig& config);

}  // namespace canopy::datasets
