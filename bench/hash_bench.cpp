// Hashing time of the files canopy pins and fingerprints (trunk files, input data), through
// canopy::sha256_file, next to `sha256sum` on the same files in the same run.
//   hash_bench FILE...      prints seconds and MB/s per file, best of 5, and the ratio
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

#include "canopy/core/fs.h"
#include "canopy/core/sha256.h"

namespace {
double best_of(int repeats, const std::function<void()>& fn) {
  double best = 1e300;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: hash_bench FILE...\n");
    return 2;
  }
  std::printf("%-60s %10s %10s %10s %8s\n", "file", "MB", "canopy s", "sha256sum", "ratio");
  for (int i = 1; i < argc; ++i) {
    const std::string path = argv[i];
    const double mb = static_cast<double>(canopy::file_size(path)) / 1e6;
    std::string digest;
    const double ours = best_of(5, [&] { digest = canopy::sha256_file(path); });
    const std::string cmd = "sha256sum '" + path + "' > /dev/null";
    const double tool = best_of(5, [&] { (void)std::system(cmd.c_str()); });
    std::printf("%-60s %10.1f %10.4f %10.4f %8.2f  (%.0f MB/s) %s\n", path.c_str(), mb, ours, tool,
                tool / ours, mb / ours, digest.substr(0, 16).c_str());
  }
  return 0;
}
