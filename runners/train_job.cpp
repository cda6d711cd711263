#include "canopy/runners/train_job.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string_view>

#include <nlohmann/json.hpp>

#include <ATen/ops/zeros.h>

#include "canopy/core/bitmasks.h"
#include "canopy/core/denormals.h"
#include "canopy/core/device.h"
#include "canopy/core/dir_lock.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/heap.h"
#include "canopy/core/label_lists.h"
#include "canopy/core/memory.h"
#include "canopy/core/memory_fence.h"
#include "canopy/core/mpi.h"
#include "canopy/core/sha256.h"
#include "canopy/core/stop.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/batch_source.h"
#include "canopy/datasets/feature_cache.h"
#include "canopy/datasets/holdout.h"
#include "canopy/datasets/level_file.h"
#include "canopy/heads/fused.h"
#include "canopy/runners/cache_job.h"
#include "canopy/runners/checkpoint_store.h"
#include "canopy/runners/fusion_choice.h"
#include "canopy/runners/fusion_plan.h"
#include "canopy/runners/head_card.h"
#include "canopy/runners/head_run.h"
#include "canopy/runners/metrics_sink.h"
#include "canopy/runners/shared_top.h"
#include "canopy/runners/step_runner.h"

namespace canopy::runners {

std::int64_t resolve_workers(const TrainConfig& train) {
  return train.workers > 0 ? train.workers : machine_cores();
}

void refuse_top_keys_without_top(const JobConfig& config) {
  const auto w = config.train.weighting;
  CANOPY_CHECK(w == Weighting::kSum || w == Weighting::kStatic, ConfigError,
               "train.weighting = ", to_string(w),
               " weights the gradient that reaches a shared trainable top, ",
               "and the trunk is frozen whole (trunk.freeze = ", trunk::describe(config.trunk.freeze),
               "): each head learns from its own loss alone; use sum");
  refuse_schedule_without_top(config.top.schedule, trunk::describe(config.trunk.freeze));
}

namespace {

// A task whose label source is not among the cache's, holds real values for a classifier, or
// has rows without a value (a CSV column's empty fields, read as a class with an empty name:
// a head would learn "no label" as a class).
void check_task_labels(const JobConfig& config, const datasets::CacheMeta& meta, const std::string& where) {
  const auto& sources = meta.label_sources;
  const auto& float_sources = meta.float_labels;
  for (const auto& tc : config.tasks) {
    CANOPY_CHECK(std::find(sources.begin(), sources.end(), tc.labels) != sources.end(), ConfigError, "task '",
                 tc.name, "': labels = '", tc.labels, "' but ", where,
                 " has label sources: ", join(sources, ", "));
    const bool real = std::find(float_sources.begin(), float_sources.end(), tc.labels) != float_sources.end();
    CANOPY_CHECK(!real || tc.kind == tasks::TaskKind::kRegression, DataError, "task '", tc.name,
                 "': label source '", tc.labels, "' holds real values; use kind = regression");
    const std::int64_t width = meta.label_width(tc.labels);
    CANOPY_CHECK(width == 1 || (tc.kind == tasks::TaskKind::kMultilabel && tc.label_map.empty()), ConfigError,
                 "task '", tc.name, "': label source '", tc.labels, "' holds lists of ", width,
                 " labels, a row of ", width, " zeros and ones (more than a bitmask's ", kMaxBits,
                 "): only kind = multilabel without label_map reads it");
    const auto names = meta.names_of(tc.labels);
    CANOPY_CHECK(
        std::find(names.begin(), names.end(), "") == names.end(), DataError, "task '", tc.name,
        "': label source '", tc.labels,
        "' has rows without a value (empty fields in its column, read as a class with no name); a head "
        "learns from rows that have its label: fill those fields, or drop their rows");
  }
}

// Data parallel over MPI ranks: the top's gradients are summed in buckets of this size.
constexpr std::int64_t kAllreduceBucketBytes = 4 << 20;
// A window of steps (EpochLoop::train_epoch): at most this many steps and bytes of batches.
constexpr std::size_t kWindowSteps = 32;
constexpr std::size_t kWindowBytes = 8 << 20;
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The resolved configuration without its first line (which names the source file).
std::string config_identity(const std::string& dump) { return dump.substr(dump.find('\n') + 1); }

// The cache the config names, refused when its fingerprint says other inputs made it.
datasets::FeatureCache open_checked_cache(const JobConfig& config) {
  auto cache = datasets::FeatureCache::open(config.cache.path);
  if (!config.train.check_fingerprint) return cache;
  const std::string expected = expected_cache_description(config);
  if (sha256_hex(expected) != cache.meta().fingerprint) {
    throw DataError(detail::str_cat(
        "feature cache '", config.cache.path, "' was built from different inputs than ", config.source,
        " describes; changed: ", join(describe_changes(cache.meta().description, expected), "; "),
        ". Run `canopy cache --config ", config.source, "` to rebuild it"));
  }
  return cache;
}

// How the train split is read: whole, or streamed under `cap` bytes. With cache.memory_cap_mb
// set, whole when it fits under it. With 0 (the default), whole when it takes at most 3/4 of
// the memory this process may still take (the machine's, a container's cgroup limit, shared
// by the ranks on the machine), else streamed under half of that: a cache larger than
// the machine is streamed, not ended by the kernel's OOM kill. `why` says so.
struct TrainRead {
  bool whole = true;
  std::uint64_t cap = 0;
  std::string why;
};

// Training reads the very rows evaluated on: train.eval_split is train.train_split, with no
// validation split held out of it and no augmented views.
bool shares_eval_split(const datasets::FeatureCache& cache, const JobConfig& config) {
  const auto& t = config.train;
  return t.eval_split == t.train_split && !has_validation(t) && cache.meta().views == 1;
}

// Why `bytes` should not be held in memory ("is more than 3/4 of the memory this process may
// take: <where the figure comes from>"), or "" when they may (or the room cannot be read).
std::string past_room(double bytes, const std::optional<MemoryRoom>& room) {
  if (!room || bytes <= static_cast<double>(room->bytes) * 0.75) return "";
  return "is more than 3/4 of the memory this process may take: " + room->said;
}

TrainRead plan_train_read(const datasets::FeatureCache& cache, const JobConfig& config) {
  // Evaluated on (train.eval_split the same split), it is in memory already: training shares it.
  if (shares_eval_split(cache, config) && config.cache.memory_cap_mb == 0) return {};
  const double bytes = static_cast<double>(cache.meta().views) *
                       static_cast<double>(cache.feature_bytes(config.train.train_split));
  if (config.cache.memory_cap_mb > 0) {
    const auto cap = static_cast<std::uint64_t>(config.cache.memory_cap_mb * 1024 * 1024);
    return {bytes <= static_cast<double>(cap), cap, ""};
  }
  const auto room = memory_room(mpi::local_size());
  TrainRead r;
  if (const std::string why = past_room(bytes, room); !why.empty()) {
    r = {
        false, room->bytes / 2,
        detail::str_cat("the train split '", config.train.train_split, "' (",
                        cache.meta().views > 1 ? detail::str_cat("its ", cache.meta().views, " views: ") : "",
                        format_mib(bytes), ") ", why)};
  }
  if (!mpi::distributed()) return r;
  // Every rank must read alike (the replicas see the same batches): all stream, under the
  // smallest cap, when one must.
  TrainRead all;
  for (const std::string& s :
       mpi::all_gather(r.whole ? std::string() : std::to_string(r.cap) + " " + r.why)) {
    if (s.empty()) continue;
    const std::uint64_t cap = std::stoull(s.substr(0, s.find(' ')));
    if (all.whole || cap < all.cap) all = {false, cap, s.substr(s.find(' ') + 1)};
  }
  return all;
}
// The label source a validation split is stratified by: `class` when the cache has it as
// classes, else its first source of one class per row, else its first list of labels (label by
// label); empty when none is (real values).
struct Stratifier {
  std::string source;
  std::size_t list_labels = 0;  // > 0: a list source of that many labels
};
Stratifier stratifying_source(const datasets::CacheMeta& meta) {
  std::string first, list;
  for (const auto& s : meta.label_sources) {
    if (meta.is_float_label(s)) continue;
    if (meta.label_bits.count(s) > 0) {
      if (list.empty()) list = s;
    } else if (s == "class") {
      return {s};
    } else if (first.empty()) {
      first = s;
    }
  }
  if (!first.empty() || list.empty()) return {first};
  return {list, meta.label_bits.at(list).size()};
}

// The rows held out of the train split, and how they were drawn (for the log).
datasets::Holdout hold_out(const datasets::FeatureCache& cache, const TrainConfig& t, std::string& how) {
  const Stratifier by = stratifying_source(cache.meta());
  if (by.source.empty()) {
    how = "nothing: no label source of classes or lists of labels";
    return datasets::stratified_holdout(at::Tensor(), cache.rows(t.train_split), t.validation_fraction,
                                        t.seed);
  }
  at::Tensor labels = cache.load_labels(t.train_split, by.source);
  how = "'" + by.source + "'";
  if (by.list_labels == 0)
    return datasets::stratified_holdout(labels, cache.rows(t.train_split), t.validation_fraction, t.seed);
  if (labels.dim() == 1) labels = multi_hot_of_bitmasks(labels, static_cast<std::int64_t>(by.list_labels));
  datasets::Holdout h = datasets::multilabel_holdout(labels, t.validation_fraction, t.seed);
  how += ", label by label over its " + std::to_string(by.list_labels) + " labels";
  if (!h.unheld_labels.empty()) {
    const auto& names = cache.meta().label_bits.at(by.source);
    std::vector<std::string> unheld;
    for (const std::int64_t j : h.unheld_labels) unheld.push_back(names.at(static_cast<std::size_t>(j)));
    how += "; no row held out for " + std::to_string(unheld.size()) +
           " of them (too few rows): " + join_first(unheld, "labels");
  }
  return h;
}

// The training rows and, with train.validation_fraction, the rows held out of them.
struct TrainSplit {
  std::unique_ptr<datasets::BatchSource> source;
  bool in_memory = true;
  at::Tensor rows;  // in memory: the training rows the source serves (the same storage)
  std::optional<datasets::SplitData> validation;
  at::Tensor kept;            // with a validation split: the split's rows that train (int64); else undefined
  std::string stratified_by;  // with a validation split: how it was drawn (for the log)
};

// The train split, read whole when it fits under cache.memory_cap_mb, else streamed; a
// validation split held out of it is read into memory and never trains. `eval`, the eval
// split's data, is shared when it is the same rows (shares_eval_split).
TrainSplit open_train_split(const datasets::FeatureCache& cache, const JobConfig& config,
                            datasets::ReadMethod method, const datasets::SplitData& eval) {
  const auto& t = config.train;
  const TrainRead plan = plan_train_read(cache, config);
  TrainSplit out;
  out.in_memory = plan.whole;
  std::optional<datasets::Holdout> holdout;
  if (has_validation(t)) {
    holdout = hold_out(cache, t, out.stratified_by);
    out.kept = holdout->train_rows;
  }
  const std::int64_t views = cache.meta().views;
  if (plan.whole) {
    // Shared with the eval split when it is the same rows (neither changes them): held once.
    datasets::SplitData all =
        shares_eval_split(cache, config) ? eval : cache.load_split(t.train_split, method);
    // Augmented views: the same rows, drawn from per epoch; validation reads view 0 alone.
    std::vector<at::Tensor> extra;
    for (std::int64_t v = 1; v < views; ++v) {
      at::Tensor f = cache.load_split(datasets::view_split(t.train_split, v), method).features;
      extra.push_back(holdout ? f.index_select(0, holdout->train_rows) : f);
    }
    if (holdout) {
      out.validation = datasets::select_rows(all, holdout->validation_rows);
      all = datasets::select_rows(all, holdout->train_rows);
    }
    out.rows = all.features;
    out.source = datasets::make_in_memory_source(std::move(all), t.batch_size, t.seed, std::move(extra));
    return out;
  }
  if (!plan.why.empty()) {
    log_info(plan.why + ": streaming it under " + format_mib(static_cast<double>(plan.cap)) +
             " (cache.memory_cap_mb sets the cap)");
  }
  at::Tensor keep;
  if (holdout) {
    out.validation = cache.load_rows(t.train_split, holdout->validation_rows, method);
    keep = at::zeros({cache.rows(t.train_split)}, at::TensorOptions().dtype(at::kBool));
    keep.index_fill_(0, holdout->train_rows, true);
  }
  try {
    out.source = datasets::make_streaming_source(cache, t.train_split, t.batch_size, t.seed, plan.cap, method,
                                                 keep, views);
  } catch (const DataError& e) {
    if (plan.why.empty()) throw;
    throw DataError(plan.why + ", and " + e.what());
  }
  return out;
}

// The classes of a task's label source (0 for real-valued labels, which check_task_labels
// leaves to regression tasks).
std::int64_t source_classes_of(const tasks::TaskConfig& tc, const datasets::CacheMeta& meta,
                               const at::Tensor& eval_labels) {
  if (meta.is_float_label(tc.labels) || meta.label_width(tc.labels) > 1) return 0;  // multi-hot: K labels
  const auto declared = meta.label_classes.find(tc.labels);
  if (declared != meta.label_classes.end()) return declared->second;
  // A cache from before label_classes was recorded: what it tells.
  const auto named = static_cast<std::int64_t>(meta.class_names.size());
  if (tc.labels == "class" && named > 0) return named;
  return eval_labels.max().item<std::int64_t>() + 1;
}

// How the report and summary describe a task before it trains.
TaskResult describe_task(const tasks::TaskConfig& tc, const tasks::Task& task,
                         const datasets::CacheMeta& meta) {
  TaskResult r;
  r.name = tc.name;
  r.head = task.head().describe();
  r.kind = tc.kind;
  const std::string k = std::to_string(task.num_classes());
  using tasks::TaskKind;
  r.labels =
      tc.kind == TaskKind::kRegression
          ? tc.labels + " (regression, " + to_string(tc.loss.value_or(tasks::RegressionLoss::kMse)) + ")"
      : tc.kind == TaskKind::kMultilabel ? tc.labels + " -> " + k + " labels"
      : tc.label_map.empty()             ? tc.labels
                                         : tc.labels + " -> " + k + " groups";
  std::ostringstream opt;
  opt << to_string(tc.optimizer) << " lr=" << tc.lr
      << (tc.schedule == tasks::LrSchedule::kConstant ? "" : std::string(" ") + to_string(tc.schedule));
  r.optimizer = opt.str();
  r.class_names = tc.class_names;  // multilabel: the labels; regression: none
  if (tc.kind == TaskKind::kMulticlass) {
    if (r.class_names.empty() && tc.label_map.empty()) r.class_names = meta.names_of(tc.labels);
    for (auto c = static_cast<std::int64_t>(r.class_names.size()); c < task.num_classes(); ++c) {
      r.class_names.push_back(std::to_string(c));
    }
  }
  return r;
}

// The tasks of a run with what the trainer keeps beside each.
struct TaskSet {
  std::vector<std::unique_ptr<tasks::Task>> owned;
  std::vector<tasks::Task*> tasks;
  std::vector<at::Tensor> eval_targets;
  std::vector<TaskResult> results;   // descriptions; the run's outcome is filled in at the end
  std::vector<std::int64_t> epochs;  // per task
  std::vector<PlanHead> plan_heads;
};

// The head types a grid's members use, for messages.
std::string config_grid_heads(const JobConfig& config, const std::string& grid) {
  std::vector<std::string> heads;
  for (const auto& t : config.tasks) {
    if (t.grid == grid && std::find(heads.begin(), heads.end(), t.head) == heads.end())
      heads.push_back(t.head);
  }
  return join(heads, ", ");
}

TaskSet build_tasks(const JobConfig& config, const tasks::HeadRegistry& registry,
                    const datasets::CacheMeta& meta, const datasets::SplitData& eval,
                    std::int64_t feature_dim, const std::string& where = "the cache") {
  TaskSet set;
  check_task_labels(config, meta, where);
  for (tasks::TaskConfig tc : config.tasks) {
    // A multilabel task on a bitmask source (all_labels, a list of labels) is named by its bits.
    const auto bits = meta.label_bits.find(tc.labels);
    if (tc.kind == tasks::TaskKind::kMultilabel && tc.class_names.empty() && tc.label_map.empty() &&
        bits != meta.label_bits.end())
      tc.class_names = bits->second;
    const auto src_eval = eval.labels.find(tc.labels);
    CANOPY_CHECK(src_eval != eval.labels.end(), ConfigError, "task '", tc.name, "': labels = '", tc.labels,
                 "' but ", where, "'s eval split (", config.train.eval_split, ") has none");
    // Seeded by name, not position: adding or removing a task changes no other task's run.
    const std::uint64_t name_seed = std::stoull(sha256_hex(tc.name).substr(0, 15), nullptr, 16);
    auto task = std::make_unique<tasks::Task>(tc, registry, feature_dim,
                                              source_classes_of(tc, meta, src_eval->second),
                                              config.train.seed * 1000003ULL + name_seed);
    const auto stats = meta.label_stats.find(tc.labels);
    if (tc.kind == tasks::TaskKind::kRegression && stats != meta.label_stats.end()) {
      task->set_target_scale(stats->second.first, stats->second.second);
    }
    set.eval_targets.push_back(task->targets(src_eval->second));
    set.results.push_back(describe_task(tc, *task, meta));
    set.epochs.push_back(task_epochs(tc, config.train));
    std::int64_t params = 0;
    for (const auto& p : task->head().parameters()) params += p.numel();
    std::string key = config.train.fuse != FuseMode::kNever && config.train.weighting != Weighting::kPcgrad
                          ? heads::fusion_key(task->head())
                          : "";
    // With a trained top, a grid's gradient to it is weighed per grid (grid_top_shares): its
    // members fuse only with each other.
    if (!key.empty() && !tc.grid.empty() && !meta.row_parts.empty()) key += ", grid " + tc.grid;
    set.plan_heads.push_back({key, heads::fused_width(task->head()), params});
    set.tasks.push_back(task.get());
    set.owned.push_back(std::move(task));
  }
  // A grid over head types leaves out, per member, the options its head does not take; an
  // option no member takes is a mistake (a typo) and refused.
  std::map<std::string, std::map<std::string, std::size_t>> left_out;  // grid -> option -> members
  std::map<std::string, std::size_t> members;
  for (const auto* t : set.tasks) {
    if (!t->config().grid_axes.count("head")) continue;
    ++members[t->config().grid];
    for (const auto& o : t->unused_head_options()) ++left_out[t->config().grid][o];
  }
  for (const auto& [grid, options] : left_out) {
    for (const auto& [option, count] : options) {
      CANOPY_CHECK(count < members[grid], ConfigError, "task.", grid, ".head.", option,
                   ": no head of the grid takes this option (heads: ", config_grid_heads(config, grid), ")");
    }
  }
  return set;
}

// class_weights / positive_weights = balanced: each such task's weights from the labels of the
// rows it trains on (the train split less a validation split), said in the log.
void balance_weights(const datasets::FeatureCache& cache, const JobConfig& config, const TrainSplit& train,
                     TaskSet& set) {
  std::map<std::string, at::Tensor> by_source;  // the training rows' labels
  for (std::size_t i = 0; i < set.tasks.size(); ++i) {
    tasks::Task& task = *set.tasks[i];
    const auto& tc = task.config();
    if (!tc.balanced_class_weights && !tc.balanced_positive_weights) continue;
    auto read = by_source.find(tc.labels);
    if (read == by_source.end()) {  // once per label source: tasks may share one
      at::Tensor all = cache.load_labels(config.train.train_split, tc.labels);
      read = by_source.emplace(tc.labels, train.kept.defined() ? all.index_select(0, train.kept) : all).first;
    }
    const at::Tensor& labels = read->second;
    const std::vector<double> w = task.balance_weights(task.targets(labels));
    if (w.empty() || mpi::rank() != 0) continue;
    const auto& names = set.results[i].class_names;
    std::ostringstream said;
    said.precision(3);
    said << "task '" << tc.name << "': " << (tc.balanced_class_weights ? "class_weights" : "positive_weights")
         << " = balanced over " << labels.size(0) << " training rows:";
    for (std::size_t k = 0; k < w.size(); ++k)
      said << (k ? ", " : " ") << (k < names.size() ? names[k] : std::to_string(k)) << " " << w[k];
    log_info(said.str());
  }
}

// Under mpirun with a frozen trunk: the heads each rank trains in an epoch. Rank 0 plans the
// work units one process would train for `heads` (the same fusion groups, so every head's
// arithmetic is a one-process run's) and deals them out, the costliest first, each to the rank
// with the least work so far. A head not in `heads` (done, failed) stays with `owner`, its
// last rank (0 when it has none), which keeps writing it into each checkpoint.
struct HeadShare {
  std::vector<int> owner;       // every head's rank
  std::vector<WorkUnit> units;  // this rank's
  std::string line;             // what this rank trains, for the log
};

HeadShare share_heads(const TaskSet& set, const std::vector<std::size_t>& heads, std::vector<int> owner,
                      const FusionPlanOptions& options,
                      const std::function<bool(const WorkUnit&)>& fuse_unit) {
  std::string plan;  // "rank:head,head;..." per unit
  if (mpi::rank() == 0) {
    std::vector<std::int64_t> load(static_cast<std::size_t>(mpi::size()), 0);
    for (const auto& unit : plan_units(set.plan_heads, heads, options, fuse_unit)) {
      const auto r = static_cast<std::size_t>(std::min_element(load.begin(), load.end()) - load.begin());
      for (std::size_t i : unit) load[r] += std::max<std::int64_t>(1, set.plan_heads[i].cost);
      std::vector<std::string> members;
      for (std::size_t i : unit) members.push_back(std::to_string(i));
      plan += std::to_string(r) + ":" + join(members, ",") + ";";
    }
  }
  plan = mpi::broadcast(plan);
  HeadShare share;
  share.owner = owner.empty() ? std::vector<int>(set.tasks.size(), 0) : std::move(owner);
  std::vector<std::string> names;
  for (const auto& item : split(plan, ';')) {
    if (item.empty()) continue;
    const auto colon = item.find(':');
    const int r = std::stoi(item.substr(0, colon));
    WorkUnit unit;
    for (const auto& h : split(item.substr(colon + 1), ',')) unit.push_back(std::stoul(h));
    for (std::size_t i : unit) share.owner.at(i) = r;
    if (r != mpi::rank()) continue;
    for (std::size_t i : unit) names.push_back(set.results[i].name);
    share.units.push_back(std::move(unit));
  }
  share.line = "this rank trains " + std::to_string(names.size()) + " of the " +
               std::to_string(heads.size()) + " heads still training" +
               (names.empty() ? std::string() : ": " + join(names, ", "));
  return share;
}

// What train.export = best ranks a top's epochs by: "the tasks' mean", or the monitored task.
std::string describe_monitor(const std::string& monitor) {
  return monitor.empty() ? std::string("the tasks' mean") : monitor + "'s score";
}

// The epoch loop: every batch once, every training head on it, then evaluation, metrics
// and a checkpoint at each epoch's end.
class EpochLoop {
 public:
  // `eval_rows`: the eval split as cached: features, or (with `top`) the prefix's output.
  EpochLoop(const JobConfig& config, TaskSet& set, datasets::BatchSource& source, const at::Tensor& eval_rows,
            SharedTop* top, LossWeighting* weighting, CheckpointStore& store, MetricsSink* metrics,
            StepRunner& runner, std::vector<HeadRun>& runs, std::function<bool(const WorkUnit&)> fuse_unit)
      : fuse_unit_(std::move(fuse_unit)),
        config_(config),
        keep_best_(exports_best(config.train) && top == nullptr),
        keep_joint_best_(top != nullptr && config.train.export_mode == ExportMode::kBest),
        set_(set),
        source_(source),
        eval_rows_(eval_rows),
        top_(top),
        weighting_(weighting),
        store_(store),
        metrics_(metrics),
        runner_(runner),
        runs_(runs) {
    steps_per_epoch_ = (source.rows() + config.train.batch_size - 1) / config.train.batch_size;
    max_epochs_ = *std::max_element(set.epochs.begin(), set.epochs.end());
    for (const tasks::Task* t : set.tasks) {
      grids_.push_back(t->config().grid);
      has_grid_ = has_grid_ || !grids_.back().empty();
    }
  }

