#include "canopy/datasets/augment.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/upsample_bilinear2d.h>

#include "canopy/core/error.h"

namespace canopy::datasets {

void validate_augment_config(const AugmentConfig& c) {
  CANOPY_CHECK(
      c.crop_scale.size() == 2 && c.crop_scale[0] > 0 && c.crop_scale[0] <= c.crop_scale[1] &&
          c.crop_scale[1] <= 1,
      ConfigError, "augment.crop_scale must be two area fractions 0 < min <= max <= 1, got '",
      [&] {
        std::ostringstream o;
        for (std::size_t i = 0; i < c.crop_scale.size(); ++i) o << (i ? "," : "") << c.crop_scale[i];
        return o.str();
      }(),
      "'");
  CANOPY_CHECK(c.jitter >= 0 && c.jitter < 1, ConfigError, "augment.jitter must lie in [0, 1), got ",
               c.jitter);
}

std::string describe(const AugmentConfig& c) {
  std::ostringstream o;
  o.precision(10);
  // crop=tv: the crop box as torchvision draws it (caches from before it clamped the box, and
  // are rebuilt).
  o << "crop_scale=" << c.crop_scale.at(0) << "," << c.crop_scale.at(1) << ";crop=tv;flip=" << c.flip
    << ";jitter=" << c.jitter;
  return o.str();
}

namespace {
// Per-channel values of `pre` (one value means every channel).
double channel_value(const std::vector<double>& v, std::int64_t c) {
  return v.size() == 1 ? v[0] : v.at(static_cast<std::size_t>(c));
}
}  // namespace

CropBox random_resized_crop_box(std::int64_t h, std::int64_t w, double scale_min, double scale_max,
                                const double* u) {
  const double area = static_cast<double>(h) * static_cast<double>(w);
  const double lo = std::log(3.0 / 4.0), hi = std::log(4.0 / 3.0);
  for (int attempt = 0; attempt < kCropTries; ++attempt) {
    const double target = area * (scale_min + (scale_max - scale_min) * u[2 * attempt]);
    const double aspect = std::exp(lo + (hi - lo) * u[2 * attempt + 1]);
    const auto cw = static_cast<std::int64_t>(std::llround(std::sqrt(target * aspect)));
    const auto ch = static_cast<std::int64_t>(std::llround(std::sqrt(target / aspect)));
    if (cw > 0 && cw <= w && ch > 0 && ch <= h) {
      const auto y0 = std::min<std::int64_t>(
          h - ch, static_cast<std::int64_t>(u[2 * kCropTries] * static_cast<double>(h - ch + 1)));
      const auto x0 = std::min<std::int64_t>(
          w - cw, static_cast<std::int64_t>(u[2 * kCropTries + 1] * static_cast<double>(w - cw + 1)));
      return {y0, x0, ch, cw};
    }
  }
  // No try fitted: the center crop of the whole image with its aspect ratio clamped.
  const double in_ratio = static_cast<double>(w) / static_cast<double>(h);
  std::int64_t ch = h, cw = w;
  if (in_ratio < 3.0 / 4.0) {
    ch = std::llround(static_cast<double>(w) / (3.0 / 4.0));
  } else if (in_ratio > 4.0 / 3.0) {
    cw = std::llround(static_cast<double>(h) * (4.0 / 3.0));
  }
  return {(h - ch) / 2, (w - cw) / 2, ch, cw};
}

at::Tensor augment_view(const at::Tensor& images, const at::Tensor& ids, std::int64_t view,
                        const AugmentConfig& config, const PreprocessConfig& pre) {
  CANOPY_CHECK(images.dim() == 4 && ids.numel() == images.size(0), Error, "augment_view: images ",
               images.sizes(), ", ", ids.numel(), " ids");
  const std::int64_t n = images.size(0), channels = images.size(1), h = images.size(2), w = images.size(3);
  at::Tensor out = at::empty_like(images);
  const at::Tensor id = ids.to(at::kLong).contiguous();
  for (std::int64_t i = 0; i < n; ++i) {
    const auto sample = static_cast<std::uint64_t>(id.data_ptr<std::int64_t>()[i]);
    auto gen = at::detail::createCPUGenerator(sample * 1000003ULL +
                                              static_cast<std::uint64_t>(view) * 7919ULL + 0xa7c0ULL);
    // The crop's draws, then the flip's, the brightness's and the contrast's.
    const at::Tensor u = at::rand({kCropDraws + 3}, gen, at::TensorOptions().dtype(at::kDouble)).contiguous();
    const double* r = u.data_ptr<double>();
    const CropBox box = random_resized_crop_box(h, w, config.crop_scale[0], config.crop_scale[1], r);
    at::Tensor x = images.narrow(0, i, 1).narrow(2, box.y0, box.h).narrow(3, box.x0, box.w);
    x = at::upsample_bilinear2d(x.contiguous(), {h, w}, /*align_corners=*/false);
    if (config.flip && r[kCropDraws] < 0.5) x = x.flip({3});
    if (config.jitter > 0) {
      const double brightness = 1 - config.jitter + 2 * config.jitter * r[kCropDraws + 1];
      const double contrast = 1 - config.jitter + 2 * config.jitter * r[kCropDraws + 2];
      for (std::int64_t c = 0; c < channels; ++c) {  // in pixel values, then normalised again
        const double mean = channel_value(pre.mean, c), std = channel_value(pre.std, c);
        at::Tensor px = x.select(1, c) * std + mean;
        px = px * brightness;
        px = ((px - px.mean()) * contrast + px.mean()).clamp(0, 1);
        x.select(1, c).copy_((px - mean) / std);
      }
    }
    out.narrow(0, i, 1).copy_(x);
  }
  return out;
}

}  // namespace canopy::datasets
