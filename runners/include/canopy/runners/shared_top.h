// The trainable top of the trunk, shared by every task, over a cache of the frozen prefix's
// output (see docs/fine-tuning.md).
//
// One step: forward() runs the top once on the batch's cached rows; the heads train on its
// output (detached, concurrently: StepRunner::train_shared) and give back the gradient of
// their weighted losses with respect to it; step() back-propagates their sum through the
// top once and steps the top's optimizer. Blocks further down learn more slowly
// (TopConfig::lr_decay, one parameter group per block).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/datasets/feature_cache.h"
#include "canopy/runners/config.h"
#include "canopy/trunk/trunk.h"

namespace torch::optim {
class Optimizer;
}

namespace canopy::runners {

class SharedTop {
 public:
  // `trunk` loaded with the policy that made the cache (`meta`): its boundary must be the
  // cache's. `default_lr` is used when config.lr is 0.
  SharedTop(trunk::Trunk trunk, const TopConfig& config, const datasets::CacheMeta& meta, double default_lr);
  ~SharedTop();
  SharedTop(const SharedTop&) = delete;
  SharedTop& operator=(const SharedTop&) = delete;

  // The top's output on cached rows [B, row values] (storage dtype): with autograd and the
  // trunk in training mode when `training`, else without (eval mode). [B, D] float32, CPU.
  at::Tensor forward(const at::Tensor& rows, bool training);
  // forward(rows, false) over a whole split, `batch` rows at a time.
  at::Tensor features(const at::Tensor& rows, std::int64_t batch);
  // Back-propagates `grad` (the heads' combined dL/dz, [B, D]) through the top from its
  // output `z` and steps the optimizer. Throws Error when the top's gradient is not finite
  // (nothing is stepped) or its weights are not finite afterwards.
  void step(const at::Tensor& z, const at::Tensor& grad);
  // Sets the learning rates of epoch `epoch` (0-based) of `total` from the schedule.
  void start_epoch(std::int64_t epoch, std::int64_t total);

  std::int64_t feature_dim() const { return feature_dim_; }
  // e.g. "blocks.12, blocks.13 (952320 parameters; adam lr 0.0001 top block, /2.6 per block down)"
  std::string describe() const;
  std::vector<std::string> blocks() const { return trunk_.split().top_blocks; }
  const trunk::Trunk& trunk() const { return trunk_; }

  // Weights, optimizer state and LibTorch's default CPU generator (dropout in the top), in
  // one file, written atomically; load restores them exactly.
  void save_checkpoint(const std::string& path) const;
  void load_checkpoint(const std::string& path);
  // Writes the fine-tuned trunk (prefix unchanged, trained top) as one TorchScript file;
  // returns its SHA-256.
  std::string export_trunk(const std::string& path) const;

 private:
  std::vector<at::Tensor> unpack(const at::Tensor& rows) const;

  trunk::Trunk trunk_;
  TopConfig config_;
  std::vector<datasets::RowPart> parts_;
  std::vector<std::pair<std::string, at::Tensor>> params_;  // trainable, by name
  std::vector<double> base_lrs_;                            // per parameter group (block)
  std::int64_t feature_dim_ = 0;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
};

}  // namespace canopy::runners
