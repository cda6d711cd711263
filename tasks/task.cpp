#include "canopy/tasks/task.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <sstream>

#include <ATen/CPUGeneratorImpl.h>

#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/nll_loss.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/utils.h>

#include "canopy/core/bitmasks.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/label_lists.h"
#include "canopy/core/strings.h"
#include "canopy/heads/fused.h"
#include "canopy/tasks/linear_step.h"

namespace canopy::tasks {

namespace {
// torch::nn modules draw their initial weights from LibTorch's default CPU generator (their
// reset_parameters take no generator). While a head is built, that generator is seeded with
// the task's seed; afterwards its previous state is put back, so building a task changes
// nothing the rest of the process sees. Builds are serialised by a lock of canopy's own
// (the generator's own mutex is taken by every draw made while building).
class SeededDefaultGenerator {
 public:
  explicit SeededDefaultGenerator(std::uint64_t seed)
      : lock_(mutex()), gen_(at::detail::getDefaultCPUGenerator()) {
    std::lock_guard<std::mutex> gen_lock(gen_.mutex());
    saved_ = gen_.get_state();
    gen_.set_current_seed(seed);
  }
  ~SeededDefaultGenerator() {
    std::lock_guard<std::mutex> gen_lock(gen_.mutex());
    gen_.set_state(saved_);
  }
  SeededDefaultGenerator(const SeededDefaultGenerator&) = delete;
  SeededDefaultGenerator& operator=(const SeededDefaultGenerator&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  std::lock_guard<std::mutex> lock_;
  at::Generator gen_;
  at::Tensor saved_;
};

template <typename E, std::size_t N>
std::vector<std::string> all_names(const std::array<std::pair<E, const char*>, N>& names) {
  std::vector<std::string> out;
  for (const auto& [value, text] : names) out.emplace_back(text);
  return out;
}
template <typename E, std::size_t N>
E parse_named(const std::array<std::pair<E, const char*>, N>& names, const std::string& name,
              const std::string& what) {
  for (const auto& [value, text] : names) {
    if (name == text) return value;
  }
  throw ConfigError(
      detail::str_cat(what, " must be one of ", join(all_names(names), ", "), "; got '", name, "'"));
}
template <typename E, std::size_t N>
const char* name_of(const std::array<std::pair<E, const char*>, N>& names, E value) {
  for (const auto& [v, text] : names) {
    if (v == value) return text;
  }
  return "?";
}
constexpr std::array<std::pair<TaskKind, const char*>, 3> kKinds{{{TaskKind::kMulticlass, "multiclass"},
                                                                  {TaskKind::kMultilabel, "multilabel"},
                                                                  {TaskKind::kRegression, "regression"}}};
constexpr std::array<std::pair<OptimizerKind, const char*>, 3> kOptimizers{
    {{OptimizerKind::kSgd, "sgd"}, {OptimizerKind::kAdam, "adam"}, {OptimizerKind::kAdamW, "adamw"}}};
constexpr std::array<std::pair<LrSchedule, const char*>, 3> kSchedules{
    {{LrSchedule::kConstant, "constant"}, {LrSchedule::kCosine, "cosine"}, {LrSchedule::kStep, "step"}}};
constexpr std::array<std::pair<RegressionLoss, const char*>, 2> kLosses{
    {{RegressionLoss::kMse, "mse"}, {RegressionLoss::kL1, "l1"}}};
constexpr std::array<std::pair<Monitor, const char*>, 5> kMonitors{{{Monitor::kAuto, "auto"},
                                                                    {Monitor::kAccuracy, "accuracy"},
                                                                    {Monitor::kMacroF1, "macro_f1"},
                                                                    {Monitor::kMeanAp, "mean_ap"},
                                                                    {Monitor::kNll, "nll"}}};

void validate_training(const TaskConfig& c, const std::string& t) {
  CANOPY_CHECK(c.lr > 0 && std::isfinite(c.lr), ConfigError, t, ": invalid learning rate: ", c.lr);
  CANOPY_CHECK(c.weight_decay >= 0, ConfigError, t, ": invalid weight_decay: ", c.weight_decay);
  CANOPY_CHECK(c.momentum >= 0 && c.momentum < 1, ConfigError, t, ": invalid momentum: ", c.momentum);
  CANOPY_CHECK(c.epochs >= 0, ConfigError, t, ": epochs must be >= 0, got ", c.epochs);
  CANOPY_CHECK(c.step_size > 0 && c.gamma > 0, ConfigError, t, ": step_size and gamma must be > 0, got ",
               c.step_size, " and ", c.gamma);
  CANOPY_CHECK(c.early_stop_patience >= 0, ConfigError, t, ": early_stop_patience must be >= 0, got ",
               c.early_stop_patience);
}
}  // namespace

const char* to_string(TaskKind kind) { return name_of(kKinds, kind); }
const char* to_string(OptimizerKind optimizer) { return name_of(kOptimizers, optimizer); }
const char* to_string(LrSchedule schedule) { return name_of(kSchedules, schedule); }
const char* to_string(RegressionLoss loss) { return name_of(kLosses, loss); }
const char* to_string(Monitor monitor) { return name_of(kMonitors, monitor); }
Monitor parse_monitor(const std::string& name, const std::string& what) {
  return parse_named(kMonitors, name, what);
}
std::vector<std::string> monitor_names() { return all_names(kMonitors); }

double EvalMetrics::score() const {
  switch (monitor) {
    case Monitor::kAccuracy:
      return accuracy;
    case Monitor::kMacroF1:
      return macro_f1;
    case Monitor::kMeanAp:
      return mean_ap.value_or(0.0);
    case Monitor::kNll:
      return nll ? -*nll : -HUGE_VAL;
    case Monitor::kAuto:
      break;
  }
  // auto: a multilabel head's mean AP (its exact-match accuracy barely moves when a rare label
  // is missed, and stays near 0 over many labels), a regression's R^2, else accuracy.
  return regression ? regression->r2 : mean_ap ? *mean_ap : accuracy;
}

const char* EvalMetrics::score_name() const {
  switch (monitor) {
    case Monitor::kAccuracy:
      return "accuracy";
    case Monitor::kMacroF1:
      return "macro-F1";
    case Monitor::kMeanAp:
      return "mean AP";
    case Monitor::kNll:
      return "NLL";
    case Monitor::kAuto:
      break;
  }
  return regression ? "R^2" : mean_ap ? "mean AP" : "accuracy";
}
TaskKind parse_task_kind(const std::string& name, const std::string& what) {
  return parse_named(kKinds, name, what);
}
OptimizerKind parse_optimizer(const std::string& name, const std::string& what) {
  return parse_named(kOptimizers, name, what);
}
LrSchedule parse_schedule(const std::string& name, const std::string& what) {
  return parse_named(kSchedules, name, what);
}
RegressionLoss parse_regression_loss(const std::string& name, const std::string& what) {
  return parse_named(kLosses, name, what);
}
std::vector<std::string> task_kind_names() { return all_names(kKinds); }
std::vector<std::string> optimizer_names() { return all_names(kOptimizers); }
std::vector<std::string> schedule_names() { return all_names(kSchedules); }
std::vector<std::string> regression_loss_names() { return all_names(kLosses); }

namespace {
// log2 of a power of two.
std::int64_t bits_of(std::int64_t power) {
  std::int64_t k = 0;
  while (power > 1) {
    power >>= 1;
    ++k;
  }
  return k;
}

// How the head's outputs are read and its epochs chosen: threshold, monitor, calibrate.
void validate_readout(const TaskConfig& c, const std::string& t) {
  if (c.threshold != "0.5") {
    CANOPY_CHECK(c.kind == TaskKind::kMultilabel, ConfigError, t, ": threshold = ", c.threshold,
                 " applies to multilabel tasks only (", to_string(c.kind), " heads give ",
                 c.kind == TaskKind::kRegression ? "a value" : "the most probable class", ")");
    char* end = nullptr;
    const double p = c.threshold == "tune" ? 0.5 : std::strtod(c.threshold.c_str(), &end);
    CANOPY_CHECK(
        c.threshold == "tune" || (!c.threshold.empty() && *end == '\0' && p > 0 && p < 1), ConfigError, t,
        ": threshold must be a probability between 0 and 1 (exclusive) or 'tune', got '", c.threshold, "'");
  }
  const bool monitor_fits =
      c.monitor == Monitor::kAuto ||
      (c.kind != TaskKind::kRegression && c.monitor != Monitor::kMeanAp && c.monitor != Monitor::kNll) ||
      (c.kind == TaskKind::kMultilabel && c.monitor == Monitor::kMeanAp) ||
      (c.kind == TaskKind::kMulticlass && c.monitor == Monitor::kNll);
  CANOPY_CHECK(monitor_fits, ConfigError, t, ": monitor = ", to_string(c.monitor), " does not apply to a ",
               to_string(c.kind), " task (",
               c.kind == TaskKind::kRegression ? "a regression is chosen by R^2: auto"
               : c.kind == TaskKind::kMultilabel
                   ? "a multilabel task: auto, accuracy (every label right), macro_f1 or mean_ap"
                   : "a multiclass task: auto, accuracy, macro_f1 or nll",
               ")");
  CANOPY_CHECK(c.calibrate == "none" || c.calibrate == "temperature", ConfigError, t,
               ": calibrate must be none or temperature, got '", c.calibrate, "'");
  CANOPY_CHECK(c.calibrate == "none" || c.kind == TaskKind::kMulticlass, ConfigError, t,
               ": calibrate = ", c.calibrate, " applies to multiclass tasks only (",
               c.kind == TaskKind::kMultilabel
                   ? "a multilabel head's labels are cut by threshold, which tune "
                     "chooses on the validation split"
                   : "a regression gives a value, not probabilities",
               ")");
}

// class_weights and positive_weights: balanced or numbers, each on its kind of task.
void validate_weights(const TaskConfig& c, const std::string& t) {
  CANOPY_CHECK(!c.balanced_class_weights || c.class_weights.empty(), ConfigError, t,
               ": class_weights is either balanced or a list of numbers, not both");
  CANOPY_CHECK(!c.balanced_positive_weights || c.positive_weights.empty(), ConfigError, t,
               ": positive_weights is either balanced or a list of numbers, not both");
  CANOPY_CHECK(
      (c.positive_weights.empty() && !c.balanced_positive_weights) || c.kind == TaskKind::kMultilabel,
      ConfigError, t, ": positive_weights applies to multilabel tasks only (", to_string(c.kind),
      c.kind == TaskKind::kMulticlass ? ": class_weights weighs its classes)" : ")");
  for (double w : c.positive_weights) {
    CANOPY_CHECK(w > 0 && std::isfinite(w), ConfigError, t, ": positive_weights must be > 0, got ", w);
  }
}

// A classifier's loss, its labels' names and class_weights' values.
void validate_classes(const TaskConfig& c, std::int64_t source_classes, const std::string& t) {
  CANOPY_CHECK(!c.loss, ConfigError, t, ": loss = ", c.loss ? to_string(*c.loss) : "",
               " applies to regression tasks only (", to_string(c.kind), " uses ",
               c.kind == TaskKind::kMultilabel ? "binary cross-entropy" : "cross-entropy", ")");
  if (c.kind == TaskKind::kMultilabel) {
    // Without label_map and class_names, training names the labels by the source's bits
    // (CacheMeta::label_bits) before the task is made: none known yet is no error.
    // Past kMaxBits labels the source is multi-hot (label_lists.h), read without label_map.
    const bool named_later = c.class_names.empty() && c.label_map.empty() && source_classes <= 0;
    const std::size_t most = c.label_map.empty() ? kMaxListLabels : kMaxBits;
    CANOPY_CHECK(named_later || (c.class_names.size() >= 1 && c.class_names.size() <= most), ConfigError, t,
                 ": a multilabel task names its labels in class_names (1 to ", most,
                 c.label_map.empty() ? "" : " with label_map, whose bitmasks hold them", "), got ",
                 c.class_names.size(),
                 !c.class_names.empty() ? ""
                 : c.label_map.empty()
                     ? detail::str_cat("; label source '", c.labels,
                                       "' names none of its bits (name them in class_names; a cache from "
                                       "before 2026-12-06 records none)")
                     : ": name the labels label_map's bitmasks set");
    CANOPY_CHECK(
        c.class_weights.empty() && !c.balanced_class_weights && c.label_smoothing == 0, ConfigError, t,
        ": class_weights and label_smoothing apply to multiclass tasks only (a multilabel task weighs "
        "each label's positive rows with positive_weights)");
  }
  CANOPY_CHECK(c.label_smoothing >= 0 && c.label_smoothing < 1, ConfigError, t,
               ": label_smoothing must be in [0, 1), got ", c.label_smoothing);
  for (double w : c.class_weights) {
    CANOPY_CHECK(w >= 0 && std::isfinite(w), ConfigError, t, ": class_weights must be >= 0, got ", w);
  }
}

// label_map against the label source and the task's classes (multilabel: bitmasks of labels,
// the source's own without label_map), and class_names' count.
void validate_label_map(const TaskConfig& c, std::int64_t source_classes, const std::string& t) {
  if (!c.label_map.empty()) {
    CANOPY_CHECK(source_classes <= 0 || static_cast<std::int64_t>(c.label_map.size()) == source_classes,
                 ConfigError, t, ": label_map has ", c.label_map.size(), " entries, label source '", c.labels,
                 "' has ", source_classes, " classes");
    for (auto v : c.label_map) {
      CANOPY_CHECK(v >= 0, ConfigError, t, ": label_map entries must be >= 0, got ", v);
    }
  }
  const std::int64_t k = c.kind == TaskKind::kMultilabel ? static_cast<std::int64_t>(c.class_names.size())
                         : c.label_map.empty()
                             ? source_classes
                             : *std::max_element(c.label_map.begin(), c.label_map.end()) + 1;
  if (c.kind == TaskKind::kMultilabel && c.label_map.empty() && is_multi_hot(static_cast<std::size_t>(k))) {
    // Past kMaxBits labels only a multi-hot source (its classes unknown: 0) has them.
    CANOPY_CHECK(source_classes <= 0, ConfigError, t, ": ", k,
                 " labels (class_names) are more than a bitmask holds (", kMaxBits, "); label source '",
                 c.labels, "' holds ", source_classes, " classes, not lists of labels");
  } else if (c.kind == TaskKind::kMultilabel && c.label_map.empty()) {
    // The source's values are the bitmasks themselves (all_labels: bit j = label j).
    const std::int64_t masks = std::int64_t{1} << k;
    CANOPY_CHECK(source_classes <= 0 || source_classes == masks, ConfigError, t,
                 ": without label_map a multilabel task reads label source '", c.labels,
                 "' as bitmasks of its ", k, " labels (class_names), ", masks, " classes; '", c.labels,
                 "' has ", source_classes,
                 (source_classes & (source_classes - 1)) == 0
                     ? detail::str_cat(": bitmasks of ", bits_of(source_classes),
                                       " labels, so name one per bit in class_names")
                     : ": give label_map, one bitmask of labels per source class");
  }
  if (c.kind == TaskKind::kMultilabel) {
    for (auto m : c.label_map) {
      CANOPY_CHECK(m < (std::int64_t(1) << k), ConfigError, t, ": label_map bitmask ", m,
                   " has bits beyond its ", k, " labels");
    }
  }
  CANOPY_CHECK(c.class_names.empty() || k <= 0 || static_cast<std::int64_t>(c.class_names.size()) == k,
               ConfigError, t, ": class_names has ", c.class_names.size(), " names for ", k, " classes");
}

}  // namespace

void validate_task_config(const TaskConfig& c, std::int64_t source_classes) {
  const std::string t = "task '" + c.name + "'";
  CANOPY_CHECK(!c.name.empty(), ConfigError, "a task needs a name");
  validate_training(c, t);
  validate_readout(c, t);
  validate_weights(c, t);
  if (c.kind == TaskKind::kRegression) {
    CANOPY_CHECK(c.label_map.empty() && c.class_names.empty() && c.class_weights.empty() &&
                     !c.balanced_class_weights && c.label_smoothing == 0,
                 ConfigError, t, ": label_map, class_names, class_weights and label_smoothing apply to ",
                 "classification tasks, not regression");
    return;
  }
  validate_classes(c, source_classes, t);
  validate_label_map(c, source_classes, t);
}

std::vector<ClassStats> per_class_stats(const at::Tensor& confusion) {
  const std::int64_t k = confusion.size(0);
  const auto* c = confusion.data_ptr<std::int64_t>();
  std::vector<ClassStats> out(static_cast<std::size_t>(k));
  for (std::int64_t i = 0; i < k; ++i) {
    auto& s = out[static_cast<std::size_t>(i)];
    for (std::int64_t j = 0; j < k; ++j) {
      s.support += c[i * k + j];
      s.predicted += c[j * k + i];
    }
    const double tp = static_cast<double>(c[i * k + i]);
    s.precision = s.predicted ? tp / static_cast<double>(s.predicted) : 0.0;
    s.recall = s.support ? tp / static_cast<double>(s.support) : 0.0;
    s.f1 = s.support + s.predicted > 0 ? 2 * tp / static_cast<double>(s.support + s.predicted) : 0.0;
  }
  return out;
}

EvalMetrics classification_metrics(const at::Tensor& predictions, const at::Tensor& targets, std::int64_t k) {
  CANOPY_CHECK(predictions.numel() == targets.numel(), DataError, predictions.numel(), " predictions for ",
               targets.numel(), " targets");
  EvalMetrics m;
  m.count = targets.numel();
  const at::Tensor p = predictions.to(at::kLong).flatten();
  const at::Tensor t = targets.to(at::kLong).flatten();
  m.confusion = at::bincount(t * k + p, {}, k * k).view({k, k}).to(at::kLong);
  if (m.count == 0) return m;
  const auto* c = m.confusion.data_ptr<std::int64_t>();
  std::int64_t correct = 0;
  double f1_sum = 0;
  std::int64_t present = 0;
  const auto stats = per_class_stats(m.confusion);
  for (std::int64_t i = 0; i < k; ++i) {
    correct += c[i * k + i];
    const auto& s = stats[static_cast<std::size_t>(i)];
    if (s.support == 0 && s.predicted == 0) continue;  // class absent from truth and predictions
    ++present;
    f1_sum += s.f1;
  }
  m.accuracy = static_cast<double>(correct) / static_cast<double>(m.count);
  m.macro_f1 = present ? f1_sum / static_cast<double>(present) : 0.0;
  return m;
}

double top_k_accuracy(const at::Tensor& scores, const at::Tensor& targets, std::int64_t k) {
  CANOPY_CHECK(scores.dim() == 2 && scores.size(0) == targets.numel() && k >= 1 && k <= scores.size(1),
               DataError, "top-", k, " accuracy of scores ", scores.sizes(), " against ", targets.numel(),
               " targets");
  if (targets.numel() == 0) return 0.0;
  const at::Tensor best = std::get<1>(scores.topk(k, /*dim=*/1));
  const at::Tensor hit = best.eq(targets.to(at::kLong).flatten().unsqueeze(1)).any(1);
  return hit.to(at::kDouble).mean().item<double>();
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(OptimizerKind kind,
                                                        const std::vector<std::vector<at::Tensor>>& groups,
                                                        double lr, double weight_decay, double momentum) {
  std::vector<torch::optim::OptimizerParamGroup> g(groups.begin(), groups.end());
  if (kind == OptimizerKind::kSgd) {
    return std::make_unique<torch::optim::SGD>(
        g, torch::optim::SGDOptions(lr).momentum(momentum).weight_decay(weight_decay));
  }
  if (kind == OptimizerKind::kAdam) {
    return std::make_unique<torch::optim::Adam>(g, torch::optim::AdamOptions(lr).weight_decay(weight_decay));
  }
  return std::make_unique<torch::optim::AdamW>(g, torch::optim::AdamWOptions(lr).weight_decay(weight_decay));
}

double lr_factor(LrSchedule schedule, std::int64_t epoch, std::int64_t total, std::int64_t step_size,
                 double gamma) {
  if (schedule == LrSchedule::kCosine) {
    return 0.5 * (1.0 + std::cos(M_PI * static_cast<double>(epoch) /
                                 static_cast<double>(std::max<std::int64_t>(1, total))));
  }
  if (schedule == LrSchedule::kStep) return std::pow(gamma, static_cast<double>(epoch / step_size));
  return 1.0;
}

Task::Task(TaskConfig config, const HeadRegistry& registry, std::int64_t in_features,
           std::int64_t source_classes, std::uint64_t seed)
    : config_(std::move(config)), loss_weight_(config_.loss_weight) {
  validate_task_config(config_, source_classes);
  if (regression()) {
    num_classes_ = 1;  // one output: the predicted value
  } else if (multilabel()) {
    num_classes_ = static_cast<std::int64_t>(config_.class_names.size());
  } else if (config_.label_map.empty()) {
    num_classes_ = source_classes;
  } else {
    num_classes_ = *std::max_element(config_.label_map.begin(), config_.label_map.end()) + 1;
  }
  CANOPY_CHECK(num_classes_ >= 2 || multilabel() || regression(), ConfigError, "task '", config_.name,
               "': needs at least 2 classes, has ", num_classes_);
  if (!config_.class_weights.empty()) {
    CANOPY_CHECK(static_cast<std::int64_t>(config_.class_weights.size()) == num_classes_, ConfigError,
                 "task '", config_.name, "': class_weights has ", config_.class_weights.size(),
                 " values for ", num_classes_, " classes");
    class_weights_ = at::tensor(config_.class_weights, at::kFloat);
  }
  if (!config_.positive_weights.empty()) {
    CANOPY_CHECK(static_cast<std::int64_t>(config_.positive_weights.size()) == num_classes_, ConfigError,
                 "task '", config_.name, "': positive_weights has ", config_.positive_weights.size(),
                 " values for ", num_classes_, " labels");
    positive_weights_ = at::tensor(config_.positive_weights, at::kFloat);
  }
  HeadSpec spec{in_features, num_classes_, HeadParams(config_.name, config_.head_params)};
  // A grid over head types: each member reads the options its head takes (the trainer
  // refuses an option no member reads).
  if (config_.grid_axes.count("head")) spec.params.leave_out_unused();
  {
    SeededDefaultGenerator seeded(seed);  // per-task seed: heads start the same whatever the task order
    head_ = registry.create(config_.head, spec);
  }
  unused_head_options_ = spec.params.unused();
  head_->seed(seed);
  optimizer_ = make_optimizer(config_.optimizer, {head_->parameters()}, config_.lr, config_.weight_decay,
                              config_.momentum);
  if (multilabel()) cutoffs_ = configured_cutoffs(config_, num_classes_);
}

void Task::tune_thresholds(const at::Tensor& features, const at::Tensor& targets) {
  if (multilabel() && config_.threshold == "tune") cutoffs_ = f1_best_cutoffs(outputs(features), targets);
}

void Task::calibrate(const at::Tensor& features, const at::Tensor& targets) {
  if (config_.calibrate != "temperature") return;  // validate_task_config: multiclass tasks only
  const at::Tensor logits = outputs(features);
  fit_ = TemperatureFit{fit_temperature(logits, targets), multiclass_nll(logits, targets)};
}

Task::~Task() = default;

at::Tensor source_targets(const TaskConfig& c, std::int64_t num_classes, const at::Tensor& source_labels) {
  if (source_labels.dim() == 2) {  // a multi-hot source: a row of K zeros and ones (label_lists.h)
    const auto k = source_labels.size(1);
    CANOPY_CHECK(c.kind == TaskKind::kMultilabel && c.label_map.empty(), DataError, "task '", c.name,
                 "': label source '", c.labels, "' holds lists of ", k, " labels, multi-hot (a row of ", k,
                 " zeros and ones): only a multilabel task without label_map "
                 "reads it (kind = ",
                 to_string(c.kind), c.label_map.empty() ? "" : ", with label_map", ")");
    CANOPY_CHECK(k == num_classes, DataError, "task '", c.name, "': label source '", c.labels, "' holds ", k,
                 " labels per row, the task has ", num_classes, " (class_names)");
    CANOPY_CHECK(source_labels.numel() == 0 || (source_labels.min().item<std::int64_t>() >= 0 &&
                                                source_labels.max().item<std::int64_t>() <= 1),
                 DataError, "task '", c.name, "': label source '", c.labels,
                 "' is multi-hot but holds values other than 0 and 1");
    return source_labels.to(at::kFloat);
  }
  if (c.kind == TaskKind::kRegression) {
    CANOPY_CHECK(at::isFloatingType(source_labels.scalar_type()), DataError, "task '", c.name,
                 "': a regression task needs a real-valued label source; '", c.labels, "' holds ",
                 source_labels.scalar_type(), " class labels");
    return source_labels.to(at::kDouble);
  }
  CANOPY_CHECK(!at::isFloatingType(source_labels.scalar_type()), DataError, "task '", c.name,
               "': label source '", c.labels, "' holds real values; use kind = regression");
  const auto max = source_labels.numel() ? source_labels.max().item<std::int64_t>() : 0;
  const auto min = source_labels.numel() ? source_labels.min().item<std::int64_t>() : 0;
  const bool multilabel = c.kind == TaskKind::kMultilabel;
  if (c.label_map.empty() && !multilabel) {
    CANOPY_CHECK(min >= 0 && max < num_classes, DataError, "task '", c.name, "': labels of '", c.labels,
                 "' range over [", min, ", ", max, "], expected [0, ", num_classes - 1, "]");
    return source_labels;
  }
  at::Tensor mapped = source_labels;
  if (c.label_map.empty()) {  // multilabel: the source's values are the bitmasks
    CANOPY_CHECK(min >= 0 && max < (std::int64_t{1} << num_classes), DataError, "task '", c.name, "': label ",
                 min < 0 ? min : max, " of '", c.labels, "' has bits beyond its ", num_classes, " labels");
  } else {
    const auto entries = static_cast<std::int64_t>(c.label_map.size());
    CANOPY_CHECK(min >= 0 && max < entries, DataError, "task '", c.name, "': label ", min < 0 ? min : max,
                 " of '", c.labels, "' has no entry in label_map (", entries, " entries)");
    mapped = at::tensor(c.label_map, at::kLong).index_select(0, source_labels);
    if (!multilabel) return mapped;
  }
  return multi_hot_of_bitmasks(mapped, num_classes).to(at::kFloat);  // [B, K]
}

at::Tensor Task::targets(const at::Tensor& source_labels) const {
  const at::Tensor t = source_targets(config_, num_classes_, source_labels);
  if (!regression()) return t;
  return ((t - target_mean_) / target_std_).to(at::kFloat).unsqueeze(1);
}

void Task::set_target_scale(double mean, double std) {
  CANOPY_CHECK(std::isfinite(mean) && std::isfinite(std) && std > 0, DataError, "task '", config_.name,
               "': a regression's targets are standardised by their mean and standard deviation over the "
               "train split, which must be finite with a standard deviation > 0; got ",
               mean, " and ", std, std == 0 ? " (the same target on every training row)" : "");
  target_mean_ = mean;
  target_std_ = std;
}

std::vector<double> Task::balance_weights(const at::Tensor& train_targets) {
  // validate_task_config: balanced class weights on multiclass tasks only, positive weights on
  // multilabel ones.
  const bool classes = config_.balanced_class_weights;
  if (!classes && !config_.balanced_positive_weights) return {};
  const auto rows = train_targets.size(0);
  CANOPY_CHECK(rows > 0, DataError, "task '", config_.name,
               "': balanced weights need training rows, got none");
  std::vector<double> weights(static_cast<std::size_t>(num_classes_), 1.0);
  if (classes) {
    const at::Tensor counts = at::bincount(train_targets.to(at::kLong), {}, num_classes_).to(at::kDouble);
    const auto* n = counts.data_ptr<double>();
    for (std::int64_t c = 0; c < num_classes_; ++c) {
      CANOPY_CHECK(
          n[c] > 0, ConfigError, "task '", config_.name, "': class_weights = balanced, but class ", c,
          c < static_cast<std::int64_t>(config_.class_names.size()) ? " ('" + config_.class_names[c] + "')"
                                                                    : std::string(),
          " has no training row (of ", rows,
          "): its weight, rows / (classes x its rows), would be infinite; give the weights as numbers "
          "or train on rows of every class");
      weights[c] = static_cast<double>(rows) / (static_cast<double>(num_classes_) * n[c]);
    }
    class_weights_ = at::tensor(weights, at::kFloat);
  } else {
    const at::Tensor positives = train_targets.to(at::kDouble).sum(0).contiguous();
    const auto* p = positives.data_ptr<double>();
    for (std::int64_t k = 0; k < num_classes_; ++k) {
      if (p[k] > 0 && p[k] < static_cast<double>(rows))
        weights[k] = (static_cast<double>(rows) - p[k]) / p[k];
    }
    positive_weights_ = at::tensor(weights, at::kFloat);
  }
  return weights;
}

void Task::start_epoch(std::int64_t epoch, std::int64_t total) {
  const double factor = lr_factor(config_.schedule, epoch, total, config_.step_size, config_.gamma);
  for (auto& group : optimizer_->param_groups()) group.options().set_lr(config_.lr * factor);
}

double Task::current_lr() const { return optimizer_->param_groups().front().options().get_lr(); }

void Task::begin_step() {
  head_->train();
  optimizer_->zero_grad();
}

void check_head_outputs(const at::Tensor& out, std::int64_t rows, std::int64_t out_features,
                        const std::string& task, const heads::Head& head) {
  if (out.dim() == 2 && out.size(0) == rows && out.size(1) == out_features &&
      at::isFloatingType(out.scalar_type()))
    return;
  throw Error(detail::str_cat("task '", task, "': its head (", head.describe(), ") gave outputs of shape ",
                              out.sizes(), " (", out.scalar_type(), ") for a batch of ", rows,
                              " rows; a head must give [batch, ", out_features,
                              "] floating-point outputs (HeadSpec::out_features: the task's classes, labels, "
                              "or 1 for a regression)"));
}

at::Tensor Task::loss(const at::Tensor& outputs, const at::Tensor& targets) const {
  if (regression()) {
    return config_.loss == RegressionLoss::kL1 ? torch::nn::functional::l1_loss(outputs, targets)
                                               : torch::nn::functional::mse_loss(outputs, targets);
  }
  if (multilabel()) {
    auto options = torch::nn::functional::BinaryCrossEntropyWithLogitsFuncOptions();
    if (positive_weights_.defined()) options.pos_weight(positive_weights_);
    return torch::nn::functional::binary_cross_entropy_with_logits(outputs, targets, options);
  }
  if (config_.label_smoothing == 0.0 && outputs.dim() == 2) {
    // Cross-entropy as log-softmax over the classes of the transposed [C, B] logits, then
    // NLL: LibTorch's log-softmax along the last dimension of [B, C] works one row of C at a
    // time, which for the usual few classes (10 here) leaves its AVX vectors mostly empty;
    // along the first dimension of [C, B] it is vectorised across the batch. Forward and
    // backward took 9% of the streamed 8-linear-head run's CPU (perf) before. Equal to
    // cross_entropy up to rounding (tested).
    const at::Tensor log_p = at::log_softmax(outputs.t().contiguous(), 0).t();
    return at::nll_loss(log_p, targets, class_weights_);
  }
  auto options = torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(config_.label_smoothing);
  if (class_weights_.defined()) options.weight(class_weights_);
  return torch::nn::functional::cross_entropy(outputs, targets, options);
}

void Task::finish_step() { optimizer_step_(*optimizer_); }

namespace {
at::Tensor weighted(const at::Tensor& loss, double weight) { return weight == 1.0 ? loss : loss * weight; }
}  // namespace

double Task::train_step(const at::Tensor& features, const at::Tensor& targets, bool check_gradients) {
  if (takes_linear_softmax_step({this}, features)) {
    std::vector<std::string> failure(1);
    const double value =
        linear_softmax_step({this}, features, {targets}, check_gradients ? &failure : nullptr)[0];
    CANOPY_CHECK(std::isfinite(value), Error, "loss is ", value);
    CANOPY_CHECK(failure[0].empty(), Error, failure[0]);
    return value;
  }
  begin_step();
  const at::Tensor out = head_->forward(features);
  check_head_outputs(out, features.size(0), num_classes_, config_.name, *head_);
  const at::Tensor l = loss(out, targets);
  const double value = l.item<double>();
  CANOPY_CHECK(std::isfinite(value), Error, "loss is ", value);
  weighted(l, loss_weight_).backward();
  CANOPY_CHECK(!check_gradients || gradients_finite(), Error, "gradient is not finite (loss ", value, ")");
  finish_step();
  return value;
}

bool Task::gradients_finite() const {
  for (const auto& p : head_->parameters()) {
    if (p.grad().defined() && !p.grad().isfinite().all().item<bool>()) return false;
  }
  return true;
}

std::vector<double> fused_train_step(const std::vector<Task*>& tasks, const at::Tensor& features,
                                     const std::vector<at::Tensor>& targets,
                                     std::vector<std::string>* failures) {
  CANOPY_CHECK(tasks.size() == targets.size(), Error, tasks.size(), " tasks but ", targets.size(),
               " targets");
  if (takes_linear_softmax_step(tasks, features))
    return linear_softmax_step(tasks, features, targets, failures);
  std::vector<heads::Head*> heads;
  for (Task* t : tasks) {
    t->begin_step();
    heads.push_back(&t->head());
  }
  const std::vector<at::Tensor> outputs = heads::fused_forward(heads, features);
  std::vector<double> values(tasks.size());
  at::Tensor total;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const at::Tensor l = tasks[i]->loss(outputs[i], targets[i]);
    values[i] = l.item<double>();
    if (!std::isfinite(values[i])) {
      if (failures) (*failures)[i] = detail::str_cat("loss is ", values[i]);
      continue;
    }
    const at::Tensor w = weighted(l, tasks[i]->loss_weight());
    total = total.defined() ? total + w : w;
  }
  const auto any_failed = [&] {
    return failures &&
           std::any_of(failures->begin(), failures->end(), [](const auto& f) { return !f.empty(); });
  };
  if (!total.defined() || any_failed()) return values;
  total.backward();
  if (failures) {
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      if (!tasks[i]->gradients_finite())
        (*failures)[i] = detail::str_cat("gradient is not finite (loss ", values[i], ")");
    }
    if (any_failed()) return values;
  }
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    if (std::isfinite(values[i])) tasks[i]->finish_step();
  }
  return values;
}

