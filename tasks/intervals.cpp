#include "canopy/tasks/intervals.h"

#include <algorithm>
#include <cmath>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/index_add.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include "canopy/core/error.h"
#include "canopy/core/tensor_values.h"

namespace canopy::tasks {

namespace {
// Resamples whose counts are held at once: up to 128, and at most 1 Mi counts (8 MB of doubles,
// 128 resamples of 8 192 rows; 17 of 60 000), so that scoring a large split takes little memory
// beside it; the resamples do not depend on it.
std::int64_t block_of(std::int64_t rows) {
  return std::clamp<std::int64_t>((std::int64_t{1} << 20) / std::max<std::int64_t>(1, rows), 1, 128);
}

// 2 x true positives / (truth + predicted) per column, where either is > 0; `empty` elsewhere.
at::Tensor f1_of(const at::Tensor& tp, const at::Tensor& truth, const at::Tensor& predicted, double empty) {
  const at::Tensor both = truth + predicted;
  return at::where(both > 0, 2.0 * tp / both.clamp_min(1e-300), at::tensor(empty, at::kDouble));
}
// Each resample's mean over labels of average precision (multilabel_metrics'): a row drawn c
// times stands c times in the ranking by score, its copies side by side (as a stable sort of
// the drawn rows puts them), each positive copy adding the precision at its place; labels
// without a positive row in the resample are left out of the mean.
at::Tensor resampled_mean_ap(const at::Tensor& scores, const at::Tensor& truth, const at::Tensor& c) {
  const std::int64_t n = c.size(0);
  at::Tensor sum = at::zeros({n}, at::kDouble), labels = at::zeros({n}, at::kDouble);
  const auto most = static_cast<std::int64_t>(c.numel() ? c.max().item<double>() : 0.0);
  for (std::int64_t j = 0; j < scores.size(1); ++j) {
    const at::Tensor order = scores.select(1, j).argsort(/*stable=*/true, /*dim=*/0, /*descending=*/true);
    const at::Tensor positive = truth.select(1, j).index_select(0, order).nonzero().reshape({-1});
    const at::Tensor drawn = c.index_select(1, order);                                // [n, N] in rank order
    const at::Tensor before = drawn.cumsum(1).sub_(drawn).index_select(1, positive);  // rows ranked above
    const at::Tensor copies = drawn.index_select(1, positive);                        // [n, P]
    const at::Tensor hits_before = copies.cumsum(1).sub_(copies);  // positives ranked above
    at::Tensor ap = at::zeros({n}, at::kDouble);
    for (std::int64_t m = 1; m <= most; ++m)  // the m-th copy of each positive row
      ap += ((hits_before + m) / (before + m)).mul_(copies.ge(m)).sum(1);
    const at::Tensor positives = copies.sum(1);
    const at::Tensor has = positives.gt(0);
    sum += at::where(has, ap / positives.clamp_min(1.0), at::zeros_like(ap));
    labels += has.to(at::kDouble);
  }
  return at::where(labels.gt(0), sum / labels.clamp_min(1.0), at::zeros_like(sum));
}
}  // namespace

const std::vector<double>* Resampled::find(const std::string& name) const {
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) return &values[i];
  }
  return nullptr;
}

const std::vector<std::string>& resampled_metric_names() {
  static const std::vector<std::string> names{"accuracy", "macro_f1", "mean_ap", "nll", "mae", "rmse", "r2"};
  return names;
}

bool lower_is_better(const std::string& name) { return name == "nll" || name == "mae" || name == "rmse"; }

std::string scored_metric(TaskKind kind, Monitor monitor) {
  switch (monitor) {
    case Monitor::kAccuracy:
      return "accuracy";
    case Monitor::kMacroF1:
      return "macro_f1";
    case Monitor::kNll:
      return "nll";
    case Monitor::kMeanAp:
      return "mean_ap";
    case Monitor::kAuto:
      break;
  }
  return kind == TaskKind::kRegression ? "r2" : "accuracy";
}

at::Tensor resample_counts(std::int64_t rows, std::int64_t first, std::int64_t n, std::uint64_t seed) {
  at::Tensor counts = at::zeros({n, rows}, at::kDouble);
  if (rows == 0) return counts;
  const at::Tensor ones = at::ones({rows}, at::kDouble);
  for (std::int64_t r = 0; r < n; ++r) {
    // Each resample its own generator: resample r is the same whichever block holds it.
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003ULL +
                                                        static_cast<std::uint64_t>(first + r) * 7919ULL + 1);
    const at::Tensor drawn = at::randint(rows, {rows}, gen, at::kLong);
    counts.select(0, r).index_add_(0, drawn, ones);
  }
  return counts;
}

HeadOutputs head_outputs(Task& task, const at::Tensor& features, const at::Tensor& targets) {
  HeadOutputs h;
  h.kind = task.config().kind;
  h.outputs = task.outputs(features);
  h.targets = task.regression()
                  ? targets.reshape({-1}).to(at::kDouble) * task.target_std() + task.target_mean()
                  : targets;
  h.num_classes = task.num_classes();
  h.target_mean = task.target_mean();
  h.target_std = task.target_std();
  h.cutoffs = task.cutoffs();
  h.temperature = task.temperature();
  return h;
}

EvalMetrics evaluate_head(const HeadOutputs& head, Monitor monitor) {
  EvalMetrics m = evaluate_outputs(head.kind, head.outputs, head.targets, head.num_classes, head.target_mean,
                                   head.target_std, head.cutoffs, head.temperature);
  m.monitor = monitor;
  return m;
}

