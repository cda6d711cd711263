// A fence on the memory a stretch of work may take, so that running out of it is an error
// that says so rather than the kernel's OOM kill, which ends the process without a word.
// `canopy cache` and `canopy predict` fence their trunk passes, `canopy train` its training
// loop (where one head's refused step fails that head alone).
//
// While a MemoryFence lives, the process's data segment may grow by no more than the room
// given, less 1/16 for what the kernel charges beside (RLIMIT_DATA, lowered from the data
// segment now; the soft limit only, and never raised): an allocation past it fails, and
// LibTorch throws where it would have allocated. A failure of LibTorch's CPU allocator is
// noted (it is wrapped while the fence lives), so the caller can tell memory from other
// errors. The data segment counts what malloc and private mappings reserve, at least what
// they make resident, so the fence errs towards refusing.
//
// Process-wide while it lives: every thread's allocations meet it. Not set (active() false)
// without a room; where the machine has free swap (memory past the room is swapped out there,
// slowly, rather than killed for); under AddressSanitizer or ThreadSanitizer (their allocators
// end the process where an allocation is refused); or where the limit cannot be set.
#pragma once

#include <cstdint>
#include <exception>
#include <optional>

#include "canopy/core/memory.h"

namespace canopy {

class MemoryFence {
 public:
  // An allocation the fence refused: its size, and how far the data segment had grown since
  // the fence was set when it was asked for.
  struct Refusal {
    std::uint64_t asked = 0;
    std::uint64_t grown = 0;
  };

  explicit MemoryFence(std::optional<MemoryRoom> room);
  ~MemoryFence();
  MemoryFence(const MemoryFence&) = delete;
  MemoryFence& operator=(const MemoryFence&) = delete;

  bool active() const { return active_; }
  const MemoryRoom& room() const { return room_; }
  // The first allocation LibTorch's CPU allocator failed while the fence lived.
  std::optional<Refusal> refusal() const;
  // Whether `e`, thrown while the fence lived, is the fence's doing: it is set, and refused
  // an allocation (or `e` is std::bad_alloc). A stop by signal (Stopped) or a failed write
  // (IoError) says its own, whatever was refused before.
  bool caused(const std::exception& e) const;

  struct Noting;  // the allocator wrapper

 private:
  bool active_ = false;
  MemoryRoom room_;
  std::uint64_t start_ = 0;
  std::uint64_t old_soft_ = 0;
  Noting* noting_ = nullptr;
};

}  // namespace canopy