namespace {
// The tensors keep_best copies: every parameter, then every buffer.
std::vector<at::Tensor> state_tensors(const heads::Head& head) {
  std::vector<at::Tensor> out = head.parameters();
  for (const auto& b : head.buffers()) out.push_back(b);
  return out;
}
}  // namespace

void Task::keep_best() {
  torch::NoGradGuard no_grad;
  best_.clear();
  for (const auto& t : state_tensors(*head_)) best_.push_back(t.detach().clone());
}

bool Task::restore_best() {
  if (best_.empty()) return false;
  torch::NoGradGuard no_grad;
  const auto now = state_tensors(*head_);
  CANOPY_CHECK(now.size() == best_.size(), Error, "task '", config_.name, "': ", best_.size(),
               " kept tensors for ", now.size());
  for (std::size_t i = 0; i < now.size(); ++i) now[i].copy_(best_[i]);
  return true;
}

void Task::save_checkpoint(const std::string& path) const {
  // Serialised in memory, then written by canopy: a full disk is an IoError naming the
  // file (LibTorch's own writer aborts with "unexpected pos"), and no temporary file stays.
  write_file_atomic(path, checkpoint_bytes());
}

std::string Task::checkpoint_bytes() const {
  torch::serialize::OutputArchive archive;
  head_->save(archive);
  torch::serialize::OutputArchive opt;
  optimizer_->save(opt);
  archive.write("canopy.optimizer", opt);
  archive.write("canopy.rng_state", head_->rng().get_state());
  for (std::size_t i = 0; i < best_.size(); ++i) archive.write("canopy.best." + std::to_string(i), best_[i]);
  std::ostringstream bytes;
  archive.save_to(bytes);
  return std::move(bytes).str();
}

