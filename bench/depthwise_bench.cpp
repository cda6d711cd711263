// The weight gradient of the demo trunk's depthwise convolutions: oneDNN's (what
// at::convolution_backward gives, what a PyTorch loop pays) against canopy's kernel
// (trunk/grouped_conv.h), side by side on the same tensors, channels-last float32 as a
// top trains them. Prints per shape the median milliseconds of each, their ratio, and the
// largest difference relative to the largest value.
//
//   depthwise_bench [--batch 256] [--repeats 20]
#include <cstdio>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/randn.h>

#include "bench_util.h"
#include "canopy/trunk/grouped_conv.h"

using canopy::bench::Clock;
using canopy::bench::seconds_since;

namespace {

struct Shape {
  const char* where;
  std::int64_t channels, size, kernel, stride, pad;
};

template <typename F>
canopy::bench::Stats time_ms(int repeats, F&& f) {
  f();  // warm: oneDNN creates its primitive on the first call
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    const auto t = Clock::now();
    f();
    ms.push_back(1e3 * seconds_since(t));
  }
  return canopy::bench::stats(ms);
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t batch = std::stoll(canopy::bench::arg(argc, argv, "--batch", "256"));
  const int repeats = std::stoi(canopy::bench::arg(argc, argv, "--repeats", "20"));
  // The demo trunk's (EfficientNet-Lite0's) 5x5 depthwise convolutions in the blocks a top
  // trains (`canopy trunk show`: blocks.9-13), at the demo's 64x64 images and at 224x224, as a
  // top runs them: a symmetric pad folded into the convolution's padding, blocks.11's
  // asymmetric one (1 before, 2 after) left as a padded input.
  const std::vector<Shape> shapes = {
      {"blocks.9-10, 64x64", 672, 4, 5, 1, 2},
      {"blocks.11 (stride 2), 64x64", 672, 7, 5, 2, 0},
      {"blocks.12-13, 64x64", 1152, 2, 5, 1, 2},
      {"blocks.9-10, 224x224", 672, 14, 5, 1, 2},
      {"blocks.11 (stride 2), 224x224", 672, 17, 5, 2, 0},
      {"blocks.12-13, 224x224", 1152, 7, 5, 1, 2},
  };
  std::printf(
      "depthwise weight gradient, batch %lld, %d threads, channels-last float32 (median ms over %d)\n",
      static_cast<long long>(batch), at::get_num_threads(), repeats);
  std::printf("%-32s %10s %10s %8s %10s\n", "convolution", "oneDNN", "canopy", "ratio", "rel.diff");
  for (const auto& s : shapes) {
    const auto cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor x = at::randn({batch, s.channels, s.size, s.size}).contiguous(cl);
    const at::Tensor w = at::randn({s.channels, 1, s.kernel, s.kernel}).contiguous(cl);
    const std::int64_t pad = s.pad;
    const std::int64_t out = (s.size + 2 * pad - s.kernel) / s.stride + 1;
    const at::Tensor g = at::randn({batch, s.channels, out, out}).contiguous(cl);
    at::Tensor theirs, ours;
    const auto onednn = time_ms(repeats, [&] {
      theirs = std::get<1>(at::convolution_backward(g, x, w, std::nullopt, {s.stride, s.stride}, {pad, pad},
                                                    {1, 1}, false, {0, 0}, s.channels, {false, true, false}));
    });
    const auto canopy_ms = time_ms(repeats, [&] {
      ours = canopy::trunk::depthwise_weight_grad(g, x, w, {s.stride, s.stride}, {pad, pad}, {1, 1});
    });
    const double diff = (ours - theirs).abs().max().item<double>() / theirs.abs().max().item<double>();
    std::printf("%-32s %10.2f %10.2f %8.2f %10.1e\n", s.where, onednn.median, canopy_ms.median,
                onednn.median / canopy_ms.median, diff);
  }
  return 0;
}
