// Augmented views of images for a cache with several views per sample (cache.views): a
// random resized crop (area fraction in crop_scale, aspect ratio in [3/4, 4/3], bilinear back
// to the input size), a horizontal flip with probability 1/2, and brightness and contrast each
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
// A canonical one-line description, e.g. "crop_scale=0.35,1;flip=1;jitter=0.1".
std::string describe(const AugmentConfig& config);

// View `view` (>= 1) of each image of `images`: float32 [B, C, H, W] as preprocess_images made
// them (normalised with `pre`'s mean and std); `ids` int64 [B] the samples' ids.
at::Tensor augment_view(const at::Tensor& images, const at::Tensor& ids, std::int64_t view,
                        const AugmentConfig& config, const PreprocessConfig& pre);

}  // namespace canopy::datasets
