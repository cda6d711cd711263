// The trainable top of the trunk, shared by every task, over a cache of the frozen prefix's
// output (see docs/fine-tuning.md).
//
// One step: forward() runs the top once on the batch's cached rows; the heads train on its
// output (detached, concurrently: StepRunner::train_shared) and give back the gradient of
// their weighted losses with respect to it; step() back-propagates their sum through the
// top once and steps the top's optimizer. Blocks further down learn more slowly
// (TopConfig::lr_decay, one parameter group per block).
//
// Freezing schedules (TopConfig::schedule, freeze_schedule.h) hold the lowest blocks of the
// top frozen for a while: they run without autograd and in eval mode. Under autofreeze,
// blocks frozen for good become a cache level: during the next epoch's forward passes the
// output of the highest frozen block is stored for every training row (it is computed
// anyway), and from the epoch after it is read instead of computed
// (<level_dir>/<block>.h5, datasets/level_file.h): held in memory beside a train split in
// memory, read from the file by row over a split that streams or when too large to hold.
// The schedule's state is in the checkpoint.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/datasets/feature_cache.h"
#include "canopy/datasets/level_file.h"
#include "canopy/runners/config.h"
#include "canopy/tasks/fused_optimizer.h"
#include "canopy/trunk/trunk.h"

namespace torch::optim {
class Optimizer;
}

namespace canopy::runners {

// A hash of tensors' bytes, in order, continuing `h`: what MPI ranks compare to check that
// their replicas of the same weights agree.
std::uint64_t hash_weights(const std::vector<at::Tensor>& tensors, std::uint64_t h = 0);

// What a top over a cached prefix refuses before it trains, from the trunk's split alone:
// trainable parameters outside its blocks, an autofreeze that could freeze nothing (a top of no
// more blocks than trunk.min_trainable) or whose levels would cut the trunk where it cannot be
// cut. A ConfigError naming them. (`trunk` is not const: cut_problem traces it.)
void check_top(trunk::Trunk& trunk, const TopConfig& config);

class SharedTop {
 public:
  // `trunk` loaded with the policy that made the cache (`meta`): its boundary must be the
  // cache's. `default_lr` is used when config.lr is 0.
  // `train_rows` and `steps_per_epoch` size the cache levels and autofreeze's interval;
  // levels are kept in `level_dir`.
  SharedTop(trunk::Trunk trunk, const TopConfig& config, const datasets::CacheMeta& meta, double default_lr,
            std::int64_t train_rows, std::int64_t steps_per_epoch, std::string level_dir);
  ~SharedTop();
  SharedTop(const SharedTop&) = delete;
  SharedTop& operator=(const SharedTop&) = delete;

