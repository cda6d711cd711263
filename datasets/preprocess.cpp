#include "canopy/datasets/preprocess.h"

#include <atomic>
#include <sstream>

#include <ATen/ops/_upsample_bilinear2d_aa.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/upsample_bilinear2d.h>

#include "canopy/core/error.h"
#include "canopy/core/progress.h"

namespace canopy::datasets {

void validate_preprocess_config(const PreprocessConfig& c) {
  CANOPY_CHECK(c.resize >= 0 && c.resize <= 4096, ConfigError,
               "preprocess.resize: expected 0 (keep) to 4096, got ", c.resize);
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

at::Tensor preprocess_images(const at::Tensor& images, const PreprocessConfig& c) {
  CANOPY_CHECK(images.dim() == 3 || images.dim() == 4, DataError,
               "images must be [N, H, W] or [N, C, H, W], got ", images.sizes());
  at::Tensor x = images.to(at::kFloat).div_(255.0);
  if (x.dim() == 3) x = x.unsqueeze(1);
  if (c.resize > 0 && (x.size(2) != c.resize || x.size(3) != c.resize)) {
    // Shrunk more than 2x without antialiasing, plain bilinear skips input pixels: said once.
    static std::atomic<bool> said{false};
    if (!c.antialias && (x.size(2) > 2 * c.resize || x.size(3) > 2 * c.resize) && !said.exchange(true)) {
      log_info(detail::str_cat(
          "images of ", x.size(2), "x", x.size(3), " are shrunk to ", c.resize, "x", c.resize,
          " without antialiasing, which skips input pixels; preprocess.antialias = true "
          "resizes as torchvision's Resize and PIL do (a new cache, and heads trained on it)"));
    }
    x = c.antialias ? at::_upsample_bilinear2d_aa(x, {c.resize, c.resize}, /*align_corners=*/false)
                    : at::upsample_bilinear2d(x, {c.resize, c.resize}, /*align_corners=*/false);
  }
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
  out << "scale=1/255;resize=" << c.resize << ";interp=bilinear" << (c.antialias ? "-aa" : "")
      << ";channels=" << c.channels << ";mean=";
  for (std::size_t i = 0; i < c.mean.size(); ++i) out << (i ? "," : "") << c.mean[i];
  out << ";std=";
  for (std::size_t i = 0; i < c.std.size(); ++i) out << (i ? "," : "") << c.std[i];
  return out.str();
}

}  // namespace canopy::datasets
