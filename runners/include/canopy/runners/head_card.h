// A trained head as users read it: <dir>/<task>.safetensors (the head's parameters and
// buffers under their module names, __metadata__ naming task, head and architecture) and
// <dir>/<task>.json, the card (docs/training.md lists its fields).
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "canopy/datasets/feature_cache.h"
#include "canopy/runners/train_report.h"
#include "canopy/tasks/task.h"

namespace canopy::runners {

// The card of `task` trained with `result` on features of `meta`'s cache.
nlohmann::ordered_json head_card(tasks::Task& task, const TaskResult& result, const datasets::CacheMeta& meta,
                                 std::int64_t in_features);

// Writes the weights and the card into `dir` (atomically, each file); returns the weights' path.
std::string export_head(tasks::Task& task, const TaskResult& result, const datasets::CacheMeta& meta,
                        std::int64_t in_features, const std::string& dir);

}  // namespace canopy::runners
