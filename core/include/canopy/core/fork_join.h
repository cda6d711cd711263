// Fork/join edges of a TBB parallel loop, made visible to ThreadSanitizer.
//
// TBB's scheduler lives in libtbb, which is not instrumented: TSan does not see that a loop's
// bodies start after the caller's earlier writes, nor that the caller continues only after
// every body has finished. It then reports the caller's later writes to its own stack, which
// a worker read inside the loop, as races. A ForkJoin marks both edges on a TSan build (and
// is empty otherwise):
//
//   ForkJoin edges;                                  // fork: the caller's writes so far
//   tbb::parallel_for(..., [&](...) {
//     [[maybe_unused]] const auto in = edges.body();                  // acquires the fork, releases at its
//     end
//     ...
//   });
//   edges.join();                                    // the caller sees every body's writes
#pragma once

#include "canopy/core/sanitizers.h"

#if defined(CANOPY_TSAN)
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

namespace canopy {

class ForkJoin {
 public:
#if defined(CANOPY_TSAN)
  ForkJoin() { __tsan_release(&fork_); }
  void join() { __tsan_acquire(&join_); }
  class Body {
   public:
    explicit Body(ForkJoin& f) : f_(f) { __tsan_acquire(&f_.fork_); }
    ~Body() { __tsan_release(&f_.join_); }
    Body(const Body&) = delete;
    Body& operator=(const Body&) = delete;

   private:
    ForkJoin& f_;
  };
  Body body() { return Body(*this); }
#else
  void join() {}
  struct Body {};
  Body body() { return {}; }
#endif

 private:
  char fork_ = 0, join_ = 0;  // addresses TSan keys the two edges on
};

}  // namespace canopy