  // The top's output on cached rows [B, row values] (storage dtype): with autograd and the
  // trunk in training mode when `training`, else without (eval mode). [B, D] float32, CPU.
  // Training rows read a cache level by `index` (their positions in the split; needed once
  // autofreeze has frozen a block).
  at::Tensor forward(const at::Tensor& rows, bool training, const at::Tensor& index = at::Tensor());
  // A step skipped on resume: stores the cache level rows that step would have written.
  void replay(const at::Tensor& rows, const at::Tensor& index);
  // forward(rows, false) over a whole split, `batch` rows at a time; with blocks held frozen,
  // their output on `rows` is kept from one call to the next (keeps_eval_level).
  at::Tensor features(const at::Tensor& rows, std::int64_t batch);
  // Back-propagates `grad` (the heads' combined dL/dz, [B, D]) through the top from its
  // output `z` and steps the optimizer, at step `step_in_epoch` (0-based) of the epoch
  // start_epoch began: the warm-up's rate follows from it (TopConfig::lr_warmup_steps), and
  // the gradient is clipped to TopConfig::max_grad_norm. Throws Error when the top's gradient
  // is not finite (nothing is stepped) or its weights are not finite afterwards.
  void step(const at::Tensor& z, const at::Tensor& grad, std::int64_t step_in_epoch);
  // Under mpirun (data parallel): the element-wise sum over ranks of every trainable
  // parameter's gradient, in buckets of `bucket_bytes`, between the backward pass and the
  // optimizer's step in step(); the seconds spent in it so far.
  void set_data_parallel(std::int64_t bucket_bytes) { allreduce_bucket_bytes_ = bucket_bytes; }
  double allreduce_seconds() const { return allreduce_seconds_; }
  std::int64_t allreduce_steps() const { return allreduce_steps_; }
  // A hash of the top's weights (every parameter's bytes), to check that ranks agree.
  std::uint64_t weights_hash() const;
  // Whether any block of the top trains now (gradual: not during the warm-up).
  bool trains() const { return frozen_ < static_cast<std::int64_t>(top_blocks_.size()); }
  // Sets the learning rates of epoch `epoch` (0-based) of `total` from the schedule, and
  // which blocks train; `first_step` > 0 when a run resumes in the middle of the epoch (the
  // epoch's statistics in TopEpoch then go on from the checkpoint's).
  void start_epoch(std::int64_t epoch, std::int64_t total, std::int64_t first_step);
  // The top's training steps before epoch `epoch` (0-based): every step of an epoch in which
  // a block trains (gradual's warm-up epochs train none). What the learning-rate warm-up counts.
  std::int64_t steps_before(std::int64_t epoch) const;
  // After an epoch's steps: a cache level written during it is complete, saved, and read
  // from now on. Returns what the epoch did.
  TopEpoch end_epoch();
  // Removes level files no checkpoint needs any more (call after a checkpoint is saved).
  void prune_levels() const;
  // The training rows of the cache (the split in memory, in the order batches index it): a
  // cache level that is missing, corrupt or not this run's is computed again from them when a
  // run resumes, instead of refused.
  void set_train_rows(at::Tensor rows) { train_rows_in_memory_ = std::move(rows); }
  // What a level may take in memory (autofreeze's over the training rows, or the frozen blocks'
  // output evaluation keeps): `why_not_in_memory(its bytes)` gives a reason it should not be
  // held (it would pass cache.memory_cap_mb, or the memory the process may take), else "".
  void limit_levels_in_memory(std::function<std::string(std::uint64_t)> why_not_in_memory) {
    why_not_in_memory_ = std::move(why_not_in_memory);
  }
  // Autofreeze's levels may be kept on disk, read by row, `rows` to a level (the streamed
  // split's, held-out ones included, as its batches index the split; or the training rows in
  // memory). Over a split in memory a level goes there when limit_levels_in_memory's reason
  // says it should not be held. Without this (trunk.level_on_disk = false, mpirun) a streamed
  // split keeps no level: the blocks it froze are computed in every step, without autograd.
  void keep_levels_on_disk(std::int64_t rows) { disk_rows_ = rows; }
  // How the tasks' losses reach the top (weighting.h); its state is checkpointed with the top.
  void set_weighting(LossWeighting* weighting) { weighting_ = weighting; }

  std::int64_t feature_dim() const { return feature_dim_; }
  // e.g. "blocks.12, blocks.13 (952320 parameters; adam lr 0.0001 top block, /2.6 per block down)"
  std::string describe() const;
  std::vector<std::string> blocks() const { return trunk_.split().top_blocks; }
  const trunk::Trunk& trunk() const { return trunk_; }

  // train.export = best: the top's weights at the epoch (1-based) with the best score so far
  // (on the validation split: the tasks' mean, or train.export_monitor's), kept in memory and
  // in every checkpoint;
  // restore_best puts them back for the export (false when none were kept).
  void keep_best(std::int64_t epoch, double score);
  bool restore_best();
  std::int64_t best_epoch() const { return best_epoch_; }
  double best_score() const { return best_score_; }

  // Weights, optimizer state and LibTorch's default CPU generator (dropout in the top),
  // serialised as one checkpoint file (CheckpointStore writes it); load restores them exactly.
  std::string checkpoint_bytes() const;
  void load_checkpoint(const std::string& path);
  // Writes the fine-tuned trunk (prefix unchanged, trained top) as one TorchScript file;
  // returns its SHA-256.
  std::string export_trunk(const std::string& path) const;

