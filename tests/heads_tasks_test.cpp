#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <tuple>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/TensorIndexing.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/nll_loss.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/utils.h>

#include "canopy/core/error.h"
#include "canopy/heads/dropout.h"
#include "canopy/heads/fused.h"
#include "canopy/heads/linear.h"
#include "canopy/heads/mlp.h"
#include "canopy/tasks/fused_optimizer.h"
#include "canopy/tasks/linear_step.h"
#include "canopy/tasks/registry.h"
#include "canopy/tasks/task.h"
#include "support/test_support.h"

namespace canopy::tasks {
namespace {

HeadRegistry builtin() {
  HeadRegistry r;
  register_builtin_heads(r);
  return r;
}

TEST(Heads, ShapesAndDescriptions) {
  heads::LinearHead lin(heads::LinearHeadOptions(16, 4));
  EXPECT_EQ(lin.forward(at::randn({3, 16})).sizes(), (std::vector<std::int64_t>{3, 4}));
  heads::MlpHead mlp(heads::MlpHeadOptions(16, 4).hidden({32, 8}).activation("gelu").dropout(0.1));
  EXPECT_EQ(mlp.forward(at::randn({3, 16})).sizes(), (std::vector<std::int64_t>{3, 4}));
  EXPECT_EQ(mlp.describe(), "mlp 16-32-8-4 gelu dropout=0.1");
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [] { heads::MlpHead(heads::MlpHeadOptions(16, 4).activation("sigmoidish")); }, {"'sigmoidish'"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [] { heads::MlpHead(heads::MlpHeadOptions(16, 4).dropout(1.5)); }, {"dropout", "1.5"}));
}

// Dropout masks: the right keep rate, values 0 or 1/(1-p), a function of the key alone, and
// no visible dependence between neighbouring elements or between keys. Bounds are 5 standard
// deviations of the binomial counts.
TEST(Dropout, MasksKeepTheRightShareIndependently) {
  const std::int64_t rows = 1024, cols = 1024, n = rows * cols;
  for (double p : {0.1, 0.5, 0.9}) {
    const double q = 1.0 - p;
    const at::Tensor m = heads::dropout_mask({rows, cols}, p, 0x1234567890abcdefULL);
    const at::Tensor kept = m.ne(0).to(at::kDouble);
    EXPECT_TRUE(at::equal(m.eq(0) | m.eq(static_cast<float>(1.0 / q)), at::ones({rows, cols}, at::kBool)));
    const double sd = std::sqrt(q * p / n);
    EXPECT_NEAR(kept.mean().item<double>(), q, 5 * sd) << "p " << p;
    // Neighbours along a row and down a column are kept together q^2 of the time.
    const double both_sd = std::sqrt(q * q * (1 - q * q) / n);
    using at::indexing::Slice;
    const at::Tensor along = kept.index({Slice(), Slice(1)}) * kept.index({Slice(), Slice(0, -1)});
    const at::Tensor down = kept.index({Slice(1)}) * kept.index({Slice(0, -1)});
    EXPECT_NEAR(along.mean().item<double>(), q * q, 5 * both_sd) << "p " << p;
    EXPECT_NEAR(down.mean().item<double>(), q * q, 5 * both_sd) << "p " << p;
    // The same key gives the same mask; the next key an independent one.
    EXPECT_TRUE(at::equal(m, heads::dropout_mask({rows, cols}, p, 0x1234567890abcdefULL)));
    const at::Tensor other =
        heads::dropout_mask({rows, cols}, p, 0x1234567890abcdf0ULL).ne(0).to(at::kDouble);
    EXPECT_NEAR((kept * other).mean().item<double>(), q * q, 5 * both_sd) << "p " << p;
  }
  // Element i depends on i and the key alone: the vector loop and the scalar tail agree.
  const at::Tensor vector_only = heads::dropout_mask({64}, 0.5, 99);
  for (std::int64_t size : {1, 7, 13, 63})
    EXPECT_TRUE(at::equal(heads::dropout_mask({size}, 0.5, 99), vector_only.narrow(0, 0, size))) << size;
  EXPECT_EQ(heads::dropout_mask({3, 5}, 0.0, 7).ne(1).sum().item<std::int64_t>(), 0);
  EXPECT_THROW(heads::dropout_mask({3}, 1.0, 7), Error);
  EXPECT_THROW(heads::dropout_mask({3}, -0.1, 7), Error);
}

// Dropout draws one key from the head's generator: the same generator state gives the same
// output, the gradient is the mask, and evaluation mode is the identity.
TEST(Dropout, FollowsTheGeneratorAndBackpropagatesTheMask) {
  at::Generator a = at::detail::createCPUGenerator(42), b = at::detail::createCPUGenerator(42);
  const at::Tensor x = at::randn({64, 32}).requires_grad_(true);
  const at::Tensor ya = heads::hashed_dropout(x, 0.3, a);
  const at::Tensor yb = heads::hashed_dropout(x, 0.3, b);
  EXPECT_TRUE(at::equal(ya, yb));
  EXPECT_FALSE(at::equal(ya, heads::hashed_dropout(x, 0.3, a)));  // the generator moved on
  ya.sum().backward();
  EXPECT_TRUE(at::allclose(x.grad() * x, ya.detach(), 0, 0));
  heads::MlpHead mlp(heads::MlpHeadOptions(32, 4).hidden({16}).dropout(0.5));
  mlp.eval();
  EXPECT_TRUE(at::equal(mlp.forward(x.detach()), mlp.forward(x.detach())));
}

TEST(Registry, BuiltinsAndErrors) {
  HeadRegistry r = builtin();
  ASSERT_EQ(r.list().size(), 2u);
  EXPECT_EQ(r.list()[0].first, "linear");
  EXPECT_EQ(r.list()[1].first, "mlp");
  HeadSpec spec{8, 3, HeadParams("t", {{"hidden", "5,4"}})};
  EXPECT_EQ(r.create("mlp", spec)->describe(), "mlp 8-5-4-3 relu");
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { r.create("conv", spec); },
                                                {"unknown head 'conv'", "linear, mlp"}));
  HeadSpec typo{8, 3, HeadParams("t", {{"hiden", "5"}})};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { r.create("mlp", typo); },
                                                {"task.t.head.hiden (did you mean 'hidden'?)"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { r.create("mpl", spec); },
                                                {"unknown head 'mpl' (did you mean 'mlp'?)"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        r.add(
            "mlp", [](const HeadSpec&) { return heads::HeadPtr(); }, "");
      },
      {"already registered"}));
}

// A head of one's own that gives another shape than [batch, out_features]: a [B] output for
// a regression (targets [B, 1]) broadcasts to [B, B] in the loss, and [B, K + 1] for K classes
// trains on a class that does not exist. Both fail at their first step and evaluation, naming
// the task, the head and the shape; the head is called only as training calls it.
class ShapedHead : public heads::Head {
 public:
  ShapedHead(std::int64_t in, std::int64_t width) : width_(width) {
    w_ = register_parameter("w", at::zeros({in}));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    const at::Tensor v = (x * w_).sum(1);
    return width_ == 0 ? v : v.reshape({-1, 1}).expand({x.size(0), width_}).contiguous();
  }
  std::string describe() const override { return "shaped " + std::to_string(width_); }

 private:
  std::int64_t width_;
  at::Tensor w_;
};

TEST(Task, AHeadThatGivesTheWrongShapeFailsNamingIt) {
  HeadRegistry r = builtin();
  for (const std::int64_t extra : {-1, 0, 1}) {  // -1: [B]
    r.add(
        "shaped" + std::to_string(extra),
        [extra](const HeadSpec& s) {
          return std::make_shared<ShapedHead>(s.in_features, extra < 0 ? 0 : s.out_features + extra);
        },
        "");
  }
  const at::Tensor x = at::randn({6, 8});
  TaskConfig c;
  c.name = "value";
  c.kind = TaskKind::kRegression;
  c.head = "shaped-1";
  Task flat(c, r, 8, 0, 1);
  flat.set_target_scale(0.0, 1.0);
  const at::Tensor y = at::randn({6}).to(at::kDouble);
  const std::string said =
      "task 'value': its head (shaped 0) gave outputs of shape [6] (Float) for a batch of 6 rows; a head "
      "must "
      "give [batch, 1]";
  EXPECT_TRUE(testing::throws_with<Error>([&] { flat.train_step(x, flat.targets(y)); }, {said}));
  EXPECT_TRUE(testing::throws_with<Error>([&] { flat.predict(x); }, {said}));
  c.name = "classes";
  c.kind = TaskKind::kMulticlass;
  c.head = "shaped1";
  Task wide(c, r, 8, 3, 1);
  const at::Tensor labels = at::randint(3, {6});
  EXPECT_TRUE(testing::throws_with<Error>([&] { wide.train_step(x, wide.targets(labels)); },
                                          {"gave outputs of shape [6, 4] (Float)", "must give [batch, 3]"}));
  c.head = "shaped0";
  Task right(c, r, 8, 3, 1);
  EXPECT_NO_THROW(right.train_step(x, right.targets(labels)));
  EXPECT_EQ(right.predict(x).size(0), 6);
}

