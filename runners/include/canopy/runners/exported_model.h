// The multi-task model `canopy train` exports, as `canopy predict` and `canopy evaluate` load
// it: every head of <train.out_dir>/heads (each card checked against its checksum and its
// weights against the card's SHA-256, refused when trained on another trunk, preprocessing,
// tap, pooling or precision) and the trunk they read (the config's, or the fine-tuned trunk
// the run exported when the heads were trained with the trunk's top).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "canopy/core/memory_fence.h"
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

// A pass over `input` met the memory fence: throws a DataError saying why, with a
// cache.batch_size that fits (advised_batch_size of the largest batch that passes through the
// trunk and every head, tried by halving) and how many of the rows were `done`. `doing` and
// `done_word` name the pass and its rows: "predicting" ... "predicted".
[[noreturn]] void model_pass_out_of_memory(const char* doing, const char* done_word, const MemoryFence& fence,
                                           const InputSplit& input, ExportedModel& model, std::int64_t batch,
                                           std::int64_t shard_rows, std::int64_t done);

}  // namespace canopy::runners
