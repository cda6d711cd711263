// A task: a head, the labels it learns (a label source of the cache, optionally mapped to
// coarser classes), its loss, optimizer and metrics. Tasks are independent of each other,
// which is what lets the trainer run them concurrently on the same feature batch.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/heads/head.h"
#include "canopy/tasks/fused_optimizer.h"
#include "canopy/tasks/registry.h"

namespace torch::optim {
class Optimizer;
}

namespace canopy::tasks {

// What a task predicts, and with which loss.
enum class TaskKind {
  kMulticlass,  // one class per sample, cross-entropy
  kMultilabel,  // a set of labels per sample, binary cross-entropy
  kRegression,  // a real value (a float label source), MSE or L1
};
enum class OptimizerKind { kSgd, kAdam, kAdamW };
enum class LrSchedule { kConstant, kCosine, kStep };  // the learning rate per epoch
enum class RegressionLoss { kMse, kL1 };
// What a head's epochs are chosen by (early stopping, train.export = best, a grid's winner and
// its halving): auto (accuracy; mean AP for a multilabel head, R^2 for a regression),
// accuracy, macro_f1, mean_ap (multilabel), nll (multiclass; lower is better).
enum class Monitor { kAuto, kAccuracy, kMacroF1, kMeanAp, kNll };

// Names as configs and cards spell them ("multiclass", "adamw", "cosine", "l1"), and back;
// parsing an unknown name is a ConfigError naming `what`, the value and the choices.
const char* to_string(TaskKind kind);
const char* to_string(OptimizerKind optimizer);
const char* to_string(LrSchedule schedule);
const char* to_string(RegressionLoss loss);
const char* to_string(Monitor monitor);
TaskKind parse_task_kind(const std::string& name, const std::string& what);
OptimizerKind parse_optimizer(const std::string& name, const std::string& what);
LrSchedule parse_schedule(const std::string& name, const std::string& what);
RegressionLoss parse_regression_loss(const std::string& name, const std::string& what);
Monitor parse_monitor(const std::string& name, const std::string& what);
// Every name each enum accepts, in declaration order (config reference, choices).
std::vector<std::string> task_kind_names();
std::vector<std::string> optimizer_names();
std::vector<std::string> schedule_names();
std::vector<std::string> regression_loss_names();
std::vector<std::string> monitor_names();

// An optimizer over parameter groups (each group starts at `lr`; change a group's rate
// through param_groups()), as tasks and the trunk's trainable top configure them.
std::unique_ptr<torch::optim::Optimizer> make_optimizer(OptimizerKind kind,
                                                        const std::vector<std::vector<at::Tensor>>& groups,
                                                        double lr, double weight_decay, double momentum);
// The factor a schedule applies to the learning rate in epoch `epoch` (0-based) of `total`:
// 1 (constant), half a cosine from 1 to 0 (cosine), gamma^(epoch / step_size) (step).
double lr_factor(LrSchedule schedule, std::int64_t epoch, std::int64_t total, std::int64_t step_size,
                 double gamma);

struct TaskConfig {
  std::string name;
  // A grid member ([task.<grid>] with lists of values, expanded by the config; see
  // docs/training.md): the grid's name, the keys that vary as written there (`lr` ->
  // "1e-4, 1e-3") and this member's value of each. Empty for a task of its own.
  std::string grid;
  std::map<std::string, std::string> grid_axes;
  std::map<std::string, std::string> grid_point;
  // The name the config writes it under ([task.<it>]) and exports it as: its grid's for a
  // member, else its own.
  const std::string& written_name() const { return grid.empty() ? name : grid; }
  TaskKind kind = TaskKind::kMulticlass;
  std::string head = "linear";
  std::string labels = "class";          // label source in the cache
  std::vector<std::int64_t> label_map;   // multiclass: source class -> task class (empty:
                                         // identity); multilabel: source class -> bitmask
                                         // of the labels it carries (bit k = class_names[k])
  std::vector<std::string> class_names;  // names of the task's classes (optional)
  OptimizerKind optimizer = OptimizerKind::kAdam;
  double lr = 1e-3;
  double loss_weight = 1.0;  // scales the loss's gradient (what reaches a shared top, and the head's)
  double weight_decay = 0.0;
  double momentum = 0.9;    // sgd only
  std::int64_t epochs = 0;  // 0: use train.epochs
  LrSchedule schedule = LrSchedule::kConstant;
  std::int64_t step_size = 5;  // step schedule: multiply by gamma every step_size epochs
  double gamma = 0.1;
  std::int64_t early_stop_patience = 0;  // stop after this many epochs without a better
                                         // eval accuracy; 0: never
  double label_smoothing = 0.0;
  std::vector<double> class_weights;  // per task class, for the loss; empty: equal
  // Multilabel: per label, the weight of its positive rows in the binary cross-entropy
  // (pos_weight); above 1 a rare label's misses cost more. Empty: 1 each.
  std::vector<double> positive_weights;
  // class_weights = balanced / positive_weights = balanced: the weights come from the training
  // rows' labels when the run starts (Task::balance_weights); the lists above stay empty.
  bool balanced_class_weights = false;
  bool balanced_positive_weights = false;
  std::optional<RegressionLoss> loss;  // regression only; unset: mse
  // Multilabel: a label is given where its probability is over this ("0.5", any value in
  // (0, 1)), or "tune": per label, the F1-best cut on the validation split, chosen once on
  // the exported weights (Task::tune_thresholds).
  std::string threshold = "0.5";
  // Multiclass: "none", or "temperature": the probabilities are softmax(logits / T), T fitted
  // once on the validation split to the exported weights (Task::calibrate; temperature
  // scaling, Guo et al. 2017). The classes given do not change, only how sure the head says it is.
  std::string calibrate = "none";
  Monitor monitor = Monitor::kAuto;                // what its epochs (and a grid's winner) are chosen by
  std::map<std::string, std::string> head_params;  // the head's options ([task.<name>.head])
};

// Checks values that need no data; `source_classes` is the number of classes of the label
// source (0 when unknown).
void validate_task_config(const TaskConfig& config, std::int64_t source_classes);

// A head's outputs for `rows` rows must be [rows, out_features] and floating-point: another
// shape would not fail but give a wrong answer (a [B] output broadcasts against [B, 1]
// regression targets into a [B, B] loss; [B, K + 1] trains a class that does not exist). An
// Error naming the task, the head and both shapes when they are not.
void check_head_outputs(const at::Tensor& out, std::int64_t rows, std::int64_t out_features,
                        const std::string& task, const heads::Head& head);

// A regression head's errors on a split: mean absolute error, root mean squared error, and
// the coefficient of determination R^2 = 1 - SSE / SST (1 perfect, 0 = predicting the mean).
struct RegressionErrors {
  double mae = 0.0;
  double rmse = 0.0;
  double r2 = 0.0;
};

// One label of a multilabel head on a split, at its threshold.
struct LabelStats {
  double threshold = 0.5;      // the probability over which the head gives the label
  std::int64_t support = 0;    // rows carrying the label
  std::int64_t predicted = 0;  // rows the head gives it
  double precision = 0.0, recall = 0.0;
  double f1 = 0.0;                          // 1 when no row carries it and the head gives it to none
  std::optional<double> average_precision;  // over the rows ranked by score; none without positives
};

// How a head did on a split: one type for every task kind; what only one kind has is optional.
struct EvalMetrics {
  std::int64_t count = 0;
  double accuracy = 0.0;           // multilabel: exact-match ratio (every label right); regression: 0
  double macro_f1 = 0.0;           // multilabel: mean over labels of F1 at their thresholds; regression: 0
  at::Tensor confusion;            // multiclass: int64 [K, K], rows = truth, columns = prediction
  std::optional<double> mean_ap;   // multilabel: mean over labels of average precision
  std::vector<LabelStats> labels;  // multilabel: per label, in class_names' order
  // Multiclass over more than 5 classes: the share of rows whose class is among the head's 5
  // highest scores (what ImageNet-style evaluations report beside accuracy as Acc@5).
  std::optional<double> top5;
  std::optional<RegressionErrors> regression;  // regression
  // Multiclass: how well the probabilities (softmax of the logits / the head's temperature)
  // fit: the mean negative log-likelihood of the true class, and the expected calibration
  // error (expected_calibration_error).
  std::optional<double> nll;
  std::optional<double> ece;
  Monitor monitor = Monitor::kAuto;  // the task's (Task::evaluate sets it)
  // What early stopping, train.export = best and a grid's choice maximise: the monitored
  // metric (auto: accuracy, or R^2), negated where lower is better (nll).
  double score() const;
  // The monitored metric's name as messages say it ("accuracy", "R^2", "macro-F1", "mean AP",
  // "NLL"), and its value for a score (-score for nll).
  const char* score_name() const;
  double score_value(double score) const { return monitor == Monitor::kNll ? -score : score; }
};

// Per-class counts and scores from a confusion matrix (rows = truth).
struct ClassStats {
  std::int64_t support = 0;    // rows of this class
  std::int64_t predicted = 0;  // rows predicted as this class
  double precision = 0.0, recall = 0.0, f1 = 0.0;
};
std::vector<ClassStats> per_class_stats(const at::Tensor& confusion);

EvalMetrics classification_metrics(const at::Tensor& predictions, const at::Tensor& targets,
                                   std::int64_t num_classes);
// The share of rows whose target class is among the k highest of their scores [N, C]
// (ties broken as at::topk breaks them); targets: [N] class indices.
double top_k_accuracy(const at::Tensor& scores, const at::Tensor& targets, std::int64_t k);
// The labels a multilabel head gives, [N, K] bool: each label whose logit is over its cut
// (`cutoffs`, one per label; empty: 0, probability 0.5).
at::Tensor labels_given(const at::Tensor& scores, const std::vector<double>& cutoffs);
// scores: [N, K] logits; targets: [N, K] in {0, 1}. Label j is given where its logit is over
// cutoffs[j] (empty: 0 for every label, probability 0.5).
EvalMetrics multilabel_metrics(const at::Tensor& scores, const at::Tensor& targets,
                               const std::vector<double>& cutoffs = {});
// Per label, the logit cut with the best F1 on these rows: halfway between the two adjacent
// distinct scores it separates (giving the label to the rows above), the smallest such set on a
// tie; 0 (probability 0.5) for a label no row carries.
std::vector<double> f1_best_cutoffs(const at::Tensor& scores, const at::Tensor& targets);
// A probability threshold as a logit cut, and back.
double threshold_logit(double probability);
double logit_threshold(double logit);
// The cuts `config.threshold` gives `labels` labels before any tuning (0.5 for "tune").
std::vector<double> configured_cutoffs(const TaskConfig& config, std::int64_t labels);
// Multiclass logits [N, C] against class indices [N], the probabilities being
// softmax(logits / temperature): the mean negative log-likelihood of the true class, and the
// expected calibration error over `bins` equal-width bins of the top class's probability
// (confidence): sum over bins of |bin| / N x |accuracy - mean confidence| (Guo et al. 2017;
// 15 bins as there). 0 for no rows.
double multiclass_nll(const at::Tensor& logits, const at::Tensor& targets, double temperature = 1.0);
// Each row's negative log-likelihood of its target at that temperature (double [N]): what
// multiclass_nll averages.
at::Tensor row_nll(const at::Tensor& logits, const at::Tensor& targets, double temperature = 1.0);
double expected_calibration_error(const at::Tensor& logits, const at::Tensor& targets,
                                  double temperature = 1.0, std::int64_t bins = 15);
// The temperature T in [0.01, 100] whose softmax(logits / T) has the least mean negative
// log-likelihood on these rows (convex in 1 / T: found by bisection on its derivative, to a
// relative 1e-9).
double fit_temperature(const at::Tensor& logits, const at::Tensor& targets);
// predictions, targets: [N] real values.
EvalMetrics regression_metrics(const at::Tensor& predictions, const at::Tensor& targets);

// Source labels [B] -> what a task of `num_classes` outputs is scored against: class indices
// [B] (multiclass, through label_map when it has one), multi-hot float [B, K] (multilabel), or
// the values as double [B] (regression; Task::targets standardises them for training). A
// DataError names the task when a label lies outside its classes or its label_map.
at::Tensor source_targets(const TaskConfig& config, std::int64_t num_classes,
                          const at::Tensor& source_labels);
// The metrics of a head's outputs [N, K] against source_targets' targets: classes by argmax
// (top-5 over more than 5), labels by a logit over their cutoffs (empty: 0), a regression's
// value as output * target_std + target_mean (its outputs are in standardised units); a
// multiclass head's probabilities (nll, ece) as softmax(outputs / temperature).
EvalMetrics evaluate_outputs(TaskKind kind, const at::Tensor& outputs, const at::Tensor& targets,
                             std::int64_t num_classes, double target_mean = 0.0, double target_std = 1.0,
                             const std::vector<double>& cutoffs = {}, double temperature = 1.0);

// A temperature fitted on a validation split (calibrate = temperature). The rows' count and
// their NLL at the temperature are what evaluate() on the same rows reports after.
struct TemperatureFit {
  double temperature = 1.0;
  double nll_before = 0.0;  // the rows' mean negative log-likelihood at temperature 1
};

// Where a head stands in a training run (the trainer keeps it, see runners/head_run.h).
enum class TaskState { kTraining, kDone, kFailed };

class Task {
 public:
  // Builds the head through the registry. `in_features` is the cache's feature dimension,
  // `source_classes` the number of classes of the label source. The head's initial weights
  // and its own generator (dropout) come from `seed` alone; LibTorch's default generator is
  // left as it was (see task.cpp).
  Task(TaskConfig config, const HeadRegistry& registry, std::int64_t in_features, std::int64_t source_classes,
       std::uint64_t seed);
  ~Task();
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;

