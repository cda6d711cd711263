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
}

}  // namespace
}  // namespace canopy::runners
