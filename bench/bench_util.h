// Small helpers shared by the benchmark programs: flags, timing, median/min/max.
#pragma once

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

namespace canopy::bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// The value after `--name` on the command line, or `fallback`.
inline std::string arg(int argc, char** argv, const std::string& name, const std::string& fallback) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (argv[i] == name) return argv[i + 1];
  }
  return fallback;
}

struct Stats {
  double min, median, max;
};

inline Stats stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v.front(), v[v.size() / 2], v.back()};
}

}  // namespace canopy::bench