void Task::load_checkpoint(const std::string& path) {
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
    head_->load(archive);
    torch::serialize::InputArchive opt;
    archive.read("canopy.optimizer", opt);
    optimizer_->load(opt);
    at::Tensor rng_state;
    archive.read("canopy.rng_state", rng_state);
    head_->rng().set_state(rng_state);
    best_.clear();
    for (at::Tensor t; archive.try_read("canopy.best." + std::to_string(best_.size()), t); t = at::Tensor())
      best_.push_back(t);
  } catch (const c10::Error& e) {
    throw DataError(detail::str_cat("task '", config_.name, "': cannot restore checkpoint '", path,
                                    "': ", e.what_without_backtrace()));
  }
}

namespace {
// Rows a head is run on at once outside training. A split is evaluated in blocks of this
// many, so that its hidden activations take block x width, not rows x width: a 60 000-row
// split through two MLPs 2048 wide took 2.8 GB at once, concurrently on every worker.
constexpr std::int64_t kEvalRows = 4096;
}  // namespace

at::Tensor Task::outputs(const at::Tensor& features) {
  torch::NoGradGuard no_grad;
  head_->eval();
  const std::int64_t rows = features.size(0);
  const auto run = [&](const at::Tensor& x) {
    at::Tensor out = head_->forward(x);
    check_head_outputs(out, x.size(0), num_classes_, config_.name, *head_);
    return out;
  };
  if (rows <= kEvalRows) return run(features);
  std::vector<at::Tensor> blocks;
  blocks.reserve(static_cast<std::size_t>((rows + kEvalRows - 1) / kEvalRows));
  for (std::int64_t begin = 0; begin < rows; begin += kEvalRows)
    blocks.push_back(run(features.narrow(0, begin, std::min(kEvalRows, rows - begin))));
  return at::cat(blocks);
}

