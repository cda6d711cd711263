#include "depthwise_kernel.h"

#include <algorithm>

namespace canopy::trunk::detail {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(__SANITIZE_THREAD__)
#define CANOPY_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CANOPY_VECTOR_CLONES
#endif

constexpr std::int64_t kLanes = kChannelBlock;

// 16 floats as one value (GCC's vector extension): each clone computes it at its width.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes load(const float* p) {
  Lanes v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Lanes v) { __builtin_memcpy(p, &v, sizeof v); }

// The contribution of samples [n_begin, n_end) to one block of 16 channels starting at c0,
// kernel width KW known at compile time: for each kernel row, the KW tap sums of the block stay
// in registers over every output position of the samples, then go to acc once (a pass per tap
// over acc, as stretch_sample makes, loads and stores it for every product). The samples'
// columns of input and gradient for the block stay in L1 over the kernel rows' passes.
template <int KW>
CANOPY_VECTOR_CLONES void block_samples(const DepthwiseShape& s, const float* input, const float* grad,
                                        float* acc, std::int64_t c0, std::int64_t n_begin,
                                        std::int64_t n_end) {
  for (std::int64_t kh = 0; kh < s.kernel_h; ++kh) {
    Lanes sums[KW] = {};
    for (std::int64_t n = n_begin; n < n_end; ++n) {
      const float* in_n = input + n * s.height * s.width * s.channels + c0;
      const float* grad_n = grad + n * s.out_height * s.out_width * s.channels + c0;
      for (std::int64_t oh = 0; oh < s.out_height; ++oh) {
        const std::int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dilation_h;
        if (ih < 0 || ih >= s.height) continue;
        const float* in_row = in_n + ih * s.width * s.channels;
        for (std::int64_t ow = 0; ow < s.out_width; ++ow) {
          const Lanes g = load(grad_n + (oh * s.out_width + ow) * s.channels);
          const std::int64_t iw0 = ow * s.stride_w - s.pad_w;
#pragma GCC unroll 8
          for (int kw = 0; kw < KW; ++kw) {
            const std::int64_t iw = iw0 + kw * s.dilation_w;
            if (iw >= 0 && iw < s.width) sums[kw] += g * load(in_row + iw * s.channels);
          }
        }
      }
    }
    for (int kw = 0; kw < KW; ++kw) {
      float* a = acc + (kh * KW + kw) * s.channels + c0;
      store(a, load(a) + sums[kw]);
    }
  }
}

// Any kernel width, any channel stretch: the same sums, a multiply-add pass per tap.
CANOPY_VECTOR_CLONES void stretch_sample(const DepthwiseShape& s, const float* in_n, const float* grad_n,
                                         float* acc, std::int64_t c0, std::int64_t len) {
  for (std::int64_t kh = 0; kh < s.kernel_h; ++kh) {
    for (std::int64_t oh = 0; oh < s.out_height; ++oh) {
      const std::int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dilation_h;
      if (ih < 0 || ih >= s.height) continue;
      for (std::int64_t ow = 0; ow < s.out_width; ++ow) {
        const float* g = grad_n + (oh * s.out_width + ow) * s.channels + c0;
        for (std::int64_t kw = 0; kw < s.kernel_w; ++kw) {
          const std::int64_t iw = ow * s.stride_w - s.pad_w + kw * s.dilation_w;
          if (iw < 0 || iw >= s.width) continue;
          const float* x = in_n + (ih * s.width + iw) * s.channels + c0;
          float* a = acc + (kh * s.kernel_w + kw) * s.channels + c0;
          for (std::int64_t l = 0; l < len; ++l) a[l] += g[l] * x[l];
        }
      }
    }
  }
}

using BlockFn = void (*)(const DepthwiseShape&, const float*, const float*, float*, std::int64_t,
                         std::int64_t, std::int64_t);

BlockFn block_for(std::int64_t kernel_w) {
  switch (kernel_w) {
    case 3:
      return block_samples<3>;
    case 5:
      return block_samples<5>;
    case 7:
      return block_samples<7>;
    default:
      return nullptr;
  }
}

}  // namespace

void depthwise_weight_grad_nhwc(const DepthwiseShape& s, const float* input, const float* grad, float* acc,
                                std::int64_t c_begin, std::int64_t c_end) {
  if (c_end <= c_begin) return;
  const BlockFn block = block_for(s.kernel_w);
  // Samples go in chunks of about 64 positions (input and output, 64 bytes each in a block's
  // column): one sample from 7x7 up, 8 at 2x2. Larger chunks measured slower at 7x7 (a column's
  // stride of C floats maps it to few L1 sets) and no faster at 2x2. The chunk, and so each
  // channel's order of summation, depends on the shape alone.
  const std::int64_t positions = s.height * s.width + s.out_height * s.out_width;
  const std::int64_t chunk = std::max<std::int64_t>(1, 64 / positions);
  const std::int64_t blocks_end = block ? c_begin + (c_end - c_begin) / kLanes * kLanes : c_begin;
  for (std::int64_t n0 = 0; n0 < s.batch; n0 += chunk) {
    const std::int64_t n1 = std::min(s.batch, n0 + chunk);
    for (std::int64_t c = c_begin; c < blocks_end; c += kLanes) block(s, input, grad, acc, c, n0, n1);
  }
  if (blocks_end < c_end) {
    for (std::int64_t n = 0; n < s.batch; ++n) {
      stretch_sample(s, input + n * s.height * s.width * s.channels,
                     grad + n * s.out_height * s.out_width * s.channels, acc, blocks_end, c_end - blocks_end);
    }
  }
}

}  // namespace canopy::trunk::detail
