#include "canopy/core/heap.h"

#include <climits>  // first: defines __GLIBC__ on glibc

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace canopy {

#if defined(__GLIBC__)
KeepFreedMemory::KeepFreedMemory() {
  mallopt(M_MMAP_MAX, 0);              // every block from the heap
  mallopt(M_TRIM_THRESHOLD, INT_MAX);  // and nothing handed back while the pass runs
}

KeepFreedMemory::~KeepFreedMemory() {
  mallopt(M_MMAP_MAX, 65536);  // glibc's defaults
  mallopt(M_TRIM_THRESHOLD, 128 * 1024);
  malloc_trim(0);
}

void release_freed_memory() { malloc_trim(0); }
#else
KeepFreedMemory::KeepFreedMemory() = default;
KeepFreedMemory::~KeepFreedMemory() = default;
void release_freed_memory() {}
#endif

}  // namespace canopy