// Building a task seeds its head from its own seed and leaves LibTorch's default generator
// where it was: the rest of the process draws the same numbers with or without it.
TEST(Task, BuildingATaskLeavesTheDefaultGeneratorAlone) {
  HeadRegistry r = builtin();
  TaskConfig c;
  c.name = "t";
  c.head = "mlp";
  torch::manual_seed(123);
  const at::Tensor expected = at::randn({8});
  torch::manual_seed(123);
  Task a(c, r, 8, 3, 42);
  EXPECT_TRUE(testing::bitwise_equal(at::randn({8}), expected));
  torch::manual_seed(999);
  Task b(c, r, 8, 3, 42);
  for (const auto& p : a.head().named_parameters(true)) {
    EXPECT_TRUE(testing::bitwise_equal(p.value(), b.head().named_parameters(true)[p.key()])) << p.key();
  }
}

TEST(Metrics, AccuracyAndMacroF1) {
  const at::Tensor truth = at::tensor(std::vector<std::int64_t>{0, 0, 1, 1, 2, 2});
  const at::Tensor pred = at::tensor(std::vector<std::int64_t>{0, 1, 1, 1, 2, 0});
  const auto m = classification_metrics(pred, truth, 3);
  EXPECT_NEAR(m.accuracy, 4.0 / 6.0, 1e-12);
  // F1 per class: c0 tp=1 (2 true, 2 pred) -> 0.5; c1 tp=2 (2, 3) -> 0.8; c2 tp=1 (2, 1) -> 2/3.
  EXPECT_NEAR(m.macro_f1, (0.5 + 0.8 + 2.0 / 3.0) / 3.0, 1e-12);
  EXPECT_EQ(m.confusion[2][0].item<std::int64_t>(), 1);
}

TEST(Metrics, TopKAccuracy) {
  // Row 0 ranks its classes 3, 1, 0, 2; row 1 ranks 0, 2, 3, 1; row 2 ranks 2, 3, 1, 0.
  const at::Tensor scores =
      at::tensor(std::vector<float>{0.2f, 0.3f, 0.1f, 0.4f, 4.0f, 1.0f, 3.0f, 2.0f, -3.0f, -2.0f, 5.0f, 1.0f})
          .view({3, 4});
  const at::Tensor truth = at::tensor(std::vector<std::int64_t>{1, 1, 2});
  EXPECT_NEAR(top_k_accuracy(scores, truth, 1), 1.0 / 3.0, 1e-12);  // row 2 only
  EXPECT_NEAR(top_k_accuracy(scores, truth, 2), 2.0 / 3.0, 1e-12);  // row 0 too
  EXPECT_NEAR(top_k_accuracy(scores, truth, 4), 1.0, 1e-12);
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { top_k_accuracy(scores, truth, 5); }, {"top-5", "[3, 4]"}));
  // A task reports it over more than 5 classes, and agrees with its accuracy at k = 1.
  HeadRegistry r = builtin();
  torch::manual_seed(8);
  const at::Tensor x = at::randn({300, 6});
  for (const std::int64_t classes : {5, 6, 10}) {
    TaskConfig c;
    c.name = "top";
    Task t(c, r, 6, classes, 1);
    const at::Tensor y = at::randint(classes, {300}, at::kLong);
    const EvalMetrics m = t.evaluate(x, y);
    EXPECT_EQ(m.top5.has_value(), classes > 5) << classes << " classes";
    if (m.top5) {
      EXPECT_NEAR(*m.top5, top_k_accuracy(t.outputs(x), y, 5), 1e-12);
      EXPECT_GE(*m.top5, m.accuracy);
    }
    EXPECT_NEAR(top_k_accuracy(t.outputs(x), y, 1), m.accuracy, 1e-12);
  }
}

TEST(Metrics, MultilabelAveragePrecision) {
  // Label 0 ranked: hit, miss, hit, miss -> AP = (1 + 2/3) / 2. Label 1: all right.
  const at::Tensor scores =
      at::tensor(std::vector<float>{2.0f, 3.0f, 1.0f, -1.0f, 0.5f, -0.5f, -2.0f, -3.0f}).view({4, 2});
  const at::Tensor truth = at::tensor(std::vector<float>{1, 1, 0, 0, 1, 1, 0, 0}).view({4, 2});
  const auto m = multilabel_metrics(scores, truth);
  ASSERT_TRUE(m.mean_ap.has_value());
  EXPECT_NEAR(*m.mean_ap, ((1.0 + 2.0 / 3.0) / 2.0 + 1.0) / 2.0, 1e-9);
  // Predictions at threshold 0: rows (1,1) (1,0) (1,0) (0,0); truth (1,1) (0,0) (1,1) (0,0).
  EXPECT_NEAR(m.accuracy, 2.0 / 4.0, 1e-9);
}

TEST(Metrics, F1BestCutsAndTheMetricsAtThem) {
  // Label 0, scores 3 2 1 0 -1 with truth 1 0 1 0 0: giving it to the top 1, 2, 3, 4, 5 rows
  // has F1 2/3, 1/2, 4/5, 2/3, 4/7; the best, the top 3, cuts halfway between 1 and 0.
  // Label 1: a tie at the top (2, 2) with one hit: both or none; both rows + nothing else is
  // F1 2/3, the only cut that gives the hit; it sits between 2 and 1. Label 2: no row carries it.
  const at::Tensor scores =
      at::tensor(std::vector<float>{3, 2, 0, 2, 2, 0, 1, 1, 0, 0, 0, 0, -1, -1, 0}).view({5, 3});
  const at::Tensor truth =
      at::tensor(std::vector<float>{1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0}).view({5, 3});
  const std::vector<double> cuts = f1_best_cutoffs(scores, truth);
  ASSERT_EQ(cuts.size(), 3U);
  EXPECT_DOUBLE_EQ(cuts[0], 0.5);
  EXPECT_DOUBLE_EQ(cuts[1], 1.5);
  EXPECT_DOUBLE_EQ(cuts[2], 0.0) << "no positives: probability 0.5";
  const EvalMetrics at_cuts = multilabel_metrics(scores, truth, cuts);
  EXPECT_NEAR(at_cuts.labels[0].f1, 0.8, 1e-12);
  EXPECT_EQ(at_cuts.labels[0].predicted, 3);
  EXPECT_NEAR(at_cuts.labels[0].threshold, 1.0 / (1.0 + std::exp(-0.5)), 1e-12);
  EXPECT_NEAR(at_cuts.labels[1].f1, 2.0 / 3.0, 1e-12);
  EXPECT_EQ(at_cuts.labels[1].predicted, 2);
  // At 0.5 (logit 0, the default) label 1 goes to the rows scored 2, 2 and 1: F1 2/4.
  const EvalMetrics at_half = multilabel_metrics(scores, truth);
  EXPECT_NEAR(at_half.labels[1].f1, 0.5, 1e-12);
  EXPECT_EQ(at_half.labels[1].predicted, 3);
  EXPECT_EQ(at_half.labels[1].threshold, 0.5);
  // Scores one float apart: the cut rounds to float between them, never onto the lower.
  const float hi = 1.0f, lo = std::nextafter(1.0f, 0.0f);
  const at::Tensor close = at::tensor(std::vector<float>{hi, lo}).view({2, 1});
  const at::Tensor first_only = at::tensor(std::vector<float>{1, 0}).view({2, 1});
  const auto cut = f1_best_cutoffs(close, first_only);
  EXPECT_EQ(multilabel_metrics(close, first_only, cut).labels[0].f1, 1.0) << cut[0];
  // Every row carrying it, at logits of 1e8 (where 1e8 - 1 rounds back to 1e8 in float): the
  // cut still gives it to all.
  const at::Tensor huge = at::tensor(std::vector<float>{1e8f, 1e8f}).view({2, 1});
  const at::Tensor both = at::tensor(std::vector<float>{1, 1}).view({2, 1});
  EXPECT_EQ(multilabel_metrics(huge, both, f1_best_cutoffs(huge, both)).labels[0].predicted, 2);
}

// A multilabel task "attrs" over 3 source classes: class 0 carries the first label, 1 the
// second, 2 both.
TaskConfig two_labels(const std::string& first, const std::string& second) {
  TaskConfig c;
  c.name = "attrs";
  c.kind = TaskKind::kMultilabel;
  c.class_names = {first, second};
  c.label_map = {1, 2, 3};
  return c;
}

