// Freezing schedules for the trunk's top (see docs/fine-tuning.md): which of the top's
// blocks train when. Pure functions; SharedTop applies them.
//   static      every block of the top trains from the first step to the last
//   gradual     ULMFiT / fastai freeze_to: only the heads for warmup_epochs, then one more
//               block every unfreeze_every epochs, from the top down
//   autofreeze  AutoFreeze (arXiv 2102.01386): every freeze_interval steps, each trainable
//               block's gradient-norm change rate |g_prev - g_cur| / g_prev is measured, and the
//               lowest blocks whose rate is below the percentile-th percentile of the trainable
//               blocks' rates freeze for good, keeping min_trainable blocks trainable
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace canopy::runners {

// What the top did in an epoch, for metrics.jsonl, TensorBoard and the progress line.
struct TopEpoch {
  std::vector<std::string> training;                  // the blocks that trained at the epoch's end
  std::string level;                                  // the block whose output was read ("": the cache's)
  std::vector<std::pair<std::string, double>> rates;  // autofreeze: each block's last change rate
  // The top's optimizer steps in the epoch, the mean L2 norm of its gradient (before any
  // clipping; NaN without steps), the steps clipped (trunk.max_grad_norm) and the top
  // block's learning rate at the last step (warm-up and schedule applied).
  std::int64_t steps = 0;
  double grad_norm = 0;
  std::int64_t clipped = 0;
  double lr = 0;
  // train.export = best: the validation score epochs are ranked by this epoch (the tasks'
  // mean, or train.export_monitor's; NaN otherwise), and the epoch (1-based) whose top and
  // heads are exported, the best so far.
  double score = std::numeric_limits<double>::quiet_NaN();
  std::int64_t best_epoch = 0;
};

// "lr 0.01, gradient norm 0.857 (clipped in 20 of 38 steps)": an epoch of the top's steps,
// for the progress line and `canopy inspect`.
std::string describe_top_steps(double lr, double grad_norm, std::int64_t clipped, std::int64_t steps);

enum class FreezeSchedule { kStatic, kGradual, kAutofreeze };
FreezeSchedule parse_freeze_schedule(const std::string& name, const std::string& where);
// ConfigError when `schedule` is not static and the trunk is frozen whole (by the policy
// `freeze` describes): nothing of it trains, so the schedule would decide nothing.
void refuse_schedule_without_top(FreezeSchedule schedule, const std::string& freeze);
const char* to_string(FreezeSchedule schedule);

// gradual: how many of the top's `top_blocks` blocks (counted from the top) train in `epoch`.
std::int64_t gradual_trainable(std::int64_t epoch, std::int64_t top_blocks, std::int64_t warmup_epochs,
                               std::int64_t unfreeze_every);

// |prev - cur| / prev per block (0 where prev is 0).
std::vector<double> change_rates(const std::vector<double>& prev, const std::vector<double>& cur);
// The p-th percentile (0..100) with linear interpolation between order statistics, as
// numpy.percentile computes it by default.
double percentile(std::vector<double> values, double p);
// autofreeze: how many of the trainable blocks, from the lowest up, freeze now, given their
// change rates in that order: the longest run from the lowest whose rates are below the
// percentile of all of them, keeping at least `min_trainable` trainable.
std::int64_t blocks_to_freeze(const std::vector<double>& rates, double percentile_p,
                              std::int64_t min_trainable);

}  // namespace canopy::runners
