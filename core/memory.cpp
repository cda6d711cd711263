#include "canopy/core/memory.h"

#include <sstream>

#include "canopy/core/cgroup.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"

namespace canopy {
namespace {

std::optional<std::uint64_t> number(const std::string& text) {
  std::istringstream in(text);
  std::uint64_t v = 0;
  if (!(in >> v)) return std::nullopt;
  return v;
}

// The value of `key` in a "key value" file (memory.stat).
std::optional<std::uint64_t> stat_value(const std::string& stat, const std::string& key) {
  std::istringstream in(stat);
  std::string k;
  std::uint64_t v = 0;
  while (in >> k >> v) {
    if (k == key) return v;
  }
  return std::nullopt;
}

std::string mib(std::uint64_t bytes) { return format_mib(static_cast<double>(bytes)); }

}  // namespace

namespace detail {

std::optional<std::uint64_t> meminfo_bytes(const std::string& meminfo, const std::string& key) {
  std::istringstream in(meminfo);
  std::string k, unit;
  std::uint64_t v = 0;
  while (in >> k >> v) {
    std::getline(in, unit);
    if (k == key + ":") return v * 1024;
  }
  return std::nullopt;
}

std::optional<std::uint64_t> mem_available(const std::string& meminfo) {
  return meminfo_bytes(meminfo, "MemAvailable");
}

std::optional<std::uint64_t> cgroup_room(const std::string& limit, const std::string& usage,
                                         const std::string& stat, bool v1, PageCache page_cache) {
  const auto cap = number(limit);
  // v2 writes "max" for none; v1 a page-rounded 2^63 - 1.
  if (!cap || *cap >= (std::uint64_t(1) << 62)) return std::nullopt;
  std::uint64_t used = number(usage).value_or(0);
  const auto anon = stat_value(stat, v1 ? "total_rss" : "anon");
  if (page_cache == PageCache::kFree && anon) {
    // What the kernel cannot reclaim without swap: anonymous memory and tmpfs (shmem).
    used = *anon + stat_value(stat, v1 ? "total_shmem" : "shmem").value_or(0);
  } else if (const auto inactive = stat_value(stat, v1 ? "total_inactive_file" : "inactive_file")) {
    used -= std::min(used, *inactive);
  }
  return *cap > used ? *cap - used : 0;
}

}  // namespace detail

std::optional<MemoryRoom> memory_room(int sharers, PageCache page_cache) {
  std::optional<MemoryRoom> room;
  auto consider = [&](std::uint64_t bytes, const std::string& said) {
    if (!room || bytes < room->bytes) room = MemoryRoom{bytes, said};
  };
  if (const auto avail = detail::mem_available(read_file_or_empty("/proc/meminfo")))
    consider(*avail, "the machine's available memory (MemAvailable " + mib(*avail) + ")");
  for (const auto& d : cgroup_dirs("memory")) {
    const std::string limit = read_cgroup_file(d, d.v1 ? "memory.limit_in_bytes" : "memory.max");
    const std::string usage = read_cgroup_file(d, d.v1 ? "memory.usage_in_bytes" : "memory.current");
    if (const auto r =
            detail::cgroup_room(limit, usage, read_cgroup_file(d, "memory.stat"), d.v1, page_cache)) {
      consider(*r,
               "the memory cgroup '" + d.path + "' (limit " + mib(*number(limit)) + ", " +
                   mib(*number(limit) - *r) +
                   (page_cache == PageCache::kFree ? " of it in use, page cache aside)" : " of it in use)"));
    }
  }
  if (room && sharers > 1) {
    room->bytes /= static_cast<std::uint64_t>(sharers);
    room->said += ", shared by the " + std::to_string(sharers) + " processes on this machine";
  }
  return room;
}

std::uint64_t free_swap() {
  return detail::meminfo_bytes(read_file_or_empty("/proc/meminfo"), "SwapFree").value_or(0);
}

}  // namespace canopy
