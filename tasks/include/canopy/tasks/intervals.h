// Bootstrap intervals of a head's metrics on an evaluation split. The rows are resampled with
// replacement (each resample draws N of the N rows), each metric is computed on every resample
// from per-row values weighted by how often the row was drawn, and the central `level` share of
// those values is the interval (the percentile bootstrap, as scikit-learn's and SciPy's users
// compute it by hand). The resamples depend only on the seed and the number of rows: two heads
// scored on the same rows see the same resamples, so their difference is resampled pairwise (a
// paired bootstrap), which is what says whether one head is better than another on these rows.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/tasks/task.h"

namespace canopy::tasks {

struct BootstrapSpec {
  std::int64_t resamples = 1000;  // 0: none
  double level = 0.95;            // the share of resampled values inside an interval
  std::uint64_t seed = 0;
};

// Each metric's value on every resample, per kind in this order: multiclass accuracy,
// macro_f1, nll; multilabel accuracy (exact match), macro_f1, mean_ap; regression mae, rmse, r2
// (in the target's units). The metrics are EvalMetrics' own, on the resampled rows.
struct Resampled {
  std::int64_t rows = 0;
  std::vector<std::string> names;
  std::vector<std::vector<double>> values;  // [metric][resample]
  std::size_t resamples() const { return values.empty() ? 0 : values.front().size(); }
  // The values of metric `name`, or null when it is not resampled.
  const std::vector<double>* find(const std::string& name) const;
};

// Every name a Resampled may hold, of any kind: accuracy, macro_f1, mean_ap, nll, mae, rmse, r2.
const std::vector<std::string>& resampled_metric_names();
// Whether a lower value of the metric is the better one (nll, mae, rmse).
bool lower_is_better(const std::string& name);

// The resampled metric (its name in Resampled) that EvalMetrics::score() is of for a head of
// `kind` monitored by `monitor`: "accuracy", "r2", "macro_f1", "mean_ap" or "nll" (whose score
// is its negation).
std::string scored_metric(TaskKind kind, Monitor monitor);

// How often each row is drawn in resamples [first, first + n): [n, rows] float64, each of
// its rows summing to `rows`. Resample r depends on (seed, r, rows) alone.
at::Tensor resample_counts(std::int64_t rows, std::int64_t first, std::int64_t n, std::uint64_t seed);

// A head's outputs on a split's rows and what scoring them takes, as evaluate_outputs takes
// them: regression outputs standardised (mapped back with target_mean and target_std) and
// targets in their units; multilabel labels cut at `cutoffs` (empty: logit 0); multiclass NLL
// taken at `temperature`.
struct HeadOutputs {
  TaskKind kind = TaskKind::kMulticlass;
  at::Tensor outputs, targets;
  std::int64_t num_classes = 0;
  double target_mean = 0.0, target_std = 1.0;
  std::vector<double> cutoffs;
  double temperature = 1.0;
};
// A task's head on `features` and `targets` (as Task::targets gives them).
HeadOutputs head_outputs(Task& task, const at::Tensor& features, const at::Tensor& targets);
// The head's metrics on its rows, monitored by `monitor`: Task::evaluate's, from outputs already
// computed.
EvalMetrics evaluate_head(const HeadOutputs& head, Monitor monitor);
// The value in `m` of the metric Resampled names `name` (0 where `m` has none).
double metric_value(const EvalMetrics& m, const std::string& name);

// The metrics of `head` on the resamples whose row counts are `counts` ([n, N], as
// resample_counts gives them; a row of ones is the split itself).
Resampled metrics_on_counts(const HeadOutputs& head, const at::Tensor& counts);
// Every head's metrics over spec.resamples resamples of the rows they were all scored on (the
// same resamples for each: paired), drawn once in blocks, so that a large split's counts are
// never all in memory at once.
std::vector<Resampled> bootstrap(const std::vector<HeadOutputs>& heads, const BootstrapSpec& spec);

struct Interval {
  double lo = 0.0, hi = 0.0;
};
// The central `level` share of `values`: the (1 - level) / 2 and (1 + level) / 2 quantiles,
// interpolated linearly between order statistics (numpy.quantile's default).
Interval percentile_interval(std::vector<double> values, double level);
// The interval of `sign` x (a - b) over the same resamples (paired; sign -1 reads a metric where
// lower is better as a lead).
Interval difference_interval(const std::vector<double>& a, const std::vector<double>& b, double level,
                             double sign = 1.0);

}  // namespace canopy::tasks