  // What the heads are evaluated on: the cached features, or the top's output on the
  // cached prefix (computed again when the top has stepped since the last time). Under
  // mpirun every rank calls it at the same point (`together`), and the ranks share the work;
  // rank 0 alone, after the loop, passes false.
  const at::Tensor& eval_features(bool together = true) {
    if (!top_) return eval_rows_;
    double stale = top_moved_ || !top_eval_.defined() ? 1.0 : 0.0;
    if (together) mpi::all_reduce_sum(&stale, 1);  // the ranks agree, or one would wait alone
    if (stale > 0) {
      top_eval_ = together ? top_features(eval_rows_) : top_->features(eval_rows_, config_.train.batch_size);
    }
    top_moved_ = false;
    return top_eval_;
  }

  // train.export = best over a top: the kept epoch's top back in place for the export (the
  // eval split's features computed again); returns that epoch, 0 when none was kept.
  std::int64_t restore_joint_best() {
    if (!keep_joint_best_ || !top_->restore_best()) return 0;
    top_moved_ = true;
    return top_->best_epoch();
  }

  // A run resumed with more epochs than its checkpoint's run had: the heads that run ended
  // after their last epoch train on to their new count, and what the longer run would have
  // done at that epoch's end is done now (an early stop whose patience had run out; a grid's
  // halving cut at it, among the members training on).
  void go_on(const CheckpointPosition& from) {
    std::vector<std::string> names;
    bool at_their_end = false;
    for (std::size_t i = 0; i < runs_.size(); ++i) {
      if (!runs_[i].go_on_to(set_.epochs[i], set_.tasks[i]->config().early_stop_patience)) continue;
      names.push_back(set_.tasks[i]->name());
      at_their_end = at_their_end || runs_[i].epochs == from.epoch;
    }
    if (names.empty()) return;
    log_info(detail::str_cat(count_of(static_cast<std::int64_t>(names.size()), "head"),
                             " done at the checkpoint's end train on: ", join(names, ", ")));
    if (at_their_end && from.step == 0) halve_grids(from.epoch - 1);
  }

