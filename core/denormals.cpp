#include "canopy/core/denormals.h"

#include <dlfcn.h>

#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define CANOPY_HAS_MXCSR 1
#endif

namespace canopy {
namespace {

#if defined(CANOPY_HAS_MXCSR)
constexpr unsigned kFtzDaz = 0x8040;  // MXCSR bit 15 flush-to-zero, bit 6 denormals-are-zero

void set_this_thread(bool on) { _mm_setcsr(on ? (_mm_getcsr() | kFtzDaz) : (_mm_getcsr() & ~kFtzDaz)); }
#else
void set_this_thread(bool) {}
#endif

// The entry point that runs a function on every thread of the calling thread's OpenMP team, as
// a `#pragma omp parallel` compiled into LibTorch does, in the OpenMP runtime LibTorch loaded
// (its libgomp, or a runtime that speaks its ABI); null without one. canopy is not compiled
// with OpenMP (a second runtime would keep a second pool), so the pragma cannot be ours.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
GompParallel gomp_parallel() {
  static const auto fn = reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  return fn;
}

void set_thread(void* on) { set_this_thread(*static_cast<const bool*>(on)); }

// Sets the calling thread's mode and, when it has more than one, its LibTorch threads'.
void set_flush_denormals(bool on) {
  set_this_thread(on);
  // LibTorch's intra-op threads are an OpenMP team the calling thread leads; threads the
  // runtime creates later inherit their creator's mode (POSIX: the floating-point environment).
  const int team = at::get_num_threads();
  if (team > 1 && !at::in_parallel_region() && gomp_parallel()) {
    gomp_parallel()(set_thread, &on, static_cast<unsigned>(team), 0);
  }
}

}  // namespace

bool flushes_denormals() {
#if defined(CANOPY_HAS_MXCSR)
  return (_mm_getcsr() & kFtzDaz) == kFtzDaz;
#else
  return false;
#endif
}

FlushDenormals::FlushDenormals(bool on) : before_(flushes_denormals()) { set_flush_denormals(on); }

FlushDenormals::~FlushDenormals() { set_flush_denormals(before_); }

}  // namespace canopy
