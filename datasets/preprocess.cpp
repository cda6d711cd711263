#include "canopy/datasets/preprocess.h"

#include <algorithm>
#include <atomic>
#include <sstream>

#include <ATen/ops/_upsample_bilinear2d_aa.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/upsample_bilinear2d.h>

#include "canopy/core/error.h"
#include "canopy/core/progress.h"

namespace canopy::datasets {

void validate_preprocess_config(const PreprocessConfig& c) {
  CANOPY_CHECK(c.resize >= 0 && c.resize <= 4096, ConfigError,
               "preprocess.resize: expected 0 (keep) to 4096, got ", c.resize);
  CANOPY_CHECK(c.resize_shorter >= 0 && c.resize_shorter <= 4096, ConfigError,
               "preprocess.resize_shorter: expected 0 (off) to 4096, got ", c.resize_shorter);
  CANOPY_CHECK(c.center_crop >= 0 && c.center_crop <= 4096, ConfigError,
               "preprocess.center_crop: expected 0 (off) to 4096, got ", c.center_crop);
  CANOPY_CHECK(c.resize == 0 || c.resize_shorter == 0, ConfigError, "preprocess.resize = ", c.resize,
               " (a square) and preprocess.resize_shorter = ", c.resize_shorter,
               " (the shorter side) are two ways to resize: set one");
  CANOPY_CHECK(c.channels == 1 || c.channels == 3, ConfigError, "preprocess.channels: expected 1 or 3, got ",
               c.channels);
  for (const auto* v : {&c.mean, &c.std}) {
    const char* name = v == &c.mean ? "preprocess.mean" : "preprocess.std";
    CANOPY_CHECK(v->size() == 1 || static_cast<std::int64_t>(v->size()) == c.channels, ConfigError, name,
                 ": expected 1 or ", c.channels, " values, got ", v->size());
  }
  for (double s : c.std) {
    CANOPY_CHECK(s > 0, ConfigError, "preprocess.std: every value must be > 0, got ", s);
  }
}

at::Tensor channel_values(const std::vector<double>& values, std::int64_t channels) {
  std::vector<float> f(static_cast<std::size_t>(channels));
  for (std::size_t i = 0; i < f.size(); ++i)
    f[i] = static_cast<float>(values.size() == 1 ? values[0] : values[i]);
  return at::tensor(f).view({1, channels, 1, 1});
}

std::pair<std::int64_t, std::int64_t> shorter_side_size(std::int64_t h, std::int64_t w,
                                                        std::int64_t shorter) {
  const std::int64_t s = std::min(h, w), l = std::max(h, w);
  // Python's int(shorter * long / short): the quotient rounded once, as a double, then truncated.
  const auto longer = static_cast<std::int64_t>(static_cast<double>(shorter * l) / static_cast<double>(s));
  return w <= h ? std::make_pair(longer, shorter) : std::make_pair(shorter, longer);
}

std::int64_t center_crop_offset(std::int64_t have, std::int64_t crop) {
  const std::int64_t d = have - crop;
  std::int64_t k = d / 2;
  if (d % 2 != 0 && k % 2 != 0) ++k;  // x.5 rounds to the even neighbour
  return k;
}

namespace {

at::Tensor resize_to(const at::Tensor& x, std::int64_t h, std::int64_t w, bool antialias) {
  if (x.size(2) == h && x.size(3) == w) return x;
  // Shrunk more than 2x without antialiasing, plain bilinear skips input pixels: said once.
  static std::atomic<bool> said{false};
  if (!antialias && (x.size(2) > 2 * h || x.size(3) > 2 * w) && !said.exchange(true)) {
    log_info(
        detail::str_cat("images of ", x.size(2), "x", x.size(3), " are shrunk to ", h, "x", w,
                        " without antialiasing, which skips input pixels; preprocess.antialias = true "
                        "resizes as torchvision's Resize and PIL do (a new cache, and heads trained on it)"));
  }
  return antialias ? at::_upsample_bilinear2d_aa(x, {h, w}, /*align_corners=*/false)
                   : at::upsample_bilinear2d(x, {h, w}, /*align_corners=*/false);
}

// torchvision's CenterCrop: zeros around an image smaller than the crop (the odd one on the
// right and bottom), then the centre.
at::Tensor center_crop(at::Tensor x, std::int64_t crop) {
  const std::int64_t ph = std::max<std::int64_t>(crop - x.size(2), 0),
                     pw = std::max<std::int64_t>(crop - x.size(3), 0);
  if (ph > 0 || pw > 0) x = at::constant_pad_nd(x, {pw / 2, (pw + 1) / 2, ph / 2, (ph + 1) / 2}, 0.0);
  const std::int64_t top = center_crop_offset(x.size(2), crop), left = center_crop_offset(x.size(3), crop);
  return x.slice(2, top, top + crop).slice(3, left, left + crop);
}

}  // namespace

at::Tensor preprocess_images(const at::Tensor& images, const PreprocessConfig& c) {
  CANOPY_CHECK(images.dim() == 3 || images.dim() == 4, DataError,
               "images must be [N, H, W] or [N, C, H, W], got ", images.sizes());
  at::Tensor x = images.to(at::kFloat).div_(255.0);
  if (x.dim() == 3) x = x.unsqueeze(1);
  if (c.resize > 0) x = resize_to(x, c.resize, c.resize, c.antialias);
  if (c.resize_shorter > 0) {
    const auto [h, w] = shorter_side_size(x.size(2), x.size(3), c.resize_shorter);
    x = resize_to(x, h, w, c.antialias);
  }
  if (c.center_crop > 0) x = center_crop(x, c.center_crop);
  if (x.size(1) == 1 && c.channels > 1) {
    x = x.expand({-1, c.channels, -1, -1});
  }
  CANOPY_CHECK(x.size(1) == c.channels, DataError, "images have ", x.size(1),
               " channels, preprocess.channels is ", c.channels);
  return x.sub(channel_values(c.mean, c.channels)).div(channel_values(c.std, c.channels)).contiguous();
}

std::string describe(const PreprocessConfig& c) {
  std::ostringstream out;
  out.precision(17);
  out << "scale=1/255;resize=" << c.resize;
  // Said only when set, so that the caches of other settings keep their fingerprints.
  if (c.resize_shorter > 0) out << ";resize_shorter=" << c.resize_shorter;
  if (c.center_crop > 0) out << ";center_crop=" << c.center_crop << " (torchvision's CenterCrop)";
  out << ";interp=bilinear" << (c.antialias ? "-aa" : "") << ";channels=" << c.channels << ";mean=";
  for (std::size_t i = 0; i < c.mean.size(); ++i) out << (i ? "," : "") << c.mean[i];
  out << ";std=";
  for (std::size_t i = 0; i < c.std.size(); ++i) out << (i ? "," : "") << c.std[i];
  return out.str();
}

}  // namespace canopy::datasets
