// How much memory this process may still take: the kernel's MemAvailable, and the limit of
// every memory cgroup (v1 or v2) the process is in, less what is in use there. What decides
// whether training reads a split whole or streams it (cache.memory_cap_mb = 0), so a cache
// larger than the machine, or than a container's limit, is streamed instead of ending in the
// kernel's OOM kill.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace canopy {

struct MemoryRoom {
  std::uint64_t bytes = 0;
  std::string said;  // where the figure comes from, for messages
};

// How a cgroup's page cache is counted: kInUse counts all but its inactive_file (what can be
// dropped at once) as use, for plans that should not lean on reclaim; kFree counts only what
// the kernel cannot reclaim without swap (anonymous memory and tmpfs), for a limit past which
// the kernel would kill.
enum class PageCache { kInUse, kFree };

// The smallest room over MemAvailable (/proc/meminfo) and each memory cgroup's limit less its
// use (page cache counted as `page_cache` says), shared among `sharers` processes started
// together (the ranks mpirun put on this machine). nullopt when neither can be read (not Linux).
std::optional<MemoryRoom> memory_room(int sharers = 1, PageCache page_cache = PageCache::kInUse);

// Free swap on this machine (SwapFree in /proc/meminfo), 0 where there is none or it cannot
// be read. Where there is some, memory past the room is swapped out rather than killed for.
std::uint64_t free_swap();

namespace detail {
// A "Key: N kB" line of /proc/meminfo's text, in bytes.
std::optional<std::uint64_t> meminfo_bytes(const std::string& meminfo, const std::string& key);
// The parts memory_room reads, apart for tests: MemAvailable in bytes from /proc/meminfo's
// text; a cgroup's room from its limit file ("max" or a number), usage and memory.stat texts
// (nullopt when there is no limit).
std::optional<std::uint64_t> mem_available(const std::string& meminfo);
std::optional<std::uint64_t> cgroup_room(const std::string& limit, const std::string& usage,
                                         const std::string& stat, bool v1,
                                         PageCache page_cache = PageCache::kInUse);
}  // namespace detail

}  // namespace canopy