TEST(Task, PositiveWeightsWeighEachLabelsPositiveRowsInTheLoss) {
  HeadRegistry r = builtin();
  TaskConfig c = two_labels("common", "rare");
  c.positive_weights = {1.0, 4.0};
  Task t(c, r, 4, 3, 1);
  const at::Tensor x = at::randn({6, 2}),
                   y = t.targets(at::tensor(std::vector<std::int64_t>{0, 1, 2, 1, 0, 2}));
  // BCE with pos_weight: -(w y log s(x) + (1 - y) log(1 - s(x))), averaged over every entry.
  const at::Tensor s = x.sigmoid(), w = at::tensor(std::vector<float>{1.0f, 4.0f});
  const at::Tensor want = -(w * y * s.log() + (1 - y) * (1 - s).log()).mean();
  EXPECT_NEAR(t.loss(x, y).item<double>(), want.item<double>(), 1e-6);
  c.positive_weights = {};
  EXPECT_LT(Task(c, r, 4, 3, 1).loss(x, y).item<double>(), want.item<double>())
      << "weights above 1 cost more";
  for (const auto& [weights, said] : std::vector<std::pair<std::vector<double>, std::string>>{
           {{1.0}, "positive_weights has 1 values for 2 labels"},
           {{1.0, 0.0}, "positive_weights must be > 0"}}) {
    c.positive_weights = weights;
    EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(c, r, 4, 3, 1); }, {said})) << said;
  }
  TaskConfig multiclass;
  multiclass.name = "cls";
  multiclass.positive_weights = {2.0, 2.0, 2.0};
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { Task(multiclass, r, 4, 3, 1); },
      {"positive_weights applies to multilabel tasks only", "class_weights weighs its classes"}));
}

TEST(Task, BalancedWeightsComeFromTheTrainingRowsTargets) {
  HeadRegistry r = builtin();
  // Multiclass: rows / (classes x the class's rows), scikit-learn's "balanced".
  TaskConfig c;
  c.name = "cls";
  c.class_names = {"a", "b", "c"};
  c.balanced_class_weights = true;
  Task classes(c, r, 4, 3, 1);
  EXPECT_FALSE(classes.class_weights().defined()) << "no weights before the rows are seen";
  const auto w = classes.balance_weights(at::tensor(std::vector<std::int64_t>{0, 0, 0, 0, 1, 1, 2, 0}));
  ASSERT_EQ(w.size(), 3U);
  EXPECT_NEAR(w[0], 8.0 / (3 * 5), 1e-12);
  EXPECT_NEAR(w[1], 8.0 / (3 * 2), 1e-12);
  EXPECT_NEAR(w[2], 8.0 / (3 * 1), 1e-12);
  ASSERT_TRUE(classes.class_weights().defined());
  EXPECT_NEAR(classes.class_weights()[2].item<double>(), 8.0 / 3, 1e-6) << "and the loss uses them";
  // A class without a training row would weigh infinitely: refused, named.
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        classes.balance_weights(at::tensor(std::vector<std::int64_t>{0, 0, 2}));
      },
      {"class_weights = balanced", "class 1 ('b') has no training row (of 3)",
       "give the weights as numbers"}));
  c.class_weights = {1, 2, 3};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(c, r, 4, 3, 1); }, {"balanced or a list"}));
  // Multilabel: per label, negative rows / positive rows; 1 where no row, or every row, has it.
  TaskConfig m = two_labels("common", "rare");
  m.class_names = {"common", "rare", "none", "all"};
  m.label_map = {1 | 8, 3 | 8, 8};  // source 0: common; 1: common + rare; 2: neither (all: each)
  m.balanced_positive_weights = true;
  Task labels(m, r, 4, 3, 1);
  const at::Tensor y = labels.targets(at::tensor(std::vector<std::int64_t>{0, 1, 2, 0, 0, 2}));
  EXPECT_EQ(labels.balance_weights(y), (std::vector<double>{2.0 / 4, 5.0 / 1, 1.0, 1.0}));
  const at::Tensor x = at::randn({6, 4});
  const at::Tensor s = x.sigmoid(), pw = at::tensor(std::vector<float>{0.5, 5, 1, 1});
  EXPECT_NEAR(labels.loss(x, y).item<double>(),
              (-(pw * y * s.log() + (1 - y) * (1 - s).log()).mean()).item<double>(), 1e-6)
      << "the loss weighs each label's positive rows by them";
  // Each key on its own kind only; a task that balances nothing returns no weights.
  c.class_weights = {};
  c.balanced_class_weights = false;
  c.balanced_positive_weights = true;
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(c, r, 4, 3, 1); },
                                                {"positive_weights applies to multilabel tasks only"}));
  m.balanced_positive_weights = false;
  m.balanced_class_weights = true;
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(m, r, 4, 3, 1); },
                                                {"class_weights and label_smoothing apply to multiclass"}));
  c.balanced_positive_weights = false;
  EXPECT_TRUE(Task(c, r, 4, 3, 1).balance_weights(at::zeros({2}, at::kLong)).empty());
}

TEST(Metrics, NllAndExpectedCalibrationErrorByHand) {
  // Two rows of three classes: logits ln(probabilities), so the softmax gives them back.
  const at::Tensor logits = at::tensor(std::vector<double>{0.7, 0.2, 0.1, 0.1, 0.3, 0.6}).view({2, 3}).log();
  const at::Tensor targets = at::tensor(std::vector<std::int64_t>{0, 0});
  EXPECT_NEAR(multiclass_nll(logits, targets), -(std::log(0.7) + std::log(0.1)) / 2, 1e-12);
  // Confidences 0.7 (right, bin (0.667, 0.733]) and 0.6 (wrong, bin (0.533, 0.6]): each bin
  // holds one row, |1 - 0.7| / 2 + |0 - 0.6| / 2.
  EXPECT_NEAR(expected_calibration_error(logits, targets), (0.3 + 0.6) / 2, 1e-12);
  // Both rows in one bin (2 bins: (0, 0.5], (0.5, 1]): |1 - (0.7 + 0.6)| / 2.
  EXPECT_NEAR(expected_calibration_error(logits, targets, 1.0, 2), 0.3 / 2, 1e-12);
  // At temperature 2 the probabilities are softmax(logits / 2) = sqrt(p) renormalised.
  const at::Tensor p2 = (logits / 2).softmax(1);
  EXPECT_NEAR(multiclass_nll(logits, targets, 2.0), -(p2[0][0].log() + p2[1][0].log()).item<double>() / 2,
              1e-12);
  EXPECT_EQ(multiclass_nll(at::zeros({0, 3}), at::zeros({0}, at::kLong)), 0.0);
  // Targets that are a strided view (every other entry of a longer tensor) are read as well.
  const at::Tensor strided = at::tensor(std::vector<std::int64_t>{0, 9, 0, 9}).slice(0, 0, 4, 2);
  EXPECT_EQ(multiclass_nll(logits, strided), multiclass_nll(logits, targets));
  EXPECT_EQ(expected_calibration_error(logits, strided), expected_calibration_error(logits, targets));
  EXPECT_EQ(fit_temperature(logits, strided), fit_temperature(logits, targets));
}

TEST(Metrics, FitTemperatureFindsTheLeastNll) {
  // Rows whose classes are drawn from softmax(z / 2.5): the NLL-best temperature is near 2.5,
  // and the NLL is higher a little either side of the one found.
  at::manual_seed(3);
  const at::Tensor z = at::randn({20000, 5}, at::kDouble) * 3;
  const at::Tensor y = at::multinomial((z / 2.5).softmax(1), 1).squeeze(1);
  const double t = fit_temperature(z, y);
  EXPECT_NEAR(t, 2.5, 0.1);
  const double at_t = multiclass_nll(z, y, t);
  EXPECT_LT(at_t, multiclass_nll(z, y, t * 1.001));
  EXPECT_LT(at_t, multiclass_nll(z, y, t / 1.001));
  EXPECT_LT(at_t, multiclass_nll(z, y, 1.0));
  // Every row right by a margin: sharper is always better, up to the search's bound.
  const at::Tensor sure = at::tensor(std::vector<double>{2, 0, 0, 3}).view({2, 2});
  EXPECT_NEAR(fit_temperature(sure, at::tensor(std::vector<std::int64_t>{0, 1})), 0.01, 1e-9);
  // Every row wrong: flatter is always better, up to the other bound.
  EXPECT_NEAR(fit_temperature(sure, at::tensor(std::vector<std::int64_t>{1, 0})), 100.0, 1e-6);
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        fit_temperature(at::zeros({0, 2}), at::zeros({0}, at::kLong));
      },
      {"N > 0"}));
}

