// The step planner: a pure function of heads, batch, budget and an explicit worker count.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "canopy/core/error.h"
#include "canopy/runners/fusion_plan.h"
#include "support/test_support.h"

namespace canopy::runners {
namespace {

std::vector<std::size_t> all_of(std::size_t n) {
  std::vector<std::size_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

// Every active head appears in exactly one unit.
void expect_partition(const std::vector<WorkUnit>& units, const std::vector<std::size_t>& active) {
  std::multiset<std::size_t> seen;
  for (const auto& u : units) seen.insert(u.begin(), u.end());
  EXPECT_EQ(seen, std::multiset<std::size_t>(active.begin(), active.end()));
}

TEST(FusionPlan, SameKeyHeadsFuseAndOthersRunAlone) {
  const std::vector<PlanHead> heads{{"linear in=64", 10, 650},
                                    {"", 0, 5000},
                                    {"linear in=64", 64, 4800},
                                    {"linear in=32", 10, 330},
                                    {"linear in=64", 4, 260}};
  const auto units = plan_units(heads, all_of(5), {64, 1e9, 1});
  expect_partition(units, all_of(5));
  ASSERT_EQ(units.size(), 3u);
  EXPECT_EQ(units[0], (WorkUnit{0, 2, 4})) << "largest cost first: 650 + 4800 + 260";
  EXPECT_EQ(units[1], (WorkUnit{1}));
  EXPECT_EQ(units[2], (WorkUnit{3}));
}

// train.fuse = auto: a group the chooser turns down runs as one unit per head, ordered by
// cost with the rest; a group it accepts stays as planned; single heads are never asked.
TEST(FusionPlan, AGroupTurnedDownRunsHeadByHead) {
  const std::vector<PlanHead> heads{
      {"in=64", 10, 650}, {"in=64", 64, 4800}, {"", 0, 5000}, {"in=32", 10, 330}, {"in=32", 10, 340}};
  std::vector<WorkUnit> asked;
  const auto units = plan_units(heads, all_of(5), {64, 1e9, 1}, [&](const WorkUnit& u) {
    asked.push_back(u);
    return u.front() == 3;  // the in=32 pair fuses, the in=64 pair does not
  });
  expect_partition(units, all_of(5));
  EXPECT_EQ(asked, (std::vector<WorkUnit>{{0, 1}, {3, 4}}));
  EXPECT_EQ(units, (std::vector<WorkUnit>{{2}, {1}, {3, 4}, {0}})) << "by cost: 5000, 4800, 670, 650";
}

TEST(FusionPlan, TheBudgetBoundsEachGroup) {
  // 64 rows x 10 columns x 4 bytes = 2560 bytes per head; a 6000-byte budget takes two.
  const std::vector<PlanHead> heads(5, PlanHead{"linear in=8", 10, 90});
  const auto units = plan_units(heads, all_of(5), {64, 6000, 1});
  expect_partition(units, all_of(5));
  ASSERT_EQ(units.size(), 3u);
  for (const auto& u : units) EXPECT_LE(u.size(), 2u);
  EXPECT_EQ(plan_units(heads, all_of(5), {64, 2000, 1}).size(), 5u) << "no room for two: nothing fuses";
}

TEST(FusionPlan, GroupsAreHalvedUntilEveryWorkerHasAUnit) {
  const std::vector<PlanHead> heads(12, PlanHead{"linear in=8", 10, 90});
  for (std::int64_t workers : {1, 2, 3, 8, 12, 16}) {
    const auto units = plan_units(heads, all_of(12), {64, 1e9, workers});
    expect_partition(units, all_of(12));
    EXPECT_EQ(static_cast<std::int64_t>(units.size()), std::min<std::int64_t>(workers, 12))
        << workers << " workers";
    const auto largest = std::max_element(
        units.begin(), units.end(), [](const WorkUnit& a, const WorkUnit& b) { return a.size() < b.size(); });
    const auto smallest = std::min_element(
        units.begin(), units.end(), [](const WorkUnit& a, const WorkUnit& b) { return a.size() < b.size(); });
    EXPECT_LE(largest->size(), 2 * smallest->size()) << workers << " workers: halving keeps units balanced";
  }
}

TEST(FusionPlan, OnlyActiveHeadsArePlannedAndThePlanIsDeterministic) {
  const std::vector<PlanHead> heads(6, PlanHead{"linear in=8", 10, 90});
  const std::vector<std::size_t> active{1, 3, 4};
  const auto a = plan_units(heads, active, {32, 1e9, 2});
  expect_partition(a, active);
  EXPECT_EQ(a, plan_units(heads, active, {32, 1e9, 2}));
  EXPECT_TRUE(plan_units(heads, {}, {32, 1e9, 4}).empty());
}

TEST(FusionPlan, BadInputsAreErrors) {
  const std::vector<PlanHead> heads(2, PlanHead{"k", 1, 1});
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        plan_units(heads, all_of(2), {8, 1e9, 0});
      },
      {"at least 1 worker", "0"}));
  EXPECT_TRUE(testing::throws_with<Error>([&] { plan_units(heads, {0, 5}, {8, 1e9, 1}); }, {"head 5 of 2"}));
}

}  // namespace
}  // namespace canopy::runners
