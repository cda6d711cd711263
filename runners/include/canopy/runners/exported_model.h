// The multi-task model `canopy train` exports, as `canopy predict` and `canopy evaluate` load
// it: every head of <train.out_dir>/heads (each card checked against its checksum and its
// weights against the card's SHA-256, refused when trained on another trunk, preprocessing,
// tap, pooling or precision) and the trunk they read (the config's, or the fine-tuned trunk
// the run exported when the heads were trained with the trunk's top).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "canopy/core/progress.h"
#include "canopy/heads/head.h"
#include "canopy/runners/config.h"
#include "canopy/runners/input_data.h"
#include "canopy/tasks/task.h"
#include "canopy/trunk/trunk.h"

namespace canopy::runners {

struct ExportedHead {
  tasks::TaskConfig config;  // the task's config; for a grid, its winner's under the grid's name
  tasks::TaskKind kind = tasks::TaskKind::kMulticlass;
  double target_mean = 0.0, target_std = 1.0;  // regression: value = output * std + mean
  heads::HeadPtr head;                         // weights loaded, in eval mode
  std::int64_t out_features = 0;               // the card's
  std::vector<std::string> class_names;
  std::vector<double> cutoffs;  // multilabel: each label's logit cut (the card's threshold_logits; 0)
  double temperature = 1.0;  // multiclass: the card's (calibrate = temperature); run_model_pass divides by it
  nlohmann::ordered_json card;  // as exported (its eval_* metrics are the run's test split's)
  const std::string& task() const { return config.name; }
};

struct ExportedModel {
  trunk::Trunk trunk;
  std::vector<ExportedHead> heads;  // in the config's task order (a grid once)
};

// Loads the trunk and every head the config's tasks exported; a DataError names what is
// missing, corrupt or trained on other features, and the command that makes it anew.
ExportedModel load_exported_model(const JobConfig& config, const tasks::HeadRegistry& registry);
// The heads alone, each checked against `trunk` (the model's, or another run's trunk whose
// features are these heads', as features_signature says).
std::vector<ExportedHead> load_exported_heads(const JobConfig& config, const tasks::HeadRegistry& registry,
                                              const trunk::Trunk& trunk);
// What the features the run's exported heads read depend on, from its first head's card and
// its config (trunk, fine-tuned or not, preprocessing, pooling, taps, precision, device, how
// labelled inputs are read): two runs of the same signature read the same features from the
// same input, so one trunk pass serves both. "" where the run exported nothing.
std::string features_signature(const JobConfig& config);

// Runs every row of `input` through `model` in trunk batches of config.cache.batch_size: the
// trunk once per batch, then every head (its output's shape checked); `each(first_row,
// outputs)` gets the heads' outputs [rows, out_features], in model.heads' order, and `progress`
// advances. On the CPU, past the memory the process may take, an allocation fails (instead of
// the kernel's OOM kill) and the pass stops with a DataError saying why, with a
// cache.batch_size that fits (the largest batch that passes, tried by halving) and how many
// rows were done; `doing` and `done_word` name the pass and its rows: "predicting" ... "predicted".
void run_model_pass(
    ExportedModel& model, const InputSplit& input, const JobConfig& config, Progress& progress,
    const char* doing, const char* done_word,
    const std::function<void(std::int64_t first_row, const std::vector<at::Tensor>& outputs)>& each);

}  // namespace canopy::runners
