// What the trainer knows about one head during a run: its state, why it failed, the loss
// of the epoch in progress, time spent, the last evaluation and the early-stopping record.
// The trainer owns one per task; a task itself holds only what it learns (head, optimizer).
// A HeadRun is touched by one worker at a time (the one training its unit this step).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "canopy/tasks/task.h"

namespace canopy::runners {

const char* state_name(tasks::TaskState state);  // "training" | "done" | "FAILED"

struct HeadRun;
// A run as text and back, every field exactly (doubles round-trip), the last evaluation's
// confusion matrix included: how MPI ranks tell rank 0 about the heads they train.
std::string encode_run(const HeadRun& run);
void decode_run(const std::string& text, HeadRun& run);

struct HeadRun {
  tasks::TaskState state = tasks::TaskState::kTraining;
  std::string failure;      // "epoch E step S: why" once FAILED
  std::int64_t epochs = 0;  // epochs completed
  double train_loss = 0.0;  // mean loss of the last completed epoch
  double loss_sum = 0.0;    // the epoch in progress
  std::int64_t loss_count = 0;
  double last_loss = 0.0;      // the last step's loss (NaN when it did not train in it)
  double seconds = 0.0;        // time spent in this head's steps
  double best_score = -1e300;  // EvalMetrics::score() of the best epoch so far
  std::int64_t best_epoch = 0;
  std::string stop_note;    // e.g. "stopped early at epoch 9 (best accuracy 0.8870 at epoch 6)"
  tasks::EvalMetrics eval;  // of the last completed epoch

  bool training() const { return state == tasks::TaskState::kTraining; }
  bool failed() const { return state == tasks::TaskState::kFailed; }
  void start_epoch();          // resets the epoch's loss
  void add_loss(double loss);  // one step's loss
  // Marks the head FAILED at a step (0-based epoch and step; the message counts from 1).
  void fail(std::int64_t epoch, std::int64_t step, const std::string& why);
  void fail_evaluation(std::int64_t epoch, const std::string& why);
  // Records epoch `epoch` (0-based) of `total` with its evaluation. The head is done after
  // its last epoch, or earlier when `patience` epochs (> 0) passed without a better score.
  // True when this epoch scored better than every one before it.
  bool finish_epoch(std::int64_t epoch, std::int64_t total, const tasks::EvalMetrics& metrics,
                    std::int64_t patience);
  // A run going on to `total` epochs past the ones it had (--resume with more epochs): a head
  // done after its last epoch trains on, unless `patience` (> 0) epochs have passed without a
  // better score, which finish_epoch would have said at that epoch had `total` been its end
  // (it stops early then, with that note). True when the head trains on.
  bool go_on_to(std::int64_t total, std::int64_t patience);
  // Stops the head at a cut of successive halving (done, keeping its exported epoch); `score`
  // is the one it was ranked by, `kept` of `of` members went on.
  void stop_by_halving(double score, std::size_t kept, std::size_t of);

 private:
  void stop_early();  // done, with the note of an early stop at this epoch
};

// How the stop note of a head cut by successive halving begins.
inline constexpr const char kHalvingStop[] = "stopped by successive halving";

// Successive halving (train.grid_halving): whether a cut comes after `epochs` completed
// epochs, the first after `first` (> 0) and then after each multiple of it by `factor`.
bool halving_cut_after(std::int64_t epochs, std::int64_t first, std::int64_t factor);
// How many of `n` members training a cut keeps: ceil(n / factor).
std::size_t halving_keep(std::size_t n, std::int64_t factor);
// Of `scores` (the members still training, in order), the positions a cut stops: all but the
// best halving_keep(n, factor); of equal scores the earlier member is kept.
std::vector<std::size_t> halving_stops(const std::vector<double>& scores, std::int64_t factor);

}  // namespace canopy::runners
