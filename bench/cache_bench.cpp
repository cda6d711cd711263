// Feature-cache benchmark, side by side in one run:
//   1. building the cache vs a bare batched inference pass of the same trunk over the same
//      images (same preprocessing, same batches, the same kept heap as the cache build's
//      trunk pass, nothing written);                                        goal <= 1.05x
//   2. reading the cache (pread and HDF5 paths) vs a raw sequential read of the same bytes,
//      warm page cache;                                                     goal >= 80%
//   3. streaming a split under a memory cap: peak bytes held and RSS growth vs the cap;
//   4. one training epoch of a head on the cache vs one epoch that runs the frozen trunk
//      for every batch, as a plain fine-tuning loop with a frozen backbone does;
//                                                                           goal >= 100x
//
//   cache_bench [--trunk FILE] [--images N] [--rows N] [--dim D] [--repeats R] [--workdir DIR]
//
// It works in a new folder made inside --workdir (default /tmp) and removes that folder at
// the end; a run that fails leaves it, to look into.
#include <fcntl.h>
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/randperm.h>
#include <ATen/ops/zeros.h>

#include "bench_util.h"
#include "canopy/core/crc32c.h"
#include "canopy/core/fs.h"
#include "canopy/core/heap.h"
#include "canopy/core/progress.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/batch_source.h"
#include "canopy/datasets/feature_cache.h"
#include "canopy/datasets/mnist.h"
#include "canopy/datasets/preprocess.h"
#include "canopy/runners/cache_job.h"
#include "canopy/runners/config.h"
#include "canopy/tasks/registry.h"
#include "canopy/tasks/task.h"
#include "canopy/trunk/trunk.h"

using namespace canopy;
using namespace canopy::bench;

