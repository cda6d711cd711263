// A tensor's values as doubles, for what canopy writes as numbers (cards, checkpoint state).
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

namespace canopy {

// Every element of `t`, any dtype, any device, in row-major order.
inline std::vector<double> tensor_values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU).to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

}  // namespace canopy
