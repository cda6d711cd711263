#include "canopy/core/torch_team.h"

#include <dlfcn.h>

#include <ATen/Parallel.h>

namespace canopy {
namespace {

// The OpenMP runtime LibTorch loaded (its libgomp, or one that speaks its ABI); null without.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpInt = int (*)();

template <typename F>
F runtime_symbol(const char* name) {
  return reinterpret_cast<F>(dlsym(RTLD_DEFAULT, name));
}

struct Runtime {
  GompParallel parallel = runtime_symbol<GompParallel>("GOMP_parallel");
  OmpInt thread_num = runtime_symbol<OmpInt>("omp_get_thread_num");
  OmpInt num_threads = runtime_symbol<OmpInt>("omp_get_num_threads");
  bool present() const { return parallel && thread_num && num_threads; }
};

const Runtime& runtime() {
  static const Runtime r;
  return r;
}

void call_on_thread(void* fn) {
  const Runtime& r = runtime();
  (*static_cast<const std::function<void(int, int)>*>(fn))(r.thread_num(), r.num_threads());
}

}  // namespace

void on_every_torch_thread(const std::function<void(int, int)>& fn) {
  const int team = at::get_num_threads();
  if (team > 1 && !at::in_parallel_region() && runtime().present()) {
    runtime().parallel(call_on_thread, const_cast<std::function<void(int, int)>*>(&fn),
                       static_cast<unsigned>(team), 0);
    return;
  }
  fn(0, 1);
}

}  // namespace canopy
