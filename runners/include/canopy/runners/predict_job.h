// `canopy predict`: the trunk and every trained head as one multi-task model. Runs new
// inputs through the trunk once and through every head, and writes one row per sample
// with every task's prediction (docs/training.md: the columns):
//   csv    id,<task>,... [,<task>:<class>,... with scores]
//   jsonl  {"id": 0, "<task>": "<prediction>", ... [, "<task>:<class>": score, ...]}
// A multiclass prediction is its class name, a multilabel one the names of the labels it
// predicts joined by '|', a regression one the value in the target's units. With scores,
// each class's softmax probability (multiclass) or each label's sigmoid (multilabel). With
// top K, each multiclass head's K most probable classes, best first, with their probabilities:
// columns <task>:top1, <task>:top1_p, ... (K capped at the head's classes).
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>

#include "canopy/core/progress.h"
#include "canopy/runners/config.h"
#include "canopy/tasks/registry.h"

namespace canopy::runners {

struct PredictOptions {
  std::string input;              // inputs in the form of the config's data source
  std::int64_t limit = 0;         // first N inputs; 0: all
  std::string format = "csv";     // csv | jsonl
  bool scores = false;            // also every class's (label's) probability
  std::int64_t top = 0;           // also each multiclass head's `top` most probable classes (0: none)
  std::vector<std::string> keep;  // columns of an input table written beside each answer
};

// Loads the heads exported by `canopy train` (<train.out_dir>/heads), refusing any head
// trained on another trunk or preprocessing, and writes predictions to `out`. Returns the
// number of rows written.
std::int64_t run_predict(const JobConfig& config, const tasks::HeadRegistry& registry,
                         const PredictOptions& options, std::ostream& out,
                         ProgressStyle style = ProgressStyle::kAuto);

}  // namespace canopy::runners
