// Where a training run's per-epoch numbers go, one row per head and epoch:
//   <out_dir>/metrics.jsonl   {"epoch", "task", "state", "train_loss", "eval_<metric>"..., "seconds"}
//   <out_dir>/metrics.csv     epoch,task,state,train_loss,eval_accuracy,eval_macro_f1,seconds,
//                             eval_mae,eval_rmse,eval_r2 (empty for classifiers),
//                             eval_top5_accuracy (empty but for multiclass over more than 5 classes)
//   <out_dir>/tensorboard/<task>/events.out.tfevents.*   train/loss and eval/<metric>
// With a trainable top, one more row per epoch, task "@trunk" (JSONL and TensorBoard's
// "@trunk" run only): the blocks that trained, the cache level read, autofreeze's change
// rates and each task's loss weight.
// A resumed run first drops the rows of epochs after the checkpoint, then appends.
#pragma once

#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "canopy/runners/freeze_schedule.h"
#include "canopy/runners/head_run.h"

namespace canopy::runners {

class EventWriter;

// Keeps the rows of epochs <= `epochs` of a metrics file (JSONL, or CSV with its header).
// DataError naming the file and line when a row has no readable epoch. A CSV whose header is
// the start of `header` (a run begun by an older canopy, before columns were appended) gets
// `header`, and its rows the new columns empty.
void truncate_metrics(const std::string& path, std::int64_t epochs, bool csv, const std::string& header = {});

class MetricsSink {
 public:
  // `resume_epoch` >= 0 continues the files of an interrupted run after that many epochs;
  // < 0 starts them anew. TensorBoard writers are made per task when `tensorboard` is set.
  MetricsSink(const std::string& out_dir, const std::vector<std::string>& task_names, bool tensorboard,
              std::int64_t resume_epoch);
  ~MetricsSink();
  MetricsSink(const MetricsSink&) = delete;
  MetricsSink& operator=(const MetricsSink&) = delete;

  // One row for task `task` (index into task_names) after epoch `epoch` (0-based).
  void record(std::int64_t epoch, std::size_t task, const HeadRun& run);
  // The top's row after epoch `epoch`; `weights`: each task's loss weight in its last step.
  void record_top(std::int64_t epoch, const TopEpoch& top, const std::vector<double>& weights);
  // Makes the rows written so far durable enough to survive the process (flushes them).
  void flush();

 private:
  std::string out_dir_;
  std::vector<std::string> names_;
  std::ofstream jsonl_;
  std::ofstream csv_;
  std::vector<std::unique_ptr<EventWriter>> tensorboard_;
  std::unique_ptr<EventWriter> top_tensorboard_;
};

}  // namespace canopy::runners
