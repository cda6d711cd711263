// `canopy export`: the trained multi-task model as one TorchScript file that PyTorch
// (`torch.jit.load`) or LibTorch loads without canopy. It holds the preprocessing of [preprocess]
// (images) or takes the tokenizer's ids and mask (texts), the trunk the heads read (the
// config's, or the fine-tuned one), its taps and pooling, and every exported head; methods:
//   forward(images)            -> {task: output}   (uint8 [N, H, W] or [N, C, H, W])
//   forward(input_ids, mask)   -> {task: output}   (a text trunk)
//   features(...)              -> [N, D], what the cache holds
//   heads(features)            -> {task: output}
// An output is each class's probability (softmax) for a multiclass head, each label's
// (sigmoid) for a multilabel one, and the value in the label's units [N] for a regression.
// Attributes: class_names (task -> names), kinds (task -> multiclass|multilabel|regression) and
// thresholds (a multilabel task -> the probability over which each label is given);
// the extra file canopy/model.json records the trunk's SHA-256, the preprocessing, and each
// head's card. Built-in heads only (linear, mlp): a registered C++ head has no TorchScript form.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "canopy/runners/config.h"
#include "canopy/tasks/task.h"

namespace canopy::runners {

struct ModelFile {
  std::string path;
  std::string sha256;
  std::int64_t bytes = 0;
  std::vector<std::string> tasks;
  std::string inputs;  // what forward takes, e.g. "images: uint8 [N, H, W] or [N, C, H, W]"
  std::vector<std::string> notes;
};

// Writes the model of `config`'s exported heads to `path` (atomically). DataError when a head
// is missing or does not load (as for canopy predict), ConfigError for a head or trunk that has
// no TorchScript form.
ModelFile export_model_file(const JobConfig& config, const tasks::HeadRegistry& registry,
                            const std::string& path);

std::string format_model_file(const ModelFile& m);

}  // namespace canopy::runners