at::Tensor Task::predict(const at::Tensor& features) {
  const at::Tensor out = outputs(features);
  if (regression()) return out.squeeze(1).to(at::kDouble) * target_std_ + target_mean_;
  return multilabel() ? out.gt(at::tensor(cutoffs_, at::kFloat)).to(at::kLong) : out.argmax(1);
}

EvalMetrics Task::evaluate(const at::Tensor& features, const at::Tensor& targets) {
  const at::Tensor out = outputs(features);
  EvalMetrics m =
      regression()
          ? evaluate_outputs(config_.kind, out,
                             targets.squeeze(1).to(at::kDouble) * target_std_ + target_mean_, num_classes_,
                             target_mean_, target_std_)
          : evaluate_outputs(config_.kind, out, targets, num_classes_, 0.0, 1.0, cutoffs_, temperature());
  m.monitor = config_.monitor;
  return m;
}

EvalMetrics evaluate_outputs(TaskKind kind, const at::Tensor& outputs, const at::Tensor& targets,
                             std::int64_t num_classes, double target_mean, double target_std,
                             const std::vector<double>& cutoffs, double temperature) {
  if (kind == TaskKind::kRegression)
    return regression_metrics(outputs.squeeze(1).to(at::kDouble) * target_std + target_mean, targets);
  if (kind == TaskKind::kMultilabel) return multilabel_metrics(outputs, targets, cutoffs);
  EvalMetrics m = classification_metrics(outputs.argmax(1), targets, num_classes);
  if (num_classes > 5) m.top5 = top_k_accuracy(outputs, targets, 5);
  m.nll = multiclass_nll(outputs, targets, temperature);
  m.ece = expected_calibration_error(outputs, targets, temperature);
  return m;
}

