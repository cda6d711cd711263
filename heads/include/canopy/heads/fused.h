// Fusion: several heads over the same features computed in batched operations.
//
// Every built-in head (linear, mlp) starts with a Linear layer over the features. Fusion
// runs the first layers of a group of heads as one matrix multiply, their weights
// concatenated along the output dimension ([sum of widths, D]); each MLP then goes on
// through its own remaining layers on its slice of the result. The weights stay each
// head's own leaf tensors and the concatenation is differentiable, so one backward pass
// gives every head exactly its own gradient, and each head keeps its own optimizer,
// checkpoint and export. Dropout and everything after the first layer is the head's own
// code, so fused and unfused training differ only in the floating-point summation order
// inside that one multiply.
//
// Why only the first layer: on the CPU one wide multiply pays off while the heads are
// narrow (many thin [B, D] x [D, 10] products are overhead-bound) and loses once they are
// wide; running the later layers as bmm over stacked weights measured slower still.
// docs/decisions.md has the numbers (bench/fusion_variants.py); the trainer bounds groups
// by fused_width (train.fuse_kib).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "canopy/heads/head.h"

namespace canopy::heads {

// Heads with equal non-empty keys can run through fused_forward together: the built-in
// linear and mlp heads over the same input width. An empty key means not fusable (any
// other head type, including subclasses of the built-ins, which may override forward).
std::string fusion_key(const Head& head);

// Output width of the head's first layer: the columns it adds to a fused multiply.
std::int64_t fused_width(const Head& head);

// The outputs of `heads` (all with the same fusion key) on `features` [B, D], one [B, K_i]
// tensor per head, in order (when every head is linear, views of one [sum K_i, B] product:
// transposed, not contiguous).
std::vector<torch::Tensor> fused_forward(const std::vector<Head*>& heads, const torch::Tensor& features);

}  // namespace canopy::heads
