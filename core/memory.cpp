#include "canopy/core/memory.h"

#include <fstream>
#include <sstream>
#include <vector>

#include "canopy/core/fs.h"
#include "canopy/core/strings.h"

namespace canopy {
namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  if (!in) return "";
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

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

struct Mount {
  std::string root, point;
  bool v1 = false;
};

// The memory cgroup mounts (/proc/self/mountinfo: id parent dev root point opts ... - type src super).
std::vector<Mount> memory_mounts() {
  std::vector<Mount> out;
  std::istringstream in(slurp("/proc/self/mountinfo"));
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::vector<std::string> w;
    for (std::string s; f >> s;) w.push_back(s);
    std::size_t dash = 0;
    while (dash < w.size() && w[dash] != "-") ++dash;
    if (dash < 5 || dash + 3 >= w.size()) continue;
    const std::string& type = w[dash + 1];
    const std::string& super = w[dash + 3];
    if (type == "cgroup2") out.push_back({w[3], w[4], false});
    if (type == "cgroup" && ("," + super + ",").find(",memory,") != std::string::npos)
      out.push_back({w[3], w[4], true});
  }
  return out;
}

// This process's path in the v1 memory hierarchy and in the v2 one (/proc/self/cgroup).
void own_paths(std::string& v1, std::string& v2) {
  std::istringstream in(slurp("/proc/self/cgroup"));
  std::string line;
  while (std::getline(in, line)) {
    const auto a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = "," + line.substr(a + 1, b - a - 1) + ",";
    const std::string path = line.substr(b + 1);
    if (line.compare(0, a, "0") == 0 && b == a + 1) v2 = path;
    if (controllers.find(",memory,") != std::string::npos) v1 = path;
  }
}

}  // namespace

namespace detail {

std::optional<std::uint64_t> mem_available(const std::string& meminfo) {
  std::istringstream in(meminfo);
  std::string key, unit;
  std::uint64_t v = 0;
  while (in >> key >> v) {
    std::getline(in, unit);
    if (key == "MemAvailable:") return v * 1024;
  }
  return std::nullopt;
}

std::optional<std::uint64_t> cgroup_room(const std::string& limit, const std::string& usage,
                                         const std::string& stat, bool v1) {
  const auto cap = number(limit);
  // v2 writes "max" for none; v1 a page-rounded 2^63 - 1.
  if (!cap || *cap >= (std::uint64_t(1) << 62)) return std::nullopt;
  std::uint64_t used = number(usage).value_or(0);
  const auto inactive = stat_value(stat, v1 ? "total_inactive_file" : "inactive_file");
  if (inactive) used -= std::min(used, *inactive);
  return *cap > used ? *cap - used : 0;
}

}  // namespace detail

std::optional<MemoryRoom> memory_room(int sharers) {
  std::optional<MemoryRoom> room;
  auto consider = [&](std::uint64_t bytes, const std::string& said) {
    if (!room || bytes < room->bytes) room = MemoryRoom{bytes, said};
  };
  if (const auto avail = detail::mem_available(slurp("/proc/meminfo")))
    consider(*avail, "the machine's available memory (MemAvailable " + mib(*avail) + ")");
  std::string v1, v2;
  own_paths(v1, v2);
  for (const auto& m : memory_mounts()) {
    const std::string& own = m.v1 ? v1 : v2;
    if (own.empty() || own.compare(0, m.root.size(), m.root) != 0) continue;
    std::string rel = m.root == "/" ? own : own.substr(m.root.size());
    // The limits of the cgroup and of every one above it apply.
    while (true) {
      const std::string dir = join_path(m.point, rel == "/" ? "" : rel.substr(rel[0] == '/' ? 1 : 0));
      const std::string limit = slurp(join_path(dir, m.v1 ? "memory.limit_in_bytes" : "memory.max"));
      const std::string usage = slurp(join_path(dir, m.v1 ? "memory.usage_in_bytes" : "memory.current"));
      if (const auto r = detail::cgroup_room(limit, usage, slurp(join_path(dir, "memory.stat")), m.v1)) {
        consider(*r, "the memory cgroup '" + (rel.empty() ? "/" : rel) + "' (limit " + mib(*number(limit)) +
                         ", " + mib(*number(limit) - *r) + " of it in use)");
      }
      if (rel.empty() || rel == "/") break;
      const auto slash = rel.find_last_of('/');
      rel = slash == std::string::npos || slash == 0 ? "/" : rel.substr(0, slash);
    }
  }
  if (room && sharers > 1) {
    room->bytes /= static_cast<std::uint64_t>(sharers);
    room->said += ", shared by the " + std::to_string(sharers) + " processes on this machine";
  }
  return room;
}

}  // namespace canopy
