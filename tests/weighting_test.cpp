// Freezing schedules and loss weightings against their formulas, on hand-made numbers.
#include <gtest/gtest.h>

#include <cmath>

#include <ATen/ops/tensor.h>

#include "canopy/core/error.h"
#include "canopy/runners/freeze_schedule.h"
#include "canopy/runners/weighting.h"

namespace canopy::runners {
namespace {

TEST(FreezeSchedule, GradualUnfreezesOneBlockPerPeriodAfterTheWarmUp) {
  std::vector<std::int64_t> got;
  for (std::int64_t e = 0; e < 6; ++e) got.push_back(gradual_trainable(e, 3, 1, 1));
  EXPECT_EQ(got, (std::vector<std::int64_t>{0, 1, 2, 3, 3, 3}));
  got.clear();
  for (std::int64_t e = 0; e < 6; ++e) got.push_back(gradual_trainable(e, 3, 0, 2));
  EXPECT_EQ(got, (std::vector<std::int64_t>{1, 1, 2, 2, 3, 3}));
}

TEST(FreezeSchedule, PercentileInterpolatesAsNumpyDoes) {
  const std::vector<double> v{4, 1, 3, 2};  // numpy.percentile(v, [0, 25, 50, 100]) = 1, 1.75, 2.5, 4
  EXPECT_DOUBLE_EQ(percentile(v, 0), 1.0);
  EXPECT_DOUBLE_EQ(percentile(v, 25), 1.75);
  EXPECT_DOUBLE_EQ(percentile(v, 50), 2.5);
  EXPECT_DOUBLE_EQ(percentile(v, 100), 4.0);
  EXPECT_THROW(percentile({}, 50), Error);
}

TEST(FreezeSchedule, ChangeRatesAndTheBlocksToFreeze) {
  EXPECT_EQ(change_rates({2, 4, 0}, {1, 5, 3}), (std::vector<double>{0.5, 0.25, 0.0}));
  // Median of {0.1, 0.2, 0.9, 0.5} is 0.35: the two lowest blocks are below it, the third not.
  EXPECT_EQ(blocks_to_freeze({0.1, 0.2, 0.9, 0.5}, 50, 1), 2);
  EXPECT_EQ(blocks_to_freeze({0.1, 0.2, 0.9, 0.5}, 50, 3), 1);  // three keep training
  EXPECT_EQ(blocks_to_freeze({0.5, 0.1, 0.2, 0.9}, 50, 1), 0);  // only a run from the lowest block
  EXPECT_EQ(blocks_to_freeze({0.1}, 100, 1), 0);
}

TEST(Weighting, UncertaintyIsHalfTheInversePrecisionAndItsGradient) {
  const auto w = uncertainty_weights({0.0, std::log(2.0)});
  EXPECT_DOUBLE_EQ(w[0], 0.5);
  EXPECT_DOUBLE_EQ(w[1], 0.25);
  // d/ds (0.5 e^-s L + 0.5 s) at s = 0, L = 3: -1.5 + 0.5.
  EXPECT_DOUBLE_EQ(uncertainty_gradient({0.0}, {3.0})[0], -1.0);
  // One Adam step moves s by lr against the gradient's sign.
  LossWeighting lw(Weighting::kUncertainty, {1.0}, 0.025, 0);
  EXPECT_DOUBLE_EQ(lw.weights()[0], 0.5);
  lw.after_step({3.0});
  EXPECT_NEAR(lw.weights()[0], 0.5 * std::exp(-0.025), 1e-9);  // Adam's eps aside
}

TEST(Weighting, DwaIsKTimesTheSoftmaxOfLossRatiosOverTheTemperature) {
  const auto w = dwa_weights({1.0, 2.0}, {2.0, 2.0}, 2.0);  // r = {0.5, 1} / 2
  const double a = std::exp(0.25), b = std::exp(0.5);
  EXPECT_NEAR(w[0], 2 * a / (a + b), 1e-12);
  EXPECT_NEAR(w[1], 2 * b / (a + b), 1e-12);
  LossWeighting lw(Weighting::kDwa, {1.0, 1.0}, 0.025, 0);
  EXPECT_EQ(lw.weights(), (std::vector<double>{1.0, 1.0}));  // until two epochs' losses exist
  lw.end_epoch({2.0, 2.0});
  EXPECT_EQ(lw.weights(), (std::vector<double>{1.0, 1.0}));
  lw.end_epoch({1.0, 2.0});
  EXPECT_NEAR(lw.weights()[0], w[0], 1e-12);
}

TEST(Weighting, FamoWeightsAndLogitUpdate) {
  // z = (0.5, 0.5), L = (1, 3): c = 0.5 + 1/6, w = z / (c L) = (0.75, 0.25).
  const auto w = famo_weights({0.0, 0.0}, {1.0, 3.0});
  EXPECT_NEAR(w[0], 0.75, 1e-7);
  EXPECT_NEAR(w[1], 0.25, 1e-7);
  // delta = (log 2, 0); J_softmax^T delta = z (delta - z.delta) = (log2 / 4, -log2 / 4).
  const auto g = famo_logits_gradient({0.0, 0.0}, {1.0, 1.0}, {0.5, 1.0});
  EXPECT_NEAR(g[0], std::log(2.0) / 4, 1e-7);
  EXPECT_NEAR(g[1], -std::log(2.0) / 4, 1e-7);
}

TEST(Weighting, PcgradProjectsConflictingGradientsOffEachOther) {
  const at::Tensor g1 = at::tensor({1.0, 0.0}), g2 = at::tensor({-1.0, 1.0});
  // g1 . g2 = -1: g1' = g1 + g2 / 2 = (0.5, 0.5); g2' = g2 + g1 = (0, 1); sum (0.5, 1.5).
  const at::Tensor out = pcgrad({g1, g2}, {{1}, {0}});
  EXPECT_TRUE(out.allclose(at::tensor({0.5, 1.5})));
  // No conflict: the plain sum.
  EXPECT_TRUE(pcgrad({g1, at::tensor({1.0, 1.0})}, {{1}, {0}}).allclose(at::tensor({2.0, 1.0})));
  // A task that did not train takes no part.
  EXPECT_TRUE(pcgrad({g1, at::Tensor()}, {{1}, {0}}).allclose(g1));
  // The combined gradient keeps the tasks' shape; the order depends on (seed, step) only.
  LossWeighting lw(Weighting::kPcgrad, {1.0, 1.0, 1.0}, 0.025, 7);
  const std::vector<at::Tensor> gs{at::tensor({1.0, 0.0, 0.0, 1.0}).reshape({2, 2}),
                                   at::tensor({-1.0, 1.0, 0.5, 0.0}).reshape({2, 2}),
                                   at::tensor({0.0, -1.0, -1.0, 0.3}).reshape({2, 2})};
  EXPECT_EQ(lw.combine(gs, 3).sizes(), gs[0].sizes());
  EXPECT_TRUE(lw.combine(gs, 3).equal(lw.combine(gs, 3)));
}

TEST(Weighting, StateRoundTripsSoAResumedRunWeightsAlike) {
  LossWeighting a(Weighting::kFamo, {1.0, 1.0, 1.0}, 0.025, 0);
  a.after_step({1.0, 2.0, 3.0});
  a.after_step({0.9, 2.1, 2.5});
  LossWeighting b(Weighting::kFamo, {1.0, 1.0, 1.0}, 0.025, 0);
  b.load_state(a.state());
  EXPECT_EQ(a.weights(), b.weights());
  a.after_step({0.8, 2.0, 2.4});
  b.after_step({0.8, 2.0, 2.4});
  EXPECT_EQ(a.weights(), b.weights());
  EXPECT_NE(a.weights()[0], 1.0 / 3);
}

TEST(Weighting, NamesParseAndUnknownOnesAreRefused) {
  for (const char* n : {"sum", "static", "uncertainty", "dwa", "famo", "pcgrad"}) {
    EXPECT_STREQ(to_string(parse_weighting(n, "train.weighting")), n);
  }
  EXPECT_THROW(parse_weighting("gradnorm", "train.weighting"), ConfigError);
  EXPECT_THROW(parse_freeze_schedule("cosine", "trunk.schedule"), ConfigError);
  EXPECT_EQ(parse_freeze_schedule("autofreeze", "trunk.schedule"), FreezeSchedule::kAutofreeze);
}

}  // namespace
}  // namespace canopy::runners
