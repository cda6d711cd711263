// The work of one training step, planned: which heads run fused (one batched first-layer
// multiply, canopy/heads/fused.h) and which alone, as units of work for the TBB workers.
// A pure function of the heads, the batch size, the fusion budget and the worker count:
// the same inputs give the same plan on every machine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace canopy::runners {

// What the planner needs to know of a head.
struct PlanHead {
  std::string fusion_key;  // heads::fusion_key, or "" when the head cannot be fused
  std::int64_t width = 0;  // heads::fused_width: columns it adds to a fused multiply
  std::int64_t cost = 0;   // parameters, a proxy for its multiply-adds
};

struct FusionPlanOptions {
  std::int64_t batch_size = 1;  // rows per step
  double fuse_bytes = 0;        // most fused first-layer activations per group (B x widths x 4)
  std::int64_t workers = 1;     // TBB workers that run the units
};

using WorkUnit = std::vector<std::size_t>;  // indices into the heads, in task order

// Groups the `active` heads (indices into `heads`) into units:
//   1. heads with the same non-empty fusion key join, in task order, the open group of that
//      key while the group's activations stay within fuse_bytes; others run alone;
//   2. units are ordered by cost, largest first (a step ends when its slowest worker does);
//   3. with fewer units than workers, the unit with the most heads is halved until every
//      worker has one or no unit has two heads;
//   4. with `fuse_unit`, a unit of two or more heads for which it says false becomes one
//      unit per head, and the units are ordered by cost again (train.fuse = auto asks
//      FusionChooser, which times the group fused and alone).
std::vector<WorkUnit> plan_units(const std::vector<PlanHead>& heads, const std::vector<std::size_t>& active,
                                 const FusionPlanOptions& options,
                                 const std::function<bool(const WorkUnit&)>& fuse_unit = {});

}  // namespace canopy::runners
