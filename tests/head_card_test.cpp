// Exported heads: the safetensors file holds the head's tensors under their module names
// and reloads bitwise; the card is JSON with the fields predict and users read.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>

#include "canopy/core/fs.h"
#include "canopy/runners/export.h"
#include "canopy/runners/head_card.h"
#include "canopy/tasks/registry.h"
#include "support/test_support.h"

namespace canopy::runners {
namespace {

TEST(HeadCard, WeightsAndCardReadBack) {
  testing::TempDir dir;
  tasks::HeadRegistry registry;
  tasks::register_builtin_heads(registry);
  tasks::TaskConfig c;
  c.name = "group \"x\"";  // quotes survive: the card is real JSON
  c.head = "mlp";
  c.head_params = {{"hidden", "8"}};
  c.label_map = {0, 1, 1};
  tasks::Task task(c, registry, 6, 3, 7);
  task.train_step(at::randn({32, 6}), task.targets(at::randint(3, {32})));
  datasets::CacheMeta meta;
  meta.trunk_sha256 = "ab12";
  meta.fingerprint = "f00d";
  meta.preprocessing = "resize=28";
  meta.pooling = "avg";
  meta.description = "tap=blocks.13\n";
  TaskResult r;
  r.name = c.name;  // the files are named by the result (a grid exports its winner under its name)
  r.class_names = {"zero", "one"};
  r.epochs = 3;
  r.eval = tasks::classification_metrics(at::randint(2, {20}), at::randint(2, {20}), 2);

  const std::string weights = export_head(task, r, meta, 6, dir.path());
  const auto tensors = load_safetensors(weights);
  for (const auto& p : task.head().named_parameters(true)) {
    ASSERT_TRUE(tensors.count(p.key())) << p.key();
    EXPECT_TRUE(testing::bitwise_equal(tensors.at(p.key()), p.value())) << p.key();
  }
  const auto card = nlohmann::json::parse(read_file(dir.file(c.name + ".json")));
  EXPECT_EQ(card.at("task"), c.name);
  EXPECT_EQ(card.at("architecture"), "mlp 6-8-2 relu");
  EXPECT_EQ(card.at("in_features"), 6);
  EXPECT_EQ(card.at("out_features"), 2);
  EXPECT_EQ(card.at("head_params"),
            nlohmann::json({{"hidden", "8"}, {"activation", "relu"}, {"dropout", "0"}}))
      << "every option, defaults included";
  EXPECT_EQ(card.at("label_map"), nlohmann::json::array({0, 1, 1}));
  EXPECT_EQ(card.at("class_names"), nlohmann::json::array({"zero", "one"}));
  EXPECT_EQ(card.at("trunk_sha256"), "ab12");
  EXPECT_EQ(card.at("tap"), "blocks.13");
  EXPECT_EQ(card.at("epochs"), 3);
  EXPECT_DOUBLE_EQ(card.at("eval_accuracy").get<double>(), r.eval.accuracy);
  EXPECT_TRUE(card.at("eval_mean_ap").is_null());
  ASSERT_EQ(card.at("per_class").size(), 2u);
  EXPECT_EQ(card.at("per_class")[1].at("class"), "one");
  EXPECT_FALSE(card.contains("eval_r2"));
  EXPECT_EQ(card.at("weights"), c.name + ".safetensors");
  EXPECT_FALSE(card.contains("eval_intervals")) << "not resampled";
  // Resampled: each metric's percentile interval at the result's level.
  r.resampled = tasks::Resampled{20, {"accuracy", "macro_f1"}, {{0.1, 0.9, 0.5, 0.3, 0.7}, {1, 2, 3, 4, 5}}};
  r.interval_level = 0.5;
  export_head(task, r, meta, 6, dir.path());
  const auto with = nlohmann::json::parse(read_file(dir.file(c.name + ".json"))).at("eval_intervals");
  EXPECT_EQ(with.at("resamples"), 5);
  EXPECT_EQ(with.at("rows"), 20);
  EXPECT_DOUBLE_EQ(with.at("level").get<double>(), 0.5);
  EXPECT_EQ(with.at("accuracy"), nlohmann::json::array({0.3, 0.7}));
  EXPECT_EQ(with.at("macro_f1"), nlohmann::json::array({2.0, 4.0}));
}

// Heads on the same labels are compared with the best of them resample by resample.
TEST(Summary, IntervalLinesCompareEachHeadWithTheBestOnItsLabels) {
  const auto result = [](const char* name, tasks::TaskKind kind, double point, std::vector<double> values) {
    TaskResult r;
    r.name = name;
    r.kind = kind;
    r.labels = kind == tasks::TaskKind::kRegression ? "ink" : "class";
    r.class_names = {"a", "b"};
    r.state = tasks::TaskState::kDone;
    r.eval.accuracy = point;
    r.eval.regression = tasks::RegressionErrors{0.1, 0.2, point};
    r.resampled = tasks::Resampled{
        400, {kind == tasks::TaskKind::kRegression ? "r2" : "accuracy"}, {std::move(values)}};
    return r;
  };
  std::vector<TaskResult> results{
      result("lower", tasks::TaskKind::kMulticlass, 0.80, {0.78, 0.80, 0.82, 0.79, 0.81}),
      result("best", tasks::TaskKind::kMulticlass, 0.85, {0.84, 0.85, 0.86, 0.83, 0.87}),
      result("close", tasks::TaskKind::kMulticlass, 0.84, {0.85, 0.84, 0.85, 0.84, 0.86}),
      result("ink", tasks::TaskKind::kRegression, 0.9, {0.88, 0.9, 0.91, 0.89, 0.92})};
  const auto versus = compare_with_best(results);
  ASSERT_TRUE(versus[0] && versus[2]);
  EXPECT_FALSE(versus[1]) << "the best";
  EXPECT_FALSE(versus[3]) << "alone on its labels";
  EXPECT_EQ(versus[0]->other, "best");
  EXPECT_EQ(versus[0]->metric, "accuracy");
  EXPECT_NEAR(versus[0]->difference, -0.05, 1e-12);
  // lower - best per resample: -0.06 -0.05 -0.04 -0.04 -0.06; close - best: 0.01 -0.01 -0.01 0.01 -0.01.
  const tasks::Interval lower = tasks::percentile_interval({-0.06, -0.05, -0.04, -0.04, -0.06}, 0.95);
  EXPECT_NEAR(versus[0]->interval.lo, lower.lo, 1e-12);
  EXPECT_NEAR(versus[0]->interval.hi, lower.hi, 1e-12);
  EXPECT_LT(versus[2]->interval.lo, 0);
  EXPECT_GT(versus[2]->interval.hi, 0);
  const std::string text = interval_lines(results, "the eval split");
  EXPECT_NE(text.find("95% intervals on the eval split (5 resamples of its 400 rows)"), std::string::npos)
      << text;
  EXPECT_NE(text.find("-5.00 points vs best [-6.00, -4.00]\n"), std::string::npos) << text;
  EXPECT_NE(text.find("-1.00 points vs best [-1.00, +1.00]: no difference these rows can show"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("the best of 3 on its labels"), std::string::npos) << text;
  EXPECT_NE(text.find("ink    R^2 0.9000 [0.8810, 0.9190]\n"), std::string::npos) << text;
  results[0].resampled.reset();
  EXPECT_FALSE(compare_with_best(results)[0]) << "not resampled: nothing to compare";
}

}  // namespace
}  // namespace canopy::runners