 private:
  // The cached parts of a batch; texts cut to the batch's longest mask (*len; -1 otherwise).
  std::vector<at::Tensor> unpack(const at::Tensor& rows, std::int64_t* len = nullptr) const;
  // The block whose output feeds the top now, with parts[0] replaced by it (a cache level,
  // and the pending level computed and stored).
  std::string feed(std::vector<at::Tensor>& parts, std::int64_t len, const at::Tensor& index);
  // A block's output on a batch as a level stores it (texts: padded from the batch's length
  // `len` to the cache's; -1: as it is).
  at::Tensor as_stored(const at::Tensor& out, std::int64_t len) const;
  void hold(std::int64_t frozen);
  // The learning rates' factor at the top's training step `k` of the run: this epoch's
  // schedule, times the warm-up's (k + 1) / lr_warmup_steps while k is below it.
  double rate_factor(std::int64_t k) const;
  // Scales the gradient (`grads`: each parameter's that has one) down to max_grad_norm when
  // its L2 norm `norm` is above it.
  void clip_gradient(std::vector<at::Tensor>& grads, double norm);
  void all_reduce_gradients();
  std::int64_t allreduce_bucket_bytes_ = 0;  // 0: one process
  double allreduce_seconds_ = 0;
  std::int64_t allreduce_steps_ = 0;
  void track_gradients();
  // The output of the blocks held frozen on the evaluation rows `rows`, per batch of `batch`.
  struct EvalLevel {
    at::Tensor rows;  // what it was computed on (held, so that its address names it)
    std::int64_t batch = 0, frozen = 0;
    std::vector<at::Tensor> outs;  // filled by the first evaluation
  };
  EvalLevel eval_level_;
  bool keeps_eval_level(const at::Tensor& rows, std::int64_t batch);
  at::Tensor evaluate(std::vector<at::Tensor>& parts, std::optional<std::size_t> kept);
  std::string level_path(std::int64_t level) const;
  std::string level_fingerprint(std::int64_t level) const;
  void load_level(std::int64_t level);
  // Levels on disk (keep_levels_on_disk, one process): a writer for `level`, or a log line
  // saying why not (no room); the level file read, or a log line saying why not.
  bool disk_levels() const;
  // Whether `level` (its block's output per row of `shape`, block_shape) is kept on disk,
  // over a split in memory: when limit_levels_in_memory's reason says it should not be held
  // (logged).
  bool level_goes_to_disk(std::int64_t level, const std::vector<std::int64_t>& shape);
  // Starts storing `level` this epoch: in memory, or on disk; false when neither can be.
  bool begin_level(std::int64_t level);
  bool open_level_writer(std::int64_t level, const std::vector<std::int64_t>& shape);
  bool open_level_reader(std::int64_t level);
  void drop_disk_level(const std::string& why);
  void rebuild_level(std::int64_t level, const std::string& why);
  std::vector<std::int64_t> level_shape(std::int64_t level);  // checked against level_rows_
  std::vector<std::int64_t> block_shape(std::int64_t level);  // one row of the block's output
  void gather_pending();

  trunk::Trunk trunk_;
  TopConfig config_;
  std::vector<datasets::RowPart> parts_;
  std::vector<std::pair<std::string, at::Tensor>> params_;  // trainable, by name
  std::vector<double> base_lrs_;                            // per parameter group (block)
  std::int64_t feature_dim_ = 0;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  tasks::FusedOptimizerStep optimizer_step_;
  std::string cache_fingerprint_;
  std::vector<std::string> top_blocks_;                // lowest first
  std::vector<std::vector<at::Tensor>> block_params_;  // per top block
  std::int64_t train_rows_ = 0;
  at::Tensor train_rows_in_memory_;  // set_train_rows
  std::int64_t disk_rows_ = 0;       // keep_levels_on_disk (0: no level on disk)
  std::function<std::string(std::uint64_t)> why_not_in_memory_;
  std::unique_ptr<datasets::LevelWriter> level_writer_;  // the pending level, on disk
  std::unique_ptr<datasets::LevelReader> level_reader_;  // the level read, on disk
  std::int64_t interval_ = 1;                            // autofreeze: steps per decision
  std::int64_t steps_per_epoch_ = 1;
  double epoch_factor_ = 1.0;      // the schedule's factor this epoch
  std::int64_t steps_before_ = 0;  // steps_before(the current epoch)
  std::string level_dir_;
  bool text_ = false;  // parts[0] is [T, D] per row with the mask as parts[1]
  // The schedule's state (checkpointed):
  std::int64_t frozen_ = 0;          // the lowest top blocks held frozen
  std::int64_t level_ = -1;          // the top block whose output is read (-1: the cache's)
  std::int64_t pending_ = -1;        // the top block whose output this epoch stores
  std::int64_t interval_steps_ = 0;  // autofreeze: steps into the current interval
  std::vector<double> norm_sum_;     // per top block, over the interval
  std::vector<double> norm_prev_;    // the last interval's mean (empty before the first)
  std::vector<double> rates_;        // the last change rates (NaN: not measured)
  double epoch_norm_sum_ = 0;        // this epoch's gradient norms, summed
  std::int64_t epoch_steps_ = 0, epoch_clipped_ = 0;
  double last_lr_ = 0;                    // the top block's, at the last step
  at::Tensor level_rows_, pending_rows_;  // float32 [train_rows, values]
  std::vector<std::int64_t> level_shape_, pending_shape_;
  LossWeighting* weighting_ = nullptr;
  std::vector<at::Tensor> best_;  // keep_best: params_' values, in order
  std::int64_t best_epoch_ = 0;
  double best_score_ = -std::numeric_limits<double>::infinity();
};

}  // namespace canopy::runners