namespace {
// log softmax(logits / temperature) in double, and the logits' rows checked against the targets'.
at::Tensor scaled_log_probs(const at::Tensor& logits, const at::Tensor& targets, double temperature) {
  CANOPY_CHECK(logits.dim() == 2 && logits.size(0) == targets.numel(), DataError, "multiclass logits ",
               logits.sizes(), " and targets ", targets.sizes(), ": expected [N, C] and [N]");
  CANOPY_CHECK(temperature > 0 && std::isfinite(temperature), DataError, "a temperature must be > 0, got ",
               temperature);
  return at::log_softmax(logits.to(at::kDouble) / temperature, 1);
}
}  // namespace

at::Tensor row_nll(const at::Tensor& logits, const at::Tensor& targets, double temperature) {
  return -scaled_log_probs(logits, targets, temperature)
              .gather(1, targets.to(at::kLong).reshape({-1, 1}))
              .reshape({-1});
}

double multiclass_nll(const at::Tensor& logits, const at::Tensor& targets, double temperature) {
  const at::Tensor nll = row_nll(logits, targets, temperature);
  return nll.numel() ? nll.mean().item<double>() : 0.0;
}

double expected_calibration_error(const at::Tensor& logits, const at::Tensor& targets, double temperature,
                                  std::int64_t bins) {
  const at::Tensor p = scaled_log_probs(logits, targets, temperature).exp();
  const std::int64_t n = p.size(0);
  if (n == 0) return 0.0;
  const auto [confidence, predicted] = p.max(1);
  const at::Tensor right = predicted.eq(targets.to(at::kLong).reshape({-1})).to(at::kDouble);
  // Bin b holds the confidences in (b / bins, (b + 1) / bins].
  const at::Tensor bin =
      (confidence * static_cast<double>(bins)).ceil().sub(1).clamp(0, bins - 1).to(at::kLong);
  // |bin| / N x |accuracy - confidence| = |rows right - sum of confidences| / N, per bin.
  const at::Tensor gap = at::bincount(bin, right, bins) - at::bincount(bin, confidence, bins);
  return gap.abs().sum().item<double>() / static_cast<double>(n);
}

