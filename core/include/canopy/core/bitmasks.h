// A bitmask label source (label_lists.h: bit j of a row's value set when the row has label j)
// as rows of zeros and ones: a multilabel task's targets, a label-by-label holdout's input.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>

#include "canopy/core/error.h"
#include "canopy/core/label_lists.h"

namespace canopy {

// Bitmasks (int64 [rows]) of `labels` labels (1 to kMaxBits) as int64 [rows, labels] of 0 and 1,
// on the bitmasks' device.
inline at::Tensor multi_hot_of_bitmasks(const at::Tensor& masks, std::int64_t labels) {
  CANOPY_CHECK(labels > 0 && labels <= static_cast<std::int64_t>(kMaxBits), DataError, "bitmasks of ", labels,
               " labels (1 to ", kMaxBits, ")");
  const at::Tensor bits = at::arange(labels, masks.options().dtype(at::kLong));
  return masks.to(at::kLong).unsqueeze(1).bitwise_right_shift(bits).bitwise_and(1);
}

}  // namespace canopy
