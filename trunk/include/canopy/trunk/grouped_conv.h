// Grouped convolutions in a trunk that trains on the CPU, and the weight gradient of the
// depthwise ones.
//
// oneDNN computes a depthwise convolution's forward and input gradient with its depthwise
// kernels, but its weight gradient with a generic grouped one: in a profile of the demo
// trunk's top-2 on a Xeon (5x5, 1 152 groups, 2x2 outputs, batch 256, channels-last) 37 ms a
// batch against 2-3 ms for the other two, most of a fine-tuning step. canopy's kernel keeps a
// block of 16 channels' tap sums in vector registers over a chunk of samples and skips the
// taps that fall in the padding (a 2x2 input padded by 2 leaves 4 of 25); on LibTorch's
// threads, by channel range. `bench/depthwise_bench` sets the two side by side.
//
// A trunk that trains on the CPU calls `canopy::grouped_conv2d` where its graph had a grouped
// convolution (and a symmetric zero pad before one becomes its padding): the same forward and
// input gradient (at::convolution and at::convolution_backward), the weight gradient by
// depthwise_weight_grad when the convolution is depthwise and float32 on the CPU. Saved trunks
// never hold the operator (Trunk::save writes the weights into the pinned file).
#pragma once

#include <cstdint>
#include <memory>

#include <ATen/core/Tensor.h>

namespace torch::jit {
struct Graph;
}

namespace canopy::trunk {

// Whether depthwise_weight_grad serves a convolution of `weight` over `input`: float32 CPU
// tensors, a 4-D input with C channels, weight [C, 1, KH, KW], groups = C.
bool depthwise_kernel_serves(const at::Tensor& input, const at::Tensor& weight, std::int64_t groups);

// The weight gradient ([C, 1, KH, KW], memory format of `weight_like`) of a depthwise
// convolution with these settings, as at::convolution_backward gives it up to float rounding.
// Requires depthwise_kernel_serves. Deterministic: the same bits whatever the thread count.
at::Tensor depthwise_weight_grad(const at::Tensor& grad_output, const at::Tensor& input,
                                 const at::Tensor& weight_like, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation);

// Replaces every aten::conv2d and non-transposed aten::_convolution with a constant groups > 1
// in `g` by canopy::grouped_conv2d; float32_input: its input is cast to float32 first (a
// bfloat16 top on the CPU, whose grouped convolutions are faster in float32). A convolution
// with no padding whose input only a zero pad the same on both sides made (aten::pad or
// constant_pad_nd in `g`, or a submodule call whose forward is just that, as a traced
// nn.ZeroPad2d: EfficientNet's "same" padding) takes the pad as its own padding instead: no
// padded copy is written, and the kernels skip the taps that fall in it. Returns how many.
int use_canopy_grouped_convolutions(const std::shared_ptr<torch::jit::Graph>& g, bool float32_input);

}  // namespace canopy::trunk
