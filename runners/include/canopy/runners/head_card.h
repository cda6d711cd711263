// A trained head as users read it: <dir>/<name>.safetensors (the head's parameters and
// buffers under their module names, __metadata__ naming task, head and architecture) and
// <dir>/<name>.json, the card (docs/training.md lists its fields). <name> is the result's:
// the task's, or for a grid of heads the grid's (its winner exported under it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "canopy/datasets/feature_cache.h"
#include "canopy/runners/train_report.h"
#include "canopy/tasks/task.h"

namespace canopy::runners {

// Writes the weights and the card into `dir` (atomically, each file); returns the weights' path.
std::string export_head(tasks::Task& task, const TaskResult& result, const datasets::CacheMeta& meta,
                        std::int64_t in_features, const std::string& dir);

// Precision, recall, F1 and support of each class, as the card's per_class lists them
// (multiclass heads; an empty array otherwise).
nlohmann::ordered_json per_class_report(const tasks::EvalMetrics& m, const std::vector<std::string>& names);
// Precision, recall, F1, average precision, support and predicted count of each label, as the
// card's per_label lists them (multilabel heads; an empty array otherwise).
nlohmann::ordered_json per_label_report(const tasks::EvalMetrics& m, const std::vector<std::string>& names);
// A confusion matrix (int64 [K, K]) as JSON rows: row = true class, column = predicted.
nlohmann::ordered_json confusion_rows(const at::Tensor& confusion);
// Resampled metrics as the card's eval_intervals and canopy evaluate's intervals: {"level",
// "resamples", "rows", "<metric>": [lo, hi], ...}.
nlohmann::ordered_json intervals_json(const tasks::Resampled& resampled, double level);

}  // namespace canopy::runners
