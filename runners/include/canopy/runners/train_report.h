// What a training run reports: one TaskResult per head, and the run's totals.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "canopy/tasks/intervals.h"
#include "canopy/tasks/task.h"

namespace canopy::runners {

// One member of a grid of heads, as the report and the winner's card list it.
struct GridMember {
  std::string name;                          // <grid>@<key>=<value>...
  std::map<std::string, std::string> point;  // the grid's keys and this member's values
  tasks::TaskState state = tasks::TaskState::kTraining;
  std::string failure;
  std::string note;                 // why it stopped before its last epoch, if it did
  std::int64_t epochs = 0;          // epochs trained
  std::int64_t exported_epoch = 0;  // the epoch its score is of
  double validation_score = 0.0;    // the task's monitor's score (accuracy, R^2 by default) on the
                                    // validation split (EvalMetrics::score: an NLL negated)
  double seconds = 0.0;
};

// A head against another on the same resamples of the rows both were scored on
// (train.bootstrap_resamples): `metric`'s difference, this head's less the other's (a grid's
// lead: the winner's over the runner-up's, in the monitored score, so an NLL the runner-up's
// less the winner's), and its interval.
struct Paired {
  std::string other;   // the other head's name
  std::string metric;  // as Resampled names it: "accuracy", "macro_f1", "mean_ap", "nll", "r2"
  double difference = 0.0;
  tasks::Interval interval;
  std::size_t resamples = 0;
};

struct TaskResult {
  std::string name;
  std::string head;    // architecture, e.g. "mlp 1280-256-10 relu"
  std::string labels;  // e.g. "class", "class -> 4 groups" or "ink (regression)"
  tasks::TaskKind kind = tasks::TaskKind::kMulticlass;
  std::vector<std::string> class_names;  // of a multiclass task's classes (numbered if unnamed)
  std::string optimizer;                 // e.g. "adam lr=0.001"
  tasks::TaskState state = tasks::TaskState::kTraining;
  std::string failure;
  std::int64_t epochs = 0;   // epochs completed
  double train_loss = 0.0;   // mean loss of the last epoch
  tasks::EvalMetrics eval;   // on train.eval_split after the last epoch
  double seconds = 0.0;      // time spent in this head's steps
  std::string note;          // e.g. why it stopped early
  std::string weights_path;  // exported safetensors file
  // With a validation split (train.validation_fraction): the exported weights' metrics on it,
  // and which epoch they are of (train.export: the best on it, or the last).
  std::optional<tasks::EvalMetrics> validation;
  std::int64_t exported_epoch = 0;
  double temperature = 1.0;  // multiclass: what its logits are divided by (calibrate = temperature)
  // A grid's result (name: the grid's): the member that won on the validation split, and
  // every member with its score. `eval` is the winner's, on the test split, evaluated once.
  std::string winner;
  std::vector<GridMember> grid;
  std::optional<Paired> grid_lead;  // the winner over the runner-up, with resamples
  // `eval`'s metrics on resamples of the same rows (train.bootstrap_resamples), and the share
  // of them an interval holds; empty when not resampled.
  std::optional<tasks::Resampled> resampled;
  double interval_level = 0.95;
};

struct TrainReport {
  std::vector<TaskResult> tasks;
  std::int64_t train_rows = 0;
  std::int64_t eval_rows = 0;
  std::int64_t validation_rows = 0;  // held out of the train split (0: none)
  std::int64_t feature_dim = 0;
  double load_seconds = 0.0;
  double train_seconds = 0.0;
  double run_train_seconds = 0.0;  // the run's in all: its checkpoint's, a resumed run's earlier time with it
  std::string source;              // how the train split was read
  std::uint64_t source_peak_bytes = 0;  // most feature/label bytes the reader held at once
  std::string out_dir;
  std::string resumed_from;            // "epoch E step S" when resumed
  std::string top;                     // the trunk's trained top, when one trained (SharedTop::describe)
  std::vector<std::string> fused;      // fused groups, e.g. "a + b + c (linear in=1280)"
  std::vector<std::string> not_fused;  // groups train.fuse = auto timed slower fused, with the times
  bool any_failed() const;
};

// The final summary table as printed by the CLI.
std::string format_summary(const TrainReport& report);
// Parts of it `canopy evaluate` prints too, of each result's `eval` "on <where>": per-class F1,
// one table per set of classes (multiclass heads on the same labels side by side), and the
// regression heads' errors, a line each, and each multilabel head's per-label scores.
std::string per_class_tables(const std::vector<TaskResult>& results, const std::string& where);
std::string per_label_tables(const std::vector<TaskResult>& results, const std::string& where);
std::string regression_lines(const std::vector<TaskResult>& results, const std::string& where);
// A line per multiclass head with NLL and ECE: how well its probabilities fit, at its temperature;
// with `calibrated_only`, of the heads calibrated (temperature other than 1) alone.
std::string calibration_lines(const std::vector<TaskResult>& results, const std::string& where,
                              bool calibrated_only);

// Per result: how it compares with the best head on the same labels (the same kind, labels and
// classes) by multiclass accuracy, multilabel macro-F1 or regression R^2 (Paired: `other` is the
// best), or empty (the best itself, alone on its labels, or not resampled). The best is the
// highest on `eval` (the first of equals).
std::vector<std::optional<Paired>> compare_with_best(const std::vector<TaskResult>& results);
// Whether two heads score the same labels: the same kind, label source and map, and classes.
bool same_labels(const TaskResult& a, const TaskResult& b);
// What heads are compared by, per kind: "accuracy" (multiclass), "macro_f1" (multilabel), "r2".
const char* compared_metric(tasks::TaskKind kind);
// A metric as the lines name it: "accuracy", "macro-F1", "mean AP", "R^2", "NLL", "MAE", "RMSE".
std::string metric_label(const std::string& metric);
// A value as the lines show it: percentages for accuracies ("88.57%", or "88.57" without
// `percent_sign`), 4 significant digits for MAE and RMSE, else 4 decimals.
std::string shown(const std::string& metric, double v, bool percent_sign);
// "88.57% [87.94, 89.17]": a value and its interval as the lines show them.
std::string shown_with_interval(const std::string& metric, double v, const tasks::Interval& in);
// A paired difference and its interval as the lines say them: "+0.40 points" (accuracy) or
// "+0.0123", and " [-0.60, +1.40]"; `said` gets ": no difference these rows can show" where the
// interval holds 0.
struct PairedText {
  std::string difference, interval, said;
};
PairedText paired_text(const Paired& p);

// The intervals as lines, one per resampled head: its metrics with their intervals, then how
// it compares with the best on its labels ("no difference these rows can show" when its
// interval holds 0).
std::string interval_lines(const std::vector<TaskResult>& results, const std::string& where);

}  // namespace canopy::runners