TEST(Task, CalibrateFitsTheTemperatureTheMetricsThenUse) {
  HeadRegistry r = builtin();
  TaskConfig c;
  c.name = "cls";
  c.calibrate = "temperature";
  Task t(c, r, 4, 3, 1);
  EXPECT_EQ(t.temperature(), 1.0);
  at::manual_seed(5);
  const at::Tensor x = at::randn({64, 4}) * 4, y = at::randint(0, 3, {64}, at::kLong);
  const at::Tensor logits = t.outputs(x);
  const EvalMetrics before = t.evaluate(x, y);
  t.calibrate(x, y);
  ASSERT_TRUE(t.temperature_fit().has_value());
  EXPECT_NEAR(t.temperature(), fit_temperature(logits, y), 1e-12);
  EXPECT_NEAR(t.temperature_fit()->nll_before, *before.nll, 1e-12);
  const EvalMetrics after = t.evaluate(x, y);
  EXPECT_EQ(after.count, 64);
  EXPECT_NEAR(*after.nll, multiclass_nll(logits, y, t.temperature()), 1e-12);
  EXPECT_LE(*after.nll, *before.nll);
  EXPECT_EQ(after.accuracy, before.accuracy) << "the classes given do not change";
  // Without calibrate, nothing is fitted; on other kinds it is refused.
  c.calibrate = "none";
  Task plain(c, r, 4, 3, 1);
  plain.calibrate(x, y);
  EXPECT_FALSE(plain.temperature_fit().has_value());
  TaskConfig m = two_labels("a", "b");
  m.calibrate = "temperature";
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { Task(m, r, 4, 3, 1); }, {"calibrate = temperature applies to multiclass tasks only"}));
  // monitor: the metrics a kind has.
  c.calibrate = "none";
  for (const auto& [kind, monitor, said] : std::vector<std::tuple<TaskKind, Monitor, std::string>>{
           {TaskKind::kMulticlass, Monitor::kMeanAp, "monitor = mean_ap does not apply to a multiclass task"},
           {TaskKind::kMultilabel, Monitor::kNll, "monitor = nll does not apply to a multilabel task"},
           {TaskKind::kRegression, Monitor::kMacroF1, "a regression is chosen by R^2: auto"}}) {
    TaskConfig k = kind == TaskKind::kMultilabel ? two_labels("a", "b") : c;
    k.kind = kind;
    if (kind == TaskKind::kRegression) k.labels = "ink";
    k.monitor = monitor;
    EXPECT_TRUE(testing::throws_with<ConfigError>(
        [&] { Task(k, r, 4, kind == TaskKind::kRegression ? 0 : 3, 1); }, {said}))
        << said;
  }
  c.monitor = Monitor::kNll;
  Task chosen(c, r, 4, 3, 1);
  EXPECT_EQ(chosen.evaluate(x, y).monitor, Monitor::kNll) << "its metrics say what scores them";
  EXPECT_EQ(chosen.evaluate(x, y).score(), -*chosen.evaluate(x, y).nll);
  c.monitor = Monitor::kAuto;
  c.calibrate = "platt";
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(c, r, 4, 3, 1); },
                                                {"calibrate must be none or temperature, got 'platt'"}));
}

TEST(Task, ThresholdIsForMultilabelTasksAndTunedOnTheRowsGiven) {
  HeadRegistry r = builtin();
  TaskConfig c = two_labels("upper", "lower");
  c.threshold = "0.8";
  Task fixed(c, r, 4, 3, 1);
  ASSERT_EQ(fixed.cutoffs().size(), 2U);
  EXPECT_NEAR(logit_threshold(fixed.cutoffs()[1]), 0.8, 1e-12);
  const at::Tensor x = at::randn({64, 4});
  const at::Tensor y = fixed.targets(at::randint(0, 3, {64}));
  EXPECT_TRUE(at::equal(fixed.predict(x), fixed.outputs(x).gt(threshold_logit(0.8)).to(at::kLong)));
  fixed.tune_thresholds(x, y);  // threshold = 0.8 is kept
  EXPECT_NEAR(logit_threshold(fixed.cutoffs()[0]), 0.8, 1e-12);
  c.threshold = "tune";
  Task tuned(c, r, 4, 3, 1);
  tuned.tune_thresholds(x, y);
  EXPECT_EQ(tuned.cutoffs(), f1_best_cutoffs(tuned.outputs(x), y));
  EXPECT_NEAR(tuned.evaluate(x, y).macro_f1,
              multilabel_metrics(tuned.outputs(x), y, tuned.cutoffs()).macro_f1, 1e-12);
  for (const char* bad : {"1", "0", "-0.2", "0.5x", "half", ""}) {
    c.threshold = bad;
    EXPECT_TRUE(testing::throws_with<ConfigError>(
        [&] { Task(c, r, 4, 3, 1); }, {"threshold must be a probability", "'" + std::string(bad) + "'"}))
        << bad;
  }
  TaskConfig multiclass;
  multiclass.name = "cls";
  multiclass.threshold = "0.7";
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(multiclass, r, 4, 3, 1); },
                                                {"threshold = 0.7 applies to multilabel tasks only"}));
}

TEST(Task, MultilabelTargetsFromBitmasks) {
  HeadRegistry r = builtin();
  TaskConfig c;
  c.name = "attrs";
  c.kind = TaskKind::kMultilabel;
  c.class_names = {"upper", "lower", "sleeves"};
  c.label_map = {1, 2, 5, 3};
  Task t(c, r, 4, 4, 1);
  EXPECT_EQ(t.num_classes(), 3);
  const at::Tensor y = t.targets(at::tensor(std::vector<std::int64_t>{2, 3}));
  EXPECT_TRUE(at::equal(y, at::tensor(std::vector<float>{1, 0, 1, 1, 1, 0}).view({2, 3})));
  EXPECT_EQ(t.predict(at::randn({5, 4})).sizes(), (std::vector<std::int64_t>{5, 3}));
  c.label_map = {1, 2, 8, 3};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(c, r, 4, 4, 1); }, {"bitmask 8", "3 labels"}));
  // Without label_map the source's values are the bitmasks (all_labels of 3 label files: 8
  // classes): the same targets as the identity map.
  c.label_map = {};
  Task bits(c, r, 4, 8, 1);
  const at::Tensor masks = at::tensor(std::vector<std::int64_t>{0, 5, 7, 2});
  c.label_map = {0, 1, 2, 3, 4, 5, 6, 7};
  EXPECT_TRUE(at::equal(bits.targets(masks), Task(c, r, 4, 8, 1).targets(masks)));
  EXPECT_TRUE(at::equal(bits.targets(masks)[1], at::tensor(std::vector<float>{1, 0, 1})));
  c.label_map = {};
  EXPECT_TRUE(testing::throws_with<DataError>([&] { bits.targets(at::tensor(std::vector<std::int64_t>{9})); },
                                              {"task 'attrs'", "label 9", "bits beyond its 3 labels"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(c, r, 4, 4, 1); },
                                                {"8 classes", "has 4: bitmasks of 2 labels", "one per bit"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(c, r, 4, 10, 1); }, {"has 10", "give label_map"}));
  // No class_names: training names the labels by the source's bits; a config alone is no error,
  // a task made without them is.
  c.class_names = {};
  c.labels = "tags";
  EXPECT_NO_THROW(validate_task_config(c, 0));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { Task(c, r, 4, 8, 1); }, {"class_names (1 to 4096), got 0", "'tags' names none of its bits"}));
  c.label_map = {1, 2, 5, 3};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { validate_task_config(c, 0); },
                                                {"got 0: name the labels label_map's bitmasks set"}));
}

// Past 62 labels a source is multi-hot ([rows, K] of 0 and 1, label_lists.h): a multilabel task
// without label_map takes its rows as targets; anything else is refused, naming the source.
TEST(Task, MultiHotSourcesAreAMultilabelTasksTargets) {
  HeadRegistry r = builtin();
  TaskConfig c;
  c.name = "words";
  c.kind = TaskKind::kMultilabel;
  c.labels = "words";
  for (int j = 0; j < 70; ++j) c.class_names.push_back("w" + std::to_string(j));
  Task t(c, r, 4, 0, 1);  // a multi-hot source's classes are unknown: 0
  EXPECT_EQ(t.num_classes(), 70);
  at::Tensor rows = at::zeros({3, 70}, at::kLong);
  rows[0][69] = 1;
  rows[2][0] = 1;
  rows[2][64] = 1;
  const at::Tensor y = t.targets(rows);
  EXPECT_EQ(y.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(y, rows.to(at::kFloat)));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        t.targets(at::zeros({3, 71}, at::kLong));
      },
      {"'words' holds 71 labels per row, the task has 70"}));
  rows[1][3] = 2;
  EXPECT_TRUE(testing::throws_with<DataError>([&] { t.targets(rows); }, {"values other than 0 and 1"}));
  // 70 labels are no bitmask: a source of classes is refused, and so is label_map.
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { Task(c, r, 4, 8, 1); }, {"70 labels (class_names) are more than a bitmask holds (62)"}));
  c.label_map = {0, 1};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { validate_task_config(c, 0); },
                                                {"class_names (1 to 62 with label_map", "got 70"}));
  c.label_map = {};
  c.kind = TaskKind::kMulticlass;
  c.class_names = {};
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        source_targets(c, 2, at::zeros({3, 70}, at::kLong));
      },
      {"'words' holds lists of 70 labels, multi-hot", "only a multilabel task without label_map",
       "kind = multiclass"}));
}

