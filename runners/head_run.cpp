#include "canopy/runners/head_run.h"

#include <cstdio>

#include "canopy/core/error.h"

namespace canopy::runners {

const char* state_name(tasks::TaskState state) {
  switch (state) {
    case tasks::TaskState::kTraining:
      return "training";
    case tasks::TaskState::kDone:
      return "done";
    case tasks::TaskState::kFailed:
      return "FAILED";
  }
  return "?";
}

void HeadRun::start_epoch() {
  loss_sum = 0.0;
  loss_count = 0;
}

void HeadRun::add_loss(double loss) {
  loss_sum += loss;
  ++loss_count;
  last_loss = loss;
}

void HeadRun::fail(std::int64_t epoch, std::int64_t step, const std::string& why) {
  state = tasks::TaskState::kFailed;
  failure = detail::str_cat("epoch ", epoch + 1, " step ", step + 1, ": ", why);
}

void HeadRun::fail_evaluation(std::int64_t epoch, const std::string& why) {
  state = tasks::TaskState::kFailed;
  failure = detail::str_cat("epoch ", epoch + 1, " evaluation: ", why);
}

bool HeadRun::finish_epoch(std::int64_t epoch, std::int64_t total, const tasks::EvalMetrics& metrics,
                           std::int64_t patience) {
  if (failed()) return false;
  epochs = epoch + 1;
  train_loss = loss_count ? loss_sum / static_cast<double>(loss_count) : 0.0;
  eval = metrics;
  const bool improved = eval.score() > best_score;
  if (improved) {
    best_score = eval.score();
    best_epoch = epochs;
  }
  if (epochs >= total) {
    state = tasks::TaskState::kDone;
  } else if (patience > 0 && epochs - best_epoch >= patience) {
    state = tasks::TaskState::kDone;  // the others go on
    char why[160];
    std::snprintf(why, sizeof why, "stopped early at epoch %lld (best %s %.4f at epoch %lld)",
                  static_cast<long long>(epochs), eval.regression ? "R^2" : "accuracy", best_score,
                  static_cast<long long>(best_epoch));
    stop_note = why;
  }
  return improved;
}

}  // namespace canopy::runners
