#pragma once

#include <cstdint>

#include <torch/nn/modules/linear.h>

#include "canopy/heads/head.h"

namespace canopy::heads {

struct LinearHeadOptions {
  LinearHeadOptions(std::int64_t in_features, std::int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(std::int64_t, in_features);
  TORCH_ARG(std::int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
};

// y = x W^T + b.
class LinearHead : public Head {
 public:
  explicit LinearHead(const LinearHeadOptions& options);
  torch::Tensor forward(const torch::Tensor& features) override;
  std::string describe() const override;
  std::map<std::string, std::string> config_values() const override;
  const LinearHeadOptions& options() const { return options_; }
  const torch::nn::Linear& linear() const { return linear_; }

 private:
  LinearHeadOptions options_;
  torch::nn::Linear linear_{nullptr};
};

}  // namespace canopy::heads