double metric_value(const EvalMetrics& m, const std::string& name) {
  if (name == "accuracy") return m.accuracy;
  if (name == "macro_f1") return m.macro_f1;
  if (name == "mean_ap") return m.mean_ap.value_or(0.0);
  if (name == "nll") return m.nll.value_or(0.0);
  if (!m.regression) return 0.0;
  return name == "mae" ? m.regression->mae : name == "rmse" ? m.regression->rmse : m.regression->r2;
}

Resampled metrics_on_counts(const HeadOutputs& head, const at::Tensor& counts) {
  const at::Tensor& outputs = head.outputs;
  const std::int64_t n = outputs.size(0);
  CANOPY_CHECK(counts.dim() == 2 && counts.size(1) == n, DataError, "resample counts ", counts.sizes(),
               " for ", n, " rows");
  Resampled out;
  out.rows = n;
  const at::Tensor c = counts.to(at::kDouble);
  const double rows = static_cast<double>(std::max<std::int64_t>(1, n));
  auto add = [&](const char* name, const at::Tensor& values) {
    out.names.emplace_back(name);
    out.values.push_back(tensor_values(values));
  };
  if (head.kind == TaskKind::kRegression) {
    const at::Tensor p = outputs.reshape({-1}).to(at::kDouble) * head.target_std + head.target_mean;
    const at::Tensor y = head.targets.reshape({-1}).to(at::kDouble);
    const at::Tensor e = p - y;
    const at::Tensor yc = y - y.mean();  // SST does not move with the mean; centred, it loses no digits
    const at::Tensor sse = c.mv(e * e), sy = c.mv(yc), sst = c.mv(yc * yc) - sy * sy / rows;
    add("mae", c.mv(e.abs()) / rows);
    add("rmse", (sse / rows).sqrt());
    add("r2", at::where(sst > 0, 1.0 - sse / sst.clamp_min(1e-300),
                        at::where(sse == 0, at::tensor(1.0, at::kDouble), at::tensor(0.0, at::kDouble))));
    return out;
  }
  if (head.kind == TaskKind::kMultilabel) {
    const at::Tensor pred = labels_given(outputs, head.cutoffs);
    const at::Tensor truth = head.targets.gt(0.5);
    add("accuracy", c.mv(pred.eq(truth).all(1).to(at::kDouble)) / rows);
    const at::Tensor tp = c.mm(pred.logical_and(truth).to(at::kDouble));
    const at::Tensor f1 = f1_of(tp, c.mm(truth.to(at::kDouble)), c.mm(pred.to(at::kDouble)), 1.0);
    add("macro_f1", f1.mean(1));
    add("mean_ap", resampled_mean_ap(outputs, truth, c));
    return out;
  }
  const at::Tensor t = head.targets.reshape({-1}).to(at::kLong);
  const at::Tensor p = outputs.argmax(1);
  const at::Tensor right = p.eq(t).to(at::kDouble);
  add("accuracy", c.mv(right) / rows);
  const at::Tensor none = at::zeros({c.size(0), head.num_classes}, at::kDouble);
  const at::Tensor support = none.index_add(1, t, c), predicted = none.index_add(1, p, c);
  const at::Tensor hits = right.nonzero().reshape({-1});  // the rows predicted right: each adds to its class
  const at::Tensor tp = none.index_add(1, t.index_select(0, hits), c.index_select(1, hits));
  const at::Tensor present = (support + predicted).gt(0).to(at::kDouble);
  add("macro_f1", f1_of(tp, support, predicted, 0.0).sum(1) / present.sum(1).clamp_min(1.0));
  add("nll", c.mv(row_nll(outputs, t, head.temperature)) / rows);
  return out;
}

std::vector<Resampled> bootstrap(const std::vector<HeadOutputs>& heads, const BootstrapSpec& spec) {
  std::vector<Resampled> all(heads.size());
  if (heads.empty()) return all;
  const std::int64_t rows = heads.front().outputs.size(0);
  for (const auto& h : heads) {
    CANOPY_CHECK(h.outputs.size(0) == rows, DataError,
                 "heads resampled together must be scored on the same rows: ", rows, " and ",
                 h.outputs.size(0));
  }
  const std::int64_t block = block_of(rows);
  for (std::int64_t first = 0; first < spec.resamples; first += block) {
    const at::Tensor counts =
        resample_counts(rows, first, std::min(block, spec.resamples - first), spec.seed);
    for (std::size_t i = 0; i < heads.size(); ++i) {
      Resampled part = metrics_on_counts(heads[i], counts);
      if (all[i].names.empty()) {
        all[i] = std::move(part);
        continue;
      }
      for (std::size_t m = 0; m < part.values.size(); ++m)
        all[i].values[m].insert(all[i].values[m].end(), part.values[m].begin(), part.values[m].end());
    }
  }
  return all;
}

Interval percentile_interval(std::vector<double> values, double level) {
  if (values.empty()) return {};
  std::sort(values.begin(), values.end());
  const auto at = [&](double q) {
    const double pos = q * static_cast<double>(values.size() - 1);
    const auto below = static_cast<std::size_t>(std::floor(pos));
    const std::size_t above = std::min(below + 1, values.size() - 1);
    return values[below] + (pos - static_cast<double>(below)) * (values[above] - values[below]);
  };
  return {at((1.0 - level) / 2.0), at((1.0 + level) / 2.0)};
}

Interval difference_interval(const std::vector<double>& a, const std::vector<double>& b, double level,
                             double sign) {
  std::vector<double> difference(std::min(a.size(), b.size()));
  for (std::size_t k = 0; k < difference.size(); ++k) difference[k] = sign * (a[k] - b[k]);
  return percentile_interval(std::move(difference), level);
}

}  // namespace canopy::tasks
