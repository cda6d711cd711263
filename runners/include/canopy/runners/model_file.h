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
#include "canopy/trunk/trunk.h"

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

// `canopy trunk extract`: the trunk as canopy runs it up to its taps (trunk.taps, with
// trunk.expand's blocks inlined), as one TorchScript file that torch.jit.load reads:
//   forward(the trunk's inputs) -> the tap's output, unpooled (a tuple, one per tap, for several)
// with the trunk's weights as its file holds them; what comes after the last tap is left out.
// A feature extractor for Python, and what scripts/export_trunk.py compiles into an
// AOTInductor package of the user's own trunk. The extra file canopy/trunk.json names the
// outputs, the source file and its SHA-256.
struct TrunkFile {
  std::string path;
  std::string sha256;
  std::int64_t bytes = 0;
  std::vector<std::string> outputs;  // the taps, or "output"
  std::string inputs;                // forward's arguments, e.g. "x: Tensor"
};

// Writes `config`'s trunk, cut after its taps, to `path` (atomically). ConfigError for a
// compiled (.pt2) trunk or a tap whose output is not one tensor.
TrunkFile export_trunk_file(const trunk::TrunkConfig& config, const std::string& path);

std::string format_trunk_file(const TrunkFile& t);

}  // namespace canopy::runners
