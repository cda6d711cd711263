// Trainer benchmark, side by side in one run, on a real cache (build it first with
// `canopy cache --config CONFIG`):
//   1. all heads of the config in one `canopy train` vs one run per head, in sequence
//      (each run loads the cache and trains its head alone, with 2 LibTorch threads);
//                                                                        goal >= 5x for 8 heads
//   2. the same one-run training with 1 and with 2 TBB workers (scaling over cores).
//
//   train_bench --config configs/fmnist_lite0.ini [--repeats R] [--epochs E]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <unistd.h>

#include "bench_util.h"
#include "canopy/core/fs.h"
#include "canopy/core/progress.h"
#include "canopy/runners/config.h"
#include "canopy/runners/train_job.h"
#include "canopy/tasks/registry.h"

using namespace canopy;
using namespace canopy::bench;

int main(int argc, char** argv) {
  const std::string config_path = arg(argc, argv, "--config", "configs/fmnist_lite0.ini");
  const int repeats = std::stoi(arg(argc, argv, "--repeats", "5"));
  const std::string epochs = arg(argc, argv, "--epochs", "5");
  char tmpl[] = "/tmp/canopy-train-bench-XXXXXX";
  const std::string work = ::mkdtemp(tmpl);
  tasks::HeadRegistry registry;
  tasks::register_builtin_heads(registry);
  runners::JobConfig config = runners::load_job_config(
      config_path, {"train.epochs=" + epochs, "train.out_dir=" + work, "train.tensorboard=false"});
  const std::size_t heads = config.tasks.size();
  std::printf("train_bench: %s, %zu heads, %s epochs, %d repeats\n", config_path.c_str(), heads, epochs.c_str(),
              repeats);

  auto one_run = [&](int workers) {
    runners::JobConfig c = config;
    c.train.workers = workers;
    const auto t = Clock::now();
    runners::run_train(c, registry, ProgressStyle::kQuiet);
    return seconds_since(t);
  };
  auto separate_runs = [&] {
    const auto t = Clock::now();
    for (const auto& task : config.tasks) {
      runners::JobConfig c = config;
      c.tasks = {task};
      // A single head gets both cores through LibTorch's intra-op threads (its best setting).
      c.train.workers = 1;
      c.train.intra_op_threads = 2;
      runners::run_train(c, registry, ProgressStyle::kQuiet);
    }
    return seconds_since(t);
  };
  one_run(0);  // warm-up: page cache, first-touch allocations
  std::vector<double> together, apart, ratio, w1, w2, scale;
  for (int r = 0; r < repeats; ++r) {
    together.push_back(one_run(0));
    apart.push_back(separate_runs());
    ratio.push_back(apart.back() / together.back());
    w1.push_back(one_run(1));
    w2.push_back(one_run(2));
    scale.push_back(w1.back() / w2.back());
  }
  const Stats st = stats(together), sa = stats(apart), sr = stats(ratio);
  std::printf("\n[1] %zu heads: one run vs %zu separate single-head runs\n", heads, heads);
  std::printf("    one run          median %.2fs (min %.2f, max %.2f)\n", st.median, st.min, st.max);
  std::printf("    separate runs    median %.2fs (min %.2f, max %.2f)\n", sa.median, sa.min, sa.max);
  std::printf("    RATIO separate/one = %.2f (min %.2f, max %.2f)   goal >= 5 for 8 heads\n", sr.median, sr.min, sr.max);
  const Stats s1 = stats(w1), s2 = stats(w2), ss = stats(scale);
  std::printf("\n[2] one run, TBB workers (1 LibTorch thread each)\n");
  std::printf("    1 worker         median %.2fs (min %.2f, max %.2f)\n", s1.median, s1.min, s1.max);
  std::printf("    2 workers        median %.2fs (min %.2f, max %.2f)\n", s2.median, s2.min, s2.max);
  std::printf("    SPEED-UP 1->2 cores = %.2f (min %.2f, max %.2f)\n", ss.median, ss.min, ss.max);
  remove_tree(work);
  return 0;
}
