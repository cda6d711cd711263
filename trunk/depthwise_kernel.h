// The weight gradient of a depthwise 2-D convolution over channels-last float32 tensors, in
// plain C++ (compiled at -O3, one clone per x86 vector width; see grouped_conv.cpp).
#pragma once

#include <cstdint>

namespace canopy::trunk::detail {

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
// dense. Each channel sums its terms in one fixed order, whatever the channel range.
void depthwise_weight_grad_nhwc(const DepthwiseShape& s, const float* input, const float* grad, float* acc,
                                std::int64_t c_begin, std::int64_t c_end);

}  // namespace canopy::trunk::detail
