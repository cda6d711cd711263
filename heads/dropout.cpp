#include "canopy/heads/dropout.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>

#include "canopy/core/error.h"

namespace canopy::heads {

namespace {
// A 32-bit integer hash with low bias (multiply-xorshift, constants from Wellons'
// hash-prospector "lowbias32"): every output bit depends on every input bit.
inline std::uint32_t mix(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The hot loop in 8-lane vectors (GCC vector extensions), compiled for AVX2 too and picked
// at run time: one instruction per 8 elements where the CPU has AVX2, two SSE2 halves
// otherwise. The same arithmetic either way, so the same mask.
using U32x8 = std::uint32_t __attribute__((vector_size(32)));
using I32x8 = std::int32_t __attribute__((vector_size(32)));

inline __attribute__((always_inline)) void fill_mask_body(float* out, std::int64_t n, std::uint32_t k0,
                                                          std::uint32_t k1, std::uint32_t keep_below,
                                                          float scale) {
  std::int32_t scale_bits = 0;
  std::memcpy(&scale_bits, &scale, sizeof scale_bits);
  std::int64_t i = 0;
  U32x8 index = {0, 1, 2, 3, 4, 5, 6, 7};
  for (; i + 8 <= n; i += 8, index += 8U) {
    U32x8 h = index ^ k0;
    for (int round = 0; round < 2; ++round) {  // mix(mix(i ^ k0) + k1), as in the tail below
      h ^= h >> 16;
      h *= 0x7feb352dU;
      h ^= h >> 15;
      h *= 0x846ca68bU;
      h ^= h >> 16;
      if (round == 0) h += k1;
    }
    const I32x8 bits = (h < keep_below) & scale_bits;  // a lane is all ones where kept
    std::memcpy(out + i, &bits, sizeof bits);
  }
  for (; i < n; ++i) {
    const std::uint32_t h = mix(mix(static_cast<std::uint32_t>(i) ^ k0) + k1);
    out[i] = h < keep_below ? scale : 0.0f;
  }
}

// Picked once at run time, not by an ifunc (GCC's target_clones): an ifunc resolver runs
// while the dynamic loader relocates, before ThreadSanitizer's runtime is up, and crashed
// every TSan build at start.
__attribute__((target("avx2"))) void fill_mask_avx2(float* out, std::int64_t n, std::uint32_t k0,
                                                    std::uint32_t k1, std::uint32_t keep_below, float scale) {
  fill_mask_body(out, n, k0, k1, keep_below, scale);
}

void fill_mask_generic(float* out, std::int64_t n, std::uint32_t k0, std::uint32_t k1,
                       std::uint32_t keep_below, float scale) {
  fill_mask_body(out, n, k0, k1, keep_below, scale);
}

void fill_mask(float* out, std::int64_t n, std::uint32_t k0, std::uint32_t k1, std::uint32_t keep_below,
               float scale) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  (avx2 ? fill_mask_avx2 : fill_mask_generic)(out, n, k0, k1, keep_below, scale);
}
}  // namespace

at::Tensor dropout_mask(at::IntArrayRef sizes, double p, std::uint64_t key) {
  CANOPY_CHECK(p >= 0.0 && p < 1.0, Error, "dropout probability must be in [0, 1), got ", p);
  at::Tensor mask = at::empty(sizes, at::TensorOptions().dtype(at::kFloat));
  const std::int64_t n = mask.numel();
  float* out = mask.data_ptr<float>();
  // Blocks of 2^32 elements each get their own second key word, so indices never repeat.
  constexpr std::int64_t kBlock = std::int64_t{1} << 32;
  const double keep = std::ldexp(1.0 - p, 32);
  const auto keep_below = static_cast<std::uint32_t>(std::min(keep, 4294967295.0));
  const auto scale = static_cast<float>(1.0 / (1.0 - p));
  for (std::int64_t start = 0; start < n; start += kBlock) {
    const auto block = static_cast<std::uint32_t>(start / kBlock);
    fill_mask(out + start, std::min(kBlock, n - start), static_cast<std::uint32_t>(key),
              static_cast<std::uint32_t>(key >> 32) + 0x9e3779b9U * block, keep_below, scale);
  }
  return mask;
}

at::Tensor hashed_dropout(const at::Tensor& x, double p, at::Generator& rng) {
  if (p == 0.0) return x;
  CANOPY_CHECK(x.scalar_type() == at::kFloat, Error, "dropout: expected float32 activations, got ",
               x.scalar_type());
  std::uint64_t key = 0;
  {
    std::lock_guard<std::mutex> lock(rng.mutex());
    key = at::check_generator<at::CPUGeneratorImpl>(rng)->random64();
  }
  at::Tensor mask = dropout_mask(x.sizes(), p, key);
  if (x.device() != mask.device()) mask = mask.to(x.device());
  return x * mask;
}

}  // namespace canopy::heads