namespace {
long rss_kb() {
  std::ifstream in("/proc/self/status");
  std::string key;
  long value = 0;
  while (in >> key) {
    if (key == "VmRSS:") {
      in >> value;
      return value;
    }
    std::getline(in, key);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const char* home = std::getenv("CANOPY_HOME");
  const std::string default_trunk =
      std::string(home && *home ? home : std::string(std::getenv("HOME")) + "/.cache/canopy") +
      "/trunks/efficientnet_lite0.pt";
  const std::string trunk_path = arg(argc, argv, "--trunk", default_trunk);
  const std::int64_t images = std::stoll(arg(argc, argv, "--images", "2560"));
  const std::int64_t rows = std::stoll(arg(argc, argv, "--rows", "60000"));
  const std::int64_t dim = std::stoll(arg(argc, argv, "--dim", "1280"));
  const int repeats = std::stoi(arg(argc, argv, "--repeats", "5"));
  std::string tmpl = arg(argc, argv, "--workdir", "/tmp") + "/canopy-bench-XXXXXX";
  if (!::mkdtemp(tmpl.data())) {
    std::fprintf(stderr, "cache_bench: cannot make a work folder %s: %s\n", tmpl.c_str(),
                 std::strerror(errno));
    return 1;
  }
  const std::string work = tmpl;
  std::printf("cache_bench: trunk %s, %lld images; read test %lld x %lld float32 (%.0f MiB); %d repeats\n",
              trunk_path.c_str(), static_cast<long long>(images), static_cast<long long>(rows),
              static_cast<long long>(dim), rows * dim * 4.0 / (1 << 20), repeats);

  // ---- 1. cache build vs bare inference --------------------------------------------
  runners::JobConfig job;
  job.source = "cache_bench";
  job.data.train_limit = images;
  job.data.test_limit = 1;
  job.preprocess.resize = 64;
  job.trunk.path = trunk_path;
  job.trunk.device = "auto";
  job.trunk.allow_unpinned = true;  // the file given on the command line
  job.cache.path = work + "/build";
  job.cache.batch_size = 128;
  job.cache.shard_rows = 1024;
  trunk::Trunk trunk = trunk::Trunk::load(job.trunk);
  const auto data = datasets::read_mnist_split(job.data.dir, "train", images);
  std::vector<double> bare, build, ratio;
  for (int r = 0; r < repeats; ++r) {
    auto t = Clock::now();
    {
      // As run_cache runs its trunk pass: without it, glibc maps and unmaps the activations
      // of every batch (page faults), and the bare pass is the slower one by 3.7x (EPYC).
      const KeepFreedMemory kept;
      for (std::int64_t i = 0; i < images; i += job.cache.batch_size) {
        const auto end = std::min(images, i + job.cache.batch_size);
        trunk.encode(datasets::preprocess_images(data.images.slice(0, i, end), job.preprocess));
      }
    }
    bare.push_back(seconds_since(t));
    t = Clock::now();
    runners::run_cache(job, /*force=*/true, &trunk, ProgressStyle::kQuiet);
    build.push_back(seconds_since(t));
    ratio.push_back(build.back() / bare.back());
  }
  const Stats sb = stats(bare), sc = stats(build), sr = stats(ratio);
  std::printf("\n[1] cache build vs bare inference (%s, %lld images at 64x64, batch 128)\n",
              trunk.device().str().c_str(), static_cast<long long>(images + 1));
  std::printf("    bare inference  median %.2fs (min %.2f, max %.2f)\n", sb.median, sb.min, sb.max);
  std::printf("    cache build     median %.2fs (min %.2f, max %.2f)\n", sc.median, sc.min, sc.max);
  std::printf("    RATIO build/bare = %.3f (min %.3f, max %.3f)   goal <= 1.05\n", sr.median, sr.min, sr.max);

  // ---- 4. an epoch on the cache vs an epoch recomputing the trunk ----------------------
  // (printed last, measured here while the cache of [1] and the images are at hand)
  std::string p1_report;
  {
    tasks::HeadRegistry registry;
    tasks::register_builtin_heads(registry);
    tasks::TaskConfig tc;
    tc.name = "p1";  // a linear head, Adam, lr 1e-3
    const auto cached = datasets::FeatureCache::open(job.cache.path);
    const std::int64_t bs = 256, n = cached.rows("train");
    std::vector<double> on_cache, recompute, ratio1;
    for (int r = 0; r < repeats; ++r) {
      tasks::Task a(tc, registry, cached.feature_dim(), 10, 1);
      auto t = Clock::now();
      auto source = datasets::make_in_memory_source(cached.load_split("train"), bs, 0);  // the load counts
      source->start_epoch(r);
      datasets::Batch batch;
      while (source->next(batch)) a.train_step(batch.features, batch.labels.at("class"));
      on_cache.push_back(seconds_since(t));
      tasks::Task b(tc, registry, cached.feature_dim(), 10, 1);
      t = Clock::now();
      const at::Tensor order = at::randperm(n, at::TensorOptions().dtype(at::kLong));
      for (std::int64_t i = 0; i < n; i += bs) {
        const at::Tensor idx = order.slice(0, i, std::min(n, i + bs));
        const at::Tensor f =
            trunk.encode(datasets::preprocess_images(data.images.index_select(0, idx), job.preprocess));
        // An inference-mode tensor cannot be saved for backward: a normal copy, as any
        // loop that runs a frozen trunk under inference mode must make.
        b.train_step(f.to(at::kCPU).clone(), data.labels.index_select(0, idx));
      }
      recompute.push_back(seconds_since(t));
      ratio1.push_back(recompute.back() / on_cache.back());
    }
    const Stats so = stats(on_cache), sre = stats(recompute), sr1 = stats(ratio1);
    char buf[1024];
    std::snprintf(buf, sizeof buf,
                  "\n[4] one epoch of a linear head over %lld images (batch %lld, %s): on the cache vs "
                  "recomputing the trunk\n"
                  "    on the cache (load + train)   median %.4fs (min %.4f, max %.4f)\n"
                  "    trunk per batch + train       median %.2fs (min %.2f, max %.2f)\n"
                  "    RATIO recompute/cache = %.0f (min %.0f, max %.0f)   goal >= 100\n",
                  static_cast<long long>(n), static_cast<long long>(bs), trunk.device().str().c_str(),
                  so.median, so.min, so.max, sre.median, sre.min, sre.max, sr1.median, sr1.min, sr1.max);
    p1_report = buf;
  }

  // ---- 2. read throughput vs raw sequential read ------------------------------------
  const std::string read_dir = work + "/read";
  {
    datasets::CacheMeta meta;
    meta.fingerprint = "bench";
    meta.feature_dim = dim;
    meta.class_names = {"a", "b"};
    datasets::FeatureCacheWriter w(read_dir, meta, {{"train", rows}}, 4096, false);
    for (std::int64_t i = 0; i < rows; i += 4096) {
      const auto n = std::min<std::int64_t>(4096, rows - i);
      w.append("train", at::randn({n, dim}), {{"class", at::zeros({n}, at::kLong)}},
               at::arange(i, i + n, at::kLong));
    }
    w.finish();
  }
  const auto cache = datasets::FeatureCache::open(read_dir);
  const auto shards = cache.shards("train");
  std::uint64_t file_bytes = 0;
  for (const auto& s : shards) file_bytes += s.bytes;
  const double feature_bytes = static_cast<double>(cache.feature_bytes("train"));
  // The baseline reads the same files whole, sequentially, on one thread, into freshly
  // allocated memory (as canopy's loader does: first-touch page faults count for both).
  std::unique_ptr<char[]> buf;
  bool fresh = true;
  auto raw_read = [&] {
    if (fresh || !buf) buf.reset(new char[file_bytes]);
    std::uint64_t off = 0;
    for (const auto& s : shards) {
      const int fd = ::open(join_path(read_dir, s.file).c_str(), O_RDONLY);
      std::uint64_t got = 0;
      while (got < s.bytes) {
        const ssize_t n = ::read(fd, buf.get() + off + got, s.bytes - got);
        if (n <= 0) break;
        got += static_cast<std::uint64_t>(n);
      }
      ::close(fd);
      off += got;
    }
  };
  raw_read();  // warm the page cache
  for (const bool fresh_memory : {true, false}) {
    fresh = fresh_memory;
    datasets::SplitData reuse_pread, reuse_hdf5;
    if (!fresh) {  // fault every destination in once, outside the timing
      raw_read();
      reuse_pread = cache.load_split("train");
      reuse_hdf5 = cache.load_split("train");
    }
    std::vector<double> raw_gbs, pread_gbs, hdf5_gbs, pread_ratio, hdf5_ratio;
    for (int r = 0; r < repeats; ++r) {
      auto t = Clock::now();
      raw_read();
      const double raw = seconds_since(t);
      t = Clock::now();
      auto a = cache.load_split("train", datasets::ReadMethod::kPread, fresh ? nullptr : &reuse_pread);
      const double pr = seconds_since(t);
      t = Clock::now();
      auto b = cache.load_split("train", datasets::ReadMethod::kHdf5, fresh ? nullptr : &reuse_hdf5);
      const double h5 = seconds_since(t);
      raw_gbs.push_back(file_bytes / raw / 1e9);
      pread_gbs.push_back(feature_bytes / pr / 1e9);
      hdf5_gbs.push_back(feature_bytes / h5 / 1e9);
      pread_ratio.push_back(pread_gbs.back() / raw_gbs.back());
      hdf5_ratio.push_back(hdf5_gbs.back() / raw_gbs.back());
    }
    const Stats s_raw = stats(raw_gbs), s_pr = stats(pread_gbs), s_h5 = stats(hdf5_gbs);
    const Stats r_pr = stats(pread_ratio), r_h5 = stats(hdf5_ratio);
    std::printf(
        "\n[2%s] reading %zu shards (%.0f MiB of features), warm page cache, checksums verified, into %s\n",
        fresh ? "a" : "b", shards.size(), feature_bytes / (1 << 20),
        fresh ? "freshly allocated memory (a user's load)"
              : "memory already faulted in (the read path alone)");
    std::printf("    raw sequential read   median %.2f GB/s (min %.2f, max %.2f)\n", s_raw.median, s_raw.min,
                s_raw.max);
    std::printf("    canopy pread          median %.2f GB/s (min %.2f, max %.2f)\n", s_pr.median, s_pr.min,
                s_pr.max);
    std::printf("    canopy HDF5 H5Dread   median %.2f GB/s (min %.2f, max %.2f)\n", s_h5.median, s_h5.min,
                s_h5.max);
    std::printf("    RATIO pread/raw = %.2f (min %.2f, max %.2f)   goal >= 0.80\n", r_pr.median, r_pr.min,
                r_pr.max);
    std::printf("    RATIO hdf5/raw  = %.2f (min %.2f, max %.2f)\n", r_h5.median, r_h5.min, r_h5.max);
  }
  {
    const at::Tensor block = at::randn({64 << 20 >> 2});  // 64 MiB
    crc32c(block.data_ptr(), 1024);
    std::vector<double> gbs;
    for (int r = 0; r < repeats; ++r) {
      const auto t = Clock::now();
      volatile std::uint32_t c = crc32c(block.data_ptr(), 64 << 20);
      (void)c;
      gbs.push_back((64 << 20) / seconds_since(t) / 1e9);
    }
    std::printf("    (CRC-32C alone, one thread: median %.2f GB/s)\n", stats(gbs).median);
  }

  // ---- 3. streaming under a cap -------------------------------------------------------
  const std::uint64_t cap = 96ull << 20;
  buf.reset();
  const long rss_before = rss_kb();
  long rss_peak = rss_before;
  {
    auto src = datasets::make_streaming_source(cache, "train", 256, 0, cap, datasets::ReadMethod::kPread);
    src->start_epoch(0);
    datasets::Batch batch;
    std::int64_t n = 0;
    const auto t = Clock::now();
    while (src->next(batch)) {
      n += batch.features.size(0);
      rss_peak = std::max(rss_peak, rss_kb());
    }
    std::printf("\n[3] streaming one epoch under a %llu MiB cap: %lld rows in %.2fs (%s)\n",
                static_cast<unsigned long long>(cap >> 20), static_cast<long long>(n), seconds_since(t),
                src->describe().c_str());
    std::printf("    peak bytes held %.1f MiB = %.2f of the cap; RSS growth %.1f MiB = %.2f of the cap\n",
                src->peak_bytes() / 1048576.0, static_cast<double>(src->peak_bytes()) / cap,
                (rss_peak - rss_before) / 1024.0, (rss_peak - rss_before) * 1024.0 / cap);
  }
  std::printf("%s", p1_report.c_str());
  remove_tree(work);
  return 0;
}
