#include "canopy/runners/freeze_schedule.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "canopy/core/error.h"

namespace canopy::runners {

FreezeSchedule parse_freeze_schedule(const std::string& name, const std::string& where) {
  if (name == "static") return FreezeSchedule::kStatic;
  if (name == "gradual") return FreezeSchedule::kGradual;
  if (name == "autofreeze") return FreezeSchedule::kAutofreeze;
  if (name == "constant" || name == "cosine") {
    throw ConfigError(detail::str_cat(
        where, " = ", name, ": trunk.schedule is the freezing schedule (static, ",
        "gradual or autofreeze); the top's learning-rate schedule is ", "trunk.lr_schedule = ", name));
  }
  throw ConfigError(detail::str_cat(where, ": expected static, gradual or autofreeze, got '", name, "'"));
}

void refuse_schedule_without_top(FreezeSchedule schedule, const std::string& freeze) {
  CANOPY_CHECK(
      schedule == FreezeSchedule::kStatic, ConfigError, "trunk.schedule = ", to_string(schedule),
      " decides when the blocks of a trainable top train, and the trunk is frozen whole (trunk.freeze = ",
      freeze,
      "): nothing of it trains. Leave the blocks that may train out of the cache (trunk.unfreeze_to = "
      "<the lowest of them>, or trunk.freeze = first:N), or drop the schedule");
}

std::string describe_top_steps(double lr, double grad_norm, std::int64_t clipped, std::int64_t steps) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "lr %.3g, gradient norm %.3g", lr, grad_norm);
  std::string out = buf;
  if (clipped > 0) out += detail::str_cat(" (clipped in ", clipped, " of ", steps, " steps)");
  return out;
}

const char* to_string(FreezeSchedule s) {
  switch (s) {
    case FreezeSchedule::kStatic:
      return "static";
    case FreezeSchedule::kGradual:
      return "gradual";
    case FreezeSchedule::kAutofreeze:
      return "autofreeze";
  }
  return "?";
}

std::int64_t gradual_trainable(std::int64_t epoch, std::int64_t top_blocks, std::int64_t warmup_epochs,
                               std::int64_t unfreeze_every) {
  if (epoch < warmup_epochs) return 0;
  return std::min(top_blocks, 1 + (epoch - warmup_epochs) / std::max<std::int64_t>(1, unfreeze_every));
}

std::vector<double> change_rates(const std::vector<double>& prev, const std::vector<double>& cur) {
  CANOPY_CHECK(prev.size() == cur.size(), Error, "change_rates: ", prev.size(), " and ", cur.size(),
               " norms");
  std::vector<double> out(prev.size());
  for (std::size_t i = 0; i < prev.size(); ++i)
    out[i] = prev[i] > 0 ? std::abs(prev[i] - cur[i]) / prev[i] : 0.0;
  return out;
}

double percentile(std::vector<double> v, double p) {
  CANOPY_CHECK(!v.empty(), Error, "percentile of no values");
  std::sort(v.begin(), v.end());
  const double pos = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(pos));
  const std::size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

std::int64_t blocks_to_freeze(const std::vector<double>& rates, double percentile_p,
                              std::int64_t min_trainable) {
  const auto n = static_cast<std::int64_t>(rates.size());
  if (n <= min_trainable) return 0;
  const double threshold = percentile(rates, percentile_p);
  std::int64_t k = 0;
  while (k < n - min_trainable && rates[static_cast<std::size_t>(k)] < threshold) ++k;
  return k;
}

}  // namespace canopy::runners
