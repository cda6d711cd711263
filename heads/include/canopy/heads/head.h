// A head maps a batch of cached features [B, D] to outputs [B, K]. Heads are plain
// torch::nn modules with no task knowledge: the task owns labels, loss and metrics.
#pragma once

#include <memory>
#include <string>

#include <torch/nn/module.h>

namespace canopy::heads {

class Head : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& features) = 0;
  // A one-line description of the architecture, e.g. "mlp 1280-256-10 relu dropout=0.1".
  virtual std::string describe() const = 0;
};

using HeadPtr = std::shared_ptr<Head>;

}  // namespace canopy::heads
