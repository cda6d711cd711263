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

// The smallest room over MemAvailable (/proc/meminfo) and each memory cgroup's limit less its
// use (page cache that can be dropped, inactive_file, not counted as use), shared among
// `sharers` processes started together (the ranks mpirun put on this machine). nullopt when
// neither can be read (not Linux).
std::optional<MemoryRoom> memory_room(int sharers = 1);

namespace detail {
// The parts memory_room reads, apart for tests: MemAvailable in bytes from /proc/meminfo's
// text; a cgroup's room from its limit file ("max" or a number), usage and memory.stat texts
// (nullopt when there is no limit).
std::optional<std::uint64_t> mem_available(const std::string& meminfo);
std::optional<std::uint64_t> cgroup_room(const std::string& limit, const std::string& usage,
                                         const std::string& stat, bool v1);
}  // namespace detail

}  // namespace canopy
