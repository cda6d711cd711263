// The step runner: a unit that throws fails only its own heads; fused and lone steps give
// the same result; without fusion the weights do not depend on the worker count.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>

#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/nn/modules/linear.h>

#include "canopy/core/denormals.h"
#include "canopy/core/device.h"
#include "canopy/core/error.h"
#include "canopy/runners/step_runner.h"
#include "canopy/tasks/registry.h"
#include "support/test_support.h"

namespace canopy::runners {
namespace {

// Throws on its third forward pass.
class ThrowingHead : public heads::Head {
 public:
  ThrowingHead(std::int64_t in, std::int64_t out) {
    linear_ = register_module("linear", torch::nn::Linear(in, out));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    if (++calls_ == 3) throw DataError("head gave up");
    return linear_->forward(x);
  }
  std::string describe() const override { return "throwing"; }

 private:
  int calls_ = 0;
  torch::nn::Linear linear_{nullptr};
};

struct Fixture {
  explicit Fixture(std::size_t n, bool with_thrower) {
    tasks::register_builtin_heads(registry);
    registry.add(
        "throwing",
        [](const tasks::HeadSpec& s) {
          return std::make_shared<ThrowingHead>(s.in_features, s.out_features);
        },
        "test");
    for (std::size_t i = 0; i < n; ++i) {
      tasks::TaskConfig c;
      c.name = "t" + std::to_string(i);
      if (with_thrower && i == 1) c.head = "throwing";
      owned.push_back(std::make_unique<tasks::Task>(c, registry, 8, 3, 11 + i));
      ptrs.push_back(owned.back().get());
    }
    runs.resize(n);
  }
  tasks::HeadRegistry registry;
  std::vector<std::unique_ptr<tasks::Task>> owned;
  std::vector<tasks::Task*> ptrs;
  std::vector<HeadRun> runs;
};

std::vector<datasets::Batch> batches(int n) {
  std::vector<datasets::Batch> out(static_cast<std::size_t>(n));
  for (auto& b : out) {
    b.features = at::randn({16, 8});
    b.labels["class"] = at::randint(3, {16});
  }
  return out;
}

// Counts this body in and waits until `bodies` have arrived (or 10 s): bodies that all get
// past it ran at the same time, each on its own thread.
void arrive_and_wait(std::atomic<int>& arrived, std::int64_t bodies) {
  ++arrived;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (arrived.load() < bodies && std::chrono::steady_clock::now() < until) std::this_thread::yield();
}

// train.workers above the cores this process may use is honoured: every worker runs at once
// (each body waits until all have arrived, or 10 s), and TBB prints no warning that it ran fewer.
TEST(StepRunner, MoreWorkersThanCoresAllRunAndTbbSaysNothing) {
  const std::int64_t workers = machine_cores() + 2;
  ::testing::internal::CaptureStderr();
  int most = 0;  // the most bodies seen running at once
  {
    StepRunner runner(workers, 1);
    std::atomic<int> arrived{0}, running{0};
    std::mutex m;
    runner.for_each(static_cast<std::size_t>(workers), [&](std::size_t) {
      ++running;
      arrive_and_wait(arrived, workers);
      {
        const std::lock_guard<std::mutex> lock(m);
        most = std::max(most, running.load());
      }
      --running;
    });
  }
  const std::string said = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(most, workers) << "fewer workers ran at once than train.workers asked for";
  EXPECT_EQ(said.find("TBB Warning"), std::string::npos) << said;
}

// What a thread computes for 1e-30 * 1e-10: a denormal (1e-40) or, flushed, 0.
float denormal_product() {
  volatile float a = 1e-30f, b = 1e-10f;
  return a * b;
}

// train.flush_denormals: the training thread, every lane a StepRunner runs (each on its own
// thread: every body waits until all have arrived) and the training thread's LibTorch threads
// flush denormals while a FlushDenormals lives, and nothing does after it.
TEST(StepRunner, LanesAndLibTorchThreadsRunInTheCallersDenormalMode) {
#if !defined(__x86_64__) && !defined(__i386__)
  GTEST_SKIP() << "FTZ/DAZ are x86's; elsewhere FlushDenormals does nothing";
#endif
  const std::int64_t workers = machine_cores() + 1;
  StepRunner runner(workers, 1);
  const auto lanes_flushing = [&] {
    std::atomic<int> arrived{0}, flushing{0}, zero{0};
    runner.for_each(static_cast<std::size_t>(workers), [&](std::size_t) {
      arrive_and_wait(arrived, workers);
      flushing += flushes_denormals() ? 1 : 0;
      zero += denormal_product() == 0.0f ? 1 : 0;
    });
    EXPECT_EQ(flushing.load(), zero.load()) << "the mode a lane reports is not the one its arithmetic has";
    return flushing.load();
  };
  // LibTorch multiplies a large tensor on its threads, each a contiguous part: the denormal
  // products left show which threads keep them.
  const auto team_flushing = [] {
    const at::Tensor product = at::full({1 << 20}, 1e-30f) * 1e-10f;
    const std::int64_t half = product.numel() / 2;
    return (product.slice(0, 0, half).eq(0).all().item<bool>() ? 1 : 0) +
           (product.slice(0, half).eq(0).all().item<bool>() ? 1 : 0);
  };
  const int threads_before = at::get_num_threads();
  at::set_num_threads(2);
  ASSERT_FALSE(flushes_denormals());
  ASSERT_NE(denormal_product(), 0.0f);
  ASSERT_EQ(team_flushing(), 0);  // the team's threads exist before the FlushDenormals
  {
    const FlushDenormals flush;
    EXPECT_TRUE(flushes_denormals());
    EXPECT_EQ(denormal_product(), 0.0f);
    EXPECT_EQ(lanes_flushing(), workers);
    EXPECT_EQ(team_flushing(), 2) << "a LibTorch thread of the training thread keeps denormals";
  }
  EXPECT_FALSE(flushes_denormals());
  EXPECT_NE(denormal_product(), 0.0f);
  EXPECT_EQ(lanes_flushing(), 0) << "a lane kept flushing denormals after the FlushDenormals ended";
  EXPECT_EQ(team_flushing(), 0);
  at::set_num_threads(threads_before);
}

TEST(StepRunner, AThrowingHeadFailsAloneAndTheOthersTrain) {
  Fixture f(4, true);
  StepRunner runner(2, 1);
  const auto data = batches(4);
  for (std::int64_t s = 0; s < 4; ++s) {
    runner.train({{0, 2, 3}, {1}}, f.ptrs, f.runs, data[static_cast<std::size_t>(s)], 0, s);
  }
  EXPECT_TRUE(f.runs[1].failed());
  EXPECT_EQ(f.runs[1].failure, "epoch 1 step 3: head gave up");
  for (std::size_t i : {0u, 2u, 3u}) {
    EXPECT_TRUE(f.runs[i].training()) << i;
    EXPECT_EQ(f.runs[i].loss_count, 4) << i;
    EXPECT_GT(f.runs[i].seconds, 0.0) << i;
  }
}

TEST(StepRunner, WeightsDoNotDependOnTheWorkerCountOrOnFusion) {
  const auto data = batches(5);
  auto train = [&](std::int64_t workers, bool fused) {
    auto f = std::make_unique<Fixture>(6, false);
    StepRunner runner(workers, 1);
    std::vector<WorkUnit> units;
    if (fused) {
      units = {{0, 1, 2, 3, 4, 5}};
    } else {
      for (std::size_t i = 0; i < 6; ++i) units.push_back({i});
    }
    for (std::size_t s = 0; s < data.size(); ++s) {
      runner.train(units, f->ptrs, f->runs, data[s], 0, static_cast<std::int64_t>(s));
    }
    return f;
  };
  const auto one = train(1, false);
  for (std::int64_t workers : {2, 3, 8}) {
    const auto other = train(workers, false);
    for (std::size_t i = 0; i < 6; ++i) {
      auto pa = one->ptrs[i]->head().named_parameters(true),
           pb = other->ptrs[i]->head().named_parameters(true);
      for (const auto& p : pa)
        EXPECT_TRUE(testing::bitwise_equal(p.value(), pb[p.key()])) << workers << " " << p.key();
    }
  }
  const auto fused = train(2, true);
  for (std::size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(fused->runs[i].loss_count, 5);
    auto pa = one->ptrs[i]->head().named_parameters(true), pb = fused->ptrs[i]->head().named_parameters(true);
    for (const auto& p : pa) EXPECT_LT((p.value() - pb[p.key()]).abs().max().item<double>(), 1e-5) << p.key();
  }
}

// A window of steps interleaves the units' chains of steps over the workers: every head
// ends bitwise where training step by step on one worker leaves it, and the side job runs
// exactly once, beside the units.
TEST(StepRunner, AWindowOfStepsTrainsEveryHeadAsStepByStepDoes) {
  const auto data = batches(7);
  const std::vector<WorkUnit> units = {{0, 1, 2}, {3}, {4}, {5}};
  Fixture steps(6, false), window(6, false);
  StepRunner one(1, 1), two(2, 1);
  for (std::size_t s = 0; s < data.size(); ++s) {
    one.train(units, steps.ptrs, steps.runs, data[s], 0, static_cast<std::int64_t>(s));
  }
  std::atomic<int> side_runs{0};
  two.train_window(units, window.ptrs, window.runs, data, 4, 0, 0, [&] { ++side_runs; });
  const std::vector<datasets::Batch> rest(data.begin() + 4, data.end());
  two.train_window(units, window.ptrs, window.runs, rest, rest.size(), 0, 4, [&] { ++side_runs; });
  EXPECT_EQ(side_runs.load(), 2);
  for (std::size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(window.runs[i].loss_count, 7) << i;
    EXPECT_DOUBLE_EQ(window.runs[i].loss_sum, steps.runs[i].loss_sum) << i;
    auto pa = steps.ptrs[i]->head().named_parameters(true),
         pb = window.ptrs[i]->head().named_parameters(true);
    for (const auto& p : pa)
      EXPECT_TRUE(testing::bitwise_equal(p.value(), pb[p.key()])) << i << " " << p.key();
  }
  // Fewer steps than batches: only `count` of them train.
  two.train_window(units, window.ptrs, window.runs, data, 2, 1, 0);
  EXPECT_EQ(window.runs[0].loss_count, 9);
  EXPECT_TRUE(testing::throws_with<Error>(
      [&] { two.train_window(units, window.ptrs, window.runs, rest, rest.size() + 1, 1, 2); },
      {"train_window", "4 steps of 3 batches"}));
  // Lanes of 2 LibTorch threads each: the side job shares the units' lanes, still once.
  Fixture threads(6, false);
  StepRunner wide(2, 2);
  side_runs = 0;
  wide.train_window({{0, 1, 2, 3, 4, 5}}, threads.ptrs, threads.runs, data, data.size(), 0, 0,
                    [&] { ++side_runs; });
  EXPECT_EQ(side_runs.load(), 1);
  EXPECT_EQ(threads.runs[5].loss_count, 7);
}

// A head that fails within a window sits out the rest of it, its unit's other heads go on;
// the side job's exception comes out once every unit has finished the window.
TEST(StepRunner, AWindowLeavesAFailedHeadOutAndRethrowsTheSideJobsError) {
  Fixture f(4, true);
  StepRunner runner(2, 1);
  const auto data = batches(5);
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        runner.train_window({{0, 1}, {2}, {3}}, f.ptrs, f.runs, data, data.size(), 0, 0,
                            [] { throw DataError("shard 7 is corrupt"); });
      },
      {"shard 7 is corrupt"}));
  EXPECT_TRUE(f.runs[1].failed());
  EXPECT_EQ(f.runs[1].failure, "epoch 1 step 3: head gave up");
  EXPECT_EQ(f.runs[1].loss_count, 2);
  for (std::size_t i : {0u, 2u, 3u}) {
    EXPECT_TRUE(f.runs[i].training()) << i;
    EXPECT_EQ(f.runs[i].loss_count, 5) << i;
  }
}