  const TaskConfig& config() const { return config_; }
  // What the loss is scaled by in the backward pass: config().loss_weight until set (a
  // loss weighting sets it before each step; see runners/weighting.h).
  double loss_weight() const { return loss_weight_; }
  void set_loss_weight(double w) { loss_weight_ = w; }
  const std::string& name() const { return config_.name; }
  std::int64_t num_classes() const { return num_classes_; }
  heads::Head& head() { return *head_; }
  const heads::Head& head() const { return *head_; }
  const heads::HeadPtr& head_ptr() const { return head_; }
  // A member of a grid over head types: the head options its head did not take.
  const std::vector<std::string>& unused_head_options() const { return unused_head_options_; }

  // Regression: targets are standardised, (y - mean) / std, for training; predict and
  // evaluate answer in the original units. Default: mean 0, std 1.
  void set_target_scale(double mean, double std);
  double target_mean() const { return target_mean_; }
  double target_std() const { return target_std_; }
  // Maps source labels to this task's targets: class indices, multi-hot rows, or
  // standardised values [B, 1] (regression).
  at::Tensor targets(const at::Tensor& source_labels) const;
  // Sets the learning rate of epoch `epoch` (0-based) of `total` from the schedule.
  void start_epoch(std::int64_t epoch, std::int64_t total);
  double current_lr() const;
  // One optimisation step on a batch; returns the loss (unweighted). Throws on a non-finite
  // loss, and with `check_gradients` on a non-finite gradient, before stepping. The
  // backward pass is of loss_weight x loss (gradients also reach `features` if it requires
  // them: a shared top's output).
  double train_step(const at::Tensor& features, const at::Tensor& targets, bool check_gradients = false);
  // Whether every gradient of the head's parameters is finite.
  bool gradients_finite() const;
  // train_step in parts, for fused_train_step: begin (train mode, zero gradients), the
  // loss of this head's outputs, and the optimizer step once the gradients are in.
  void begin_step();
  at::Tensor loss(const at::Tensor& outputs, const at::Tensor& targets) const;
  void finish_step();
  // Multilabel: each label's logit cut (config().threshold's, or tuned); empty otherwise.
  const std::vector<double>& cutoffs() const { return cutoffs_; }
  // threshold = tune: sets each label's cut to the F1-best on these rows (f1_best_cutoffs of
  // the head's outputs); the metrics and predictions after use them.
  void tune_thresholds(const at::Tensor& features, const at::Tensor& targets);
  // calibrate = temperature: fits the temperature on these rows (fit_temperature of the head's
  // logits); the metrics after use it. Nothing otherwise.
  void calibrate(const at::Tensor& features, const at::Tensor& targets);
  // Multiclass: what the logits are divided by before the softmax (1 until calibrated).
  double temperature() const { return fit_ ? fit_->temperature : 1.0; }
  const std::optional<TemperatureFit>& temperature_fit() const { return fit_; }
  // Predictions for a batch (eval mode, no grad): [B] class indices (multiclass), [B, K]
  // 0/1 label indicators (multilabel) or [B] values (regression).
  at::Tensor predict(const at::Tensor& features);
  // Metrics of the head on a whole split (eval mode).
  EvalMetrics evaluate(const at::Tensor& features, const at::Tensor& targets);
  // The head's raw outputs (eval mode, no grad), run over the rows in blocks of a few
  // thousand: a split's activations never all at once.
  at::Tensor outputs(const at::Tensor& features);
  // Per-class weights of the cross-entropy (float [C]), undefined when the task has none.
  const at::Tensor& class_weights() const { return class_weights_; }
  // Multilabel: per-label pos_weight of the binary cross-entropy (float [K]), or undefined.
  const at::Tensor& positive_weights() const { return positive_weights_; }
  // class_weights / positive_weights = balanced: sets them from the training rows' targets
  // (as targets() gives them) and returns them; empty when the task balances nothing.
  // Multiclass: rows / (classes x the class's rows), scikit-learn's "balanced" (the mean
  // weight of a row is 1); a class with no training row is a ConfigError naming it (its
  // weight would be infinite). Multilabel: per label, its negative rows / its positive rows,
  // the pos_weight PyTorch's documentation derives; 1 for a label that no row, or every row,
  // carries (nothing to balance).
  std::vector<double> balance_weights(const at::Tensor& train_targets);
  bool multilabel() const { return config_.kind == TaskKind::kMultilabel; }
  bool regression() const { return config_.kind == TaskKind::kRegression; }

