// Augmented views of images for a cache with several views per sample (cache.views): a
// random resized crop (torchvision's: area fraction in crop_scale, aspect ratio in [3/4, 4/3],
// bilinear back to the input size), a horizontal flip with probability 1/2, and brightness and contrast each
// scaled by a factor in [1 - jitter, 1 + jitter]. Every draw comes from a generator seeded by
// (sample id, view) alone, so a view is the same whatever the batch, the order or a resume.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/datasets/preprocess.h"

namespace canopy::datasets {

struct AugmentConfig {
  std::vector<double> crop_scale{0.35, 1.0};  // area fraction kept by the crop: min, max
  bool flip = true;
  double jitter = 0.1;
};

void validate_augment_config(const AugmentConfig& config);
// A canonical one-line description, e.g. "crop_scale=0.35,1;crop=tv;flip=1;jitter=0.1".
std::string describe(const AugmentConfig& config);

// RandomResizedCrop's box as torchvision draws it: up to 10 tries of an area fraction
// uniform in [scale_min, scale_max] of the image and an aspect ratio (width / height)
// log-uniform in [3/4, 4/3], the first whose box fits inside the image, at a uniform position;
// when none fits, the whole image, cropped at the center to bring its aspect ratio into that
// range. `u`: kCropDraws uniform draws in [0, 1) (2 per try, then the position's 2).
inline constexpr int kCropTries = 10;
inline constexpr int kCropDraws = 2 * kCropTries + 2;
struct CropBox {
  std::int64_t y0 = 0, x0 = 0, h = 0, w = 0;
};
CropBox random_resized_crop_box(std::int64_t h, std::int64_t w, double scale_min, double scale_max,
                                const double* u);

// View `view` (>= 1) of each image of `images`: float32 [B, C, H, W] as preprocess_images made
// them (normalised with `pre`'s mean and std); `ids` int64 [B] the samples' ids.
at::Tensor augment_view(const at::Tensor& images, const at::Tensor& ids, std::int64_t view,
                        const AugmentConfig& config, const PreprocessConfig& pre);

}  // namespace canopy::datasets