TEST(Task, LabelMapAndValidation) {
  HeadRegistry r = builtin();
  TaskConfig c;
  c.name = "group";
  c.label_map = {0, 1, 0, 2};
  Task t(c, r, 8, 4, 1);
  EXPECT_EQ(t.num_classes(), 3);
  const at::Tensor y = t.targets(at::tensor(std::vector<std::int64_t>{3, 2, 1}));
  EXPECT_EQ(y[0].item<std::int64_t>(), 2);
  EXPECT_EQ(y[1].item<std::int64_t>(), 0);
  c.label_map = {0, 1, 0};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(c, r, 8, 4, 1); },
                                                {"task 'group'", "3 entries", "4 classes"}));
  c.label_map = {};
  c.lr = -1;
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(c, r, 8, 4, 1); }, {"learning rate", "-1"}));
}

TEST(Task, TrainingLowersLossAndNaNFails) {
  HeadRegistry r = builtin();
  torch::manual_seed(3);
  const at::Tensor x = at::randn({256, 8});
  const at::Tensor y = (x.select(1, 0) > 0).to(at::kLong);  // linearly separable
  TaskConfig c;
  c.name = "sep";
  c.lr = 0.05;
  Task t(c, r, 8, 2, 1);
  const double first = t.train_step(x, y);
  double last = first;
  for (int i = 0; i < 50; ++i) last = t.train_step(x, y);
  EXPECT_LT(last, 0.5 * first);
  EXPECT_GT(classification_metrics(t.predict(x), y, 2).accuracy, 0.95);
  at::Tensor bad = x.clone();
  bad[0][0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(testing::throws_with<Error>([&] { t.train_step(bad, y); }, {"loss is nan"}));
}

// A linear head that remembers the most rows it was run on at once outside training.
class RowCountingHead : public heads::Head {
 public:
  RowCountingHead(std::int64_t in, std::int64_t out, std::int64_t* most)
      : linear_(register_module("linear", torch::nn::Linear(in, out))), most_(most) {}
  torch::Tensor forward(const torch::Tensor& x) override {
    if (!is_training()) *most_ = std::max(*most_, x.size(0));
    return linear_->forward(x);
  }
  std::string describe() const override { return "counting"; }

 private:
  torch::nn::Linear linear_;
  std::int64_t* most_;
};

TEST(Task, ASplitIsEvaluatedInBlocksWithTheSameResults) {
  std::int64_t most = 0;
  HeadRegistry r;
  r.add(
      "counting",
      [&](const HeadSpec& s) {
        return std::make_shared<RowCountingHead>(s.in_features, s.out_features, &most);
      },
      "a linear head counting rows");
  torch::manual_seed(5);
  const std::int64_t rows = 10001;  // two whole blocks and one row
  const at::Tensor x = at::randn({rows, 16});
  for (const TaskKind kind : {TaskKind::kMulticlass, TaskKind::kMultilabel, TaskKind::kRegression}) {
    TaskConfig c;
    c.name = "blocks";
    c.head = "counting";
    c.kind = kind;
    if (kind == TaskKind::kMultilabel) {
      c.class_names = {"a", "b"};
      c.label_map = {1, 2, 3, 0};
    }
    Task t(c, r, 16, kind == TaskKind::kRegression ? 0 : 4, 1);
    const at::Tensor targets = kind == TaskKind::kRegression ? t.targets(at::randn({rows}, at::kDouble))
                                                             : t.targets(at::randint(4, {rows}, at::kLong));
    at::Tensor whole;
    {
      torch::NoGradGuard no_grad;
      t.head().eval();
      whole = t.head().forward(x);  // every row at once, for reference
    }
    most = 0;
    const at::Tensor out = t.outputs(x);
    const EvalMetrics m = t.evaluate(x, targets);
    EXPECT_EQ(most, 4096) << "the head ran on more rows at once than a block";
    ASSERT_EQ(out.sizes(), whole.sizes());
    EXPECT_TRUE(at::allclose(out, whole, 1e-5, 1e-6));
    EXPECT_EQ(m.count, rows);
    if (kind == TaskKind::kMulticlass) {
      EXPECT_NEAR(m.accuracy, classification_metrics(whole.argmax(1), targets, 4).accuracy, 1e-12);
    } else if (kind == TaskKind::kMultilabel) {
      EXPECT_NEAR(*m.mean_ap, *multilabel_metrics(whole, targets).mean_ap, 1e-9);
    } else {
      EXPECT_NEAR(m.regression->rmse,
                  regression_metrics(whole.squeeze(1), targets.squeeze(1)).regression->rmse, 1e-6);
    }
  }
}

TEST(Task, ScheduleSmoothingAndWeights) {
  HeadRegistry r = builtin();
  TaskConfig c;
  c.name = "s";
  c.lr = 0.1;
  c.schedule = LrSchedule::kCosine;
  Task cosine(c, r, 4, 3, 1);
  cosine.start_epoch(0, 10);
  EXPECT_DOUBLE_EQ(cosine.current_lr(), 0.1);
  cosine.start_epoch(5, 10);
  EXPECT_NEAR(cosine.current_lr(), 0.05, 1e-12);
  c.schedule = LrSchedule::kStep;
  c.step_size = 2;
  c.gamma = 0.5;
  Task step(c, r, 4, 3, 1);
  step.start_epoch(5, 10);
  EXPECT_NEAR(step.current_lr(), 0.1 * 0.25, 1e-12);  // epoch 5: two halvings (epochs 2 and 4)
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { parse_schedule("warmup", "task.s.schedule"); },
                                                {"task.s.schedule", "constant, cosine, step", "'warmup'"}));
  EXPECT_EQ(parse_schedule("cosine", "x"), LrSchedule::kCosine);
  c.schedule = LrSchedule::kConstant;
  c.class_weights = {1, 2};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(c, r, 4, 3, 1); },
                                                {"class_weights has 2 values for 3 classes"}));
  // The smoothed loss is (1 - e) * NLL + e * mean over classes of -log p.
  c.class_weights = {};
  c.label_smoothing = 0.3;
  const at::Tensor x = at::randn({8, 4}), y = at::zeros({8}, at::kLong);
  Task smooth(c, r, 4, 3, 1);
  const at::Tensor logp = smooth.head().forward(x).detach().log_softmax(1);
  const double expected = (logp.select(1, 0) * -0.7 - logp.mean(1) * 0.3).mean().item<double>();
  EXPECT_NEAR(smooth.train_step(x, y), expected, 1e-5);
  // Class weights: cross-entropy weighted by the target's class.
  c.label_smoothing = 0;
  c.class_weights = {2, 1, 1};
  Task weighted(c, r, 4, 3, 1);
  const at::Tensor y2 = at::tensor(std::vector<std::int64_t>{0, 0, 1, 2, 1, 0, 2, 2});
  const at::Tensor lp = weighted.head().forward(x).detach().log_softmax(1);
  const at::Tensor w = at::tensor(std::vector<float>{2, 1, 1}).index_select(0, y2);
  const double expected_w =
      (lp.gather(1, y2.unsqueeze(1)).squeeze(1) * w).sum().item<double>() * -1.0 / w.sum().item<double>();
  EXPECT_NEAR(weighted.train_step(x, y2), expected_w, 1e-5);
}

// Task::loss computes cross-entropy its own way (log-softmax over the transposed logits):
// the loss and its gradient agree with LibTorch's cross_entropy, with and without class
// weights, for a few and for many classes.
TEST(Task, CrossEntropyAgreesWithLibTorchs) {
  HeadRegistry r = builtin();
  for (const std::int64_t classes : {2, 10, 37}) {
    for (const bool weights : {false, true}) {
      TaskConfig c;
      c.name = "ce";
      if (weights) {
        for (std::int64_t k = 0; k < classes; ++k)
          c.class_weights.push_back(0.5 + 0.1 * static_cast<double>(k));
      }
      const Task task(c, r, 4, classes, 1);
      const at::Tensor logits = (at::randn({64, classes}) * 4).requires_grad_(true);
      const at::Tensor y = at::randint(classes, {64});
      const at::Tensor ours = task.loss(logits, y);
      const at::Tensor g_ours = torch::autograd::grad({ours}, {logits})[0];
      auto options = torch::nn::functional::CrossEntropyFuncOptions();
      if (weights) options.weight(at::tensor(c.class_weights, at::kFloat));
      const at::Tensor theirs = torch::nn::functional::cross_entropy(logits, y, options);
      const at::Tensor g_theirs = torch::autograd::grad({theirs}, {logits})[0];
      // Relative: the two reduce in another order, and a float32 loss near 10 has a rounding
      // step of 1e-6 (an unoptimised ASan build differed by 2 steps, 1.9e-6, at 37 classes).
      const double want = theirs.item<double>();
      EXPECT_NEAR(ours.item<double>(), want, 1e-6 * std::max(1.0, std::abs(want)))
          << classes << " " << weights;
      EXPECT_LT((g_ours - g_theirs).abs().max().item<double>(), 1e-7) << classes << " " << weights;
    }
  }
}