  FusionPlanOptions plan_options() const {
    return {config_.train.batch_size, config_.train.fuse_kib * 1024.0, runner_.workers()};
  }

  void run(const CheckpointPosition& from, ProgressStyle style) {
    describe_halving();
    describe_grids_on_top();
    describe_short_warmup();
    if (top_ && mpi::distributed()) {
      const auto [lo, hi] = eval_share(eval_rows_.size(0));
      log_info(detail::str_cat("the top's output on the eval split (", eval_rows_.size(0),
                               " rows) is evaluated over the ranks: this rank's rows ", lo, "-", hi,
                               ", every rank gets all of them"));
    }
    Progress progress("train", (max_epochs_ - from.epoch) * steps_per_epoch_ - from.step, "steps", style);
    for (std::int64_t epoch = from.epoch; epoch < max_epochs_; ++epoch) {
      const std::int64_t first_step = epoch == from.epoch ? from.step : 0;
      const auto active = start_epoch(epoch, first_step);
      if (active.empty()) break;
      train_epoch(epoch, first_step, active, progress);
      progress.set_note(detail::str_cat("epoch ", epoch + 1, ": evaluating on ", eval_rows_.size(0), " rows",
                                        top_ ? " through the top" : "", ", then the checkpoint"));
      TopEpoch top_epoch = top_ ? top_->end_epoch() : TopEpoch{};
      finish_epoch(epoch, active, top_epoch);
      progress.set_note("");
      progress.message(epoch_line(epoch, active) + top_line(top_epoch));
      // The epoch's checkpoint is the place to stop; after the last epoch the run just ends.
      if (epoch + 1 < max_epochs_) {
        if (const int signal = agree_on_stop()) stop(signal);
      }
    }
    for (auto& r : runs_) {
      if (r.training()) r.state = tasks::TaskState::kDone;
    }
    store_.flush();  // the last checkpoint committed (or its error thrown) before the export
    progress.finish();
  }

 private:
  // A stop asked for (StopOnSignal), once the checkpoint where it stops is saved: committed,
  // then Stopped.
  [[noreturn]] void stop(int signal) {
    store_.flush();
    throw Stopped(signal, detail::str_cat("stopped by ", signal_name(signal), ": ", store_.resume_point(),
                                          "; run the same command with --resume to go on from it"));
  }

  // The heads that train this epoch; a run resumed mid-epoch keeps its partial losses.
  std::vector<std::size_t> start_epoch(std::int64_t epoch, std::int64_t first_step) {
    std::vector<std::size_t> active;
    for (std::size_t i = 0; i < runs_.size(); ++i) {
      if (!runs_[i].training()) continue;
      if (epoch >= set_.epochs[i]) {
        runs_[i].state = tasks::TaskState::kDone;
        continue;
      }
      active.push_back(i);
      if (first_step == 0) runs_[i].start_epoch();
      set_.tasks[i]->start_epoch(epoch, set_.epochs[i]);
    }
    if (top_) top_->start_epoch(epoch, max_epochs_, first_step);
    if (mpi::distributed() && !top_) take_share(active);
    return active;
  }

  // Under mpirun, at each epoch's start: the units of the plan one process would make for
  // `active`, this rank's share of them. A head that moves to this rank continues from the
  // checkpoint its last rank wrote at the epoch's end (every rank holds every head's state
  // when the run starts: made from the same seeds, or loaded from the checkpoint). The runs of
  // the heads other ranks train come from them at every epoch's end (sync_runs).
  void take_share(const std::vector<std::size_t>& active) {
    HeadShare share = share_heads(set_, active, owner_, plan_options(), fuse_unit_);
    std::vector<bool> mine(share.owner.size());
    for (std::size_t i = 0; i < mine.size(); ++i) {
      mine[i] = share.owner[i] == mpi::rank();
      if (mine[i] && !mine_.empty() && !mine_[i]) store_.load_task(*set_.tasks[i]);
    }
    if (share.line != share_line_) log_info(share.line);
    share_line_ = share.line;
    owner_ = std::move(share.owner);
    mine_ = std::move(mine);
    assigned_ = std::move(share.units);
    store_.set_owned(mine_);
  }

  void train_epoch(std::int64_t epoch, std::int64_t first_step, const std::vector<std::size_t>& active,
                   Progress& progress) {
    source_.start_epoch(epoch);
    source_done_ = false;
    std::int64_t step = 0;
    {
      datasets::Batch batch;
      // The data order depends only on (seed, epoch): a resumed run skips what was done.
      for (; step < first_step && source_.next(batch); ++step) {
        if (top_) replay(batch);  // the cache level rows it stored
      }
    }
    // Windows of steps: the heads train one window while the next one's batches are
    // gathered beside them (StepRunner::train_window), two windows held at once.
    std::vector<datasets::Batch> windows[2];
    std::size_t cur = 0;
    std::size_t count = fill_window(windows[cur], epoch, step, 1);
    const std::size_t size = count == 0 ? 1 : window_steps(windows[cur][0]);
    count += fill_window(windows[cur], epoch, step, size, count);  // nothing more at the epoch's end
    std::vector<std::size_t> planned_for;                          // the heads `units` were planned for
    std::vector<WorkUnit> units;
    while (count > 0) {
      std::vector<std::size_t> training;
      for (std::size_t i : active) {
        if (runs_[i].training() && mine(i)) training.push_back(i);
      }
      if (planned_for.empty() || training != planned_for) {  // a head failed, or a new epoch
        units = training == assigned_heads()
                    ? assigned_
                    : plan_units(set_.plan_heads, training, plan_options(), fuse_unit_);
        planned_for = std::move(training);
      }
      std::size_t next_count = 0;
      auto& next = windows[1 - cur];
      const std::int64_t next_step = step + static_cast<std::int64_t>(count);
      if (top_) {
        train_shared_step(units, windows[cur][0], epoch, step);
        next_count = fill_window(next, epoch, next_step, size);
      } else {
        runner_.train_window(units, set_.tasks, runs_, windows[cur], count, epoch, step,
                             [&] { next_count = fill_window(next, epoch, next_step, size); });
      }
      progress.advance(static_cast<std::int64_t>(count));
      step = next_step;
      if (config_.train.fail_fast) check_none_failed(active);
      const std::int64_t global_step = epoch * steps_per_epoch_ + step;
      const auto every = config_.train.checkpoint_steps;
      // A stop asked for (of any rank under mpirun, which all reach this point in step): a
      // checkpoint here, then Stopped. The epoch's last window stops at the epoch's checkpoint.
      const int signal = step < steps_per_epoch_ ? agree_on_stop() : 0;
      if (step < steps_per_epoch_ && ((every > 0 && global_step % every == 0) || signal != 0)) {
        sync_runs();
        store_.save({epoch, step}, set_.tasks, runs_, top_);
        if (signal != 0) stop(signal);
      }
      cur = 1 - cur;
      count = next_count;
    }
  }

  // Steps per window: 1 with a shared top (each step needs every head's gradient) or
  // train.fail_fast (nothing trains past a failure), else as many as fit in kWindowBytes of
  // batches (at most kWindowSteps).
  std::size_t window_steps(const datasets::Batch& batch) const {
    if (top_ || config_.train.fail_fast) return 1;
    const auto bytes = std::max<std::size_t>(1, batch.features.nbytes());
    return std::clamp<std::size_t>(kWindowBytes / bytes, 1, kWindowSteps);
  }

  // Gathers batches into window[at..] for the window that starts at step `from` (of `size`
  // steps at most), stopping at the end of the epoch (and not asking the source again after
  // it) and at a train.checkpoint_steps boundary; returns how many it gathered.
  std::size_t fill_window(std::vector<datasets::Batch>& window, std::int64_t epoch, std::int64_t from,
                          std::size_t size, std::size_t at = 0) {
    std::size_t limit = size;
    const auto every = config_.train.checkpoint_steps;
    if (every > 0) {
      const std::int64_t global = epoch * steps_per_epoch_ + from;
      limit = std::min<std::size_t>(limit, static_cast<std::size_t>(every - global % every));
    }
    if (window.size() < size) window.resize(size);  // batches are reused: the source refills them
    std::size_t n = 0;
    while (!source_done_ && at + n < limit) {
      if (!source_.next(window[at + n])) {
        source_done_ = true;
        break;
      }
      ++n;
    }
    return n;
  }