TEST(StepRunner, EvaluationSkipsFailedHeads) {
  Fixture f(3, false);
  f.runs[2].fail(0, 0, "earlier");
  StepRunner runner(3, 1);
  const at::Tensor x = at::randn({40, 8});
  const std::vector<at::Tensor> targets(3, at::randint(3, {40}));
  const auto m = runner.evaluate({0, 1, 2}, f.ptrs, f.runs, x, targets, 0);
  EXPECT_EQ(m[0].count, 40);
  EXPECT_EQ(m[1].count, 40);
  EXPECT_EQ(m[2].count, 0);
  EXPECT_TRUE(testing::throws_with<ConfigError>([] { StepRunner(0, 1); }, {"train.workers", "0"}));
}

// With a shared top, each unit hands back dL/dz of its heads: summed over units this must
// be the sum of every head's loss_weight x gradient, whether the heads are fused or not; a
// head whose loss is not finite (here: NaN weights) is failed and adds nothing.
TEST(StepRunner, EveryHeadsGradientReachesTheSharedTopAndANonFiniteOneNever) {
  for (const bool poisoned : {false, true}) {
    for (const bool fused : {true, false}) {
      Fixture f(3, false);
      f.owned[2] = std::make_unique<tasks::Task>(
          [] {
            tasks::TaskConfig c;
            c.name = "t2";
            c.loss_weight = 0.5;
            return c;
          }(),
          f.registry, 8, 3, 13);
      f.ptrs[2] = f.owned[2].get();
      if (poisoned) {
        torch::NoGradGuard no_grad;
        for (auto& p : f.ptrs[1]->head().parameters()) p.fill_(std::numeric_limits<float>::quiet_NaN());
      }
      const auto data = batches(1)[0];
      // The expected gradient, from the heads as they are before the step.
      at::Tensor expected = at::zeros_like(data.features);
      for (std::size_t i = 0; i < 3; ++i) {
        if (poisoned && i == 1) continue;
        const at::Tensor x = data.features.detach().requires_grad_(true);
        tasks::Task& t = *f.ptrs[i];
        const at::Tensor l = t.loss(t.head().forward(x), data.labels.at("class")) * t.config().loss_weight;
        expected += torch::autograd::grad({l}, {x})[0];
      }
      StepRunner runner(2, 1);
      std::vector<at::Tensor> grads;
      const std::vector<WorkUnit> units =
          fused ? std::vector<WorkUnit>{{0, 1, 2}} : std::vector<WorkUnit>{{0}, {1}, {2}};
      runner.train(units, f.ptrs, f.runs, data, 0, 0, &grads);
      at::Tensor total = at::zeros_like(data.features);
      for (const auto& g : grads) {
        if (g.defined()) total += g;
      }
      EXPECT_EQ(f.runs[1].failed(), poisoned) << fused;
      EXPECT_TRUE(f.runs[0].training() && f.runs[2].training()) << fused;
      EXPECT_TRUE(total.isfinite().all().item<bool>()) << fused << poisoned;
      EXPECT_LT((total - expected).abs().max().item<double>(), 1e-6)
          << "fused " << fused << " poisoned " << poisoned;
      EXPECT_GT(expected.abs().max().item<double>(), 1e-4);
    }
  }
}