  // The head's weights at its best epoch (train.export = best): keep_best copies its
  // parameters and buffers, restore_best puts them back (false when none were kept).
  void keep_best();
  bool restore_best();
  bool has_best() const { return !best_.empty(); }

  // Head weights and buffers, optimizer state, the head's RNG state and the kept best
  // weights, in one file (LibTorch's archive format), written atomically (IoError naming the
  // file, e.g. when the disk is full; the previous file stays); load restores all exactly.
  void save_checkpoint(const std::string& path) const;
  // What save_checkpoint writes, serialised in memory.
  std::string checkpoint_bytes() const;
  void load_checkpoint(const std::string& path);

 private:
  TaskConfig config_;
  double loss_weight_ = 1.0;
  std::int64_t num_classes_ = 0;
  at::Tensor class_weights_;
  at::Tensor positive_weights_;  // multilabel: float [K], undefined when the task has none
  double target_mean_ = 0.0;
  double target_std_ = 1.0;
  heads::HeadPtr head_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  FusedOptimizerStep optimizer_step_;
  std::vector<at::Tensor> best_;  // parameters then buffers, in the head's order
  std::vector<double> cutoffs_;   // multilabel: per label
  std::optional<TemperatureFit> fit_;
  std::vector<std::string> unused_head_options_;
};

// One training step of several tasks whose heads share a fusion key (heads::fusion_key):
// one fused forward pass and one backward pass for all of them. Returns each task's loss;
// a task whose loss is not finite gets no optimizer step (the caller marks it failed), and
// since every head's gradient comes only from its own loss, the others are unaffected.
// With `failures` (sized like tasks), a failing head stops the whole group: when a loss or a
// head's gradient is not finite, failures[i] says so for each culprit and NO head steps (a
// shared input's gradient would carry the culprit's part; the caller retries the others).
std::vector<double> fused_train_step(const std::vector<Task*>& tasks, const at::Tensor& features,
                                     const std::vector<at::Tensor>& targets,
                                     std::vector<std::string>* failures = nullptr);

}  // namespace canopy::tasks
