// `canopy train`: read each batch of cached features once and train every task's head on
// it at the same time. The parts, each in its own file:
//   fusion_plan.h       which heads run fused and which alone, per step (a pure function)
//   step_runner.h       the units of a step on TBB workers, failures isolated per head
//   head_run.h          per-head run state (state, losses, early stopping)
//   checkpoint_store.h  crash-safe checkpoints and --resume
//   metrics_sink.h      metrics.jsonl, metrics.csv, TensorBoard
//   head_card.h         exported heads: safetensors + JSON card
// A head that throws or produces a non-finite loss is marked FAILED with the reason; the
// others go on.
#pragma once

#include "canopy/core/progress.h"
#include "canopy/runners/config.h"
#include "canopy/runners/train_report.h"
#include "canopy/tasks/registry.h"

namespace canopy::datasets {
struct CacheMeta;
struct SplitData;
}  // namespace canopy::datasets

namespace canopy::runners {

// With `resume`, continues from the last checkpoint in <out_dir>/checkpoint (refused when
// the configuration differs from the one that wrote it). On the CPU the resumed run ends
// with weights bitwise identical to a run that was never interrupted.
TrainReport run_train(const JobConfig& config, const tasks::HeadRegistry& registry,
                      ProgressStyle style = ProgressStyle::kAuto, bool resume = false);

// What a trunk frozen whole (no trainable top: its cache holds pooled features) refuses before
// training: a loss weighting other than sum or static, and a freezing schedule (trunk.schedule);
// a ConfigError naming the key.
void refuse_top_keys_without_top(const JobConfig& config);

// Why `canopy train --resume` of `config` would refuse the checkpoint in its out_dir ("" when
// it would go on): another configuration than epochs and out_dir, or epochs it cannot go on to
// (fewer than a head began, a cosine schedule over the epochs). DataError when there is no
// readable checkpoint.
std::string resume_refusal(const JobConfig& config);

// What run_train refuses of the config's tasks once it reads the cache (a label source the
// cache lacks, real values for a classifier, a label_map, class_names or class_weights for
// another class count, an option no head takes), checked against `meta` and `eval` (the eval
// split's labels) as a cache of the data will hold them; `where` names them in a message ("the
// data"). The cache job checks so before its trunk pass for `canopy run`, so that a mistake costs
// no cache build. Each head is built with `feature_dim` inputs (the width of the features the
// heads read: over a trained top, its output's), and dropped.
void check_tasks(const JobConfig& config, const tasks::HeadRegistry& registry,
                 const datasets::CacheMeta& meta, const datasets::SplitData& eval, std::int64_t feature_dim,
                 const std::string& where);

// The TBB workers a run uses: train.workers, or one per core when it is 0.
std::int64_t resolve_workers(const TrainConfig& train);

}  // namespace canopy::runners
