// Running canopy's own loops on LibTorch's intra-op threads.
//
// LibTorch's intra-op pool is an OpenMP team that the calling thread leads. canopy is not
// compiled with OpenMP (a second runtime would keep a second pool of spinning threads), so an
// at::parallel_for in canopy's code runs serially; this reaches the runtime LibTorch loaded
// instead, as a `#pragma omp parallel` compiled into LibTorch does.
#pragma once

#include <functional>

namespace canopy {

// Calls fn(i, n) once on each of the n threads of the calling thread's LibTorch team (i = 0 is
// the caller; n <= at::get_num_threads(), what the runtime grants). Runs fn(0, 1) on the caller
// alone when its count is 1, inside a parallel region, or without the OpenMP runtime. fn must
// not throw.
void on_every_torch_thread(const std::function<void(int, int)>& fn);

}  // namespace canopy