TEST(Metrics, Regression) {
  const at::Tensor pred = at::tensor(std::vector<double>{1, 2, 3});
  const at::Tensor truth = at::tensor(std::vector<double>{1, 2, 5});
  const auto m = regression_metrics(pred, truth);
  ASSERT_TRUE(m.regression.has_value());
  EXPECT_FALSE(m.mean_ap.has_value());
  EXPECT_NEAR(m.regression->mae, 2.0 / 3.0, 1e-12);
  EXPECT_NEAR(m.regression->rmse, std::sqrt(4.0 / 3.0), 1e-12);
  EXPECT_NEAR(m.regression->r2, 1.0 - 4.0 / (78.0 / 9.0), 1e-12);  // SST around the mean 8/3
  EXPECT_DOUBLE_EQ(m.score(), m.regression->r2);
}

TEST(Task, RegressionLearnsARealTargetWithMseOrL1) {
  HeadRegistry r = builtin();
  torch::manual_seed(5);
  const at::Tensor x = at::randn({256, 8});
  const at::Tensor y =
      (x.select(1, 0) * 2 - x.select(1, 3) + 0.5).to(at::kDouble);  // float64, as the cache stores
  for (const RegressionLoss loss : {RegressionLoss::kMse, RegressionLoss::kL1}) {
    TaskConfig c;
    c.name = "value";
    c.kind = TaskKind::kRegression;
    c.loss = loss;
    c.lr = 0.05;
    Task t(c, r, 8, 0, 1);
    EXPECT_EQ(t.num_classes(), 1);
    t.set_target_scale(y.mean().item<double>(), y.std().item<double>());
    const at::Tensor target = t.targets(y);  // standardised for training
    EXPECT_NEAR(target.mean().item<double>(), 0.0, 1e-5);
    EXPECT_NEAR(target.std().item<double>(), 1.0, 1e-5);
    EXPECT_EQ(target.sizes(), (std::vector<std::int64_t>{256, 1}));
    const double first = t.train_step(x, target);
    for (int i = 0; i < 300; ++i) t.train_step(x, target);
    const auto m = t.evaluate(x, target);
    EXPECT_GT(m.regression->r2, 0.99) << to_string(loss);
    // Predictions come back in the target's own units.
    EXPECT_LT((t.predict(x) - y).abs().mean().item<double>(), 0.1) << to_string(loss);
    EXPECT_LT(m.regression->mae, 0.1) << to_string(loss);
    EXPECT_LT(t.train_step(x, target), 0.1 * first) << to_string(loss);
  }
  TaskConfig c;
  c.name = "value";
  c.kind = TaskKind::kRegression;
  Task t(c, r, 8, 0, 1);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { t.targets(at::zeros({4}, at::kLong)); },
                                              {"real-valued label source", "class labels"}));
  c.class_names = {"a"};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(c, r, 8, 0, 1); }, {"not regression"}));
  c.class_names = {};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { parse_regression_loss("huber", "task.value.loss"); },
                                                {"task.value.loss", "mse, l1", "'huber'"}));
  TaskConfig k;
  k.name = "cls";
  k.loss = RegressionLoss::kL1;
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Task(k, r, 8, 3, 1); }, {"regression tasks only"}));
  k.loss.reset();
  Task cls(k, r, 8, 3, 1);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { cls.targets(at::zeros({4}, at::kDouble)); },
                                              {"kind = regression"}));
}

// Two identical sets of tasks (same seeds): one trained fused, one head by head.
struct FusionFixture {
  std::vector<std::unique_ptr<Task>> fused, alone;
  // linear_only: every member linear, which fused_forward computes transposed.
  explicit FusionFixture(bool linear_only = false) {
    HeadRegistry r = builtin();
    std::vector<TaskConfig> configs;
    auto add = [&](const std::string& name, const std::string& head, OptimizerKind optimizer, double lr,
                   std::map<std::string, std::string> params) {
      TaskConfig c;
      c.name = name;
      c.head = head;
      c.optimizer = optimizer;
      c.lr = lr;
      c.head_params = std::move(params);
      configs.push_back(c);
    };
    add("lin_adam", "linear", OptimizerKind::kAdam, 0.01, {});
    add("lin_sgd", "linear", OptimizerKind::kSgd, 0.1, {});
    if (linear_only) {
      add("lin_adamw", "linear", OptimizerKind::kAdamW, 0.005, {});
      add("lin_weighted", "linear", OptimizerKind::kAdam, 0.003, {});
      configs[3].class_weights = {1.0, 2.0, 0.5, 1.0, 3.0};
    } else {
      add("mlp_dropout", "mlp", OptimizerKind::kAdamW, 0.005, {{"hidden", "32,16"}, {"dropout", "0.3"}});
      add("mlp_gelu", "mlp", OptimizerKind::kAdam, 0.003, {{"hidden", "24"}, {"activation", "gelu"}});
    }
    configs[1].label_smoothing = 0.1;
    for (std::uint64_t i = 0; i < configs.size(); ++i) {
      fused.push_back(std::make_unique<Task>(configs[i], r, 16, 5, 100 + i));
      alone.push_back(std::make_unique<Task>(configs[i], r, 16, 5, 100 + i));
    }
  }
  std::vector<Task*> fused_ptrs() {
    std::vector<Task*> out;
    for (auto& t : fused) out.push_back(t.get());
    return out;
  }
};

double max_param_difference(Task& a, Task& b) {
  double worst = 0;
  const auto pa = a.head().parameters(), pb = b.head().parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    worst = std::max(worst, (pa[i] - pb[i]).abs().max().item<double>());
  }
  return worst;
}

// Two copies of the same small problem, one stepped by the optimizer's own step(), one by
// FusedOptimizerStep; `steps` steps each, switching paths halfway through `switch_at` (the
// state is shared, so either path must continue from the other).
struct OptimizerRun {
  std::vector<at::Tensor> params;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
};
OptimizerRun make_run(OptimizerKind kind, double weight_decay) {
  torch::manual_seed(3);
  OptimizerRun r;
  r.params = {at::randn({10, 32}).requires_grad_(true), at::randn({10}).requires_grad_(true),
              at::randn({7}).requires_grad_(true)};  // the last never gets a gradient
  r.optimizer = make_optimizer(kind, {{r.params[0]}, {r.params[1], r.params[2]}}, 0.01, weight_decay, 0.9);
  // A second group at another rate, as the shared top's blocks have.
  r.optimizer->param_groups()[1].options().set_lr(0.003);
  return r;
}
void backward_once(const OptimizerRun& r, const at::Tensor& x, const at::Tensor& y) {
  r.optimizer->zero_grad();
  at::nll_loss(at::log_softmax(at::addmm(r.params[1], x, r.params[0].t()), 1), y).backward();
}

