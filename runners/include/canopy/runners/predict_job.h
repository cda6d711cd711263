// `canopy predict`: the trunk and every trained head as one multi-task model. Runs new
// inputs through the trunk once and through every head, and writes one row per sample
// with every task's prediction.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>

#include "canopy/core/progress.h"
#include "canopy/runners/config.h"
#include "canopy/tasks/registry.h"

namespace canopy::runners {

struct PredictOptions {
  std::string input;            // an idx image file (MNIST format, .gz or raw)
  std::int64_t limit = 0;       // first N images; 0: all
  std::string format = "csv";   // csv | jsonl
};

// Loads the heads exported by `canopy train` (<train.out_dir>/heads), refusing any head
// trained on another trunk or preprocessing, and writes predictions to `out`. Returns the
// number of rows written.
std::int64_t run_predict(const JobConfig& config, const tasks::HeadRegistry& registry, const PredictOptions& options,
                         std::ostream& out, ProgressStyle style = ProgressStyle::kAuto);

}  // namespace canopy::runners