double fit_temperature(const at::Tensor& logits, const at::Tensor& targets) {
  CANOPY_CHECK(logits.dim() == 2 && logits.size(0) == targets.numel() && logits.size(0) > 0, DataError,
               "a temperature is fitted on multiclass logits [N, C] and targets [N], N > 0; got ",
               logits.sizes(), " and ", targets.sizes());
  const at::Tensor z = logits.to(at::kDouble);
  CANOPY_CHECK(at::isfinite(z).all().item<bool>(), DataError, "a temperature is fitted on finite logits");
  const at::Tensor true_logit = z.gather(1, targets.to(at::kLong).reshape({-1, 1})).squeeze(1);
  // The mean NLL at beta = 1 / T is mean(logsumexp(beta z) - beta z_y): convex in beta, with
  // derivative mean(E_p[z] - z_y), p = softmax(beta z), increasing in beta.
  const auto slope = [&](double beta) {
    const at::Tensor p = at::softmax(z * beta, 1);
    return ((p * z).sum(1) - true_logit).mean().item<double>();
  };
  double lo = 0.01, hi = 100.0;       // beta
  if (slope(lo) >= 0) return 1 / lo;  // the least NLL at T = 100 or above: the bound
  if (slope(hi) <= 0) return 1 / hi;  // at T = 0.01 or below
  while (hi / lo > 1 + 1e-9) {
    const double mid = std::sqrt(lo * hi);
    (slope(mid) < 0 ? lo : hi) = mid;
  }
  return 1 / std::sqrt(lo * hi);
}