TEST(FusedOptimizer, StepsAsTheOptimizerDoesForAdamAndAdamW) {
  torch::manual_seed(11);
  const at::Tensor x = at::randn({64, 32});
  const at::Tensor y = at::randint(0, 10, {64}, at::kLong);
  for (const auto kind : {OptimizerKind::kAdam, OptimizerKind::kAdamW}) {
    for (const double wd : {0.0, 0.05}) {
      OptimizerRun plain = make_run(kind, wd), fused = make_run(kind, wd);
      FusedOptimizerStep fused_step;
      for (int step = 0; step < 40; ++step) {
        backward_once(plain, x, y);
        plain.optimizer->step();
        backward_once(fused, x, y);
        // Steps 20-24 by the optimizer's own step(): the two paths share the state.
        if (step >= 20 && step < 25) {
          fused.optimizer->step();
        } else {
          fused_step(*fused.optimizer);
        }
      }
      const std::string what =
          std::string(kind == OptimizerKind::kAdam ? "adam" : "adamw") + " wd " + std::to_string(wd);
      const OptimizerRun start = make_run(kind, wd);
      for (std::size_t i = 0; i < 2; ++i) {
        // The parameters moved by ~0.3 over 40 steps; the two kernels differ in rounding only.
        EXPECT_GT((plain.params[i] - start.params[i]).abs().max().item<double>(), 0.05) << what;
        EXPECT_LT((plain.params[i] - fused.params[i]).abs().max().item<double>(), 1e-5)
            << what << " param " << i;
      }
      EXPECT_TRUE(at::equal(fused.params[2], start.params[2]))
          << what << ": a parameter without a gradient moved";
      // The same state, in the optimizer's own form: step counts and moments.
      for (std::size_t i = 0; i < 2; ++i) {
        const auto& a = *plain.optimizer->state().at(plain.params[i].unsafeGetTensorImpl());
        const auto& b = *fused.optimizer->state().at(fused.params[i].unsafeGetTensorImpl());
        if (kind == OptimizerKind::kAdam) {
          const auto& sa = static_cast<const torch::optim::AdamParamState&>(a);
          const auto& sb = static_cast<const torch::optim::AdamParamState&>(b);
          EXPECT_EQ(sa.step(), 40);
          EXPECT_EQ(sb.step(), 40);
          EXPECT_LT((sa.exp_avg_sq() - sb.exp_avg_sq()).abs().max().item<double>(), 1e-6) << what;
        } else {
          const auto& sa = static_cast<const torch::optim::AdamWParamState&>(a);
          const auto& sb = static_cast<const torch::optim::AdamWParamState&>(b);
          EXPECT_EQ(sa.step(), 40);
          EXPECT_EQ(sb.step(), 40);
          EXPECT_LT((sa.exp_avg() - sb.exp_avg()).abs().max().item<double>(), 1e-6) << what;
        }
      }
      EXPECT_EQ(fused.optimizer->state().count(fused.params[2].unsafeGetTensorImpl()), 0u) << what;
    }
  }
}

TEST(FusedOptimizer, FallsBackToTheOptimizersOwnStep) {
  torch::manual_seed(11);
  const at::Tensor x = at::randn({64, 32});
  const at::Tensor y = at::randint(0, 10, {64}, at::kLong);
  // SGD with momentum, and Adam with amsgrad: the fused path does not cover them, so each
  // pair of runs must stay bit for bit equal.
  OptimizerRun plain = make_run(OptimizerKind::kSgd, 0.01), fused = make_run(OptimizerKind::kSgd, 0.01);
  OptimizerRun plain_ams = make_run(OptimizerKind::kAdam, 0.0),
               fused_ams = make_run(OptimizerKind::kAdam, 0.0);
  for (auto* r : {&plain_ams, &fused_ams}) {
    for (auto& g : r->optimizer->param_groups())
      static_cast<torch::optim::AdamOptions&>(g.options()).amsgrad(true);
  }
  // And Adam with a gradient that is not contiguous (the same values, transposed strides):
  // the fused kernels read flat arrays.
  OptimizerRun plain_strided = make_run(OptimizerKind::kAdam, 0.0),
               fused_strided = make_run(OptimizerKind::kAdam, 0.0);
  FusedOptimizerStep fused_step, fused_ams_step, fused_strided_step;
  for (int step = 0; step < 10; ++step) {
    for (auto* r : {&plain, &fused, &plain_ams, &fused_ams, &plain_strided, &fused_strided})
      backward_once(*r, x, y);
    for (auto* r : {&plain_strided, &fused_strided}) {
      const at::Tensor g = r->params[0].grad();
      // Not a view (zero_grad detaches gradients in place): a tensor of its own, column-major.
      at::Tensor strided = at::empty_strided(g.sizes(), {1, g.size(0)}, g.options());
      strided.copy_(g);
      r->params[0].mutable_grad() = strided;
      ASSERT_FALSE(r->params[0].grad().is_contiguous());
    }
    plain.optimizer->step();
    plain_ams.optimizer->step();
    plain_strided.optimizer->step();
    fused_step(*fused.optimizer);
    fused_ams_step(*fused_ams.optimizer);
    fused_strided_step(*fused_strided.optimizer);
  }
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(at::equal(plain.params[i], fused.params[i])) << "sgd param " << i;
    EXPECT_TRUE(at::equal(plain_ams.params[i], fused_ams.params[i])) << "amsgrad param " << i;
    EXPECT_TRUE(at::equal(plain_strided.params[i], fused_strided.params[i]))
        << "strided gradient, param " << i;
  }
}

// The step linear_softmax_step replaces: the head's forward, Task::loss, the backward pass of
// loss_weight x loss through autograd, the optimizer's step.
double autograd_step(Task& t, const at::Tensor& x, const at::Tensor& y) {
  t.begin_step();
  const at::Tensor l = t.loss(t.head().forward(x), y);
  (l * t.loss_weight()).backward();
  t.finish_step();
  return l.item<double>();
}

TEST(LinearStep, CrossEntropyAndItsGradientAgreeWithLibTorchs) {
  torch::manual_seed(21);
  for (const std::int64_t classes : {2, 10, 37}) {
    for (const bool weights : {false, true}) {
      for (const double smoothing : {0.0, 0.2}) {
        SCOPED_TRACE(detail::str_cat(classes, " classes, weights ", weights, ", smoothing ", smoothing));
        std::vector<double> w;
        for (std::int64_t k = 0; weights && k < classes; ++k) w.push_back(0.5 + 0.1 * static_cast<double>(k));
        const at::Tensor class_weights = weights ? at::tensor(w, at::kFloat) : at::Tensor();
        const at::Tensor logits = (at::randn({64, classes}) * 4).requires_grad_(true);
        const at::Tensor y = at::randint(classes, {64});
        auto options = torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(smoothing);
        if (weights) options.weight(class_weights);
        const at::Tensor theirs = torch::nn::functional::cross_entropy(logits, y, options);
        const at::Tensor g_theirs = torch::autograd::grad({theirs * 0.7}, {logits})[0];
        const at::Tensor grad = at::empty({classes, 64});
        const double ours = softmax_cross_entropy_cb(logits.detach().t().contiguous(), y, class_weights,
                                                     smoothing, 0.7, grad);
        EXPECT_NEAR(ours, theirs.item<double>(), 2e-6 * std::abs(ours));
        EXPECT_LT((grad.t() - g_theirs).abs().max().item<double>(), 1e-7);
      }
    }
  }
  const at::Tensor grad = at::empty({5, 3});
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        softmax_cross_entropy_cb(at::randn({5, 3}), at::tensor(std::vector<std::int64_t>{0, 5, 1}), {}, 0, 1,
                                 grad);
      },
      {"class index 5", "out of range for 5 classes"}));
  at::Tensor nan_logits = at::randn({5, 3});
  nan_logits[2][1] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(softmax_cross_entropy_cb(nan_logits, at::zeros({3}, at::kLong), {}, 0, 1, grad)));
}

TEST(LinearStep, StepsAsAutogradDoes) {
  // A group of four: Adam, SGD with label smoothing, AdamW at half the loss weight, Adam with
  // class weights. Two heads without a bias. One head alone (Task::train_step) with class
  // weights and label smoothing.
  FusionFixture f(true);
  for (auto* set : {&f.fused, &f.alone}) {
    (*set)[2]->set_loss_weight(0.5);
  }
  HeadRegistry r = builtin();
  TaskConfig c;
  c.head_params = {{"bias", "false"}};
  c.lr = 0.01;
  std::vector<std::unique_ptr<Task>> nobias, nobias_ref;
  for (std::uint64_t i = 0; i < 2; ++i) {
    c.name = "nobias" + std::to_string(i);
    nobias.push_back(std::make_unique<Task>(c, r, 16, 5, 200 + i));
    nobias_ref.push_back(std::make_unique<Task>(c, r, 16, 5, 200 + i));
  }
  TaskConfig both = f.fused[3]->config();
  both.label_smoothing = 0.15;
  Task single(both, r, 16, 5, 300), single_ref(both, r, 16, 5, 300);
  torch::manual_seed(9);
  const at::Tensor x = at::randn({64, 16});
  const at::Tensor y = at::randint(0, 5, {64}, at::kLong);
  const std::vector<Task*> group = f.fused_ptrs(), pair = {nobias[0].get(), nobias[1].get()};
  ASSERT_TRUE(takes_linear_softmax_step(group, x));
  ASSERT_TRUE(takes_linear_softmax_step(pair, x));
  ASSERT_TRUE(takes_linear_softmax_step({&single}, x));
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    const auto losses = fused_train_step(group, x, std::vector<at::Tensor>(group.size(), y));
    for (std::size_t i = 0; i < group.size(); ++i) {
      EXPECT_NEAR(losses[i], autograd_step(*f.alone[i], x, y), 1e-5)
          << f.alone[i]->name() << " step " << step;
    }
    const auto pair_losses = fused_train_step(pair, x, {y, y});
    for (std::size_t i = 0; i < 2; ++i)
      EXPECT_NEAR(pair_losses[i], autograd_step(*nobias_ref[i], x, y), 1e-5);
    last = single.train_step(x, y);
    if (step == 0) first = last;
    EXPECT_NEAR(last, autograd_step(single_ref, x, y), 1e-5) << "step " << step;
  }
  EXPECT_LT(last, 0.9 * first) << "the steps train";
  for (std::size_t i = 0; i < group.size(); ++i) {
    EXPECT_LT(max_param_difference(*f.fused[i], *f.alone[i]), 1e-5) << f.alone[i]->name();
  }
  for (std::size_t i = 0; i < 2; ++i) EXPECT_LT(max_param_difference(*nobias[i], *nobias_ref[i]), 1e-5);
  EXPECT_LT(max_param_difference(single, single_ref), 1e-5);
  EXPECT_EQ(nobias[0]->head().parameters().size(), 1u);
}

