// The cgroups this process is in, as a container's limits are set: for a v1 controller
// ("memory", "cpu") or the v2 hierarchy, the directory of the process's own cgroup and of
// every one above it up to the hierarchy's mount, whose limits all apply. Read from
// /proc/self/cgroup and /proc/self/mountinfo; empty where there is no such hierarchy.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace canopy {

struct CgroupDir {
  std::string dir;   // e.g. /sys/fs/cgroup/memory/a/b
  std::string path;  // the cgroup's own name, e.g. /a/b, for messages
  bool v1 = false;
};

// Innermost first: the v1 hierarchy holding `controller`, then the v2 one.
std::vector<CgroupDir> cgroup_dirs(const std::string& controller);

// The text of `dir`/`file`, "" when it cannot be read.
std::string read_cgroup_file(const CgroupDir& dir, const std::string& file);

// The CPUs a CFS quota grants, rounded up ("150000 100000" in v2's cpu.max, or v1's
// cpu.cfs_quota_us over cpu.cfs_period_us), nullopt for none. For tests.
std::optional<long> cpus_of_quota(const std::string& quota, const std::string& period);

}  // namespace canopy
