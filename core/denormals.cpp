#include "canopy/core/denormals.h"

#include "canopy/core/torch_team.h"

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

// Sets the mode of the calling thread and of its LibTorch threads (threads the runtime creates
// later inherit their creator's mode: POSIX's floating-point environment).
void set_flush_denormals(bool on) {
  on_every_torch_thread([on](int, int) { set_this_thread(on); });
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
