#include "canopy/runners/step_runner.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>

#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <c10/util/Exception.h>
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/info.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/partitioner.h>
#include <oneapi/tbb/task_arena.h>

#include "canopy/core/denormals.h"
#include "canopy/core/device.h"
#include "canopy/core/error.h"
#include "canopy/core/fork_join.h"
#include "canopy/core/mpi.h"

namespace canopy::runners {

std::string failure_reason(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

std::vector<double> grid_top_shares(const std::vector<WorkUnit>& units, const std::vector<std::string>& grid,
                                    const std::vector<bool>& stepped) {
  std::map<std::string, std::int64_t> members;  // per grid, those that stepped
  for (const auto& unit : units) {
    for (std::size_t i : unit) {
      if (stepped.at(i) && !grid.at(i).empty()) ++members[grid[i]];
    }
  }
  std::vector<double> shares(units.size(), 1.0);
  for (std::size_t u = 0; u < units.size(); ++u) {
    if (units[u].empty()) continue;
    const std::string& g = grid.at(units[u].front());
    for (std::size_t i : units[u]) {
      CANOPY_CHECK(grid.at(i) == g, Error, "a unit of heads mixes grid '", g, "' with '", grid[i],
                   "': its gradient to the shared top cannot be weighed per grid");
    }
    const auto it = members.find(g);
    if (!g.empty() && it != members.end()) shares[u] = 1.0 / static_cast<double>(it->second);
  }
  return shares;
}

namespace {

using Clock = std::chrono::steady_clock;

// Each thread that runs head work sets LibTorch's intra-op thread count once: a worker
// keeps what it had when it first touched LibTorch otherwise, and more intra-op threads
// than cores on top of the TBB workers oversubscribes the machine. LibTorch gives a thread
// the count the last set_num_threads of any thread left the first time that thread runs a
// parallel loop; get_num_threads takes that first time here, so it cannot come later and
// undo this thread's own count (the heads would then run on a count that depends on timing,
// and a resumed run would not be bitwise the uninterrupted one).
void configure_thread(std::int64_t intra_op_threads) {
  thread_local std::int64_t configured = -1;
  if (configured != intra_op_threads) {
    static_cast<void>(at::get_num_threads());
    at::set_num_threads(static_cast<int>(intra_op_threads));
    configured = intra_op_threads;
  }
}
}  // namespace

struct StepRunner::Arena {
  explicit Arena(int workers) {
    // More workers than the cores this process may use is the user's choice (train.workers):
    // TBB would otherwise cap the arena at the cores, warn on stderr and run fewer threads
    // than the run says it has.
    if (static_cast<std::size_t>(workers) >
        std::min(static_cast<std::size_t>(tbb::info::default_concurrency()),
                 tbb::global_control::active_value(tbb::global_control::max_allowed_parallelism))) {
      raised = std::make_unique<tbb::global_control>(tbb::global_control::max_allowed_parallelism,
                                                     static_cast<std::size_t>(workers));
    }
    arena.initialize(workers);
  }
  std::unique_ptr<tbb::global_control> raised;
  tbb::task_arena arena;
};

std::string fit_threads_to_cpu_quota(bool libtorch) {
  const auto quota = cpu_quota();
  const std::int64_t mask = affinity_cores();
  if (!quota || quota->share >= mask) return "";
  // For the process's life, never destroyed: it would outlive nothing at exit.
  static const auto* tbb_limit = new tbb::global_control(tbb::global_control::max_allowed_parallelism,
                                                         static_cast<std::size_t>(quota->share));
  static_cast<void>(tbb_limit);
  const bool omp = std::getenv("OMP_NUM_THREADS") != nullptr;
  if (libtorch && !omp) at::set_num_threads(static_cast<int>(quota->share));
  return detail::str_cat("a CPU quota (cgroup '", quota->cgroup, "') grants ", quota->cpus, " of the ", mask,
                         " CPUs this process may run on",
                         quota->share < quota->cpus
                             ? detail::str_cat(", ", quota->share, " to each of the ", mpi::local_size(),
                                               " ranks on this machine")
                             : std::string(),
                         ": ", quota->share, " thread(s) for TBB",
                         !libtorch ? " (a compiled trunk keeps LibTorch's)"
                         : omp     ? " (OMP_NUM_THREADS sets LibTorch's)"
                                   : " and LibTorch",
                         "; train.workers sets the training workers");
}

StepRunner::StepRunner(std::int64_t workers, std::int64_t intra_op_threads)
    : workers_(workers), intra_op_threads_(intra_op_threads) {
  CANOPY_CHECK(workers >= 1, ConfigError, "train.workers must be >= 1 once resolved, got ", workers);
  CANOPY_CHECK(intra_op_threads >= 1, ConfigError, "train.intra_op_threads must be >= 1, got ",
               intra_op_threads);
  arena_ = std::make_unique<Arena>(static_cast<int>(workers));
}

StepRunner::~StepRunner() = default;

namespace {
// One unit's step on the calling thread. A fused group that throws is retried head by head,
// which finds the culprit. With `top_grad`, the heads train on `features` as a shared top's
// output: *top_grad receives the sum of the gradients w.r.t. it of the heads that stepped
// (undefined when none did); a head whose loss or gradient is not finite adds nothing.
void train_unit(const WorkUnit& unit, const std::vector<tasks::Task*>& tasks, std::vector<HeadRun>& runs,
                const datasets::Batch& batch, std::int64_t epoch, std::int64_t step, at::Tensor* top_grad) {
  const auto t0 = Clock::now();
  const bool shared = top_grad != nullptr;
  std::vector<tasks::Task*> group;
  std::vector<at::Tensor> targets;
  std::vector<std::size_t> members;
  for (std::size_t i : unit) {
    if (!runs[i].training()) continue;  // failed earlier in a window of steps
    try {
      targets.push_back(tasks[i]->targets(batch.labels.at(tasks[i]->config().labels)));
      group.push_back(tasks[i]);
      members.push_back(i);
    } catch (const std::exception& e) {
      runs[i].fail(epoch, step, failure_reason(e));
    }
  }
  at::Tensor grad;
  bool done = false;
  if (group.size() >= 2) {
    try {
      const at::Tensor x = shared ? batch.features.detach().requires_grad_(true) : batch.features;
      std::vector<std::string> failures(group.size());
      const std::vector<double> losses =
          tasks::fused_train_step(group, x, targets, shared ? &failures : nullptr);
      bool any_failed = false;
      for (const auto& f : failures) any_failed = any_failed || !f.empty();
      if (any_failed) {
        // Nothing stepped: the culprits fail, the others step alone below, their gradients
        // w.r.t. the shared top's output free of the culprits' part.
        std::vector<tasks::Task*> rest;
        std::vector<at::Tensor> rest_targets;
        std::vector<std::size_t> rest_members;
        for (std::size_t k = 0; k < members.size(); ++k) {
          if (!failures[k].empty()) {
            runs[members[k]].fail(epoch, step, failures[k]);
          } else {
            rest.push_back(group[k]);
            rest_targets.push_back(targets[k]);
            rest_members.push_back(members[k]);
          }
        }
        group = std::move(rest);
        targets = std::move(rest_targets);
        members = std::move(rest_members);
      } else {
        for (std::size_t k = 0; k < members.size(); ++k) {
          if (std::isfinite(losses[k])) {
            runs[members[k]].add_loss(losses[k]);
          } else {
            runs[members[k]].fail(epoch, step, detail::str_cat("loss is ", losses[k]));
          }
        }
        if (shared) grad = x.grad();
        done = true;
      }
    } catch (const std::exception&) {
    }
  }
  if (!done) {
    for (std::size_t k = 0; k < members.size(); ++k) {
      try {
        const at::Tensor x = shared ? batch.features.detach().requires_grad_(true) : batch.features;
        runs[members[k]].add_loss(group[k]->train_step(x, targets[k], shared));
        if (shared && x.grad().defined()) grad = grad.defined() ? grad + x.grad() : x.grad();
      } catch (const std::exception& e) {
        runs[members[k]].fail(epoch, step, failure_reason(e));
      }
    }
  }
  if (shared && grad.defined() && !grad.isfinite().all().item<bool>()) {
    for (std::size_t i : members) {
      if (!runs[i].failed())
        runs[i].fail(epoch, step, "its gradient w.r.t. the shared top's output is not finite");
    }
    grad = at::Tensor();
  }
  if (shared) *top_grad = grad;
  const double share = std::chrono::duration<double>(Clock::now() - t0).count() /
                       static_cast<double>(std::max<std::size_t>(1, unit.size()));
  for (std::size_t i : unit) runs[i].seconds += share;
}
}  // namespace

void StepRunner::train(const std::vector<WorkUnit>& units, const std::vector<tasks::Task*>& tasks,
                       std::vector<HeadRun>& runs, const datasets::Batch& batch, std::int64_t epoch,
                       std::int64_t step, std::vector<at::Tensor>* top_grads) {
  if (top_grads) top_grads->assign(units.size(), at::Tensor());
  // Greedy list scheduling: one lane per worker, each taking the next unit (the planner
  // ordered them by cost, largest first) as soon as it is free. Splitting the range in
  // halves instead (TBB's partitioners) put the three largest MLPs of the 8-head demo in one
  // half: 2 workers ran 1.48x faster than 1 instead of close to 2x.
  for_each(units.size(), [&](std::size_t u) {
    train_unit(units[u], tasks, runs, batch, epoch, step, top_grads ? &(*top_grads)[u] : nullptr);
  });
}

void StepRunner::train_window(const std::vector<WorkUnit>& units, const std::vector<tasks::Task*>& tasks,
                              std::vector<HeadRun>& runs, const std::vector<datasets::Batch>& batches,
                              std::size_t count, std::int64_t epoch, std::int64_t first_step,
                              const std::function<void()>& side) {
  CANOPY_CHECK(count <= batches.size(), Error, "train_window: ", count, " steps of ", batches.size(),
               " batches");
  // Each unit is a chain of `count` steps that must run in order; chains are independent. A
  // free worker takes the side job first (it is what the next window waits for), then the
  // unit no worker holds with the most work left: units not yet started first, in the
  // planner's order (largest first), then by steps left x the unit's last step time. A
  // worker that finds every unit with steps left held by another stops: the holders finish
  // their own chains, and moving a chain to another worker would not shorten it.
  std::mutex m;
  std::vector<std::size_t> done(units.size(), 0);
  std::vector<char> held(units.size(), 0);
  std::vector<double> last(units.size(), 0.0);
  bool side_pending = static_cast<bool>(side);
  std::exception_ptr side_error;
  const auto pick = [&]() -> std::ptrdiff_t {
    std::ptrdiff_t best = -1;
    double best_left = -1;
    for (std::size_t u = 0; u < units.size(); ++u) {
      if (held[u] || done[u] >= count) continue;
      if (done[u] == 0) return static_cast<std::ptrdiff_t>(u);
      const double left = static_cast<double>(count - done[u]) * last[u];
      if (left > best_left) {
        best = static_cast<std::ptrdiff_t>(u);
        best_left = left;
      }
    }
    return best;
  };
  // The side job gets a lane of its own only where each lane is one thread: next to a lane
  // whose multiplies run on several LibTorch (OpenMP) threads, a third busy thread on the
  // cores stalls the whole team (a single head with 2 intra-op threads trained 1.5x slower).
  const bool side_lane = side && intra_op_threads_ == 1;
  run_lanes(units.size() + (side_lane ? 1 : 0), [&] {
    for (;;) {
      std::ptrdiff_t u = -1;
      std::size_t s = 0;
      bool run_side = false;
      {
        std::lock_guard<std::mutex> lock(m);
        if (side_pending) {
          side_pending = false;
          run_side = true;
        } else {
          u = pick();
          if (u < 0) return;
          held[u] = 1;
          s = done[u];
        }
      }
      if (run_side) {
        try {
          side();
        } catch (...) {
          side_error = std::current_exception();  // written once: side_pending was taken once
        }
        continue;
      }
      const auto t0 = Clock::now();
      train_unit(units[u], tasks, runs, batches[s], epoch, first_step + static_cast<std::int64_t>(s),
                 nullptr);
      const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      std::lock_guard<std::mutex> lock(m);
      last[u] = seconds;
      ++done[u];
      held[u] = 0;
    }
  });
  if (side_error) std::rethrow_exception(side_error);
}

void StepRunner::for_each(std::size_t n, const std::function<void(std::size_t)>& body) {
  std::atomic<std::size_t> next{0};
  run_lanes(n, [&] {
    for (std::size_t k = next++; k < n; k = next++) body(k);
  });
}

void StepRunner::run_lanes(std::size_t jobs, const std::function<void()>& lane) {
  const auto lanes =
      static_cast<std::size_t>(std::min<std::int64_t>(workers_, std::max<std::size_t>(1, jobs)));
  // The calling thread runs a lane too, at the lanes' thread count; what it runs between
  // lanes (a shared top's forward and backward, its evaluation, which the lanes wait on) gets
  // its own count back: LibTorch's, every core's threads by default.
  const int caller_threads = at::get_num_threads();
  const bool flush_denormals = flushes_denormals();  // the lanes run in the caller's mode
  ForkJoin edges;
  arena_->arena.execute([&] {
    tbb::parallel_for(
        tbb::blocked_range<std::size_t>(0, lanes, 1),
        [&](const tbb::blocked_range<std::size_t>&) {
          [[maybe_unused]] const auto in = edges.body();
          configure_thread(intra_op_threads_);
          const FlushDenormals mode(flush_denormals);
          lane();
        },
        tbb::simple_partitioner());
  });
  edges.join();
  configure_thread(caller_threads);
}

std::vector<tasks::EvalMetrics> StepRunner::evaluate(const std::vector<std::size_t>& which,
                                                     const std::vector<tasks::Task*>& tasks,
                                                     std::vector<HeadRun>& runs, const at::Tensor& features,
                                                     const std::vector<at::Tensor>& targets,
                                                     std::int64_t epoch) {
  std::vector<tasks::EvalMetrics> metrics(tasks.size());
  for_each(which.size(), [&](std::size_t k) {
    const std::size_t i = which[k];
    if (runs[i].failed()) return;
    try {
      metrics[i] = tasks[i]->evaluate(features, targets[i]);
    } catch (const std::exception& e) {
      runs[i].fail_evaluation(epoch, failure_reason(e));
    }
  });
  return metrics;
}

}  // namespace canopy::runners
