// Keeping freed memory for reuse during a trunk pass.
//
// A trunk pass allocates and frees the same large activation buffers every batch (tens of
// MB each at batch 128). glibc's malloc serves blocks above 32 MB (its largest mmap
// threshold) with mmap and unmaps them on free, so every batch page-faults its activations
// in again: on the demo's trunk pass that was a quarter of the time, spent in the kernel.
// While a KeepFreedMemory lives, malloc takes everything from its heap and keeps what is
// freed (no mmap, no trimming), so the second batch on reuses the first's pages; when it
// ends, the defaults come back and the heap is trimmed. Process-wide (mallopt); on a C
// library other than glibc it does nothing.
#pragma once

namespace canopy {

class KeepFreedMemory {
 public:
  KeepFreedMemory();
  ~KeepFreedMemory();
  KeepFreedMemory(const KeepFreedMemory&) = delete;
  KeepFreedMemory& operator=(const KeepFreedMemory&) = delete;
};

// Hands the heap's free memory back to the kernel now (glibc's malloc_trim; elsewhere
// nothing), as a KeepFreedMemory does when it ends.
void release_freed_memory();

}  // namespace canopy