  // One step with the trunk's top shared by every head: its forward once, the heads
  // concurrently on its output, their gradients w.r.t. it summed, one backward through it.
  void train_shared_step(const std::vector<WorkUnit>& units, const datasets::Batch& batch, std::int64_t epoch,
                         std::int64_t step) {
    const auto step_start = Clock::now();
    // Under mpirun, data parallel: this rank runs the top on its slice of the batch, every rank
    // gets every slice's output, trains every head on all of it (as one process does), and
    // back-propagates through the top its slice's part of the heads' gradient; the top's
    // gradients are summed over the ranks before its step (SharedTop::step).
    const auto [lo, hi] = my_rows(batch.features.size(0));
    const at::Tensor z_own =
        !mpi::distributed() ? top_->forward(batch.features, true, batch.index)
        : hi > lo           ? top_->forward(batch.features.slice(0, lo, hi), true,
                                  batch.index.defined() ? batch.index.slice(0, lo, hi) : batch.index)
                            : at::empty({0, top_->feature_dim()}, at::kFloat);
    const at::Tensor z = mpi::distributed() ? gather_rows(z_own, batch.features.size(0)) : z_own;
    CANOPY_CHECK(z.isfinite().all().item<bool>(), Error, "the shared top's output is not finite at epoch ",
                 epoch + 1, " step ", step + 1,
                 " (its weights diverged; lower trunk.lr). The last checkpoint in ", store_.dir(),
                 " is the last good state");
    datasets::Batch shared{z.detach(), batch.labels, batch.index};
    auto t = Clock::now();
    last_weights_ = weighting_->weights();
    weighting_seconds_ += since(t);
    for (std::size_t i = 0; i < set_.tasks.size(); ++i) {
      set_.tasks[i]->set_loss_weight(last_weights_[i]);
      runs_[i].last_loss = std::numeric_limits<double>::quiet_NaN();
    }
    std::vector<at::Tensor> grads;
    const bool learns = top_->trains();
    runner_.train(units, set_.tasks, runs_, shared, epoch, step, learns ? &grads : nullptr);
    if (learns && has_grid_) weigh_grids(units, grads);
    std::vector<double> losses;
    for (const auto& r : runs_)
      losses.push_back(r.failed() ? std::numeric_limits<double>::quiet_NaN() : r.last_loss);
    t = Clock::now();
    weighting_->after_step(losses);
    weighting_seconds_ += since(t);
    if (!learns) {  // gradual's warm-up: the heads alone
      step_seconds_ += since(step_start);
      return;
    }
    t = Clock::now();
    const at::Tensor total = weighting_->combine(grads, epoch * steps_per_epoch_ + step);
    weighting_seconds_ += since(t);
    if (!total.defined()) return;  // every head failed: nothing to learn from
    top_moved_ = true;
    try {
      top_->step(z_own, mpi::distributed() ? total.slice(0, lo, hi) : total, step);
    } catch (const Error& e) {
      throw Error(detail::str_cat(e.what(), " at epoch ", epoch + 1, " step ", step + 1,
                                  "; the last checkpoint in ", store_.dir(), " is the last good state"));
    }
    step_seconds_ += since(step_start);
  }

 public:
  // The loss weighting's own time (its weights, its update, combining the gradients) and the
  // shared steps' whole time, in this process.
  std::pair<double, double> weighting_share() const { return {weighting_seconds_, step_seconds_}; }

 private:
  // A grid weighs on the shared top as one task: each unit's gradient to it scaled by 1 / n,
  // n its grid's members that stepped (grid_top_shares).
  void weigh_grids(const std::vector<WorkUnit>& units, std::vector<at::Tensor>& grads) const {
    std::vector<bool> stepped;
    for (const auto& r : runs_) stepped.push_back(!r.failed() && std::isfinite(r.last_loss));
    const std::vector<double> shares = grid_top_shares(units, grids_, stepped);
    for (std::size_t u = 0; u < units.size(); ++u) {
      if (grads[u].defined() && shares[u] != 1.0) grads[u] = grads[u] * shares[u];
    }
  }

  // A warm-up longer than the steps the top trains, said once at the start.
  void describe_short_warmup() const {
    if (!top_) return;
    const std::int64_t warmup = config_.top.lr_warmup_steps, steps = top_->steps_before(max_epochs_);
    if (warmup <= steps) return;
    log_info(detail::str_cat("trunk.lr_warmup_steps = ", warmup, " is more than the ", steps,
                             " steps the top trains in ", max_epochs_,
                             " epoch(s): its learning rate never reaches trunk.lr (at most ", steps, "/",
                             warmup, " of it)"));
  }

  // With a trained top, said once at the start: how a grid weighs on it.
  void describe_grids_on_top() const {
    if (!top_ || !has_grid_) return;
    for (std::size_t i = 0, end = 0; i < runs_.size(); i = end) {
      end = grid_end(i);
      const std::string& grid = set_.tasks[i]->config().grid;
      if (grid.empty()) continue;
      log_info(detail::str_cat("grid '", grid, "' (", end - i,
                               " members) trains the trunk's shared top as one task: each member's gradient "
                               "to it counts 1 / n, n the members training"));
    }
  }

  void check_none_failed(const std::vector<std::size_t>& active) const {
    for (std::size_t i : active) {
      CANOPY_CHECK(!runs_[i].failed(), Error, "head '", set_.results[i].name, "' FAILED at ",
                   runs_[i].failure, "; stopping every head (train.fail_fast / --fail-fast)");
    }
  }

  bool mine(std::size_t i) const { return mine_.empty() || mine_[i]; }

  // Rank r's rows [lo, hi) of `n` to run the top over: a run of whole batches.
  std::pair<std::int64_t, std::int64_t> eval_share(std::int64_t n, int r = mpi::rank()) const {
    const std::int64_t batch = config_.train.batch_size, batches = (n + batch - 1) / batch, k = mpi::size();
    return {std::min(n, batches * r / k * batch), std::min(n, batches * (r + 1) / k * batch)};
  }
  // The top's output on `rows`, in batches of train.batch_size. Under mpirun each rank runs
  // its share of the batches (the batches one process runs, so each row's output is the
  // same) and every rank gets all of them.
  at::Tensor top_features(const at::Tensor& rows) const {
    const std::int64_t batch = config_.train.batch_size, n = rows.size(0);
    if (!mpi::distributed() || n * top_->feature_dim() > std::numeric_limits<int>::max())
      return top_->features(rows, batch);
    const auto [lo, hi] = eval_share(n);
    return gather_shares(top_->features(rows.slice(0, lo, hi), batch), n,
                         [&](int r) { return eval_share(n, r); });
  }

  // A step skipped on resume stores the cache level rows it stored: under mpirun, this rank's
  // slice of the batch, as train_shared_step ran the top on.
  void replay(const datasets::Batch& batch) {
    if (!mpi::distributed()) return top_->replay(batch.features, batch.index);
    const auto [lo, hi] = my_rows(batch.features.size(0));
    if (hi > lo)
      top_->replay(batch.features.slice(0, lo, hi),
                   batch.index.defined() ? batch.index.slice(0, lo, hi) : batch.index);
  }

  // Under mpirun with a trainable top: the rows [lo, hi) of a batch of `rows` rank r's top
  // pass takes, this rank's by default (contiguous, as even as can be).
  std::pair<std::int64_t, std::int64_t> my_rows(std::int64_t rows, int r = mpi::rank()) const {
    const std::int64_t k = mpi::size();
    return {rows * r / k, rows * (r + 1) / k};
  }
  // Every rank's top output, in row order: the batch's [rows, D].
  at::Tensor gather_rows(const at::Tensor& own, std::int64_t rows) const {
    return gather_shares(own, rows, [&](int r) { return my_rows(rows, r); });
  }
  // All [n, D] rows of an output the ranks computed in shares: rank r the rows [a, b) that
  // share(r) gives, this rank `own`.
  template <class Share>
  at::Tensor gather_shares(const at::Tensor& own, std::int64_t n, Share share) const {
    const std::int64_t d = top_->feature_dim();
    std::vector<int> counts;
    for (int r = 0; r < mpi::size(); ++r) {
      const auto [a, b] = share(r);
      counts.push_back(static_cast<int>((b - a) * d));
    }
    const at::Tensor mine = own.detach().to(at::kFloat).contiguous();
    at::Tensor all = at::empty({n, d}, at::kFloat);
    mpi::all_gather(mine.data_ptr<float>(), counts, all.data_ptr<float>());
    return all;
  }
  std::vector<std::size_t> assigned_heads() const {
    std::vector<std::size_t> heads;
    for (const auto& u : assigned_) heads.insert(heads.end(), u.begin(), u.end());
    std::sort(heads.begin(), heads.end());
    return heads;
  }

  // Data parallel: every rank holds the same top and heads; a hash of all their weights,
  // compared over the ranks at each epoch's end, says they still do.
  void check_replicas_agree(std::int64_t epoch) const {
    std::uint64_t h = top_->weights_hash();
    for (const auto* t : set_.tasks) h = hash_weights(t->head().parameters(), h);
    CANOPY_CHECK(mpi::all_equal(h), Error, "the ranks' weights differ after epoch ", epoch + 1, " (",
                 mpi::describe_rank(), " hashes them to ", h,
                 "): the data-parallel replicas diverged; nothing of this epoch is saved");
  }

  // Under mpirun: every rank's runs of the heads it trains, on every rank.
  void sync_runs() {
    if (mine_.empty()) return;
    std::string own;
    for (std::size_t i = 0; i < runs_.size(); ++i) {
      if (mine_[i]) own += std::to_string(i) + " " + encode_run(runs_[i]) + "\n";
    }
    for (const auto& theirs : mpi::all_gather(own)) {
      std::istringstream in(theirs);
      std::size_t i = 0;
      for (std::string line; in >> i && std::getline(in, line);) decode_run(line, runs_.at(i));
    }
  }

  void finish_epoch(std::int64_t epoch, const std::vector<std::size_t>& active, TopEpoch& top_epoch) {
    std::vector<std::size_t> own;
    for (std::size_t i : active) {
      if (mine(i)) own.push_back(i);
    }
    // Largest heads first, so that no worker is left with a large one at the end.
    std::vector<std::size_t> by_cost = own;
    std::stable_sort(by_cost.begin(), by_cost.end(), [&](std::size_t a, std::size_t b) {
      return set_.plan_heads[a].cost > set_.plan_heads[b].cost;
    });
    const auto metrics =
        runner_.evaluate(by_cost, set_.tasks, runs_, eval_features(), set_.eval_targets, epoch);
    for (std::size_t i : own) {
      const bool best = runs_[i].finish_epoch(epoch, set_.epochs[i], metrics[i],
                                              set_.tasks[i]->config().early_stop_patience);
      if (best && keep_best_) set_.tasks[i]->keep_best();
    }
    sync_runs();
    if (keep_joint_best_) keep_joint_best(epoch, own, top_epoch);
    halve_grids(epoch);
    if (top_ && mpi::distributed()) check_replicas_agree(epoch);
    std::vector<double> means(runs_.size(), std::numeric_limits<double>::quiet_NaN());
    for (std::size_t i : active) {
      if (metrics_) metrics_->record(epoch, i, runs_[i]);
      if (!runs_[i].failed()) means[i] = runs_[i].train_loss;
    }
    if (top_) {
      weighting_->end_epoch(means);
      if (metrics_)
        metrics_->record_top(epoch, top_epoch, last_weights_.empty() ? weighting_->weights() : last_weights_);
    }
    if (metrics_) metrics_->flush();
    store_.save({epoch + 1, 0}, set_.tasks, runs_, top_);
    if (top_) top_->prune_levels();
  }

  // train.export = best over a trainable top: every head reads the top, so one epoch is
  // exported for all, the one with the best mean validation score over the tasks, or the
  // best score of train.export_monitor's (a grid counts as its best member, a head that
  // stopped with its last score, a failed one not at all). There the top and every head
  // still training keep their weights; a head that stopped before it exports its last epoch
  // (export_heads), as its weights have not moved since. Every rank holds every run here
  // (sync_runs) and the same top: all keep alike.
  void keep_joint_best(std::int64_t epoch, const std::vector<std::size_t>& own, TopEpoch& row) {
    const std::string& monitor = config_.train.export_monitor;
    double sum = 0;
    std::int64_t tasks = 0;
    for (std::size_t i = 0, end = 0; i < runs_.size(); i = end) {
      end = grid_end(i);
      const auto& tc = set_.tasks[i]->config();
      if (!monitor.empty() && monitor != tc.written_name()) continue;
      double best = -std::numeric_limits<double>::infinity();
      for (std::size_t j = i; j < end; ++j) {
        if (!runs_[j].failed() && runs_[j].epochs > 0 && runs_[j].eval.score() > best)
          best = runs_[j].eval.score();
      }
      if (std::isfinite(best)) {
        sum += best;
        ++tasks;
      }
    }
    if (tasks == 0) return;
    row.score = sum / static_cast<double>(tasks);
    if (row.score > top_->best_score()) {
      top_->keep_best(epoch + 1, row.score);
      for (std::size_t i : own) {
        if (!runs_[i].failed()) set_.tasks[i]->keep_best();
      }
    }
    row.best_epoch = top_->best_epoch();
  }

