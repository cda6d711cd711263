// Per-head run state: losses, failures, early stopping, and the state a finished head ends in.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ops/arange.h>

#include "canopy/runners/head_run.h"

namespace canopy::runners {
namespace {

tasks::EvalMetrics accuracy(double a) {
  tasks::EvalMetrics m;
  m.accuracy = a;
  return m;
}

TEST(HeadRun, EpochLossIsTheMeanOfItsSteps) {
  HeadRun r;
  r.start_epoch();
  r.add_loss(1.0);
  r.add_loss(2.0);
  r.finish_epoch(0, 3, accuracy(0.5), 0);
  EXPECT_DOUBLE_EQ(r.train_loss, 1.5);
  EXPECT_EQ(r.epochs, 1);
  EXPECT_TRUE(r.training());
  r.start_epoch();
  r.add_loss(4.0);
  r.finish_epoch(1, 3, accuracy(0.6), 0);
  EXPECT_DOUBLE_EQ(r.train_loss, 4.0) << "each epoch starts its own mean";
}

TEST(HeadRun, AHeadIsDoneAfterItsLastEpochWithoutAStopNote) {
  HeadRun r;
  for (std::int64_t e = 0; e < 2; ++e) r.finish_epoch(e, 2, accuracy(0.1 * static_cast<double>(e)), 0);
  EXPECT_EQ(r.state, tasks::TaskState::kDone);
  EXPECT_STREQ(state_name(r.state), "done");
  EXPECT_TRUE(r.stop_note.empty());
}

TEST(HeadRun, EarlyStoppingAfterPatienceEpochsWithoutImprovement) {
  HeadRun r;
  const double scores[] = {0.5, 0.7, 0.6, 0.65, 0.69, 0.9};
  std::int64_t e = 0;
  for (; e < 6 && r.training(); ++e) r.finish_epoch(e, 10, accuracy(scores[e]), 3);
  EXPECT_EQ(e, 5) << "best at epoch 2, three epochs without better: stops after epoch 5";
  EXPECT_EQ(r.state, tasks::TaskState::kDone);
  EXPECT_EQ(r.best_epoch, 2);
  EXPECT_EQ(r.stop_note, "stopped early at epoch 5 (best accuracy 0.7000 at epoch 2)");
}

// --resume with more epochs: a head done at its last epoch goes on; it then ends as a run of the
// new length from the start would have, early stop included.
TEST(HeadRun, GoingOnToMoreEpochsEndsAsTheLongerRunWould) {
  const double scores[] = {0.5, 0.6, 0.7, 0.7, 0.7, 0.8};
  const auto run = [&](HeadRun& r, std::int64_t from, std::int64_t to, std::int64_t total,
                       std::int64_t patience) {
    for (std::int64_t e = from; e < to && r.training(); ++e)
      r.finish_epoch(e, total, accuracy(scores[e]), patience);
  };
  for (const std::int64_t patience : {0, 2, 3}) {
    HeadRun longer, shorter;
    run(longer, 0, 6, 6, patience);
    run(shorter, 0, 3, 3, patience);
    ASSERT_EQ(shorter.state, tasks::TaskState::kDone);
    EXPECT_TRUE(shorter.go_on_to(6, patience)) << "patience " << patience;
    EXPECT_TRUE(shorter.training());
    run(shorter, 3, 6, 6, patience);
    EXPECT_EQ(std::tie(shorter.state, shorter.epochs, shorter.best_epoch, shorter.stop_note),
              std::tie(longer.state, longer.epochs, longer.best_epoch, longer.stop_note))
        << "patience " << patience << ": " << longer.stop_note;
  }
  // Patience run out at the shorter run's last epoch: the longer run stops there, saying so.
  HeadRun r, longer;
  const double flat[] = {0.9, 0.5, 0.5, 0.5};
  for (std::int64_t e = 0; e < 3; ++e) r.finish_epoch(e, 3, accuracy(flat[e]), 2);
  for (std::int64_t e = 0; e < 4 && longer.training(); ++e) longer.finish_epoch(e, 4, accuracy(flat[e]), 2);
  EXPECT_TRUE(r.stop_note.empty());
  EXPECT_FALSE(r.go_on_to(4, 2));
  EXPECT_EQ(r.state, tasks::TaskState::kDone);
  EXPECT_EQ(r.stop_note, "stopped early at epoch 3 (best accuracy 0.9000 at epoch 1)");
  EXPECT_EQ(r.stop_note, longer.stop_note);
  // Not going on: the same count, a head stopped early, one that failed.
  EXPECT_FALSE(r.go_on_to(3, 0));
  HeadRun stopped;
  for (std::int64_t e = 0; e < 3 && stopped.training(); ++e)
    stopped.finish_epoch(e, 10, accuracy(flat[e]), 2);
  ASSERT_FALSE(stopped.stop_note.empty());
  EXPECT_FALSE(stopped.go_on_to(20, 2));
  EXPECT_EQ(stopped.epochs, 3);
  HeadRun failed;
  failed.fail(0, 4, "loss is NaN");
  EXPECT_FALSE(failed.go_on_to(20, 0));
  EXPECT_TRUE(failed.failed());
}

TEST(HeadRun, TheMonitoredMetricChoosesTheBestEpochAndNamesItself) {
  // nll: lower wins, and the note says the NLL, not its negation.
  HeadRun r;
  const double nll[] = {0.9, 0.5, 0.6, 0.7};
  const double acc[] = {0.5, 0.6, 0.8, 0.9};  // accuracy rising would have chosen epoch 4
  for (std::int64_t e = 0; e < 4 && r.training(); ++e) {
    tasks::EvalMetrics m = accuracy(acc[e]);
    m.nll = nll[e];
    m.monitor = tasks::Monitor::kNll;
    r.finish_epoch(e, 10, m, 2);
  }
  EXPECT_EQ(r.best_epoch, 2);
  EXPECT_EQ(r.stop_note, "stopped early at epoch 4 (best NLL 0.5000 at epoch 2)");
  // Each monitor scores its metric; auto is a multilabel head's mean AP (the metrics that have
  // one), a regression's R^2, else accuracy.
  tasks::EvalMetrics m = accuracy(0.8);
  m.macro_f1 = 0.6;
  m.mean_ap = 0.7;
  m.nll = 0.4;
  const std::vector<std::tuple<tasks::Monitor, double, std::string>> each{
      {tasks::Monitor::kAuto, 0.7, "mean AP"},
      {tasks::Monitor::kAccuracy, 0.8, "accuracy"},
      {tasks::Monitor::kMacroF1, 0.6, "macro-F1"},
      {tasks::Monitor::kMeanAp, 0.7, "mean AP"},
      {tasks::Monitor::kNll, -0.4, "NLL"}};
  for (const auto& [monitor, score, name] : each) {
    m.monitor = monitor;
    EXPECT_EQ(m.score(), score) << name;
    EXPECT_EQ(m.score_name(), name);
  }
  EXPECT_EQ(m.score_value(m.score()), 0.4);
  m.monitor = tasks::Monitor::kAuto;
  m.mean_ap.reset();  // a multiclass head's
  EXPECT_EQ(m.score(), 0.8);
  EXPECT_STREQ(m.score_name(), "accuracy");
  m.regression = tasks::RegressionErrors{0.1, 0.2, 0.75};
  EXPECT_EQ(m.score(), 0.75);
  EXPECT_STREQ(m.score_name(), "R^2");
}

TEST(HeadRun, FailuresNameEpochAndStepCountingFromOne) {
  HeadRun r;
  r.fail(1, 8, "loss is nan");
  EXPECT_TRUE(r.failed());
  EXPECT_EQ(r.failure, "epoch 2 step 9: loss is nan");
  r.finish_epoch(1, 3, accuracy(0.9), 0);
  EXPECT_EQ(r.epochs, 0) << "a failed head records no more epochs";
  HeadRun e;
  e.fail_evaluation(0, "bad shape");
  EXPECT_EQ(e.failure, "epoch 1 evaluation: bad shape");
  EXPECT_STREQ(state_name(e.state), "FAILED");
}

// Successive halving: cuts after first x factor^k epochs; each keeps the best ceil(n / factor)
// members, the earlier of equal scores, a NaN score last.
TEST(HeadRun, SuccessiveHalvingCutsAtPowersOfTheFactorAndKeepsTheBest) {
  std::vector<std::int64_t> cuts;
  for (std::int64_t e = 0; e <= 40; ++e) {
    if (halving_cut_after(e, 2, 3)) cuts.push_back(e);
  }
  EXPECT_EQ(cuts, (std::vector<std::int64_t>{2, 6, 18}));
  EXPECT_FALSE(halving_cut_after(5, 0, 3)) << "0: off";
  EXPECT_TRUE(halving_cut_after(std::int64_t{1} << 62, 1, 2)) << "large epochs without overflow";
  EXPECT_FALSE(halving_cut_after((std::int64_t{1} << 62) + 1, 1, 2));

  using Stops = std::vector<std::size_t>;
  EXPECT_EQ(halving_stops({0.5, 0.9, 0.7, 0.1, 0.8, 0.6}, 3), (Stops{0, 2, 3, 5})) << "6 -> the best 2";
  EXPECT_EQ(halving_stops({0.5, 0.9, 0.7, 0.1, 0.8, 0.6, 0.2}, 3), (Stops{0, 3, 5, 6})) << "7 -> 3";
  EXPECT_EQ(halving_stops({0.4, 0.4, 0.4}, 2), (Stops{2})) << "ties keep the earlier members";
  EXPECT_EQ(halving_stops({std::nan(""), 0.1, 0.2, 0.05}, 2), (Stops{0, 3})) << "a NaN ranks last";
  EXPECT_EQ(halving_stops({0.3}, 4), Stops{}) << "one member always goes on";
  EXPECT_EQ(halving_stops({}, 2), Stops{});

  HeadRun r;
  r.finish_epoch(0, 10, accuracy(0.75), 0);
  r.stop_by_halving(0.75, 2, 6);
  EXPECT_FALSE(r.training());
  EXPECT_EQ(r.stop_note, "stopped by successive halving at epoch 1 (accuracy 0.7500; 2 of 6 went on)");
}

// How MPI ranks send runs to each other: every field exactly, NaN and the confusion matrix too.
TEST(HeadRun, EncodedRunsDecodeToTheSameRun) {
  HeadRun r;
  r.finish_epoch(0, 5, accuracy(0.1 + 0.2), 0);  // a double with no short decimal form
  r.add_loss(std::numeric_limits<double>::quiet_NaN());
  r.add_loss(1.0 / 3.0);
  r.seconds = 12.345678901234567;
  r.eval.confusion = at::arange(9, at::kLong).reshape({3, 3});
  r.eval.mean_ap = 0.7;
  r.eval.nll = 0.25;
  r.eval.ece = 0.125;
  r.eval.monitor = tasks::Monitor::kNll;
  r.stop_note = "stopped, \"quoted\"\n";
  HeadRun back;
  decode_run(encode_run(r), back);
  EXPECT_EQ(back.state, r.state);
  EXPECT_EQ(back.epochs, 1);
  EXPECT_EQ(back.eval.accuracy, 0.1 + 0.2);
  EXPECT_TRUE(std::isnan(back.loss_sum));
  EXPECT_EQ(back.loss_count, 2);
  EXPECT_EQ(back.last_loss, 1.0 / 3.0);
  EXPECT_EQ(back.seconds, r.seconds);
  EXPECT_EQ(back.best_score, r.best_score);
  EXPECT_EQ(back.stop_note, r.stop_note);
  ASSERT_TRUE(back.eval.confusion.defined());
  EXPECT_TRUE(back.eval.confusion.equal(r.eval.confusion));
  EXPECT_EQ(back.eval.mean_ap, 0.7);
  EXPECT_EQ(back.eval.nll, 0.25);
  EXPECT_EQ(back.eval.ece, 0.125);
  EXPECT_EQ(back.eval.monitor, tasks::Monitor::kNll);
  EXPECT_FALSE(back.eval.regression.has_value());
  r.eval.regression = tasks::RegressionErrors{0.5, 0.25, -1.5};
  decode_run(encode_run(r), back);
  ASSERT_TRUE(back.eval.regression.has_value());
  EXPECT_EQ(back.eval.regression->r2, -1.5);
}

}  // namespace
}  // namespace canopy::runners
