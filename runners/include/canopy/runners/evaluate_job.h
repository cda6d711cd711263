// `canopy evaluate`: how the exported multi-task model does on labelled samples, new ones or
// any the user holds out: the trunk once per sample and every head on its features, as
// `canopy predict` runs them, then each head's metrics against the labels, computed as the
// training run computes them on its eval split (accuracy, macro-F1, top-5, per-class
// precision/recall/F1; exact match, mean F1 and mean AP for multi-label heads; MAE, RMSE and
// R^2 in the target's units for regression heads). Each head is scored on the labels it was
// trained for, as its card records them (label source, label map).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "canopy/core/progress.h"
#include "canopy/runners/config.h"
#include "canopy/runners/train_report.h"
#include "canopy/tasks/intervals.h"
#include "canopy/tasks/registry.h"

namespace canopy::runners {

struct EvaluateOptions {
  std::string input;       // labelled samples in the form of the config's data source; "": the
                           // config's eval split (train.eval_split), as training scored it
  std::string labels;      // fashion-mnist / mnist: the idx label file ("": beside the images)
  std::int64_t limit = 0;  // the first N samples; 0: all
};

struct Evaluation {
  std::string input;       // as EvaluateOptions::input: "" for the eval split
  std::string eval_split;  // the split when input is "" (train.eval_split), else ""
  std::int64_t rows = 0;
  // Per head evaluated: name, kind, class names and `eval`, state kDone.
  std::vector<TaskResult> heads;
  // The head card's score on the training run's eval split (accuracy, R^2), beside each head.
  std::vector<double> card_scores;
  // Heads not evaluated: "task 'x': why" (the input has no labels of their label source).
  std::vector<std::string> not_evaluated;
  double seconds = 0.0;
};

// Where the rows came from, for reports: "'<input>'" or "the eval split (test)".
std::string input_said(const std::string& input, const std::string& eval_split);

Evaluation run_evaluate(const JobConfig& config, const tasks::HeadRegistry& registry,
                        const EvaluateOptions& options, ProgressStyle style = ProgressStyle::kAuto);

// What run_evaluate computes before it resamples: the Evaluation (no head resampled), and per
// head evaluated, in its order, its outputs on the input's rows with their targets.
struct ScoredInput {
  Evaluation evaluation;
  std::vector<tasks::HeadOutputs> outputs;
};
// `what` names the pass in progress lines ("evaluate").
ScoredInput score_input(const JobConfig& config, const tasks::HeadRegistry& registry,
                        const EvaluateOptions& options, ProgressStyle style, const std::string& what);
// The same for several runs of one features_signature (exported_model.h) in one pass: the
// first run's trunk once per batch, every run's heads on its features; one ScoredInput per
// run, each with the pass's seconds.
std::vector<ScoredInput> score_inputs(const std::vector<const JobConfig*>& configs,
                                      const tasks::HeadRegistry& registry, const EvaluateOptions& options,
                                      ProgressStyle style, const std::string& what);

// The report as the CLI prints it: a row per head, the regression errors, per-class F1 tables.
std::string format_evaluation(const Evaluation& e);
// The same as one JSON object: {"input", "rows", "seconds", "heads": [{"task", "kind", "rows",
// "accuracy", "macro_f1", "top5_accuracy", "mean_ap", "per_class", "confusion" (rows: the true
// class, columns: the predicted, in class_names' order), "per_label" (multilabel),
// "card_eval_accuracy"; or
// "mae", "rmse", "r2", "card_eval_r2"}, with "intervals" and "versus_best" (train_report.h's
// compare_with_best) where resampled], "not_evaluated": [...]}, each where the head's kind has it.
std::string evaluation_json(const Evaluation& e);
// Its "heads" array alone.
nlohmann::ordered_json evaluation_heads_json(const Evaluation& e);

}  // namespace canopy::runners