  // Past the last of the tasks from `i` that are one grid's members (they are adjacent); i + 1
  // for a head of its own.
  std::size_t grid_end(std::size_t i) const {
    const std::string& grid = set_.tasks[i]->config().grid;
    std::size_t end = i + 1;
    while (!grid.empty() && end < runs_.size() && set_.tasks[end]->config().grid == grid) ++end;
    return end;
  }

  // The cuts successive halving will make, said once at the start: "grid 'probe': successive
  // halving after epochs 1, 3, 9 (48 -> 16 -> 6 -> 2 members training, fewer where some stop
  // early)".
  void describe_halving() const {
    const TrainConfig& t = config_.train;
    if (t.grid_halving <= 0) return;
    for (std::size_t i = 0, end = 0; i < runs_.size(); i = end) {
      end = grid_end(i);
      const std::string& grid = set_.tasks[i]->config().grid;
      if (grid.empty()) continue;
      const std::int64_t longest = *std::max_element(set_.epochs.begin() + static_cast<std::ptrdiff_t>(i),
                                                     set_.epochs.begin() + static_cast<std::ptrdiff_t>(end));
      std::vector<std::string> cuts;
      std::size_t n = end - i;
      std::string counts = std::to_string(n);
      for (std::int64_t e = 1; e < longest; ++e) {
        if (!halving_cut_after(e, t.grid_halving, t.grid_halving_factor)) continue;
        cuts.push_back(std::to_string(e));
        n = halving_keep(n, t.grid_halving_factor);
        counts += " -> " + std::to_string(n);
      }
      if (cuts.empty()) continue;
      log_info("grid '" + grid + "': successive halving after epoch" + (cuts.size() > 1 ? "s " : " ") +
               join(cuts, ", ") + " (" + counts + " members training, fewer where some stop early)");
    }
  }

  // Successive halving (train.grid_halving): at a cut, each grid's members still training go
  // on only when among its best 1 / factor on the validation split, ranked by the score of the
  // epoch each would export. Every rank holds every run here (sync_runs): all stop the same.
  void halve_grids(std::int64_t epoch) {
    const TrainConfig& t = config_.train;
    if (!halving_cut_after(epoch + 1, t.grid_halving, t.grid_halving_factor)) return;
    for (std::size_t i = 0, end = 0; i < runs_.size(); i = end) {
      end = grid_end(i);
      const std::string& grid = set_.tasks[i]->config().grid;
      if (grid.empty()) continue;
      std::vector<std::size_t> members;
      std::vector<double> scores;
      for (std::size_t j = i; j < end; ++j) {
        if (!runs_[j].training()) continue;
        members.push_back(j);
        scores.push_back(keep_best_ ? runs_[j].best_score : runs_[j].eval.score());
      }
      const auto stops = halving_stops(scores, t.grid_halving_factor);
      const std::size_t kept = members.size() - stops.size();
      for (std::size_t k : stops) runs_[members[k]].stop_by_halving(scores[k], kept, members.size());
      if (!stops.empty())
        log_info(detail::str_cat("grid '", grid, "': successive halving after epoch ", epoch + 1, ": ", kept,
                                 " of ", members.size(), " members training go on"));
    }
  }

  // What the top did, for the progress line: " | top: blocks.12, blocks.13 train (level blocks.11)".
  std::string top_line(const TopEpoch& e) const {
    if (!top_) return "";
    std::ostringstream o;
    o << " | top: " << (e.training.empty() ? std::string("frozen") : join(e.training, ", ") + " train");
    if (!e.level.empty()) o << " (reads " << e.level << "'s cached output)";
    bool any = false;
    for (const auto& [block, r] : e.rates) {
      if (!std::isfinite(r)) continue;
      char buf[64];
      std::snprintf(buf, sizeof buf, "%s%s %.3f", any ? ", " : "; change rates ", block.c_str(), r);
      o << buf;
      any = true;
    }
    if (e.steps > 0) o << "; " << describe_top_steps(e.lr, e.grad_norm, e.clipped, e.steps);
    if (std::isfinite(e.score)) {
      char buf[64];
      std::snprintf(buf, sizeof buf, " %.4f (best: epoch %lld)", e.score,
                    static_cast<long long>(e.best_epoch));
      o << "; validation: " << describe_monitor(config_.train.export_monitor) << buf;
    }
    return o.str();
  }

  std::string epoch_line(std::int64_t epoch, const std::vector<std::size_t>& active) const {
    std::ostringstream line;
    line << "epoch " << epoch + 1 << "/" << max_epochs_ << ":";
    for (std::size_t i = 0; i < runs_.size(); ++i) {
      const auto& r = runs_[i];
      const char* name = set_.results[i].name.c_str();
      char buf[320];
      const std::string& grid = set_.tasks[i]->config().grid;
      if (!grid.empty()) {  // a grid: its best member this epoch, not every member
        if (i > 0 && set_.tasks[i - 1]->config().grid == grid) continue;
        std::size_t members = 0, training = 0, best = i;
        bool any = false;
        for (std::size_t j = i, end = grid_end(i); j < end; ++j) {
          ++members;
          if (runs_[j].failed() || std::find(active.begin(), active.end(), j) == active.end()) continue;
          ++training;
          if (!any || runs_[j].eval.score() > runs_[best].eval.score()) best = j;
          any = true;
        }
        const auto& b = runs_[best];
        if (!any) {
          std::snprintf(buf, sizeof buf, " %s: %zu heads, none training", grid.c_str(), members);
        } else if (b.eval.monitor != tasks::Monitor::kAuto) {  // task.NAME.monitor's metric
          std::snprintf(buf, sizeof buf, " %s: best %s %.4f (%s; %zu of %zu heads training)", grid.c_str(),
                        b.eval.score_name(), b.eval.score_value(b.eval.score()),
                        set_.results[best].name.c_str() + grid.size() + 1, training, members);
        } else {
          std::snprintf(buf, sizeof buf,
                        b.eval.regression ? " %s: best R^2 %.3f (%s; %zu of %zu heads training)"
                                          : " %s: best %.1f%% (%s; %zu of %zu heads training)",
                        grid.c_str(), b.eval.regression ? b.eval.regression->r2 : 100 * b.eval.accuracy,
                        set_.results[best].name.c_str() + grid.size() + 1, training, members);
        }
        line << buf;
        continue;
      }
      if (r.failed()) {
        std::snprintf(buf, sizeof buf, " %s FAILED", name);
      } else if (std::find(active.begin(), active.end(), i) == active.end()) {
        std::snprintf(buf, sizeof buf, " %s done", name);
      } else {
        std::snprintf(buf, sizeof buf, r.eval.regression ? " %s R^2 %.3f%s" : " %s %.1f%%%s", name,
                      r.eval.regression ? r.eval.regression->r2 : 100 * r.eval.accuracy,
                      r.stop_note.empty() ? "" : " (stopped)");
      }
      line << buf;
    }
    return line.str();
  }