EvalMetrics regression_metrics(const at::Tensor& predictions, const at::Tensor& targets) {
  CANOPY_CHECK(predictions.numel() == targets.numel(), DataError, predictions.numel(), " predictions for ",
               targets.numel(), " targets");
  EvalMetrics m;
  m.regression = RegressionErrors{};
  m.count = targets.numel();
  if (m.count == 0) return m;
  const at::Tensor p = predictions.to(at::kDouble).flatten(), t = targets.to(at::kDouble).flatten();
  const at::Tensor err = p - t;
  m.regression->mae = err.abs().mean().item<double>();
  const double sse = (err * err).sum().item<double>();
  m.regression->rmse = std::sqrt(sse / static_cast<double>(m.count));
  const at::Tensor centred = t - t.mean();
  const double sst = (centred * centred).sum().item<double>();
  m.regression->r2 = sst > 0 ? 1.0 - sse / sst : (sse == 0 ? 1.0 : 0.0);
  return m;
}

double threshold_logit(double probability) { return std::log(probability / (1.0 - probability)); }
double logit_threshold(double logit) { return 1.0 / (1.0 + std::exp(-logit)); }

std::vector<double> configured_cutoffs(const TaskConfig& config, std::int64_t labels) {
  const double p = config.threshold == "tune" ? 0.5 : std::strtod(config.threshold.c_str(), nullptr);
  return std::vector<double>(static_cast<std::size_t>(labels), threshold_logit(p));
}