TEST(StepRunner, AGridWeighsOnTheSharedTopAsOneTaskOfItsMembersThatStepped) {
  // Heads 0, 1: no grid; 2..5: grid g (split over two units); 6, 7: grid h.
  const std::vector<std::string> grid = {"", "", "g", "g", "g", "g", "h", "h"};
  const std::vector<WorkUnit> units = {{0, 1}, {2, 3, 4}, {5}, {6, 7}};
  std::vector<bool> stepped(8, true);
  auto shares = grid_top_shares(units, grid, stepped);
  ASSERT_EQ(shares.size(), 4u);
  EXPECT_EQ(shares[0], 1.0);
  EXPECT_EQ(shares[1], 0.25);  // g: 4 members, in two units
  EXPECT_EQ(shares[2], 0.25);
  EXPECT_EQ(shares[3], 0.5);
  // A member that failed or did not step no longer counts: the rest of its grid share 1.
  stepped[3] = false;
  stepped[7] = false;
  shares = grid_top_shares(units, grid, stepped);
  EXPECT_DOUBLE_EQ(shares[1], 1.0 / 3);
  EXPECT_DOUBLE_EQ(shares[2], 1.0 / 3);
  EXPECT_EQ(shares[3], 1.0);
  // Heads no longer training are not in the step's units: g's last member takes all of it.
  shares = grid_top_shares({{0}, {5}}, grid, stepped);
  EXPECT_EQ(shares[0], 1.0);
  EXPECT_EQ(shares[1], 1.0);
  // A unit mixing a grid's members with another head cannot be weighed per grid.
  EXPECT_THROW(grid_top_shares({{1, 2}}, grid, stepped), Error);
  EXPECT_THROW(grid_top_shares({{5, 6}}, grid, stepped), Error);
}

}  // namespace
}  // namespace canopy::runners
