// Fusion decided by measured cost (train.fuse = auto).
//
// Whether one batched first-layer multiply beats the heads' own multiplies depends on the
// CPU, the batch, the widths and the thread count: on this project's 2-core Xeon it wins
// for groups of linear heads and loses for groups with MLPs (docs/performance.md). So for each group
// the planner would fuse, canopy times a forward and backward pass of the group fused and
// of its heads alone (no optimizer step: that costs the same either way; the heads'
// weights, gradients and generators are left as they were), on a batch of the run's size,
// and fuses only when fused is not slower. The passes are the ones training runs: groups of
// linear classification heads step without autograd (tasks/linear_step.h), the rest through
// it, with the features requiring their gradient when a shared top trains under the heads.
//
// A decision is a property of the machine, not of the run: it is kept in a calibration
// file, `${CANOPY_HOME:-~/.cache/canopy}/calibration/fusion.tsv` (or $CANOPY_FUSION_CALIBRATION;
// the tests use their own, in the build tree), one line per group shape
// (CPU model, LibTorch version, threads, batch, input width, the group's first-layer
// widths, "step=direct" for groups stepped without autograd), never rewritten. Every later
// run on the machine reads it, so runs repeat exactly; delete the file to measure again.
// Processes that need the same decision at once take turns (flock): the first measures, the
// rest read. A run's own decisions are recorded in its checkpoint too (state.json's
// `fusion`), and a resumed run keeps them before any file's: `--resume` stays bitwise after
// the calibration file was deleted or timed again (on another machine the run fuses as it
// began, though other kernels or another thread count may round otherwise).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/runners/fusion_plan.h"
#include "canopy/tasks/task.h"

namespace canopy::runners {

struct FusionDecision {
  enum class Source { kCalibration, kMeasuredNow, kCheckpoint };
  bool fuse = true;
  double fused_seconds = 0;  // median of one fused forward+backward
  double alone_seconds = 0;  // median of the heads' own, summed
  Source source = Source::kCalibration;
};

// A run's decisions by group ("a + b + c"), as its checkpoint records them.
using FusionDecisions = std::map<std::string, FusionDecision>;
// state.json's `fusion`: {"a + b": {"fuse": true, "fused_ms": 0.5, "alone_ms": 0.54}, ...} (as text),
// and back; read() takes "" for none and gives every decision Source::kCheckpoint (DataError
// when it does not parse).
std::string fusion_decisions_json(const FusionDecisions& decisions);
FusionDecisions read_fusion_decisions(const std::string& json);

class FusionChooser {
 public:
  // `tasks` as the planner indexes them; `eval_targets[i]`: task i's targets on the eval
  // split (the timing batch takes its first `batch_size` rows, repeating them if fewer).
  // `file`: the calibration file ("" keeps decisions in memory only). `shared_top`: the heads
  // train on a shared top's output, whose gradient the backward pass computes too.
  // `kept`: the decisions of the checkpoint a resumed run goes on from, followed first.
  FusionChooser(std::vector<tasks::Task*> tasks, std::vector<at::Tensor> eval_targets,
                std::int64_t feature_dim, std::int64_t batch_size, std::int64_t intra_op_threads,
                std::string file, bool shared_top = false, FusionDecisions kept = {});

  // Whether `unit` (heads with one fusion key, two or more) runs fused: as the resumed
  // checkpoint decided it, else read from the calibration file, or measured and recorded there.
  bool operator()(const WorkUnit& unit);

  // Every decision this run used, by the group's description ("a + b + c").
  const FusionDecisions& decisions() const { return decisions_; }
  // What the run's checkpoint records: the resumed checkpoint's decisions and this run's.
  FusionDecisions recorded() const;
  // Data-parallel ranks (every rank holds every head) must fuse alike, or their replicas
  // drift apart: `agreed` (rank 0's recorded(), sent to every rank) is followed like the
  // checkpoint's decisions, and from then on a group none of them decided follows a group of
  // its shape met before it, else fuses: the same on every rank (which meet the groups in one
  // order), whatever each host's calibration file says; no rank measures.
  void agree(const FusionDecisions& agreed);
  const std::string& file() const { return file_; }

  // The calibration file: $CANOPY_FUSION_CALIBRATION, else under CANOPY_HOME or ~/.cache/canopy.
  static std::string default_file();
  // How many group shapes `file` records decisions for (0 when there is no such file).
  static std::size_t recorded_shapes(const std::string& file);
  // The key a group is recorded under.
  std::string signature(const WorkUnit& unit) const;

 private:
  FusionDecision measure(const WorkUnit& unit);
  std::vector<tasks::Task*> group_of(const WorkUnit& unit) const;
  // Whether `group` steps without autograd (tasks::takes_linear_softmax_step) in this run.
  bool direct_step(const std::vector<tasks::Task*>& group) const;

  std::vector<tasks::Task*> tasks_;
  std::vector<at::Tensor> eval_targets_;
  std::int64_t feature_dim_;
  std::int64_t batch_size_;
  std::int64_t threads_;
  std::string file_;
  bool shared_top_;
  FusionDecisions kept_;
  bool agreed_ = false;  // agree() was called: groups not kept are decided without the file
  std::map<std::string, FusionDecision> by_signature_;
  FusionDecisions decisions_;
};

// One line for the log and the run's summary: "a + b (in=192): fused 1.2 ms, alone 1.5 ms
// per step -> fused (measured now)"; "(measured before on this machine)" from the calibration
// file, "(kept from the checkpoint)" on resume.
std::string describe_decision(const std::string& group, const std::string& key, const FusionDecision& d);

}  // namespace canopy::runners
