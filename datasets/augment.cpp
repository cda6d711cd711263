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
  o << "crop_scale=" << c.crop_scale.at(0) << "," << c.crop_scale.at(1) << ";flip=" << c.flip
    << ";jitter=" << c.jitter;
  return o.str();
}

namespace {
// Per-channel values of `pre` (one value means every channel).
double channel_value(const std::vector<double>& v, std::int64_t c) {
  return v.size() == 1 ? v[0] : v.at(static_cast<std::size_t>(c));
}
}  // namespace

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
    const at::Tensor u = at::rand({8}, gen, at::TensorOptions().dtype(at::kDouble)).contiguous();
    const double* r = u.data_ptr<double>();
    // The crop: area fraction and log-uniform aspect ratio, fitted inside the image.
    const double area = config.crop_scale[0] + (config.crop_scale[1] - config.crop_scale[0]) * r[0];
    const double aspect = std::exp(std::log(3.0 / 4.0) + (std::log(4.0 / 3.0) - std::log(3.0 / 4.0)) * r[1]);
    const auto ch = std::clamp<std::int64_t>(std::llround(std::sqrt(area / aspect) * h), 1, h);
    const auto cw = std::clamp<std::int64_t>(std::llround(std::sqrt(area * aspect) * w), 1, w);
    const auto y0 = std::min<std::int64_t>(h - ch, static_cast<std::int64_t>(r[2] * (h - ch + 1)));
    const auto x0 = std::min<std::int64_t>(w - cw, static_cast<std::int64_t>(r[3] * (w - cw + 1)));
    at::Tensor x = images.narrow(0, i, 1).narrow(2, y0, ch).narrow(3, x0, cw);
    x = at::upsample_bilinear2d(x.contiguous(), {h, w}, /*align_corners=*/false);
    if (config.flip && r[4] < 0.5) x = x.flip({3});
    if (config.jitter > 0) {
      const double brightness = 1 - config.jitter + 2 * config.jitter * r[5];
      const double contrast = 1 - config.jitter + 2 * config.jitter * r[6];
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
