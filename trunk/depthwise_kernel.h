// The weight gradient of a depthwise 2-D convolution over channels-last float32 tensors, in
// plain C++: blocks of 16 channels as GCC vector values, compiled once per x86 vector width
// (AVX-512, AVX2, SSE2) and picked at load time; see grouped_conv.h.
#pragma once

#include <cstdint>

namespace canopy::trunk::detail {

// Channels a block takes: one AVX-512 register of floats, two AVX2 ones. Callers split the
// channels at multiples of it.
constexpr std::int64_t kChannelBlock = 16;

struct DepthwiseShape {
  std::int64_t batch, channels;
  std::int64_t height, width;          // the input's
  std::int64_t out_height, out_width;  // the output's (and its gradient's)
  std::int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

// acc[(kh * kernel_w + kw) * channels + c] += sum over n, oh, ow of
//   grad[n, oh, ow, c] * input[n, oh * stride_h - pad_h + kh * dilation_h, ..., c]
// for c in [c_begin, c_end) (taps that fall in the padding add nothing). `input` is
// [batch, height, width, channels], `grad` [batch, out_height, out_width, channels], both
// dense. c_begin is a multiple of kChannelBlock (c_end too, or the channel count): each channel then sums
// its terms in one order, whatever the ranges the channels are split into.
void depthwise_weight_grad_nhwc(const DepthwiseShape& s, const float* input, const float* grad, float* acc,
                                std::int64_t c_begin, std::int64_t c_end);

}  // namespace canopy::trunk::detail
