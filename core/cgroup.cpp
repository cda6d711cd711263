#include "canopy/core/cgroup.h"

#include <sstream>

#include "canopy/core/fs.h"

namespace canopy {
namespace {

bool has_word(const std::string& list, const std::string& word) {
  return ("," + list + ",").find("," + word + ",") != std::string::npos;
}

struct Mount {
  std::string root, point;
  bool v1 = false;
};

// The cgroup mounts (/proc/self/mountinfo: id parent dev root point opts ... - type src super)
// of the v1 hierarchy holding `controller` and of v2.
std::vector<Mount> mounts(const std::string& controller) {
  std::vector<Mount> out;
  std::istringstream in(read_file_or_empty("/proc/self/mountinfo"));
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::vector<std::string> w;
    for (std::string s; f >> s;) w.push_back(s);
    std::size_t dash = 0;
    while (dash < w.size() && w[dash] != "-") ++dash;
    if (dash < 5 || dash + 3 >= w.size()) continue;
    if (w[dash + 1] == "cgroup2") out.push_back({w[3], w[4], false});
    if (w[dash + 1] == "cgroup" && has_word(w[dash + 3], controller)) out.push_back({w[3], w[4], true});
  }
  return out;
}

}  // namespace

std::vector<CgroupDir> cgroup_dirs(const std::string& controller) {
  // This process's path in the v1 hierarchy of `controller` and in v2 (/proc/self/cgroup).
  std::string v1, v2;
  std::istringstream in(read_file_or_empty("/proc/self/cgroup"));
  std::string line;
  while (std::getline(in, line)) {
    const auto a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string path = line.substr(b + 1);
    if (line.compare(0, a, "0") == 0 && b == a + 1) v2 = path;
    if (has_word(line.substr(a + 1, b - a - 1), controller)) v1 = path;
  }
  std::vector<CgroupDir> out;
  for (const auto& m : mounts(controller)) {
    const std::string& own = m.v1 ? v1 : v2;
    if (own.empty() || own.compare(0, m.root.size(), m.root) != 0) continue;
    // Below the mount's root (a container's namespace shows its own cgroup as "/").
    std::string rel = m.root == "/" ? own : own.substr(m.root.size());
    while (!rel.empty() && rel.back() == '/') rel.pop_back();
    while (true) {
      out.push_back(
          {rel.empty() ? m.point : join_path(m.point, rel.substr(1)), rel.empty() ? "/" : rel, m.v1});
      if (rel.empty()) break;
      rel = rel.substr(0, rel.find_last_of('/'));
    }
  }
  return out;
}

std::string read_cgroup_file(const CgroupDir& dir, const std::string& file) {
  return read_file_or_empty(join_path(dir.dir, file));
}

std::optional<long> cpus_of_quota(const std::string& quota, const std::string& period) {
  std::istringstream q(quota), p(period);
  long us = 0, per = 0;
  if (!(q >> us) || us <= 0) return std::nullopt;  // "max" (v2) or -1 (v1): none
  if (!(p >> per) || per <= 0) return std::nullopt;
  return (us + per - 1) / per;
}

}  // namespace canopy
