// `canopy cache`: run the frozen trunk once per sample and store features and labels in
// the feature cache (format in canopy/datasets/feature_cache.h). Crash-safe: a killed run
// resumes from its finished shards, and the result is bitwise the same as one that was
// never interrupted.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "canopy/core/progress.h"
#include "canopy/runners/config.h"

namespace canopy::trunk {
class Trunk;
}
namespace canopy::tasks {
class HeadRegistry;
}

namespace canopy::runners {

// The canonical description of everything that changes the cached features, one
// `part=value` per line; its SHA-256 is the cache fingerprint.
std::string cache_description(const JobConfig& config, const std::string& trunk_sha256);

struct CacheReport {
  std::string path;
  bool rebuilt = false;  // false: the cache was already up to date
  std::string reason;    // why it was (re)built, resumed or kept
  std::string fingerprint;
  std::int64_t feature_dim = 0;
  std::map<std::string, std::int64_t> rows;  // per split
  std::int64_t rows_computed = 0;            // rows the trunk ran on in this run
  double seconds = 0.0;                      // whole job
  double trunk_seconds = 0.0;                // time inside preprocessing and the trunk's forward pass
  double write_wait_seconds = 0.0;           // time the trunk waited for the writer (0 when overlapped)
};

// Builds the cache unless one with the same fingerprint is complete (or `force`). An
// unfinished cache with the same fingerprint is resumed. Uses `trunk` when given. A trunk
// that gives non-finite features (NaN, Inf) for any row is a DataError naming how many rows
// and the first ids, and the cache is not finished (its manifest is removed: the next run
// starts over).
// Given `registry`, the config's tasks are checked against what the cache will hold before the
// trunk pass (check_tasks: what training would refuse); with `refuse_tasks` (`canopy run`,
// `canopy cache --check-tasks`) such a task is refused, so that a mistake costs no cache build,
// else (`canopy cache`, whose cache serves any config of these features) it is said in a log
// line and the cache is built.
CacheReport run_cache(const JobConfig& config, bool force = false, trunk::Trunk* trunk = nullptr,
                      ProgressStyle style = ProgressStyle::kAuto,
                      const tasks::HeadRegistry* registry = nullptr, bool refuse_tasks = false);

// The description a cache built from `config` must carry: the trunk's hash is the pinned
// trunk.sha256 when there is one, else the trunk file's (DataError when it is missing).
std::string expected_cache_description(const JobConfig& config);

// `canopy inspect`: splits, shapes, dtype, size on disk, the fingerprint's parts,
// completeness, and — given a config — whether the cache matches it. With `verify`, every
// shard's size and checksums are checked too, with progress as `style` says. Returns the
// report; `ok` (if given) is set to whether the cache is complete, verified when asked, and
// matches the config.
std::string inspect_cache(const std::string& dir, const JobConfig* config, bool verify, bool* ok = nullptr,
                          ProgressStyle style = ProgressStyle::kQuiet);

// A description's `part=value` lines as a map.
std::map<std::string, std::string> parse_description(const std::string& description);

// Names the description parts that differ, e.g. "preprocess (resize=64 -> resize=96)".
std::vector<std::string> describe_changes(const std::string& old_description,
                                          const std::string& new_description);

}  // namespace canopy::runners
