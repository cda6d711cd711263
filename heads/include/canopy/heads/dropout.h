// Inverted dropout with masks from a counter-based hash.
//
// LibTorch's bernoulli_ on the CPU draws every element from a Mersenne Twister, one at a
// time under the generator's lock: in the 8-head demo (three MLPs with dropout) that was
// 28% of the whole run's CPU time (perf, docs/performance.md). Here one 64-bit key is
// drawn from the head's own generator per call (so the generator's checkpointed state
// still fixes every mask, and a resumed run draws the same ones), and element i of the
// mask is kept when hash(key, i) < (1 - p) * 2^32: a keyed 32-bit integer hash of the
// element's index, the counter-based idea behind Philox (cuRAND) and threefry (JAX), in a
// loop the compiler vectorises. The mask holds 0 or 1 / (1 - p), so dropout is one
// multiply forward and one backward.
#pragma once

#include <cstdint>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace canopy::heads {

// A float32 tensor of `sizes` whose elements are 1 / (1 - p) with probability 1 - p and 0
// otherwise, independently, fixed by `key`. p in [0, 1).
at::Tensor dropout_mask(at::IntArrayRef sizes, double p, std::uint64_t key);

// x * dropout_mask(x.sizes(), p, one draw of `rng`) (x float32); x itself when p == 0.
at::Tensor hashed_dropout(const at::Tensor& x, double p, at::Generator& rng);

}  // namespace canopy::heads
