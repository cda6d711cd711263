// A frozen trunk's convolutions as the CPU runs them fastest: one oneDNN primitive with its
// activation, and no padded copies.
//
// A frozen TorchScript graph runs each convolution, its activation and the zero pad before it
// as separate passes over memory. In a profile of the demo trunk (EfficientNet-Lite0, 2
// threads, channels-last) the convolutions were 41-43 % of the time, the ReLU6 clamps 20-23 %
// and EfficientNet's "same" pads (a fill of the whole padded tensor, then a copy) 24-29 %;
// Inductor, which makes the `.pt2` trunks, fuses the activation into the convolution and the
// pad into the convolution's padding. fuse_cpu_convolutions does both on the graph:
//
// - a 2-D convolution with a constant float32 CPU weight becomes
//   mkldnn::_convolution_pointwise (the op Inductor's CPU code calls), with the activation
//   its output alone feeds (relu, hardtanh/ReLU6, silu, sigmoid, tanh, hardswish,
//   hardsigmoid, leaky_relu, gelu; in place or not) as oneDNN's post-op;
// - a zero pad that alone feeds one becomes its padding: the same on both sides as is; a pad
//   larger on one side (TensorFlow's "same" at stride 2: [0, 1] or [1, 2]) as the symmetric
//   padding whose windows include the wanted ones, and canopy::crop_padded keeps those (a view;
//   its size from the input's at run time, so any input size works).
//
// The result is the same up to float rounding (oneDNN may pick another kernel for another
// padding). For graphs that run on the CPU in float32, or in bfloat16 (below).
#pragma once

#include <memory>

#include <c10/core/ScalarType.h>

namespace torch::jit {
struct Graph;
}

namespace canopy::trunk {

// What fuse_cpu_convolutions rewrote: convolutions, of them those that took their activation,
// zero pads folded into padding, of them those that needed a crop.
struct FusedConvolutions {
  int convolutions = 0, activations = 0, pads = 0, crops = 0;
  FusedConvolutions& operator+=(const FusedConvolutions& o) {
    convolutions += o.convolutions;
    activations += o.activations;
    pads += o.pads;
    crops += o.crops;
    return *this;
  }
};

// Rewrites `g` (a frozen graph: weights are constants) as above; nothing where LibTorch was
// built without oneDNN. dtype bfloat16: the convolutions run in bfloat16 (their float32 weights
// converted once, their inputs cast), as under autocast to bfloat16, whose dispatcher does not
// know the fused op; the graph then runs under that autocast as before.
FusedConvolutions fuse_cpu_convolutions(const std::shared_ptr<torch::jit::Graph>& g,
                                        at::ScalarType dtype = at::kFloat);

}  // namespace canopy::trunk
