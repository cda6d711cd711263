// What canopy's graph rewrites (grouped_conv.cpp, conv_fusion.cpp) read off a TorchScript
// graph: constant lists, and the zero pads EfficientNet-style trunks put before a convolution.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

namespace torch::jit {
struct Node;
struct Value;
}  // namespace torch::jit

namespace canopy::trunk::graph {

// A list of ints the graph fixes: a constant, or a ListConstruct of constants.
std::optional<std::vector<std::int64_t>> constant_ints(torch::jit::Value* v);

// Where the groups input of `n` is when `n` is a forward convolution whose inputs begin
// (input, weight, bias, stride, padding, dilation): aten::conv2d with a list padding (6; not
// padding="same") or a non-transposed aten::_convolution (8).
std::optional<std::size_t> convolution_groups_input(torch::jit::Node* n);

// A zero pad of the last two dimensions, in F.pad's order.
struct ZeroPad {
  std::int64_t left, right, top, bottom;
  bool symmetric() const { return left == right && top == bottom; }
};

// The pad `n` applies when it pads its first input with zeros by constant, non-negative
// amounts in the last two dimensions: aten::pad(x, [l, r, t, b], "constant", 0 or None) or
// aten::constant_pad_nd(x, [l, r, t, b], 0).
std::optional<ZeroPad> zero_pad(torch::jit::Node* n);

// A convolution's input that a zero pad made and nothing else reads: made in the same graph
// (as in a frozen, inlined one), or by a call of a submodule whose forward returns only that
// pad of its argument (a traced nn.ZeroPad2d, as EfficientNet's Conv2dStaticSamePadding calls
// before a convolution with no padding of its own). `padder` is the node that made `x`.
struct PaddedInput {
  torch::jit::Value* unpadded;
  ZeroPad pad;
  torch::jit::Node* padder;
};
std::optional<PaddedInput> padded_input(torch::jit::Value* x);

}  // namespace canopy::trunk::graph
