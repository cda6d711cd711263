// Image decoding alone, through canopy's decoders (canopy::datasets::decode_image), one file
// after another on one thread: bench/image_decode_compare.py runs it beside PIL on the same files.
//   decode_bench --repeats R FILE...   prints the seconds of each pass over the files, one per line
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "canopy/datasets/images.h"

int main(int argc, char** argv) {
  int repeats = 3;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) {
      repeats = std::atoi(argv[++i]);
    } else {
      files.emplace_back(argv[i]);
    }
  }
  if (files.empty() || repeats < 1) {
    std::fprintf(stderr, "usage: decode_bench --repeats R FILE...\n");
    return 2;
  }
  std::int64_t values = 0;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& f : files) values += canopy::datasets::decode_image(f).numel();
    std::printf("%.6f\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::fprintf(stderr, "decode_bench: %zu files x %d passes, %lld values\n", files.size(), repeats,
               static_cast<long long>(values));
  return 0;
}
