#include "canopy/runners/fusion_plan.h"

#include <algorithm>
#include <map>

#include "canopy/core/error.h"

namespace canopy::runners {

namespace {
std::int64_t unit_cost(const WorkUnit& unit, const std::vector<PlanHead>& heads) {
  std::int64_t cost = 0;
  for (std::size_t i : unit) cost += heads[i].cost;
  return cost;
}
}  // namespace

std::vector<WorkUnit> plan_units(const std::vector<PlanHead>& heads, const std::vector<std::size_t>& active,
                                 const FusionPlanOptions& options,
                                 const std::function<bool(const WorkUnit&)>& fuse_unit) {
  CANOPY_CHECK(options.workers >= 1, ConfigError, "the planner needs at least 1 worker, got ",
               options.workers);
  std::vector<WorkUnit> units;
  std::map<std::string, std::size_t> open_unit;  // key -> the unit still taking heads
  std::vector<double> unit_bytes;
  for (std::size_t i : active) {
    CANOPY_CHECK(i < heads.size(), Error, "plan_units: head ", i, " of ", heads.size());
    const PlanHead& h = heads[i];
    const double bytes = static_cast<double>(options.batch_size * h.width * 4);
    const auto it = open_unit.find(h.fusion_key);
    if (!h.fusion_key.empty() && it != open_unit.end() &&
        unit_bytes[it->second] + bytes <= options.fuse_bytes) {
      units[it->second].push_back(i);
      unit_bytes[it->second] += bytes;
      continue;
    }
    if (!h.fusion_key.empty()) open_unit[h.fusion_key] = units.size();
    units.push_back({i});
    unit_bytes.push_back(bytes);
  }
  std::stable_sort(units.begin(), units.end(), [&](const WorkUnit& a, const WorkUnit& b) {
    return unit_cost(a, heads) > unit_cost(b, heads);
  });
  while (static_cast<std::int64_t>(units.size()) < options.workers) {
    auto largest = std::max_element(units.begin(), units.end(),
                                    [](const WorkUnit& a, const WorkUnit& b) { return a.size() < b.size(); });
    if (largest == units.end() || largest->size() < 2) break;
    const auto half = static_cast<std::ptrdiff_t>(largest->size() / 2);
    WorkUnit second(largest->begin() + half, largest->end());
    largest->resize(static_cast<std::size_t>(half));
    units.push_back(std::move(second));
  }
  if (fuse_unit) {
    std::vector<WorkUnit> decided;
    bool split_any = false;
    for (auto& unit : units) {
      if (unit.size() < 2 || fuse_unit(unit)) {
        decided.push_back(std::move(unit));
        continue;
      }
      split_any = true;
      for (std::size_t i : unit) decided.push_back({i});
    }
    units = std::move(decided);
    if (split_any) {
      std::stable_sort(units.begin(), units.end(), [&](const WorkUnit& a, const WorkUnit& b) {
        return unit_cost(a, heads) > unit_cost(b, heads);
      });
    }
  }
  return units;
}

}  // namespace canopy::runners