// What the fusion calibration times: the gradients alone, autograd's to rounding, and no step.
TEST(LinearStep, GradientsWithoutAStep) {
  FusionFixture f(true);
  torch::manual_seed(4);
  const at::Tensor x = at::randn({32, 16});
  const at::Tensor y = at::randint(0, 5, {32}, at::kLong);
  std::vector<at::Tensor> before;
  for (auto& t : f.fused) {
    for (const auto& p : t->head().parameters()) before.push_back(p.detach().clone());
  }
  const auto losses = linear_softmax_gradients(f.fused_ptrs(), x, std::vector<at::Tensor>(f.fused.size(), y));
  std::size_t k = 0;
  for (std::size_t i = 0; i < f.fused.size(); ++i) {
    Task& ref = *f.alone[i];
    ref.begin_step();
    const at::Tensor l = ref.loss(ref.head().forward(x), y);
    (l * ref.loss_weight()).backward();
    EXPECT_NEAR(losses[i], l.item<double>(), 1e-6);
    const auto ours = f.fused[i]->head().parameters(), theirs = ref.head().parameters();
    for (std::size_t p = 0; p < ours.size(); ++p, ++k) {
      EXPECT_TRUE(testing::bitwise_equal(ours[p], before[k])) << "no step";
      ASSERT_TRUE(ours[p].grad().defined());
      EXPECT_LT((ours[p].grad() - theirs[p].grad()).abs().max().item<double>(), 1e-6) << ref.name();
    }
  }
  for (auto& t : f.fused) t->begin_step();  // as the calibration leaves them: no gradients
  for (auto& t : f.fused) EXPECT_FALSE(t->head().parameters().front().grad().defined());
}

TEST(LinearStep, OnlyLinearClassificationHeadsOverFeaturesThatNeedNoGradient) {
  FusionFixture linear(true), mixed(false);
  const at::Tensor x = at::randn({8, 16});
  EXPECT_TRUE(takes_linear_softmax_step(linear.fused_ptrs(), x));
  EXPECT_FALSE(takes_linear_softmax_step(mixed.fused_ptrs(), x)) << "MLP heads keep autograd";
  EXPECT_FALSE(takes_linear_softmax_step(linear.fused_ptrs(), x.detach().requires_grad_(true)))
      << "a shared top's output needs its gradient";
  EXPECT_FALSE(takes_linear_softmax_step(linear.fused_ptrs(), x.to(at::kDouble)));
  EXPECT_FALSE(takes_linear_softmax_step(linear.fused_ptrs(), at::randn({8, 12}))) << "another width";
  HeadRegistry r = builtin();
  TaskConfig c;
  c.name = "value";
  c.kind = TaskKind::kRegression;
  Task regression(c, r, 16, 0, 1);
  EXPECT_FALSE(takes_linear_softmax_step({&regression}, x));
  c.name = "attrs";
  c.kind = TaskKind::kMultilabel;
  c.class_names = {"a", "b"};
  c.label_map = {1, 2, 3};
  Task multilabel(c, r, 16, 3, 1);
  EXPECT_FALSE(takes_linear_softmax_step({&multilabel}, x));
  c = TaskConfig();
  c.name = "nobias";
  c.head_params = {{"bias", "false"}};
  Task nobias(c, r, 16, 5, 1);
  EXPECT_FALSE(takes_linear_softmax_step({linear.fused[0].get(), &nobias}, x)) << "bias and none mixed";
}

TEST(Fusion, KeysAndWidths) {
  heads::LinearHead lin(heads::LinearHeadOptions(16, 4));
  heads::MlpHead mlp(heads::MlpHeadOptions(16, 4).hidden({32}));
  heads::LinearHead nobias(heads::LinearHeadOptions(16, 4).bias(false));
  heads::LinearHead other_width(heads::LinearHeadOptions(12, 4));
  EXPECT_EQ(heads::fusion_key(lin), heads::fusion_key(mlp));
  EXPECT_NE(heads::fusion_key(lin), heads::fusion_key(nobias));
  EXPECT_NE(heads::fusion_key(lin), heads::fusion_key(other_width));
  EXPECT_EQ(heads::fused_width(lin), 4);
  EXPECT_EQ(heads::fused_width(mlp), 32);
  // A subclass may override forward: never fused.
  struct Shifted : heads::LinearHead {
    Shifted() : heads::LinearHead(heads::LinearHeadOptions(16, 4)) {}
    torch::Tensor forward(const torch::Tensor& x) override { return heads::LinearHead::forward(x) + 1; }
  } shifted;
  EXPECT_EQ(heads::fusion_key(shifted), "");
  std::vector<heads::Head*> mixed{&lin, &other_width};
  EXPECT_TRUE(testing::throws_with<Error>(
      [&] {
        heads::fused_forward(mixed, at::randn({2, 16}));
      },
      {"does not fuse"}));
}

TEST(Fusion, FusedTrainingMatchesHeadByHead) {
  for (const bool linear_only : {false, true}) {
    SCOPED_TRACE(linear_only ? "linear heads only" : "linear and MLP heads");
    FusionFixture f(linear_only);
    torch::manual_seed(7);
    const at::Tensor x = at::randn({64, 16});
    const at::Tensor y = at::randint(0, 5, {64}, at::kLong);
    std::vector<at::Tensor> ys(f.fused.size(), y);
    // Same outputs in eval mode (no dropout) before training.
    for (auto& t : f.fused) t->head().eval();
    for (auto& t : f.alone) t->head().eval();
    std::vector<heads::Head*> hs;
    for (auto& t : f.fused) hs.push_back(&t->head());
    const auto outs = heads::fused_forward(hs, x);
    // Linear heads alone in a group get views of the transposed product.
    EXPECT_EQ(outs[0].t().is_contiguous(), linear_only);
    for (std::size_t i = 0; i < hs.size(); ++i) {
      EXPECT_LT((outs[i] - f.alone[i]->head().forward(x)).abs().max().item<double>(), 1e-5) << i;
    }
    for (int step = 0; step < 30; ++step) {
      const auto losses = fused_train_step(f.fused_ptrs(), x, ys);
      for (std::size_t i = 0; i < f.alone.size(); ++i) {
        const double alone = f.alone[i]->train_step(x, y);
        EXPECT_NEAR(losses[i], alone, 1e-4) << f.alone[i]->name() << " step " << step;
      }
    }
    for (std::size_t i = 0; i < f.alone.size(); ++i) {
      // Tolerance: only the summation order inside the one fused multiply differs.
      EXPECT_LT(max_param_difference(*f.fused[i], *f.alone[i]), 1e-4) << f.alone[i]->name();
    }
  }
}

TEST(Fusion, ANonFiniteHeadLeavesItsGroupUntouched) {
  FusionFixture f;
  const at::Tensor x = at::randn({32, 16});
  const at::Tensor y = at::randint(0, 5, {32}, at::kLong);
  {
    torch::NoGradGuard no_grad;
    f.fused[2]->head().parameters().front().fill_(std::numeric_limits<float>::quiet_NaN());
  }
  const auto before = f.fused[2]->head().parameters().back().clone();
  for (int step = 0; step < 5; ++step) {
    const auto losses = fused_train_step(f.fused_ptrs(), x, std::vector<at::Tensor>(4, y));
    EXPECT_TRUE(std::isnan(losses[2]));
    for (std::size_t i : {0, 1, 3}) {
      EXPECT_NEAR(losses[i], f.alone[i]->train_step(x, y), 1e-4) << i;
    }
  }
  for (std::size_t i : {0, 1, 3}) EXPECT_LT(max_param_difference(*f.fused[i], *f.alone[i]), 1e-4) << i;
  EXPECT_TRUE(testing::bitwise_equal(f.fused[2]->head().parameters().back(), before))
      << "no step for the NaN head";
}

}  // namespace
}  // namespace canopy::tasks
