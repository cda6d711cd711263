#include "canopy/core/memory_fence.h"

#include <sys/resource.h>

#include <mutex>
#include <new>
#include <sstream>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/sanitizers.h"
#include "canopy/core/stop.h"

namespace canopy {
namespace {

// The data segment now (VmData in /proc/self/status), in bytes.
std::optional<std::uint64_t> data_segment_bytes() {
  std::istringstream in(read_file_or_empty("/proc/self/status"));
  std::string key;
  while (in >> key) {
    std::uint64_t kib = 0;
    if (key == "VmData:" && in >> kib) return kib * 1024;
    std::getline(in, key);
  }
  return std::nullopt;
}

}  // namespace

// LibTorch's CPU allocator, noting the first allocation it fails.
struct MemoryFence::Noting final : c10::Allocator {
  Noting(c10::Allocator* inner, std::uint64_t start) : inner(inner), start(start) {}
  c10::DataPtr allocate(std::size_t n) override {
    try {
      return inner->allocate(n);
    } catch (const c10::Error&) {
      std::lock_guard<std::mutex> hold(mutex);
      if (!refusal) {
        const std::uint64_t now = data_segment_bytes().value_or(start);
        refusal = Refusal{n, now > start ? now - start : 0};
      }
      throw;
    }
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    inner->copy_data(dest, src, count);
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner->raw_deleter(); }

  c10::Allocator* const inner;
  const std::uint64_t start;
  std::mutex mutex;
  std::optional<Refusal> refusal;
};

MemoryFence::MemoryFence(std::optional<MemoryRoom> room) {
  // Off under a sanitizer's allocator: AddressSanitizer's and ThreadSanitizer's end the process
  // where an allocation past RLIMIT_DATA fails ("allocator is out of memory"), instead of
  // returning null for LibTorch to throw.
#if !defined(CANOPY_ASAN) && !defined(CANOPY_TSAN)
  const auto data = data_segment_bytes();
  rlimit limit{};
  if (!room || !data || free_swap() > 0 || getrlimit(RLIMIT_DATA, &limit) != 0) return;
  room_ = *room;
  start_ = *data;
  const rlim_t fence = static_cast<rlim_t>(*data + room->bytes - room->bytes / 16);
  if (limit.rlim_cur != RLIM_INFINITY && limit.rlim_cur <= fence) return;  // already tighter
  old_soft_ = limit.rlim_cur;
  limit.rlim_cur = fence;
  if (setrlimit(RLIMIT_DATA, &limit) != 0) return;
  active_ = true;
  // Never freed: a tensor's storage made while the fence lived keeps a pointer to the
  // allocator it came from (to grow it), and may outlive the fence.
  noting_ = new Noting(c10::GetCPUAllocator(), start_);
  c10::SetCPUAllocator(noting_);
  if (c10::GetCPUAllocator() != noting_) noting_ = nullptr;  // one of higher priority is set
#else
  (void)room;
#endif
}

MemoryFence::~MemoryFence() {
  if (noting_) c10::SetCPUAllocator(noting_->inner);
  if (!active_) return;
  rlimit limit{};
  if (getrlimit(RLIMIT_DATA, &limit) == 0) {
    limit.rlim_cur = static_cast<rlim_t>(old_soft_);
    setrlimit(RLIMIT_DATA, &limit);
  }
}

std::optional<MemoryFence::Refusal> MemoryFence::refusal() const {
  if (!noting_) return std::nullopt;
  std::lock_guard<std::mutex> hold(noting_->mutex);
  return noting_->refusal;
}

bool MemoryFence::caused(const std::exception& e) const {
  if (!active_ || dynamic_cast<const Stopped*>(&e) || dynamic_cast<const IoError*>(&e)) return false;
  return refusal().has_value() || dynamic_cast<const std::bad_alloc*>(&e) != nullptr;
}

}  // namespace canopy
