// `canopy compare`: several training runs' exported models scored on the same labelled rows,
// and whether one run's head beats another's there. The question it answers is the one a
// choice between runs asks (how much of the trunk to freeze or train, which tap, which input
// size, which trunk): each run's whole model (its trunk, fine-tuned top included, and every
// head) goes through the input as `canopy evaluate` runs it, then every head of every run is
// scored on the same resamples of those rows, so a head's difference from the same task's head
// in the first run (the baseline) is resampled pairwise and has an interval of its own. A
// setting trained with several seeds is one arm of several runs: its score is their mean, and
// its interval holds the spread between them as well as the rows' (a two-level bootstrap).
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

// Refuses (ConfigError) a --metric other than "" and the resampled metrics' names.
void check_compared_metric(const std::string& metric);

struct ComparedRun {
  std::string label;    // "A", or "A1", "A2", ... in an arm of several runs
  std::size_t arm = 0;  // its arm's index
  std::string path;     // as given
  std::string out_dir;  // train.out_dir, where its heads are
  std::string trunk;    // what its heads read, e.g. "trunk efficientnet_lite0.pt, freeze = first:13, ..."
  // Its config's keys that differ from `differs_from`'s ("key = value (A: value)"): the first
  // run of arm A for the first run of another arm, the first run of its arm for the others.
  std::vector<std::string> differs;
  std::string differs_from;
  // The run whose trunk pass its heads shared (the same features_signature): "" for its own.
  std::string pass_with;
  Evaluation evaluation;  // its heads on the input, each resampled with every run's heads
};

// An arm: one run, or several runs of one setting (seeds, say), scored by their mean.
struct ComparedArm {
  std::string label;              // "A", "B", ...; A is the baseline
  std::vector<std::size_t> runs;  // indices into Comparison::runs
};

// An arm's score in a metric: the mean of its runs' values, and its interval over the
// resamples (rows resampled, and an arm's runs resampled with replacement on each).
struct ArmScore {
  double value = 0.0;
  tasks::Interval interval;
};

// One task scored by several arms: per run, its head's index in that run's evaluation.heads
// (none where the task is not compared for the run's arm); per arm, its score in `metric` and,
// for each arm after A, the paired difference from A's (the arm's less A's), in `metric` and
// in every resampled metric (`differences`).
struct ComparedTask {
  std::string task;
  // run_compare's `metric` where the head's kind has it, else compared_metric's
  std::string metric;
  std::vector<std::optional<std::size_t>> head;  // per run
  std::vector<std::optional<ArmScore>> score;    // per arm
  std::vector<std::optional<Paired>> versus;     // per arm; none for A
  std::vector<std::vector<Paired>> differences;  // per arm: every resampled metric
  // [b][a] for a < b: arm b's difference from arm a's in `metric`, paired on the same resamples
  // (between[b][0] is versus[b]); none where either arm lacks the task.
  std::vector<std::vector<std::optional<Paired>>> between;
};

// How many tasks one arm does better on than another (the difference's interval clear of 0 on
// the better side: above it, or below it for NLL, MAE and RMSE), worse on, and cannot tell.
struct Tally {
  int better = 0, worse = 0, undecided = 0;
};

struct Comparison {
  std::string input;       // as EvaluateOptions::input: "" for the runs' eval split
  std::string eval_split;  // the split when input is "" (A's train.eval_split), else ""
  std::int64_t rows = 0;
  std::size_t resamples = 0;
  double level = 0.95;
  std::uint64_t seed = 0;
  std::vector<ComparedRun> runs;
  std::vector<ComparedArm> arms;
  // Every arm has the same k > 1 runs whose i-th share one train.seed: the runs are drawn
  // together (the same indices for every arm), as the rows are.
  bool paired_by_seed = false;
  std::vector<ComparedTask> tasks;
  std::vector<std::string> not_compared;  // "task 'x': why"
  double seconds = 0.0;
};

// Scores every run's model on `options.input` (runs reading the same features in one pass;
// one such group in memory at a time), then resamples every head together with the first
// run's train.seed, train.bootstrap_resamples (which must be > 0) and train.interval_level.
// `arms[a]` are the configs of arm a's runs, `paths[a]` how each was named. The runs must read
// the same rows: the same number, and for each task compared, the same labels (a DataError says
// which run and task differ). In an arm of k > 1 runs, each resample also draws k of its runs
// with replacement (a generator seeded by seed * 1000003 + resample * 7919 + 2 + the arm's
// index, or + 0 for every arm when they are paired by seed), the arm's value on it their mean:
// the spread between runs (seeds) is in its interval. `metric` (accuracy, macro_f1, mean_ap,
// nll, mae, rmse or r2; "": each kind's compared_metric) is what each task is compared by, where
// its head's kind has it.
Comparison run_compare(const std::vector<std::vector<JobConfig>>& arms,
                       const std::vector<std::vector<std::string>>& paths,
                       const tasks::HeadRegistry& registry, const EvaluateOptions& options,
                       const std::string& metric = "", ProgressStyle style = ProgressStyle::kAuto);

// The comparison as the CLI prints it: the runs, then a row per task with each arm's metric and
// interval and each arm's difference from A with its interval, then per arm after A how many
// tasks it does better and worse on (the difference's interval clear of 0) and cannot tell.
std::string format_comparison(const Comparison& c);
// The same as one JSON object: {"input", "eval_split", "rows", "resamples", "level", "seed", "runs":
// [{"label", "arm", "path", "out_dir", "trunk", "differs_from", "differs", "seconds", "pass_with", "heads":
// [as canopy evaluate --json's]}], "arms": [{"label", "runs": [labels]}], "tasks": [{"task",
// "metric", "arms": {"A": {"value", "interval", "runs": {run label: value}}, ...}, "versus_A":
// {"B": {"difference", "interval", "metrics": {"accuracy": {"difference", "interval"}, ...}}}}],
// "paired_by_seed", "against_A": {"B": {"better", "worse", "no_difference"}}, "between": {"B":
// {"A": {"better", "worse", "no_difference"}, "C": {...}}, ...} (every arm against every other),
// "not_compared", "seconds"}; each task has "unbeaten": [the labels of unbeaten_arms]; with three
// arms or more each task also has "between": {"C - B": {"difference", "interval"}, ...} for the
// pairs without A.
std::string comparison_json(const Comparison& c);

// [b][a]: arm b against arm a over the tasks compared, for every pair of arms (b != a).
std::vector<std::vector<Tally>> tally_between(const Comparison& c);

// Whether a paired difference (one arm's less another's, in `metric`) shows the first better:
// its interval clear of 0 above, or below for the metrics where lower is better (NLL, MAE, RMSE).
bool shown_better(const std::string& metric, const tasks::Interval& difference);

// The arms that score task `t` and that no other arm is shown better than on it (the
// difference's interval clear of 0), in arm order: the arms a choice for this task alone keeps.
std::vector<std::size_t> unbeaten_arms(const ComparedTask& t);

}  // namespace canopy::runners