std::vector<double> f1_best_cutoffs(const at::Tensor& scores, const at::Tensor& targets) {
  CANOPY_CHECK(scores.sizes() == targets.sizes() && scores.dim() == 2, DataError, "multilabel scores ",
               scores.sizes(), " and targets ", targets.sizes(), " must both be [N, K]");
  const at::Tensor s = scores.to(at::kDouble).contiguous(), t = targets.gt(0.5).contiguous();
  const std::int64_t n = s.size(0);
  std::vector<double> out;
  for (std::int64_t j = 0; j < s.size(1); ++j) {
    const at::Tensor order = s.select(1, j).argsort(/*stable=*/true, /*dim=*/0, /*descending=*/true);
    const at::Tensor ranked = s.select(1, j).index_select(0, order).contiguous();
    const at::Tensor hits = t.select(1, j).index_select(0, order).contiguous();
    const double* v = ranked.data_ptr<double>();
    const bool* h = hits.data_ptr<bool>();
    std::int64_t positives = 0;
    for (std::int64_t r = 0; r < n; ++r) positives += h[r] ? 1 : 0;
    if (positives == 0) {
      out.push_back(0.0);
      continue;
    }
    // Giving the label to the first k rows (a cut between distinct scores): F1 = 2 TP / (k + P).
    double best_f1 = -1.0, cut = 0.0;
    std::int64_t tp = 0;
    for (std::int64_t k = 1; k <= n; ++k) {
      tp += h[k - 1] ? 1 : 0;
      if (k < n && v[k] == v[k - 1]) continue;  // a cut must separate distinct scores
      const double f1 = 2.0 * static_cast<double>(tp) / static_cast<double>(k + positives);
      if (f1 > best_f1) {
        best_f1 = f1;
        // Logits are compared as float32, a label given where the logit is over the cut: the
        // halfway point rounded to float must stay above the next row's score, else the cut is
        // that score itself. Every row: the float just below the lowest score.
        if (k == n) {
          cut = std::nextafter(static_cast<float>(v[n - 1]), -std::numeric_limits<float>::infinity());
        } else {
          const auto half = static_cast<float>((v[k - 1] + v[k]) / 2);
          cut = half > v[k] && half < v[k - 1] ? half : v[k];
        }
      }
    }
    out.push_back(cut);
  }
  return out;
}

at::Tensor labels_given(const at::Tensor& scores, const std::vector<double>& cutoffs) {
  return cutoffs.empty() ? scores.gt(0)
                         : scores.gt(at::tensor(cutoffs, at::kDouble).to(scores.scalar_type()));
}

EvalMetrics multilabel_metrics(const at::Tensor& scores, const at::Tensor& targets,
                               const std::vector<double>& cutoffs) {
  CANOPY_CHECK(scores.sizes() == targets.sizes() && scores.dim() == 2, DataError, "multilabel scores ",
               scores.sizes(), " and targets ", targets.sizes(), " must both be [N, K]");
  EvalMetrics m;
  m.count = scores.size(0);
  const std::int64_t k = scores.size(1);
  CANOPY_CHECK(cutoffs.empty() || static_cast<std::int64_t>(cutoffs.size()) == k, DataError, cutoffs.size(),
               " label thresholds for ", k, " labels");
  const at::Tensor pred = labels_given(scores, cutoffs);
  const at::Tensor truth = targets.gt(0.5);
  m.accuracy = m.count ? pred.eq(truth).all(1).to(at::kDouble).mean().item<double>() : 0.0;
  double f1 = 0, ap = 0;
  std::int64_t with_positives = 0;
  for (std::int64_t j = 0; j < k; ++j) {
    const at::Tensor p = pred.select(1, j), t = truth.select(1, j);
    LabelStats s;
    s.threshold = cutoffs.empty() ? 0.5 : logit_threshold(cutoffs[static_cast<std::size_t>(j)]);
    const double tp = p.logical_and(t).sum().item<double>();
    const double claimed = p.sum().item<double>();
    const double positives = t.sum().item<double>();
    s.support = static_cast<std::int64_t>(positives);
    s.predicted = static_cast<std::int64_t>(claimed);
    s.precision = claimed > 0 ? tp / claimed : 0.0;
    s.recall = positives > 0 ? tp / positives : 0.0;
    s.f1 = claimed + positives > 0 ? 2 * tp / (claimed + positives) : 1.0;  // nothing to find, none claimed
    f1 += s.f1;
    if (positives > 0) {
      // Average precision: mean of precision at each positive, ranking by score.
      ++with_positives;
      const at::Tensor order = scores.select(1, j).argsort(/*stable=*/true, /*dim=*/0, /*descending=*/true);
      const at::Tensor hits = t.index_select(0, order).to(at::kDouble);
      const at::Tensor precision = hits.cumsum(0) / at::arange(1, m.count + 1, at::kDouble);
      s.average_precision = (precision * hits).sum().item<double>() / positives;
      ap += *s.average_precision;
    }
    m.labels.push_back(s);
  }
  m.macro_f1 = k ? f1 / static_cast<double>(k) : 0.0;
  m.mean_ap = with_positives ? ap / static_cast<double>(with_positives) : 0.0;
  return m;
}

}  // namespace canopy::tasks
