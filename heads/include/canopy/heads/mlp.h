#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>

#include "canopy/heads/head.h"

namespace canopy::heads {

struct MlpHeadOptions {
  MlpHeadOptions(std::int64_t in_features, std::int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(std::int64_t, in_features);
  TORCH_ARG(std::int64_t, out_features);
  TORCH_ARG(std::vector<std::int64_t>, hidden) = {256};
  TORCH_ARG(std::string, activation) = "relu";  // relu | gelu | tanh | silu
  TORCH_ARG(double, dropout) = 0.0;
};

void validate_mlp_options(const MlpHeadOptions& options);

// Linear -> activation -> dropout for each hidden size, then a linear output layer.
class MlpHead : public Head {
 public:
  explicit MlpHead(const MlpHeadOptions& options);
  torch::Tensor forward(const torch::Tensor& features) override;
  std::string describe() const override;
  std::map<std::string, std::string> config_values() const override;
  const MlpHeadOptions& options() const { return options_; }
  // The first Linear layer, and the rest of the forward pass from its output (activation,
  // dropout, further layers): forward(x) == forward_after_first(first()(x)).
  torch::nn::Linear first() const;
  torch::Tensor forward_after_first(torch::Tensor first_output);

 private:
  MlpHeadOptions options_;
  torch::nn::Sequential layers_{nullptr};
};

}  // namespace canopy::heads
