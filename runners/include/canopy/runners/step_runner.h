// Runs the heads' work of a step on a fixed set of TBB workers: one TBB task per work unit
// (a fused group or a lone head, see fusion_plan.h), each with a fixed number of LibTorch
// intra-op threads. Isolation: an exception never leaves a unit (TBB would cancel every
// other unit's work); only the head it came from is marked FAILED in its HeadRun.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/datasets/batch_source.h"
#include "canopy/runners/fusion_plan.h"
#include "canopy/runners/head_run.h"
#include "canopy/tasks/task.h"

namespace canopy::runners {

// Under a CPU quota below the affinity mask (a Kubernetes CPU limit on a large machine), TBB's
// parallelism, and with `libtorch` LibTorch's intra-op threads, are cut to the quota's CPUs:
// more threads than that only wait for the quota's next period (measured under a 1-CPU quota
// on 2 cores: a TorchScript trunk pass 8.2-9.7 s on 1 thread against 10.6-10.7 s on 2). Not
// for a compiled (.pt2) trunk, whose pass was slower on 1 thread there (13.8-14.8 s against
// 8.5-9.0 s). OMP_NUM_THREADS, when set, rules LibTorch. Returns the line to log, or "".
std::string fit_threads_to_cpu_quota(bool libtorch);

// Why a head failed, for its card and the summary: an error's message, a LibTorch error's
// without the C++ backtrace it carries.
std::string failure_reason(const std::exception& e);

// With a trainable top shared by every head, a grid weighs on the top as one task, whatever
// its size: the gradient a unit sends the top is scaled by 1 / n, n the members of its grid
// whose gradient reached the top this step; 1 for a unit of heads of no grid. `grid[i]`:
// head i's grid ("" for none); `stepped[i]`: whether head i's gradient reached the top. Every
// unit holds the members of one grid or heads of none (the trainer's fusion keys keep them
// apart); a unit that mixes them is an Error. One factor per unit.
std::vector<double> grid_top_shares(const std::vector<WorkUnit>& units, const std::vector<std::string>& grid,
                                    const std::vector<bool>& stepped);

class StepRunner {
 public:
  // `workers` >= 1 TBB workers, `intra_op_threads` >= 1 LibTorch threads inside each.
  StepRunner(std::int64_t workers, std::int64_t intra_op_threads);
  ~StepRunner();
  StepRunner(const StepRunner&) = delete;
  StepRunner& operator=(const StepRunner&) = delete;

  std::int64_t workers() const { return workers_; }

  // One optimisation step of every unit on `batch` (read-only, shared), concurrently.
  // `epoch` and `step` (0-based) go into failure messages. Each head's time is added to
  // its run's seconds (a fused group's time split evenly among its heads).
  // With `top_grads`, batch.features is the output of a trainable top shared by every head
  // (see shared_top.h): each unit trains on its own leaf copy and (*top_grads)[u] receives
  // the gradient of its heads' weighted losses w.r.t. it, only from heads whose loss and
  // gradient were finite (undefined when none).
  void train(const std::vector<WorkUnit>& units, const std::vector<tasks::Task*>& tasks,
             std::vector<HeadRun>& runs, const datasets::Batch& batch, std::int64_t epoch, std::int64_t step,
             std::vector<at::Tensor>* top_grads = nullptr);

  // Steps first_step .. first_step + count - 1 (batches[0 .. count - 1]) of every unit: each
  // unit's steps in order, the units interleaved over the workers, so that no worker waits
  // at the end of every step for the slowest unit. Each head computes exactly what
  // train() step by step would. `side`, when given, runs once, concurrently, on the first
  // free worker (the trainer gathers the next window's batches there); an exception from it
  // is rethrown once every unit has finished. A head that fails is left out of its unit's
  // later steps in the window.
  void train_window(const std::vector<WorkUnit>& units, const std::vector<tasks::Task*>& tasks,
                    std::vector<HeadRun>& runs, const std::vector<datasets::Batch>& batches,
                    std::size_t count, std::int64_t epoch, std::int64_t first_step,
                    const std::function<void()>& side = {});

  // body(0) .. body(n - 1) on the workers, greedily: each free worker takes the next k in
  // order, so work given largest first ends balanced (train, evaluate, serialising
  // checkpoints); body must not throw.
  void for_each(std::size_t n, const std::function<void(std::size_t)>& body);

  // Evaluates the heads `which` that have not failed on the eval split, concurrently, in
  // `which`'s order (largest first balances the workers); a head whose evaluation throws is
  // failed. Returns metrics indexed like `tasks`.
  std::vector<tasks::EvalMetrics> evaluate(const std::vector<std::size_t>& which,
                                           const std::vector<tasks::Task*>& tasks, std::vector<HeadRun>& runs,
                                           const at::Tensor& features, const std::vector<at::Tensor>& targets,
                                           std::int64_t epoch);

 private:
  // Runs `lane` on min(workers, jobs) workers (at least one) and waits for all of them.
  void run_lanes(std::size_t jobs, const std::function<void()>& lane);
  struct Arena;
  std::int64_t workers_;
  std::int64_t intra_op_threads_;
  std::unique_ptr<Arena> arena_;
};

}  // namespace canopy::runners
