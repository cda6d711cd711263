// A task: a head, the labels it learns (a label source of the cache, optionally mapped to
// coarser classes), its loss, optimizer and metrics. Tasks are independent of each other,
// which is what lets the trainer run them concurrently on the same feature batch.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/heads/head.h"
#include "canopy/tasks/registry.h"

namespace torch::optim {
class Optimizer;
}

namespace canopy::tasks {

struct TaskConfig {
  std::string name;
  std::string head = "linear";
  std::string labels = "class";           // label source in the cache
  std::vector<std::int64_t> label_map;    // source class -> task class; empty: identity
  std::vector<std::string> class_names;   // names of the task's classes (optional)
  std::string optimizer = "adam";         // sgd | adam | adamw
  double lr = 1e-3;
  double weight_decay = 0.0;
  double momentum = 0.9;                  // sgd only
  std::int64_t epochs = 0;                // 0: use train.epochs
  std::map<std::string, std::string> head_params;  // every other task.<name>.* key
};

// Checks values that need no data; `source_classes` is the number of classes of the label
// source (0 when unknown).
void validate_task_config(const TaskConfig& config, std::int64_t source_classes);

struct ClassificationMetrics {
  std::int64_t count = 0;
  double accuracy = 0.0;
  double macro_f1 = 0.0;
  at::Tensor confusion;  // int64 [K, K], rows = truth, columns = prediction
};

ClassificationMetrics classification_metrics(const at::Tensor& predictions,
                                             const at::Tensor& targets, std::int64_t num_classes);

enum class TaskState { kTraining, kDone, kFailed };

class Task {
 public:
  // Builds the head through the registry. `in_features` is the cache's feature dimension,
  // `source_classes` the number of classes of the label source.
  Task(TaskConfig config, const HeadRegistry& registry, std::int64_t in_features,
       std::int64_t source_classes, std::uint64_t seed);
  ~Task();
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;

  const TaskConfig& config() const { return config_; }
  const std::string& name() const { return config_.name; }
  std::int64_t num_classes() const { return num_classes_; }
  heads::Head& head() { return *head_; }
  const heads::HeadPtr& head_ptr() const { return head_; }

  // Maps source labels to this task's classes.
  at::Tensor targets(const at::Tensor& source_labels) const;
  // One optimisation step on a batch; returns the loss. Throws on a non-finite loss.
  double train_step(const at::Tensor& features, const at::Tensor& targets);
  // Predicted classes for a batch (eval mode, no grad).
  at::Tensor predict(const at::Tensor& features);

  // Head weights and buffers, optimizer state and the head's RNG state, in one file
  // (LibTorch's archive format); load restores all three exactly.
  void save_checkpoint(const std::string& path) const;
  void load_checkpoint(const std::string& path);

  TaskState state = TaskState::kTraining;
  std::string failure;  // why the task failed, with epoch and step

 private:
  TaskConfig config_;
  std::int64_t num_classes_ = 0;
  at::Tensor map_;  // int64 [source_classes] or undefined
  heads::HeadPtr head_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
};

}  // namespace canopy::tasks
