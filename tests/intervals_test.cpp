// Bootstrap intervals: resamples that depend on (seed, resample, rows) alone, metrics on them
// that are EvalMetrics' own on the resampled rows, and percentile intervals as numpy's.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include <ATen/Context.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/bernoulli.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include "canopy/core/error.h"
#include "canopy/tasks/intervals.h"
#include "canopy/tasks/task.h"

namespace canopy::tasks {
namespace {

std::vector<HeadOutputs> cases() {
  at::manual_seed(3);
  const std::int64_t n = 300;
  HeadOutputs multiclass{
      TaskKind::kMulticlass, at::randn({n, 4}), at::randint(4, {n}, at::kLong), 4, 0, 1, {}, 1.7};
  multiclass.outputs.select(1, 0) += multiclass.targets.eq(0).to(at::kFloat) * 2;  // some skill
  HeadOutputs multilabel{
      TaskKind::kMultilabel, at::randn({n, 3}), at::rand({n, 3}).gt(0.6).to(at::kFloat), 3, 0, 1,
      {0.2, -0.1, 0.4}};
  // Regression: outputs standardised, targets in their units (mean 3, std 2.5).
  HeadOutputs regression{TaskKind::kRegression, at::randn({n, 1}), at::randn({n, 1}), 1, 3.0, 2.5, {}, 1.0};
  regression.outputs = regression.outputs * 0.3 + regression.targets * 0.8;
  regression.targets = regression.targets * 2.5 + 3.0;
  return {multiclass, multilabel, regression};
}

// The metrics EvalMetrics gives for a head's rows (`rows`: which, repeats allowed), in Resampled's order.
std::vector<double> evaluated(const HeadOutputs& c, const at::Tensor& rows) {
  const at::Tensor o = c.outputs.index_select(0, rows), t = c.targets.index_select(0, rows);
  const EvalMetrics m =
      evaluate_outputs(c.kind, o, c.kind == TaskKind::kRegression ? t.squeeze(1) : t, c.num_classes,
                       c.target_mean, c.target_std, c.cutoffs, c.temperature);
  if (c.kind == TaskKind::kRegression) return {m.regression->mae, m.regression->rmse, m.regression->r2};
  if (c.kind == TaskKind::kMultilabel) return {m.accuracy, m.macro_f1, *m.mean_ap};
  return {m.accuracy, m.macro_f1, *m.nll};
}

TEST(Intervals, ResamplesDependOnSeedResampleAndRowsAlone) {
  const at::Tensor a = resample_counts(50, 0, 10, 7), b = resample_counts(50, 4, 3, 7);
  EXPECT_TRUE(a.sum(1).eq(50).all().item<bool>()) << "each resample draws as many rows as there are";
  EXPECT_TRUE(a.slice(0, 4, 7).equal(b)) << "resample 4 is the same in any block";
  EXPECT_FALSE(a.equal(resample_counts(50, 0, 10, 8))) << "another seed, other resamples";
  EXPECT_GT(a.eq(0).to(at::kDouble).mean().item<double>(), 0.25) << "about 1/e of rows are left out of each";
}

TEST(Intervals, MetricsOnCountsAreEvalMetricsOnTheResampledRows) {
  for (const HeadOutputs& c : cases()) {
    const std::int64_t n = c.outputs.size(0);
    // Counts of ones: the split itself.
    const Resampled whole = metrics_on_counts(c, at::ones({1, n}, at::kDouble));
    const std::vector<double> want = evaluated(c, at::arange(n));
    ASSERT_EQ(whole.values.size(), want.size()) << to_string(c.kind);
    for (std::size_t m = 0; m < want.size(); ++m)
      EXPECT_NEAR(whole.values[m][0], want[m], 1e-12) << to_string(c.kind) << " " << whole.names[m];
    // A resample: the rows it draws, each as often as drawn, scored by evaluate_outputs.
    const at::Tensor counts = resample_counts(n, 5, 2, 11);
    const Resampled two = metrics_on_counts(c, counts);
    for (std::int64_t r = 0; r < 2; ++r) {
      const at::Tensor rows = at::repeat_interleave(at::arange(n), counts.select(0, r).to(at::kLong));
      const std::vector<double> got = evaluated(c, rows);
      for (std::size_t m = 0; m < got.size(); ++m)
        EXPECT_NEAR(two.values[m][static_cast<std::size_t>(r)], got[m], 1e-9)
            << to_string(c.kind) << " " << two.names[m] << " resample " << r;
    }
  }
}

TEST(Intervals, PercentileIntervalsInterpolateAsNumpy) {
  std::vector<double> v;
  for (int i = 100; i >= 0; --i) v.push_back(i);
  const Interval a = percentile_interval(v, 0.9);
  EXPECT_DOUBLE_EQ(a.lo, 5.0);
  EXPECT_DOUBLE_EQ(a.hi, 95.0);
  const Interval b = percentile_interval({4, 1, 3, 2}, 0.5);  // numpy.quantile([1,2,3,4], [.25,.75])
  EXPECT_DOUBLE_EQ(b.lo, 1.75);
  EXPECT_DOUBLE_EQ(b.hi, 3.25);
}

// An accuracy of p on n rows: the 95% interval is about p +- 1.96 sqrt(p (1 - p) / n), and the
// same seed gives the same interval; a paired difference of a head with itself is 0 exactly.
TEST(Intervals, AnAccuracysIntervalHasTheBinomialWidth) {
  at::manual_seed(5);
  const std::int64_t n = 4000;
  const at::Tensor targets = at::randint(2, {n}, at::kLong);
  const at::Tensor right = at::bernoulli(at::full({n}, 0.8, at::kDouble)).to(at::kLong);
  const at::Tensor predicted = at::where(right.eq(1), targets, 1 - targets);
  at::Tensor logits = at::zeros({n, 2});
  logits.scatter_(1, predicted.reshape({-1, 1}), 1.0);
  const BootstrapSpec spec{2000, 0.95, 0};
  HeadOutputs head;
  head.outputs = logits;
  head.targets = targets;
  head.num_classes = 2;
  const Resampled r = bootstrap({head}, spec).front();
  ASSERT_EQ(r.find("accuracy")->size(), 2000u);
  const Interval i = percentile_interval(*r.find("accuracy"), 0.95);
  const double p = right.to(at::kDouble).mean().item<double>(), half = 1.96 * std::sqrt(p * (1 - p) / n);
  EXPECT_NEAR(i.hi - i.lo, 2 * half, 0.15 * 2 * half);
  EXPECT_NEAR((i.hi + i.lo) / 2, p, 0.25 * half);
  const Resampled again = bootstrap({head}, spec).front();
  EXPECT_EQ(*again.find("accuracy"), *r.find("accuracy"));
  EXPECT_EQ(r.find("mean_ap"), nullptr) << "multiclass: no mean AP";
}

// Heads resampled together see the resamples each sees alone; a head against itself differs by 0.
TEST(Intervals, HeadsResampledTogetherArePaired) {
  const auto heads = cases();
  const BootstrapSpec spec{300, 0.9, 4};
  const std::vector<Resampled> together = bootstrap({heads[0], heads[1], heads[0]}, spec);
  ASSERT_EQ(together.size(), 3u);
  EXPECT_EQ(together[1].values, bootstrap({heads[1]}, spec).front().values);
  EXPECT_EQ(together[0].values, together[2].values);
  EXPECT_EQ(together[0].values.at(0).size(), 300u);
  HeadOutputs fewer = heads[0];
  fewer.outputs = fewer.outputs.slice(0, 0, 10);
  EXPECT_THROW(bootstrap({heads[0], fewer}, spec), DataError);
}

}  // namespace
}  // namespace canopy::tasks
