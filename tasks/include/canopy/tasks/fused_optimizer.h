// An optimizer step through LibTorch's fused multi-tensor kernels.
#pragma once

#include <unordered_map>

#include <ATen/core/Tensor.h>
#include <torch/optim/optimizer.h>

namespace canopy::tasks {

// Steps an optimizer as its own step() would, but for Adam and AdamW through the kernels
// behind PyTorch's `fused=True` (at::_fused_adam_, at::_fused_adamw_): one call per parameter
// group instead of about eight operator calls per parameter. For the small heads canopy
// trains, those calls were most of the optimizer's time (4 linear heads of 1280 x 10: 0.11 ms
// a step against 0.02 ms fused). The state stays the optimizer's own (its AdamParamState /
// AdamWParamState: the step count, both moments), so save(), load() and checkpoints are
// unchanged and either path can continue from the other. The update is the same formula;
// the fused kernel rounds differently (its multiplies and adds are not LibTorch's operator
// by operator), so the two agree to float rounding, not bit for bit.
//
// Anything the fused kernels do not cover takes optimizer.step(): SGD, amsgrad, and
// parameters that are not dense, contiguous float32 tensors on the CPU (a GPU's, too: the
// CUDA kernels exist, but canopy has no GPU test of this path yet).
class FusedOptimizerStep {
 public:
  void operator()(torch::optim::Optimizer& optimizer);

 private:
  // Per parameter (its TensorImpl, the optimizer state's own key): the step count as the
  // float32 scalar tensor the fused kernels read.
  std::unordered_map<void*, at::Tensor> steps_;
};

}  // namespace canopy::tasks