  std::function<bool(const WorkUnit&)> fuse_unit_;  // train.fuse = auto: FusionChooser; else none
  const JobConfig& config_;
  bool keep_best_ = false;        // each head keeps its best epoch's weights (train.export = best)
  bool keep_joint_best_ = false;  // the same with a top: the top and heads of one epoch (keep_joint_best)
  TaskSet& set_;
  datasets::BatchSource& source_;
  const at::Tensor& eval_rows_;
  SharedTop* top_;
  LossWeighting* weighting_;
  std::vector<double> last_weights_;  // each task's loss weight in the last step
  double weighting_seconds_ = 0, step_seconds_ = 0;
  at::Tensor top_eval_;    // the top's output on eval_rows_ ...
  bool top_moved_ = true;  // ... unless the top stepped since
  CheckpointStore& store_;
  MetricsSink* metrics_;            // rank 0's (none on the other ranks)
  std::vector<bool> mine_;          // under mpirun, the heads this rank trains (empty: all)
  std::vector<WorkUnit> assigned_;  // ... in the units rank 0 planned
  std::vector<int> owner_;          // ... and every head's rank
  std::string share_line_;
  StepRunner& runner_;
  std::vector<HeadRun>& runs_;
  std::int64_t steps_per_epoch_ = 0;
  bool source_done_ = false;  // the source said the epoch's batches are all served
  std::int64_t max_epochs_ = 0;
  std::vector<std::string> grids_;  // per task, the grid it is a member of ("" for none)
  bool has_grid_ = false;           // some task is a grid's member
};

// The groups of the first step, as the report and the log name them: the fused ones, and
// with a chooser (train.fuse = auto) those it timed slower fused, with its numbers.
void describe_fusion(const TaskSet& set, const FusionPlanOptions& options,
                     const std::function<bool(const WorkUnit&)>& fuse_unit, const FusionChooser* chooser,
                     TrainReport& report) {
  std::vector<std::size_t> everyone(set.tasks.size());
  for (std::size_t i = 0; i < everyone.size(); ++i) everyone[i] = i;
  for (const auto& unit : plan_units(set.plan_heads, everyone, options, fuse_unit)) {
    if (unit.size() < 2) continue;
    std::string group;
    for (std::size_t i : unit) group += (group.empty() ? "" : " + ") + set.results[i].name;
    const std::string key = set.plan_heads[unit.front()].fusion_key;
    const FusionDecision* decided = nullptr;
    if (chooser) {
      const auto it = chooser->decisions().find(group);
      if (it != chooser->decisions().end()) decided = &it->second;
    }
    report.fused.push_back(decided ? describe_decision(group, key, *decided) : group + " (" + key + ")");
    log_info("fused " + std::to_string(unit.size()) + " heads: " + report.fused.back());
  }
  if (!chooser) return;
  for (const auto& [group, d] : chooser->decisions()) {
    if (d.fuse) continue;
    report.not_fused.push_back(describe_decision(group, "", d));
    log_info("not fused: " + report.not_fused.back());
  }
}

// What the trainer chose each head on and tests it on at the end.
struct FinalSplits {
  at::Tensor selection_features;  // the split epochs were scored on (validation, else test)
  bool validation = false;        // whether that is a held-out validation split
  at::Tensor test_features;
  const datasets::SplitData* test = nullptr;  // its labels
};

// How far a grid's winner (task `winner`, one of `members`, listed in `listed` in their order)
// leads the runner-up on the validation split: both heads' outputs there (`validation_outputs`)
// on the same resamples of its rows, in the monitored metric's score. Empty without a runner-up.
std::optional<Paired> grid_lead(const TaskSet& set, const std::vector<std::size_t>& members,
                                std::size_t winner, const std::vector<GridMember>& listed,
                                const std::vector<tasks::HeadOutputs>& validation_outputs,
                                const TrainConfig& train) {
  std::optional<std::size_t> runner;  // places in `members`
  std::size_t winner_place = 0;
  for (std::size_t k = 0; k < members.size(); ++k) {
    if (members[k] == winner) winner_place = k;
    if (members[k] == winner || listed[k].state != tasks::TaskState::kDone ||
        !set.results[members[k]].validation)
      continue;
    if (!runner || listed[k].validation_score > listed[*runner].validation_score) runner = k;
  }
  if (!runner) return std::nullopt;
  const auto& config = set.tasks[winner]->config();
  const std::string metric = tasks::scored_metric(config.kind, config.monitor);
  const std::vector<tasks::Resampled> both = tasks::bootstrap(
      {validation_outputs[winner], validation_outputs[members[*runner]]},
      {train.bootstrap_resamples, train.interval_level, static_cast<std::uint64_t>(train.seed)});
  const std::vector<double>& w = *both[0].find(metric);
  return Paired{
      listed[*runner].name, metric, listed[winner_place].validation_score - listed[*runner].validation_score,
      tasks::difference_interval(w, *both[1].find(metric), train.interval_level,
                                 tasks::lower_is_better(metric) ? -1.0 : 1.0),  // a score: higher is better
      w.size()};
}

// Final evaluation and export. Each head that finished takes its exported epoch's weights
// (train.export: best on the validation split, or the last); with a validation split it is
// scored there again. A grid's members are compared on the validation split alone, and only
// its winner is evaluated on the test split, once, and exported under the grid's name.
// `shared_best` (> 0): the epoch exported for the top and every head (keep_joint_best); a
// head that stopped before it exports its last epoch.
void export_heads(TaskSet& set, const std::vector<HeadRun>& runs, const datasets::CacheMeta& meta,
                  const FinalSplits& splits, const std::string& dir, TrainReport& report,
                  std::int64_t shared_best, const TrainConfig& train) {
  std::vector<tasks::HeadOutputs> validation_outputs(set.tasks.size());  // of grid members, when resampled
  for (std::size_t i = 0; i < set.tasks.size(); ++i) {
    TaskResult& r = set.results[i];
    const HeadRun& run = runs[i];
    r.state = run.state;
    r.failure = run.failure;
    r.epochs = run.epochs;
    r.train_loss = run.train_loss;
    r.eval = run.eval;
    r.seconds = run.seconds;
    r.note = run.stop_note;
    if (r.state != tasks::TaskState::kDone) continue;
    if (shared_best > 0) {
      r.exported_epoch = run.epochs >= shared_best && set.tasks[i]->restore_best() ? shared_best : run.epochs;
    } else {
      r.exported_epoch = set.tasks[i]->restore_best() ? run.best_epoch : run.epochs;
    }
    if (splits.validation) {
      set.tasks[i]->tune_thresholds(splits.selection_features, set.eval_targets[i]);  // threshold = tune
      set.tasks[i]->calibrate(splits.selection_features, set.eval_targets[i]);  // calibrate = temperature
      r.temperature = set.tasks[i]->temperature();
      // Kept for a grid's members: the winner's lead over the runner-up is resampled from them.
      tasks::HeadOutputs scored =
          tasks::head_outputs(*set.tasks[i], splits.selection_features, set.eval_targets[i]);
      r.validation = tasks::evaluate_head(scored, set.tasks[i]->config().monitor);
      if (!set.tasks[i]->config().grid.empty() && train.bootstrap_resamples > 0)
        validation_outputs[i] = std::move(scored);
      if (const auto& fit = set.tasks[i]->temperature_fit()) {
        std::ostringstream said;
        said.precision(4);
        said << "task '" << r.name << "': temperature " << fit->temperature << " fitted on "
             << r.validation->count << " validation rows (their mean NLL " << fit->nll_before << " -> "
             << *r.validation->nll << ")";
        log_info(said.str());
      }
    }
  }
  // The test split, once per exported head (a resumed run carries no confusion matrix over from
  // before the interruption, so the exported metrics come from the exported weights); then every
  // exported head's intervals, on the same resamples of the test rows (paired); then the exports.
  std::vector<std::pair<std::size_t, std::size_t>> tested;  // (task, its result's place in `out`)
  std::vector<tasks::HeadOutputs> outputs;
  std::vector<TaskResult> out;
  auto test = [&](std::size_t i, TaskResult& r) {
    auto& task = *set.tasks[i];
    tasks::HeadOutputs scored = tasks::head_outputs(
        task, splits.test_features, task.targets(splits.test->labels.at(task.config().labels)));
    r.eval = tasks::evaluate_head(scored, task.config().monitor);
    r.interval_level = train.interval_level;
    if (train.bootstrap_resamples > 0) outputs.push_back(std::move(scored));
    tested.emplace_back(i, out.size());
  };
  for (std::size_t i = 0; i < set.tasks.size(); ++i) {
    const auto& tc = set.tasks[i]->config();
    if (tc.grid.empty()) {
      if (set.results[i].state == tasks::TaskState::kDone) test(i, set.results[i]);
      out.push_back(std::move(set.results[i]));
      continue;
    }
    if (i > 0 && set.tasks[i - 1]->config().grid == tc.grid) continue;  // members are adjacent
    std::vector<std::size_t> members;
    for (std::size_t j = i; j < set.tasks.size() && set.tasks[j]->config().grid == tc.grid; ++j)
      members.push_back(j);
    std::optional<std::size_t> winner;
    std::vector<GridMember> listed;
    for (std::size_t j : members) {
      const TaskResult& m = set.results[j];
      GridMember g{
          m.name,           set.tasks[j]->config().grid_point,          m.state,  m.failure, m.note, m.epochs,
          m.exported_epoch, m.validation ? m.validation->score() : 0.0, m.seconds};
      listed.push_back(g);
      if (m.state == tasks::TaskState::kDone && m.validation &&
          (!winner || g.validation_score > set.results[*winner].validation->score()))
        winner = j;
    }
    TaskResult r = std::move(set.results[winner ? *winner : members.front()]);
    if (winner && splits.validation && train.bootstrap_resamples > 0)
      r.grid_lead = grid_lead(set, members, *winner, listed, validation_outputs, train);
    r.winner = r.name;
    r.name = tc.grid;
    r.grid = std::move(listed);
    if (winner) {
      test(*winner, r);
      log_info("grid '" + tc.grid + "': " + r.winner + " won on the validation split (" +
               std::to_string(members.size()) + " heads)");
    } else {
      r.state = tasks::TaskState::kFailed;
      r.failure = "every member of the grid failed (the first: " + r.failure + ")";
    }
    out.push_back(std::move(r));
  }
  if (!outputs.empty()) {
    std::vector<tasks::Resampled> resampled = tasks::bootstrap(
        outputs, {train.bootstrap_resamples, train.interval_level, static_cast<std::uint64_t>(train.seed)});
    for (std::size_t k = 0; k < tested.size(); ++k) out[tested[k].second].resampled = std::move(resampled[k]);
  }
  for (const auto& [i, place] : tested)
    out[place].weights_path = export_head(*set.tasks[i], out[place], meta, report.feature_dim, dir);
  report.tasks = std::move(out);
}

// The trunk's shared top and how the tasks' losses reach it, when the cache holds a frozen
// prefix's output (both empty for a cache of pooled features).
struct SharedTraining {
  std::unique_ptr<SharedTop> top;
  std::unique_ptr<LossWeighting> weighting;
};

// Why autofreeze's cache level of `bytes` should not be held beside a train split in memory
// ("" when it may): with cache.memory_cap_mb the two together must fit under it, else the level
// must take at most 3/4 of the memory the process may take when it is made (past_room).
// A split in memory with augmented views holds every view's rows.
std::function<std::string(std::uint64_t)> level_too_large(const JobConfig& config, const TrainSplit& train,
                                                          std::int64_t views) {
  const double split =
      train.rows.defined() ? static_cast<double>(train.rows.nbytes()) * static_cast<double>(views) : 0.0;
  const double cap = config.cache.memory_cap_mb * 1024 * 1024;
  return [split, cap](std::uint64_t bytes) -> std::string {
    const auto b = static_cast<double>(bytes);
    if (cap > 0) {
      return b + split <= cap
                 ? ""
                 : detail::str_cat("with the train split (", format_mib(split),
                                   ") it would pass cache.memory_cap_mb (", format_mib(cap), ")");
    }
    const std::string why = past_room(b, memory_room(1));
    return why.empty() ? "" : "it " + why;
  };
}

SharedTraining make_shared_training(const JobConfig& config, const datasets::FeatureCache& cache,
                                    const TrainSplit& train, std::int64_t train_rows) {
  const auto w = config.train.weighting;
  const bool shared = !cache.meta().row_parts.empty();
  SharedTraining out;
  if (!shared) {
    refuse_top_keys_without_top(config);
    if (const auto unused = top_keys_set(config); !unused.empty()) {
      log_info("the trunk is frozen whole (trunk.freeze = " + trunk::describe(config.trunk.freeze) +
               "), so what only a trainable top reads goes unused: " + join(unused, ", "));
    }
    return out;
  }
  const std::int64_t views = cache.meta().views;
  if (config.top.schedule == FreezeSchedule::kAutofreeze && views > 1) {
    // A level is one row per training row; with views each epoch serves every row as one of
    // its views, so a level stored in one epoch would fix each row to that epoch's view.
    log_info("autofreeze over " + std::to_string(views) +
             " augmented views (cache.views): the blocks it freezes stop training but are computed in every "
             "step, without autograd, on the view drawn; no cache level of their output is kept");
  } else if (config.top.schedule == FreezeSchedule::kAutofreeze && !train.in_memory) {
    const std::string split = format_mib(static_cast<double>(cache.feature_bytes(config.train.train_split)));
    log_info(mpi::distributed() || !config.top.level_on_disk
                 ? "autofreeze over a streamed train split (" + split + ")" +
                       (config.top.level_on_disk ? " under mpirun" : " with trunk.level_on_disk = false") +
                       ": the blocks it freezes stop training but are computed in every step, without "
                       "autograd; a cache level of their output is kept only when the split is in memory "
                       "(cache.memory_cap_mb)"
                 : "autofreeze over a streamed train split (" + split +
                       "): the output of the blocks it freezes is stored on disk during the next epoch (" +
                       join_path(config.train.out_dir, datasets::kLevelDir) +
                       "), and read by row instead of computed from the epoch after");
  }
  double mean_lr = 0.0;
  std::vector<double> static_weights;
  for (const auto& t : config.tasks) {
    mean_lr += t.lr / static_cast<double>(config.tasks.size());
    static_weights.push_back(t.loss_weight);
  }
  const std::int64_t steps = (train_rows + config.train.batch_size - 1) / config.train.batch_size;
  out.top =
      std::make_unique<SharedTop>(trunk::Trunk::load(config.trunk), config.top, cache.meta(), mean_lr,
                                  train_rows, steps, join_path(config.train.out_dir, datasets::kLevelDir));
  out.weighting =
      std::make_unique<LossWeighting>(w, static_weights, config.train.weighting_lr, config.train.seed);
  out.top->set_weighting(out.weighting.get());
  out.top->limit_levels_in_memory(level_too_large(config, train, views));
  if (views > 1) return out;  // no level over views (above)
  if (train.in_memory) out.top->set_train_rows(train.rows);
  if (!mpi::distributed() && config.top.level_on_disk)
    out.top->keep_levels_on_disk(train.in_memory ? train_rows : cache.rows(config.train.train_split));
  return out;
}

// The weighting's own time against the shared steps', for the log.
void log_weighting_share(Weighting weighting, std::pair<double, double> share) {
  const auto [spent, steps] = share;
  char line[200];
  std::snprintf(line, sizeof line, "loss weighting (%s): %.1f ms of %.1f s in the shared steps (%.3f%%)",
                to_string(weighting), 1000 * spent, steps, steps > 0 ? 100 * spent / steps : 0.0);
  log_info(line);
}

// What a failed or killed run left half-written in out_dir goes; a fresh run also drops the
// cache levels an earlier one kept.
void clean_out_dir(const std::string& out_dir, bool resume) {
  const std::string levels = join_path(out_dir, datasets::kLevelDir);
  for (const std::string& sub : {out_dir, out_dir + "/checkpoint", out_dir + "/heads", levels})
    remove_temporaries(sub);
  if (!resume && is_directory(levels)) remove_tree(levels);
}

void log_validation_split(const JobConfig& config, const std::string& stratified_by, std::int64_t rows) {
  log_info("validation split: " + std::to_string(rows) + " rows held out of '" + config.train.train_split +
           "' (train.validation_fraction = " + std::to_string(config.train.validation_fraction) +
           ", stratified by " + stratified_by + "); '" + config.train.eval_split +
           "' is evaluated once, at the end");
}

// What a run reads before it trains, beside the cache: the test split, the training rows
// (and a validation split held out of them), and the trunk's top when the cache holds a prefix.
struct TrainInputs {
  datasets::SplitData test;
  TrainSplit train;
  SharedTraining shared;
  // Epochs (and grid winners) are scored on the validation split when one is held out; the
  // test split is then used once, at the end. Without one, on the test split, as always.
  const datasets::SplitData& selection() const { return train.validation ? *train.validation : test; }
};

// The eval split, and a validation split held out of train, are read whole and evaluated as
// float32, whatever the train split does. Rows that cannot fit in the memory this process may
// take are refused before they are read, with the numbers, instead of ending in the kernel's
// OOM kill.
void refuse_eval_rows_that_cannot_fit(const datasets::FeatureCache& cache, const JobConfig& config) {
  const auto& t = config.train;
  // float16 and bfloat16 splits are read as stored and converted: 2 + 4 bytes a value.
  const double in_memory = cache.meta().dtype == datasets::StorageDtype::kFloat32 ? 1.0 : 3.0;
  const double eval = in_memory * static_cast<double>(cache.feature_bytes(t.eval_split));
  const double validation = has_validation(t) ? in_memory * t.validation_fraction *
                                                    static_cast<double>(cache.feature_bytes(t.train_split))
                                              : 0.0;
  const auto room = memory_room(mpi::local_size());
  if (!room || eval + validation <= static_cast<double>(room->bytes)) return;
  throw DataError(detail::str_cat(
      "the eval split '", t.eval_split, "' (", cache.rows(t.eval_split), " rows, ", format_mib(eval),
      " in memory as float32", validation > 0 ? ", and the validation split's " + format_mib(validation) : "",
      ") is read whole to evaluate on, and is more than the memory this process may take: ", room->said,
      ". Evaluate on a smaller split (train.eval_split), cache fewer rows to evaluate on (data.test_limit), "
      "or run where there is more memory"));
}

TrainInputs open_inputs(const datasets::FeatureCache& cache, const JobConfig& config, TrainReport& report) {
  const auto method = datasets::parse_read_method(config.cache.read_method);
  refuse_eval_rows_that_cannot_fit(cache, config);
  TrainInputs in;
  in.test = cache.load_split(config.train.eval_split, method);
  report.eval_rows = in.test.features.size(0);
  report.feature_dim = cache.feature_dim();
  CANOPY_CHECK(cache.rows(config.train.train_split) > 0, DataError, "split '", config.train.train_split,
               "' of '", config.cache.path, "' is empty");
  in.train = open_train_split(cache, config, method, in.test);
  report.train_rows = in.train.source->rows();
  if (in.train.validation) {
    report.validation_rows = in.train.validation->features.size(0);
    log_validation_split(config, in.train.stratified_by, report.validation_rows);
  }
  // A cache of a frozen prefix: the trunk's top trains too, shared by every head.
  in.shared = make_shared_training(config, cache, in.train, report.train_rows);
  if (const SharedTop* top = in.shared.top.get()) {
    report.feature_dim = top->feature_dim();
    report.top = top->describe();
    log_info("fine-tuning the trunk's top over the cached prefix (output of " + cache.meta().boundary +
             "): " + report.top);
  }
  return in;
}

// train.fuse = auto: the chooser that times each group fused and alone (none otherwise),
// following `kept`, the decisions of the checkpoint the run resumes from.
std::unique_ptr<FusionChooser> make_fusion_chooser(const JobConfig& config, const TaskSet& set,
                                                   std::int64_t feature_dim, bool shared_top,
                                                   FusionDecisions kept) {
  if (config.train.fuse != FuseMode::kAuto) return nullptr;
  return std::make_unique<FusionChooser>(set.tasks, set.eval_targets, feature_dim, config.train.batch_size,
                                         config.train.intra_op_threads, FusionChooser::default_file(),
                                         shared_top, std::move(kept));
}

// The heads' trunk when the top trained: the fine-tuned one, written to out_dir/trunk.pt and
// pinned in every card; the cache's otherwise.
datasets::CacheMeta trained_trunk_meta(const datasets::CacheMeta& cache_meta, SharedTop* top,
                                       const JobConfig& config) {
  datasets::CacheMeta meta = cache_meta;
  if (!top) return meta;
  const std::string& out_dir = config.train.out_dir;
  meta.top_precision = config.trunk.top_precision;
  meta.trunk_path = join_path(out_dir, "trunk.pt");
  meta.trunk_sha256 = top->export_trunk(meta.trunk_path);
  log_info("fine-tuned trunk written to " + meta.trunk_path + " (sha256 " + meta.trunk_sha256 + ")");
  return meta;
}

// The features the heads are scored on at the end: the selection split's (as the loop last
// computed them) and the test split's, through the trained top when there is one.
FinalSplits final_splits(EpochLoop& loop, bool validation, const datasets::SplitData& test, SharedTop* top,
                         std::int64_t batch_size) {
  FinalSplits s{loop.eval_features(false), validation, {}, &test};
  s.test_features = !validation ? s.selection_features
                    : top       ? top->features(test.features.to(at::kFloat), batch_size)
                                : test.features.to(at::kFloat);
  return s;
}

// After a failed write: what the checkpoint on disk is, and the command that goes on from it.
std::string where_to_go_on(const CheckpointStore& store) {
  const auto& kept = store.committed();
  if (!kept) {
    return "no checkpoint had been written yet: once the cause is mended (a full disk: free space), run the "
           "same command again";
  }
  return detail::str_cat(store.resume_point(),
                         ": once the cause is mended (a full disk: free space), run the same command with "
                         "--resume to go on from it");
}

// What the memory fence refused during training, and what to change.
std::string memory_refused(const MemoryFence& fence) {
  const auto refused = fence.refusal();
  return detail::str_cat("an allocation",
                         refused ? " of " + format_mib(static_cast<double>(refused->asked)) : std::string(),
                         " was refused: training needs more memory than this process may take (",
                         fence.room().said, "). A smaller train.batch_size or smaller heads need less");
}

// The first of the `begun` epochs of a run of `total` that a run of `other` would have given
// another rate: ": epoch 2, done, learnt at 0.7500 x the rate, 0.9330 x in a run of 6", or "".
std::string rate_change(tasks::LrSchedule schedule, std::int64_t begun, std::int64_t total,
                        std::int64_t other, std::int64_t step_size, double gamma) {
  for (std::int64_t e = 0; e < begun; ++e) {
    const double was = tasks::lr_factor(schedule, e, total, step_size, gamma);
    const double now = tasks::lr_factor(schedule, e, other, step_size, gamma);
    if (was == now) continue;
    char line[160];
    std::snprintf(line, sizeof line, ": epoch %lld, done, learnt at %.4f x the rate, %.4f x in a run of %lld",
                  static_cast<long long>(e + 1), was, now, static_cast<long long>(other));
    return line;
  }
  return "";
}

// The keys of `values` that `keep` keeps.
CheckpointStore::ConfigValues keys_where(const CheckpointStore::ConfigValues& values,
                                         const std::function<bool(const std::string&)>& keep) {
  CheckpointStore::ConfigValues kept;
  for (const auto& [key, value] : values)
    if (keep(key)) kept[key] = value;
  return kept;
}

// --resume under another configuration: it may give the tasks other epochs (train.epochs,
// task.NAME.epochs), and the run then goes on as one of the new length from its start would
// have; and it may name another train.out_dir, the run's folder copied or moved there (the
// checkpoint, cache levels and exports are read and written where it is now). Nothing else.
// Refused, saying why ("" when not), where that run would have done otherwise in the epochs
// done: fewer epochs than a head began, or a learning-rate schedule over the epochs (cosine)
// that would have given them other rates. `saved` and `now` as key -> value.
std::string resume_refused(const JobConfig& config, bool top, const std::string& out_dir,
                           const CheckpointStore::ConfigValues& saved,
                           const CheckpointStore::ConfigValues& now, const CheckpointPosition& at) {
  const std::string same = "; resume with the same config (see " + join_path(out_dir, "config.ini") + ")";
  const std::string start_over =
      "; train.epochs and task.NAME.epochs may change on --resume where the run "
      "goes on as a run of the new length would; start over without --resume instead";
  const auto other_key = [](const std::string& key) { return !is_epochs_key(key) && key != "train.out_dir"; };
  const auto others = keys_where(saved, other_key), others_now = keys_where(now, other_key);
  if (others != others_now) {
    return config_changes(others, others_now) +
           " (only train.epochs, task.NAME.epochs and train.out_dir may change on --resume)" + same;
  }
  const JobConfig before = job_config_from_values(saved, "the saved configuration");
  if (before.tasks.size() != config.tasks.size()) {
    return config_changes(saved, now) + ": the grids have " + std::to_string(before.tasks.size()) +
           " heads, now " + std::to_string(config.tasks.size()) + same;
  }
  const std::int64_t begun = at.epoch + (at.step > 0 ? 1 : 0);  // epochs that have trained (in part)
  std::int64_t longest_before = 0, longest = 0;
  for (std::size_t i = 0; i < config.tasks.size(); ++i) {
    const tasks::TaskConfig &was = before.tasks[i], &t = config.tasks[i];
    const std::int64_t total = task_epochs(was, before.train), other = task_epochs(t, config.train);
    longest_before = std::max(longest_before, total);
    longest = std::max(longest, other);
    const std::int64_t done = std::min(total, begun);
    if (other == total) continue;
    if (other < done) {
      return detail::str_cat(config_changes(saved, now), ": task '", t.name, "' has trained ",
                             count_of(done, "epoch"), " of its ", total, " (", describe_done(at),
                             "); a run goes on, it cannot end before that", start_over);
    }
    const std::string rate = rate_change(t.schedule, done, total, other, t.step_size, t.gamma);
    if (!rate.empty()) {
      const std::string keep = was.epochs == 0 && t.epochs == 0
                                   ? detail::str_cat("; --set task.", t.written_name(), ".epochs=", total,
                                                     " keeps its ", total, " and lets the others go on")
                                   : std::string();
      return detail::str_cat(config_changes(saved, now), ": task '", t.name,
                             "' learns on schedule = ", to_string(t.schedule), ", over its epochs", rate,
                             keep, start_over);
    }
  }
  if (top && longest != longest_before) {
    const std::string rate =
        rate_change(config.top.lr_schedule, std::min(longest_before, begun), longest_before, longest, 1, 1.0);
    if (!rate.empty()) {
      return detail::str_cat(config_changes(saved, now), ": the trunk's top learns on trunk.lr_schedule = ",
                             to_string(config.top.lr_schedule), ", over the longest task's epochs", rate,
                             start_over);
    }
  }
  return "";
}

}  // namespace

std::string resume_refusal(const JobConfig& config) {
  const std::string dir = join_path(config.train.out_dir, "checkpoint");
  const CheckpointRecord record = CheckpointStore::read_record(dir, false);
  std::string text;
  try {
    text = nlohmann::json::parse(read_file(join_path(dir, "state.json"))).at("config").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    throw DataError(detail::str_cat("'", join_path(dir, "state.json"), "' cannot be read: ", e.what()));
  }
  const std::string now_text = config_identity(dump_config(config));
  if (text == now_text) return "";
  std::istringstream saved_in(text), now_in(now_text);
  const auto saved = read_config_values(saved_in, "the saved configuration");
  const auto now = read_config_values(now_in, "the configuration");
  return resume_refused(config, record.top, config.train.out_dir, saved, now, record.position);
}

namespace {

// Where the run starts: with --resume, the checkpoint's position, its heads and top loaded;
// else the beginning (saying so when an earlier run's checkpoint is there to be replaced).
CheckpointPosition starting_point(const JobConfig& config, CheckpointStore& store, TaskSet& set,
                                  std::vector<HeadRun>& runs, SharedTop* top, bool resume,
                                  TrainReport& report) {
  if (!resume) {
    if (mpi::rank() == 0) {
      if (const auto earlier = CheckpointStore::peek(store.dir())) {
        log_info(detail::str_cat("'", store.dir(), "' holds an earlier run's checkpoint (",
                                 describe_done(*earlier),
                                 "); this run starts over, and its first checkpoint replaces that one "
                                 "(--resume goes on from it instead)"));
      }
    }
    return {};
  }
  std::string epochs_changed, moved_from;
  store.set_config_check([&](const CheckpointStore::ConfigValues& saved,
                             const CheckpointStore::ConfigValues& now, const CheckpointPosition& at) {
    std::string refused = resume_refused(config, top != nullptr, config.train.out_dir, saved, now, at);
    if (!refused.empty()) return refused;
    const auto was = saved.find("train.out_dir"), is = now.find("train.out_dir");
    if (was != saved.end() && is != now.end() && was->second != is->second) moved_from = was->second;
    if (const std::string changes =
            config_changes(keys_where(saved, is_epochs_key), keys_where(now, is_epochs_key));
        !changes.empty())
      epochs_changed = changes.substr(2);  // less ": "
    return refused;
  });
  const CheckpointPosition from = store.load(set.tasks, runs, top);
  store.set_config_check(nullptr);
  report.resumed_from = "epoch " + std::to_string(from.epoch + 1) + " step " + std::to_string(from.step);
  log_info("resuming from the checkpoint at " + report.resumed_from +
           (moved_from.empty() ? std::string() : " of the run copied or moved from '" + moved_from + "'") +
           (epochs_changed.empty() ? std::string()
                                   : " with other epochs, " + epochs_changed +
                                         ": the run goes on as one of the new length would from here"));
  return from;
}

// The epochs, within the memory this process may take: past it an allocation fails instead of
// the kernel's OOM kill taking every head, so a head whose step it was fails alone, saying so,
// and the others go on; refused elsewhere, the run stops with the advice and where --resume
// goes on from. (A top on a GPU keeps its activations there: no fence on the host.)
void run_within_memory(EpochLoop& loop, const CheckpointPosition& from, ProgressStyle style, bool top,
                       const CheckpointStore& store) {
  const MemoryFence fence(top && cuda_available() ? std::nullopt
                                                  : memory_room(mpi::local_size(), PageCache::kFree));
  try {
    loop.run(from, style);
  } catch (const std::exception& e) {
    if (!fence.caused(e)) throw;
    throw DataError(
        detail::str_cat(failure_reason(e), "; ", memory_refused(fence), "; ", where_to_go_on(store)));
  }
  if (fence.refusal()) log_info(memory_refused(fence) + " (the heads that failed for it are FAILED)");
}

// Under mpirun, the top trains data parallel over the ranks (EpochLoop::train_shared_step).
// A freezing schedule decides from the summed gradients, the same on every rank; autofreeze's
// cache levels are gathered from the ranks' slices (SharedTop::end_epoch).
void train_top_data_parallel(SharedTop& top) {
  top.set_data_parallel(kAllreduceBucketBytes);
  log_info("the trunk's top trains data parallel over " + std::to_string(mpi::size()) +
           " ranks: each takes a slice of every batch; gradients summed in buckets of " +
           std::to_string(kAllreduceBucketBytes >> 20) + " MiB");
}

// Rank 0's part of out_dir before training: heads/, the resolved config, the metrics files
// (continued from `resume_epoch`, or new when it is -1).
void open_out_dir(const JobConfig& config, const TaskSet& set, const std::string& resolved,
                  std::int64_t resume_epoch, std::optional<MetricsSink>& metrics) {
  make_dirs(config.train.out_dir + "/heads");
  write_file_atomic(config.train.out_dir + "/config.ini", resolved);
  std::vector<std::string> names;
  for (const auto& r : set.results) names.push_back(r.name);
  metrics.emplace(config.train.out_dir, names, config.train.tensorboard, resume_epoch);
}

void log_training(const JobConfig& config, const TaskSet& set, const TrainReport& report,
                  const datasets::BatchSource& source, const StepRunner& runner) {
  log_info("training " + std::to_string(set.tasks.size()) +
           (set.tasks.size() == 1 ? " head on " : " heads concurrently on ") +
           std::to_string(report.train_rows) + " x " + std::to_string(report.feature_dim) + " features, " +
           source.describe() + " (" + std::to_string(runner.workers()) +
           (runner.workers() == 1 ? " TBB worker x " : " TBB workers x ") +
           std::to_string(config.train.intra_op_threads) + " LibTorch thread(s))");
  if (const auto unused = task_keys_unused(config); !unused.empty())
    log_info("set but unused: " + join(unused, "; "));
  if (const std::string optimistic = stops_on_eval_split(config); !optimistic.empty()) log_info(optimistic);
}

void log_allreduce(const SharedTop& top) {
  char line[160];
  const auto steps = std::max<std::int64_t>(1, top.allreduce_steps());
  std::snprintf(line, sizeof line, "all-reduce of the top's gradients: %.3f ms per step over %lld steps",
                1000 * top.allreduce_seconds() / static_cast<double>(steps),
                static_cast<long long>(top.allreduce_steps()));
  log_info(line);
}

}  // namespace

void check_tasks(const JobConfig& config, const tasks::HeadRegistry& registry,
                 const datasets::CacheMeta& meta, const datasets::SplitData& eval, std::int64_t feature_dim,
                 const std::string& where) {
  (void)build_tasks(config, registry, meta, eval, feature_dim, where);
}

namespace {

// After the last epoch, on the rank that writes out_dir: the joint best epoch restored where
// train.export = best chose one over a top, each head scored on the final splits and exported
// with its card.
void export_trained(const JobConfig& config, const datasets::CacheMeta& cache_meta, TrainInputs& in,
                    EpochLoop& loop, TaskSet& set, const std::vector<HeadRun>& runs, TrainReport& report) {
  SharedTop* top = in.shared.top.get();
  if (top) log_weighting_share(config.train.weighting, loop.weighting_share());
  report.source_peak_bytes = in.train.source->peak_bytes();
  report.source = in.train.source->describe();
  const std::int64_t shared_best = loop.restore_joint_best();
  if (shared_best > 0) {
    char line[64];
    std::snprintf(line, sizeof line, " on the validation split was best (%.4f)", top->best_score());
    log_info(detail::str_cat("train.export = best: the top and the heads as they were at epoch ", shared_best,
                             ", where ", describe_monitor(config.train.export_monitor), line));
  }
  export_heads(set, runs, trained_trunk_meta(cache_meta, top, config),
               final_splits(loop, in.train.validation.has_value(), in.test, top, config.train.batch_size),
               config.train.out_dir + "/heads", report, shared_best, config.train);
}

}  // namespace

TrainReport run_train(const JobConfig& config, const tasks::HeadRegistry& registry, ProgressStyle style,
                      bool resume) {
  validate_job_config(config);
  CANOPY_CHECK(!config.tasks.empty(), ConfigError, "no tasks in ", config.source,
               ": add a [task.<name>] section with at least head = linear");
  TrainReport report;
  report.out_dir = config.train.out_dir;
  const auto load_start = Clock::now();
  // The cache is read while no `canopy cache` writes it; the run has its out_dir alone, and
  // what a failed or killed run left half-written there goes.
  // Under mpirun, rank 0 holds out_dir for the job and writes all in it but the checkpoint
  // files of the heads other ranks train.
  const DirLock cache_lock(config.cache.path, DirLock::Mode::kRead, "canopy train");
  std::optional<DirLock> out_lock;
  if (mpi::rank() == 0) {
    out_lock.emplace(config.train.out_dir, DirLock::Mode::kWrite, "canopy train");
    clean_out_dir(config.train.out_dir, resume);
  }
  mpi::barrier();
  const auto cache = open_checked_cache(config);
  TrainInputs in = open_inputs(cache, config, report);
  if (mpi::distributed() && in.shared.top) train_top_data_parallel(*in.shared.top);
  const auto& source = in.train.source;
  SharedTop* top = in.shared.top.get();
  const at::Tensor eval_rows = in.selection().features.to(at::kFloat);
  report.load_seconds = since(load_start);

  TaskSet set = build_tasks(config, registry, cache.meta(), in.selection(), report.feature_dim);
  balance_weights(cache, config, in.train, set);
  std::vector<HeadRun> runs(set.tasks.size());
  const std::string resolved = dump_config(config);
  CheckpointStore store(config.train.out_dir + "/checkpoint", config_identity(resolved));
  const CheckpointPosition from = starting_point(config, store, set, runs, top, resume, report);
  // A full disk, or another failed write in out_dir, says what is kept and how to go on.
  try {
    std::optional<MetricsSink> metrics;
    if (mpi::rank() == 0) open_out_dir(config, set, resolved, resume ? from.epoch : -1, metrics);
    StepRunner runner(resolve_workers(config.train), config.train.intra_op_threads);
    log_training(config, set, report, *source, runner);
    const auto chooser = make_fusion_chooser(config, set, report.feature_dim, top != nullptr,
                                             read_fusion_decisions(store.fusion()));
    std::function<bool(const WorkUnit&)> fuse_unit;
    if (chooser) {
      fuse_unit = std::ref(*chooser);
      // Every checkpoint records the decisions the run followed, for --resume to follow them.
      store.set_fusion_source([c = chooser.get()] { return fusion_decisions_json(c->recorded()); });
    }
    if (mpi::distributed() && top) store.set_owned(std::vector<bool>(set.tasks.size(), mpi::rank() == 0));
    store.set_async(true);
    store.set_for_each(
        [&runner](std::size_t n, const std::function<void(std::size_t)>& body) { runner.for_each(n, body); });
    EpochLoop loop(config, set, *source, eval_rows, top, in.shared.weighting.get(), store,
                   metrics ? &*metrics : nullptr, runner, runs, fuse_unit);
    if (mpi::rank() == 0) describe_fusion(set, loop.plan_options(), fuse_unit, chooser.get(), report);
    if (chooser && top && mpi::distributed()) {
      // Data parallel: every rank plans every head's units, and must fuse as rank 0 decided
      // (each host's calibration file may say otherwise: the replicas would drift apart).
      chooser->agree(read_fusion_decisions(
          mpi::broadcast(mpi::rank() == 0 ? fusion_decisions_json(chooser->recorded()) : std::string())));
    }
    if (resume) loop.go_on(from);

    // A top's activations are megabytes a batch, allocated and freed every step: glibc maps
    // and unmaps them, and every step faults them in again (a quarter to a third of a top-4
    // run's CPU time in the kernel). Kept for reuse while the top trains and scores the final
    // splits.
    std::optional<KeepFreedMemory> reuse_activations;
    if (top) reuse_activations.emplace();
    const FlushDenormals denormals(config.train.flush_denormals);
    const auto train_start = Clock::now();
    // train_seconds: the loaded checkpoint's and this run's (a top trains on the GPU where there
    // is one); the ranks of a job under mpirun, and each one's machine, are part of where it trained.
    const std::string machine = machine_description(top && cuda_available());
    store.start_clock(mpi::distributed() ? describe_rank_machines(mpi::all_gather(machine)) : machine);
    run_within_memory(loop, from, style, top != nullptr, store);
    report.train_seconds = since(train_start);
    report.run_train_seconds = store.train_seconds();
    if (mpi::distributed() && top) {
      log_allreduce(*top);
      if (mpi::rank() != 0) return report;  // rank 0 holds the same top and heads
    } else if (mpi::distributed()) {
      // Rank 0 exports every head: the others' weights (and best epochs) from the checkpoint
      // all ranks wrote at the last epoch's end.
      if (mpi::rank() != 0) return report;
      store.set_owned({});
      if (store.exists()) store.load(set.tasks, runs, top);
    }
    export_trained(config, cache.meta(), in, loop, set, runs, report);
    return report;
  } catch (const IoError& e) {
    throw IoError(detail::str_cat(e.what(), "; ", where_to_go_on(store)));
  }
}

}  // namespace canopy::runners
