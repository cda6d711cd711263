// `canopy compare`: several training runs' exported models scored on the same labelled rows,
// and whether one run's head beats another's there. The question it answers is the one a
// choice between runs asks (how much of the trunk to freeze or train, which tap, which input
// size, which trunk): each run's whole model (its trunk, fine-tuned top included, and every
// head) goes through the input as `canopy evaluate` runs it, then every head of every run is
// scored on the same resamples of those rows, so a head's difference from the same task's head
// in the first run (the baseline) is resampled pairwise and has an interval of its own.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "canopy/core/progress.h"
#include "canopy/runners/config.h"
#include "canopy/runners/evaluate_job.h"
#include "canopy/runners/train_report.h"
#include "canopy/tasks/registry.h"

namespace canopy::runners {

// A run as `canopy compare` names one: a training run's out_dir (its config.ini is read, with
// train.out_dir set to that folder, so a run moved or copied is read where it is) or a config
// file. `overrides` ("key=value") apply after it is read.
JobConfig load_compared_run(const std::string& path, const std::vector<std::string>& overrides);

struct ComparedRun {
  std::string label;    // "A", "B", ... in the order given; A is the baseline
  std::string path;     // as given
  std::string out_dir;  // train.out_dir, where its heads are
  std::string trunk;    // what its heads read, e.g. "trunk efficientnet_lite0.pt, freeze = first:13, ..."
  std::vector<std::string> differs;  // its config's keys that differ from A's: "key = value (A: value)"
  // The run whose trunk pass its heads shared (the same features_signature): "" for its own.
  std::string pass_with;
  Evaluation evaluation;  // its heads on the input, each resampled with every run's heads
};

// One task scored by several runs: per run, its head's index in that run's evaluation.heads
// (none where the run has no such head), and per run after the first that has it, the paired
// difference from the baseline's head in `metric` (the run's less the baseline's, each metric
// in `differences` in the same order as the Resampled names).
struct ComparedTask {
  std::string task;
  std::string metric;  // compared_metric: accuracy, macro_f1 or r2
  std::vector<std::optional<std::size_t>> head;
  std::vector<std::optional<Paired>> versus;     // per run; none for A
  std::vector<std::vector<Paired>> differences;  // per run: every resampled metric
};

struct Comparison {
  std::string input;
  std::int64_t rows = 0;
  std::size_t resamples = 0;
  double level = 0.95;
  std::uint64_t seed = 0;
  std::vector<ComparedRun> runs;
  std::vector<ComparedTask> tasks;
  std::vector<std::string> not_compared;  // "task 'x': why"
  double seconds = 0.0;
};

// Scores every run's model on `options.input` in turn (one model in memory at a time), then
// resamples every head together with the first run's train.seed, train.bootstrap_resamples
// (which must be > 0) and train.interval_level. The runs must read the same rows: the same
// number, and for each task compared, the same labels (a DataError says which run and task
// differ). `paths` names each run as given.
Comparison run_compare(const std::vector<JobConfig>& configs, const std::vector<std::string>& paths,
                       const tasks::HeadRegistry& registry, const EvaluateOptions& options,
                       ProgressStyle style = ProgressStyle::kAuto);

// The comparison as the CLI prints it: the runs, then a row per task with each run's metric and
// interval and each run's difference from A with its interval.
std::string format_comparison(const Comparison& c);
// The same as one JSON object: {"input", "rows", "resamples", "level", "seed", "runs": [{"label",
// "path", "out_dir", "trunk", "seconds", "heads": [as canopy evaluate --json's]}], "tasks":
// [{"task", "metric", "runs": {"A": {"value", "interval"}, ...}, "versus_A": {"B": {"difference",
// "interval", "metrics": {"accuracy": {"difference", "interval"}, ...}}}}], "not_compared"}.
std::string comparison_json(const Comparison& c);

}  // namespace canopy::runners
