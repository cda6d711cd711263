#include "depthwise_kernel.h"

namespace canopy::trunk::detail {
namespace {

// One multiply-add pass over a channel range: the loop every clone vectorises at its width.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(__SANITIZE_THREAD__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void multiply_add(float* __restrict acc, const float* __restrict a, const float* __restrict b, std::int64_t n) {
  for (std::int64_t c = 0; c < n; ++c) acc[c] += a[c] * b[c];
}

}  // namespace

void depthwise_weight_grad_nhwc(const DepthwiseShape& s, const float* input, const float* grad, float* acc,
                                std::int64_t c_begin, std::int64_t c_end) {
  const std::int64_t len = c_end - c_begin;
  if (len <= 0) return;
  for (std::int64_t n = 0; n < s.batch; ++n) {
    const float* in_n = input + n * s.height * s.width * s.channels;
    for (std::int64_t oh = 0; oh < s.out_height; ++oh) {
      for (std::int64_t ow = 0; ow < s.out_width; ++ow) {
        const float* g = grad + ((n * s.out_height + oh) * s.out_width + ow) * s.channels + c_begin;
        for (std::int64_t kh = 0; kh < s.kernel_h; ++kh) {
          const std::int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dilation_h;
          if (ih < 0 || ih >= s.height) continue;
          for (std::int64_t kw = 0; kw < s.kernel_w; ++kw) {
            const std::int64_t iw = ow * s.stride_w - s.pad_w + kw * s.dilation_w;
            if (iw < 0 || iw >= s.width) continue;
            multiply_add(acc + (kh * s.kernel_w + kw) * s.channels + c_begin, g,
                         in_n + (ih * s.width + iw) * s.channels + c_begin, len);
          }
        }
      }
    }
  }
}

}  // namespace canopy::trunk::detail
