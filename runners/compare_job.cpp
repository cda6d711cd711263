#include "canopy/runners/compare_job.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <set>
#include <sstream>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/randint.h>
#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"
#include "canopy/runners/exported_model.h"
#include "canopy/runners/head_card.h"
#include "canopy/tasks/intervals.h"

namespace canopy::runners {

namespace {
using nlohmann::ordered_json;

// What a run's heads read, from its config: the trunk file, how much of it trained, taps,
// pooling, the input size.
std::string describe_run(const JobConfig& c) {
  std::string file = c.trunk.path;
  if (const auto slash = file.find_last_of('/'); slash != std::string::npos) file = file.substr(slash + 1);
  const std::string freeze = trunk::describe(c.trunk.freeze);
  std::string out = "trunk " + file + ", freeze = " + freeze;
  if (freeze != "all" && c.top.schedule != FreezeSchedule::kStatic)
    out += std::string(" (") + to_string(c.top.schedule) + ")";
  if (c.trunk.precision != "float32") out += ", precision " + c.trunk.precision;
  if (!c.trunk.expand.empty()) out += ", expand " + join(c.trunk.expand, ",");
  out += ", tap " + trunk::describe_taps(c.trunk) + ", " + c.trunk.pooling + " pooling";
  if (!reads_text_data(c.data)) {
    const auto& p = c.preprocess;
    if (p.resize_shorter > 0) out += ", images shorter side " + std::to_string(p.resize_shorter);
    if (p.center_crop > 0)
      out += (p.resize_shorter > 0 ? ", crop " : ", images crop ") + std::to_string(p.center_crop);
    else if (p.resize > 0)
      out += ", images " + std::to_string(p.resize);
  }
  return out;
}

// The resolved config's keys whose values differ from `base`'s, as "key = value (A1: value)"
// (`base_label` naming `base`); train.out_dir, which differs between any two runs, and
// cache.path (where the features were kept: the cache's fingerprint says what they are) left out.
std::vector<std::string> keys_differing(const JobConfig& base, const JobConfig& c,
                                        const std::string& base_label) {
  const auto values = [](const JobConfig& j) {
    std::istringstream in(dump_config(j));
    auto v = read_config_values(in, j.source);
    v.erase("train.out_dir");
    v.erase("cache.path");  // where a run's features were kept, not what they are
    return v;
  };
  // A task in one of the two configs is said once, by its section, not key by key.
  const auto tasks_of = [](const JobConfig& j) {
    std::set<std::string> names;
    for (const auto& t : j.tasks) names.insert("task." + t.written_name() + ".");
    return names;
  };
  // Keys a run does not read: a frozen trunk's top keys, and a task's settings for another
  // optimizer or schedule (task_keys_unused names those set).
  const auto unused = [](const JobConfig& j) {
    std::set<std::string> keys;
    for (const auto& s : task_keys_unused(j)) keys.insert(s.substr(0, s.find(' ')));
    return keys;
  };
  const auto a_unused = unused(base), b_unused = unused(c);
  const bool a_frozen = trunk::describe(base.trunk.freeze) == "all",
             b_frozen = trunk::describe(c.trunk.freeze) == "all";
  const auto read_by_neither = [&](const std::string& key) {
    if (is_top_key(key)) return a_frozen && b_frozen;
    return a_unused.count(key) && b_unused.count(key);
  };
  const auto a = values(base), b = values(c);
  const auto a_tasks = tasks_of(base), b_tasks = tasks_of(c);
  // A key of a task only one of the two has (said by its section above).
  const auto one_sided = [&](const std::string& key) {
    if (key.rfind("task.", 0) != 0) return false;
    const std::string section = key.substr(0, key.find('.', 5) + 1);
    return !a_tasks.count(section) || !b_tasks.count(section);
  };
  std::vector<std::string> out;
  for (const auto& t : b_tasks)
    if (!a_tasks.count(t)) out.push_back("[" + t.substr(0, t.size() - 1) + "] (" + base_label + ": none)");
  for (const auto& t : a_tasks)
    if (!b_tasks.count(t)) out.push_back("no [" + t.substr(0, t.size() - 1) + "] (" + base_label + ": one)");
  for (const auto& [key, value] : b) {
    if (one_sided(key)) continue;
    const auto it = a.find(key);
    if (it == a.end()) {
      out.push_back(key + " = " + value + " (" + base_label + ": none)");
    } else if (it->second != value && !read_by_neither(key)) {
      out.push_back(key + " = " + value + " (" + base_label + ": " + it->second + ")");
    }
  }
  for (const auto& [key, value] : a)
    if (!one_sided(key) && !b.count(key)) out.push_back(key + ": none (" + base_label + ": " + value + ")");
  return out;
}

ordered_json printed(const std::vector<std::string>& lines) {
  ordered_json out = ordered_json::array();
  for (const auto& l : lines) out.push_back(printable(l));
  return out;
}

ordered_json interval_pair(const tasks::Interval& i) { return {i.lo, i.hi}; }

// Where a paired difference (in `metric`) says the first is better, worse, or cannot tell.
void count(const Paired& v, const std::string& metric, Tally& n) {
  if (shown_better(metric, v.interval)) {
    ++n.better;
  } else if (shown_better(metric, {-v.interval.hi, -v.interval.lo})) {
    ++n.worse;
  } else {
    ++n.undecided;
  }
}

// Whether a task was compared at all: some arm after A has a difference from A on it.
bool was_compared(const ComparedTask& t) {
  return std::any_of(t.versus.begin(), t.versus.end(), [](const auto& v) { return v.has_value(); });
}

// Which of an arm's k runs resample r draws, with replacement (every run once for k = 1).
std::vector<std::size_t> drawn_runs(std::size_t k, std::size_t r, std::uint64_t seed, std::size_t arm) {
  if (k == 1) return {0};
  auto gen = at::make_generator<at::CPUGeneratorImpl>(
      seed * 1000003ULL + static_cast<std::uint64_t>(r) * 7919ULL + 2ULL + static_cast<std::uint64_t>(arm));
  const at::Tensor drawn =
      at::randint(static_cast<std::int64_t>(k), {static_cast<std::int64_t>(k)}, gen, at::kLong);
  const auto* v = drawn.data_ptr<std::int64_t>();
  return std::vector<std::size_t>(v, v + k);
}

// An arm's value of `metric` on every resample: its drawn runs' mean.
std::vector<double> arm_replicates(const Comparison& c, const ComparedTask& t, std::size_t arm,
                                   const std::string& metric,
                                   const std::vector<std::vector<std::vector<std::size_t>>>& draws) {
  const auto& runs = c.arms[arm].runs;
  std::vector<const std::vector<double>*> values;
  for (const std::size_t r : runs)
    values.push_back(c.runs[r].evaluation.heads[*t.head[r]].resampled->find(metric));
  std::vector<double> out(c.resamples, 0.0);
  for (const auto* v : values)
    if (!v) return {};
  for (std::size_t r = 0; r < c.resamples; ++r) {
    for (const std::size_t d : draws[arm][r]) out[r] += (*values[d])[r];
    out[r] /= static_cast<double>(draws[arm][r].size());
  }
  return out;
}

// The arm's value of `metric`: its runs' mean.
double arm_value(const Comparison& c, const ComparedTask& t, std::size_t arm, const std::string& metric) {
  double sum = 0.0;
  for (const std::size_t r : c.arms[arm].runs)
    sum += tasks::metric_value(c.runs[r].evaluation.heads[*t.head[r]].eval, metric);
  return sum / static_cast<double>(c.arms[arm].runs.size());
}

using Draws = std::vector<std::vector<std::vector<std::size_t>>>;  // [arm][resample]: its runs drawn

std::string run_name(const Comparison& c, std::size_t r) {
  return "run " + c.runs[r].label + " (" + c.runs[r].path + ")";
}

// The arms' runs in one list, A's first: each labelled (A, or A1, A2, ... in an arm of several),
// knowing its arm and path; their configs in the same order.
std::vector<JobConfig> lay_out(Comparison& c, const std::vector<std::vector<JobConfig>>& arms,
                               const std::vector<std::vector<std::string>>& paths) {
  CANOPY_CHECK(arms.size() == paths.size(), ConfigError, "canopy compare: ", arms.size(), " arms, ",
               paths.size(), " lists of paths");
  std::vector<JobConfig> configs;
  for (std::size_t a = 0; a < arms.size(); ++a) {
    CANOPY_CHECK(!arms[a].empty() && arms[a].size() == paths[a].size(), ConfigError, "canopy compare: arm ",
                 a + 1, " has no runs");
    ComparedArm arm{std::string(1, static_cast<char>('A' + a)), {}};
    for (std::size_t i = 0; i < arms[a].size(); ++i) {
      arm.runs.push_back(configs.size());
      configs.push_back(arms[a][i]);
      ComparedRun run;
      run.label = arms[a].size() == 1 ? arm.label : arm.label + std::to_string(i + 1);
      run.arm = a;
      run.path = paths[a][i];
      run.out_dir = arms[a][i].train.out_dir;
      run.trunk = describe_run(arms[a][i]);
      c.runs.push_back(std::move(run));
    }
    c.arms.push_back(std::move(arm));
  }
  CANOPY_CHECK(configs.size() >= 2 && arms.size() <= 26, ConfigError,
               "canopy compare: name 2 to 26 runs (training out_dirs or config files), got ", arms.size(),
               arms.size() == 1 ? " run" : " runs",
               "; e.g. canopy compare runs/frozen runs/top2 --input FILE (several runs of one setting, "
               "seeds say, as one comma-separated argument)");
  CANOPY_CHECK(arms.size() >= 2, ConfigError,
               "canopy compare: one arm of several runs has nothing to be compared with; name 2 to 26 runs "
               "or comma-separated lists of runs");
  return configs;
}

// Every run's heads on the input. Runs whose heads read the same features share one trunk pass
// (pass_with), one such group in memory at a time; an error names the group's runs.
std::vector<ScoredInput> score_runs(Comparison& c, const std::vector<JobConfig>& configs,
                                    const tasks::HeadRegistry& registry, const EvaluateOptions& options,
                                    ProgressStyle style) {
  std::vector<std::string> signature;
  for (const auto& config : configs) signature.push_back(features_signature(config));
  std::vector<ScoredInput> scored(configs.size());
  for (std::size_t r = 0; r < configs.size(); ++r) {
    if (!c.runs[r].pass_with.empty()) continue;
    std::vector<std::size_t> group{r};
    for (std::size_t s = r + 1; s < configs.size(); ++s) {
      if (!signature[r].empty() && signature[s] == signature[r]) {
        group.push_back(s);
        c.runs[s].pass_with = c.runs[r].label;
      }
    }
    std::vector<const JobConfig*> group_configs;
    std::string what = "compare", runs_named;
    for (const std::size_t g : group) {
      group_configs.push_back(&configs[g]);
      what += " " + c.runs[g].label;
      runs_named += (runs_named.empty() ? "" : ", ") + run_name(c, g);
    }
    std::vector<ScoredInput> results = adding_context("canopy compare: " + runs_named + ": ", [&] {
      return score_inputs(group_configs, registry, options, style, what);
    });
    for (std::size_t i = 0; i < group.size(); ++i) scored[group[i]] = std::move(results[i]);
  }
  return scored;
}

// Each run's evaluation, every head of every run resampled on the same resamples of the rows
// (which every run must have read alike), and what differs between the runs' configs.
void take_evaluations(Comparison& c, const std::vector<JobConfig>& configs,
                      const std::vector<ScoredInput>& scored, const EvaluateOptions& options,
                      const TrainConfig& baseline) {
  c.rows = scored[0].evaluation.rows;
  std::vector<tasks::HeadOutputs> all;
  for (std::size_t r = 0; r < c.runs.size(); ++r) {
    ComparedRun& run = c.runs[r];
    run.evaluation = scored[r].evaluation;
    CANOPY_CHECK(run.evaluation.rows == c.rows, DataError, "canopy compare: ", run_name(c, r), " read ",
                 run.evaluation.rows, " rows from ", input_said(options.input, c.eval_split), ", ",
                 run_name(c, 0), " read ", c.rows,
                 ": the runs read the input differently (their data.* keys differ)");
    if (r > 0) {  // the first run of an arm against A's first, the others against their arm's first
      const auto& own = c.arms[run.arm].runs;
      const std::size_t against = own.front() == r ? 0 : own.front();
      run.differs_from = c.runs[against].label;
      run.differs = keys_differing(configs[against], configs[r], run.differs_from);
    }
    all.insert(all.end(), scored[r].outputs.begin(), scored[r].outputs.end());
  }
  std::vector<tasks::Resampled> resampled =
      tasks::bootstrap(all, {baseline.bootstrap_resamples, baseline.interval_level, c.seed});
  c.resamples = static_cast<std::size_t>(baseline.bootstrap_resamples);
  std::size_t next = 0;
  for (auto& run : c.runs) {
    for (auto& h : run.evaluation.heads) {
      h.resampled = std::move(resampled[next++]);
      h.interval_level = c.level;
    }
  }
}

// Each arm's runs drawn on every resample. Arms whose i-th runs share their train.seed (the
// same shuffles and head initialisations) are paired by seed: every arm draws the same runs.
Draws draw_runs(Comparison& c, const std::vector<JobConfig>& configs) {
  c.paired_by_seed = std::all_of(c.arms.begin(), c.arms.end(), [&](const ComparedArm& arm) {
    if (arm.runs.size() != c.arms[0].runs.size() || arm.runs.size() < 2) return false;
    for (std::size_t i = 0; i < arm.runs.size(); ++i)
      if (configs[arm.runs[i]].train.seed != configs[c.arms[0].runs[i]].train.seed) return false;
    return true;
  });
  Draws draws(c.arms.size());
  for (std::size_t a = 0; a < c.arms.size(); ++a)
    for (std::size_t r = 0; r < c.resamples; ++r)
      draws[a].push_back(drawn_runs(c.arms[a].runs.size(), r, c.seed, c.paired_by_seed ? 0 : a));
  return draws;
}

std::optional<std::size_t> find_head(const Evaluation& e, const std::string& task) {
  for (std::size_t i = 0; i < e.heads.size(); ++i)
    if (e.heads[i].name == task) return i;
  return std::nullopt;
}

// Finds task `t` (run A's head `i`) in every run of `arm`, setting t.head; false (and why in
// c.not_compared) where a run lacks it or scores other labels. The same labels read from the
// input are checked too.
bool match_arm(Comparison& c, ComparedTask& t, const std::vector<ScoredInput>& scored, std::size_t i,
               std::size_t arm, const EvaluateOptions& options) {
  const TaskResult& base = c.runs[0].evaluation.heads[i];
  std::vector<std::size_t> heads;
  for (const std::size_t r : c.arms[arm].runs) {
    const auto j = find_head(c.runs[r].evaluation, base.name);
    if (!j) {
      c.not_compared.push_back(detail::str_cat("task '", base.name, "': not in ", run_name(c, r)));
      return false;
    }
    const TaskResult& other = c.runs[r].evaluation.heads[*j];
    if (!same_labels(base, other)) {
      c.not_compared.push_back(detail::str_cat(
          "task '", base.name, "': ", run_name(c, r), " scores ", other.labels, " (",
          tasks::to_string(other.kind), ", ", other.class_names.size(), " classes), run ", c.runs[0].label,
          " ", base.labels, " (", tasks::to_string(base.kind), ", ", base.class_names.size(), " classes)"));
      return false;
    }
    const at::Tensor& want = scored[0].outputs[i].targets;
    const at::Tensor& got = scored[r].outputs[*j].targets;
    CANOPY_CHECK(at::equal(want, got), DataError, "canopy compare: task '", base.name, "': ", run_name(c, r),
                 " read other labels from ", input_said(options.input, c.eval_split), " than ",
                 run_name(c, 0), " (", at::ne(want, got).sum().item<std::int64_t>(),
                 " values differ): the runs read the input's rows differently (their data.* keys differ)");
    heads.push_back(*j);
  }
  for (std::size_t k = 0; k < heads.size(); ++k) t.head[c.arms[arm].runs[k]] = heads[k];
  return true;
}

// Task `t`'s score per arm that has it, and each such arm's differences from A's, in every
// resampled metric.
void score_task(const Comparison& c, ComparedTask& t, const Draws& draws, const std::vector<bool>& has) {
  const TaskResult& base = c.runs[0].evaluation.heads[*t.head[0]];
  const std::size_t arms = c.arms.size();
  std::vector<std::vector<double>> replicates(arms);  // in t.metric
  std::vector<double> values(arms, 0.0);
  for (const std::string& name : base.resampled->names) {
    const std::vector<double> theirs = arm_replicates(c, t, 0, name, draws);
    if (theirs.empty()) continue;
    const double base_value = arm_value(c, t, 0, name);
    if (name == t.metric) {
      t.score[0] = ArmScore{base_value, tasks::percentile_interval(theirs, c.level)};
      replicates[0] = theirs;
      values[0] = base_value;
    }
    for (std::size_t arm = 1; arm < arms; ++arm) {
      if (!has[arm]) continue;
      std::vector<double> mine = arm_replicates(c, t, arm, name, draws);
      if (mine.empty()) continue;
      const double value = arm_value(c, t, arm, name);
      t.differences[arm].push_back({c.arms[0].label + ":" + base.name, name, value - base_value,
                                    tasks::difference_interval(mine, theirs, c.level), c.resamples});
      if (name != t.metric) continue;
      t.score[arm] = ArmScore{value, tasks::percentile_interval(mine, c.level)};
      t.versus[arm] = t.differences[arm].back();
      replicates[arm] = std::move(mine);
      values[arm] = value;
    }
  }
  // Every pair of arms, on the same resamples: which of two deeper tops is worth its cost.
  t.between.assign(arms, {});
  for (std::size_t b = 1; b < arms; ++b) {
    t.between[b].assign(b, std::nullopt);
    t.between[b][0] = t.versus[b];
    for (std::size_t a = 1; a < b; ++a) {
      if (replicates[a].empty() || replicates[b].empty()) continue;
      t.between[b][a] =
          Paired{c.arms[a].label + ":" + base.name, t.metric, values[b] - values[a],
                 tasks::difference_interval(replicates[b], replicates[a], c.level), c.resamples};
    }
  }
}
}  // namespace

void check_compared_metric(const std::string& metric) {
  const auto& names = tasks::resampled_metric_names();
  CANOPY_CHECK(metric.empty() || std::find(names.begin(), names.end(), metric) != names.end(), ConfigError,
               "canopy compare: --metric '", metric, "' is not one of ", join(names, ", "));
}

JobConfig load_compared_run(const std::string& path, const std::vector<std::string>& overrides) {
  if (is_directory(path)) {
    const std::string config = join_path(path, "config.ini");
    CANOPY_CHECK(is_regular_file(config), ConfigError, "canopy compare: '", path,
                 "' is a folder without config.ini: name a training run's out_dir or a config file");
    std::vector<std::string> with_out_dir = overrides;
    with_out_dir.push_back("train.out_dir=" + path);
    return load_job_config(config, with_out_dir);
  }
  CANOPY_CHECK(is_regular_file(path), ConfigError, "canopy compare: no run '", path,
               "': name a training run's out_dir or a config file");
  return load_job_config(path, overrides);
}

Comparison run_compare(const std::vector<std::vector<JobConfig>>& arms,
                       const std::vector<std::vector<std::string>>& arm_paths,
                       const tasks::HeadRegistry& registry, const EvaluateOptions& options,
                       const std::string& metric, ProgressStyle style) {
  const auto start = std::chrono::steady_clock::now();
  Comparison c;
  const std::vector<JobConfig> configs = lay_out(c, arms, arm_paths);
  check_compared_metric(metric);
  const TrainConfig& baseline = configs.front().train;
  CANOPY_CHECK(baseline.bootstrap_resamples > 0, ConfigError,
               "canopy compare: heads are compared on resamples of the rows, and run ", c.runs[0].label,
               "'s train.bootstrap_resamples is 0; --set train.bootstrap_resamples=1000");
  c.input = options.input;
  c.eval_split = options.input.empty() ? baseline.eval_split : "";
  c.level = baseline.interval_level;
  c.seed = static_cast<std::uint64_t>(baseline.seed);
  const std::vector<ScoredInput> scored = score_runs(c, configs, registry, options, style);
  take_evaluations(c, configs, scored, options, baseline);
  const Draws draws = draw_runs(c, configs);

  // Run A's tasks in its order, each matched by name in every other run.
  const Evaluation& a = c.runs[0].evaluation;
  for (std::size_t i = 0; i < a.heads.size(); ++i) {
    ComparedTask t;
    t.task = a.heads[i].name;
    // --metric where the head's kind has it, else the kind's own.
    t.metric =
        !metric.empty() && a.heads[i].resampled->find(metric) ? metric : compared_metric(a.heads[i].kind);
    t.head.assign(c.runs.size(), std::nullopt);
    t.score.assign(c.arms.size(), std::nullopt);
    t.versus.assign(c.arms.size(), std::nullopt);
    t.differences.assign(c.arms.size(), {});
    std::vector<bool> has(c.arms.size());
    for (std::size_t arm = 0; arm < c.arms.size(); ++arm) {
      has[arm] = match_arm(c, t, scored, i, arm, options);
      if (!has[0]) break;  // not compared at all
    }
    if (!has[0]) continue;
    score_task(c, t, draws, has);
    c.tasks.push_back(std::move(t));
  }
  for (std::size_t r = 1; r < c.runs.size(); ++r) {
    for (const auto& h : c.runs[r].evaluation.heads) {
      if (!find_head(a, h.name))
        c.not_compared.push_back(
            detail::str_cat("task '", h.name, "': in ", run_name(c, r), ", not in ", run_name(c, 0)));
    }
  }
  c.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return c;
}

namespace {
// The runs, a line each (label, path, what its heads read, heads, pass), then what differs.
std::string run_lines(const Comparison& c) {
  std::vector<std::vector<std::string>> runs;
  for (const auto& r : c.runs) {
    char secs[64];
    std::snprintf(secs, sizeof secs, "%.2f s", r.evaluation.seconds);
    if (!r.pass_with.empty()) std::snprintf(secs, sizeof secs, "in %s's pass", r.pass_with.c_str());
    runs.push_back(
        {"  " + r.label, printable(r.path), r.trunk, count_of(r.evaluation.heads.size(), "head"), secs});
  }
  std::string o = aligned_columns(runs);
  for (const auto& r : c.runs) {
    if (r.differs_from.empty()) continue;
    constexpr std::size_t kShown = 8;
    std::vector<std::string> shown_keys(r.differs.begin(),
                                        r.differs.begin() + std::min(r.differs.size(), kShown));
    if (r.differs.size() > kShown)
      shown_keys.push_back(std::to_string(r.differs.size() - kShown) + " more (--json)");
    o += "  " + r.label + " differs from " + r.differs_from + " in " +
         (r.differs.empty() ? std::string("no key") : printable(join(shown_keys, "; "))) + "\n";
  }
  return o;
}

// A row per task compared: its metric, each arm's score and each arm's difference from A.
std::string task_table(const Comparison& c) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> header{"task", "metric"};
  for (const auto& a : c.arms)
    header.push_back(a.runs.size() > 1 ? a.label + " (mean of " + std::to_string(a.runs.size()) + ")"
                                       : a.label);
  for (std::size_t a = 1; a < c.arms.size(); ++a) header.push_back(c.arms[a].label + " - A");
  const bool unbeaten_column = c.arms.size() >= 3;  // with two, "B - A" says it
  if (unbeaten_column) header.push_back("unbeaten");
  rows.push_back(header);
  for (const auto& t : c.tasks) {
    if (!was_compared(t)) continue;
    std::vector<std::string> row{
        t.task, metric_label(t.metric) + (tasks::lower_is_better(t.metric) ? " (lower)" : "")};
    for (const auto& s : t.score)
      row.push_back(s ? shown_with_interval(t.metric, s->value, s->interval) : "-");
    for (std::size_t a = 1; a < c.arms.size(); ++a) {
      if (!t.versus[a]) {
        row.push_back("-");
        continue;
      }
      const PairedText said = paired_text(*t.versus[a]);
      row.push_back(said.difference + said.interval + (said.said.empty() ? "" : " (no difference shown)"));
    }
    if (unbeaten_column) {
      std::vector<std::string> labels;
      for (const std::size_t a : unbeaten_arms(t)) labels.push_back(c.arms[a].label);
      row.push_back(join(labels, " "));
    }
    rows.push_back(std::move(row));
  }
  return aligned_columns(rows);
}

// Every arm against every other: the tasks it does better, worse and cannot tell, a row per arm.
std::string between_table(const Comparison& c) {
  const auto counts = tally_between(c);
  std::vector<std::vector<std::string>> rows{{""}};
  for (const auto& a : c.arms) rows[0].push_back(a.label);
  for (std::size_t b = 0; b < c.arms.size(); ++b) {
    rows.push_back({"  " + c.arms[b].label});
    for (std::size_t a = 0; a < c.arms.size(); ++a) {
      const Tally& n = counts[b][a];
      rows.back().push_back(a == b ? "-" : detail::str_cat(n.better, "/", n.worse, "/", n.undecided));
    }
  }
  return "each arm (row) against each other (column): tasks better / worse / no difference shown\n" +
         aligned_columns(rows);
}

// On how many of the tasks compared each arm is unbeaten (no other arm shown better on it).
std::string unbeaten_line(const Comparison& c) {
  std::vector<int> unbeaten(c.arms.size(), 0);
  int compared = 0;
  for (const auto& t : c.tasks) {
    if (!was_compared(t)) continue;
    ++compared;
    for (const std::size_t a : unbeaten_arms(t)) ++unbeaten[a];
  }
  std::vector<std::string> said;
  for (std::size_t a = 0; a < c.arms.size(); ++a)
    said.push_back(c.arms[a].label + " on " + std::to_string(unbeaten[a]) +
                   (a == 0 ? " of " + count_of(compared, "task") : ""));
  return "unbeaten (no other arm shown better on the task): " + join(said, ", ") + "\n";
}
}  // namespace

std::string format_comparison(const Comparison& c) {
  char level[32];
  std::snprintf(level, sizeof level, "%g%%", 100 * c.level);
  const bool several =
      std::any_of(c.arms.begin(), c.arms.end(), [](const ComparedArm& a) { return a.runs.size() > 1; });
  std::string o = detail::str_cat(
      "compared on ", input_said(c.input, c.eval_split), ": ", c.rows,
      " rows, every head of every run on the same ", c.resamples, " resamples of them (", level,
      " intervals; differences from A, paired)\n",
      several ? "an arm of several runs is scored by their mean, and each resample also draws its runs with "
                "replacement, so its interval holds the spread between them"
              : "",
      !several           ? ""
      : c.paired_by_seed ? "; the arms' runs are paired by train.seed: every arm draws the same seeds\n"
                         : "; the arms' runs are drawn independently (their train.seed lists differ)\n");
  o += run_lines(c) + "\n" + task_table(c);
  const auto counts = tally_between(c);
  if (std::any_of(counts.begin() + 1, counts.end(), [](const auto& row) { return row[0].undecided > 0; }))
    o +=
        "(no difference shown: the difference's interval holds 0, so these rows cannot tell the two apart)\n";
  for (std::size_t a = 1; a < c.arms.size(); ++a) {
    const Tally& n = counts[a][0];
    o += detail::str_cat(c.arms[a].label, " against A: better on ", n.better, ", worse on ", n.worse,
                         ", no difference shown on ", n.undecided, " of the ",
                         n.better + n.worse + n.undecided, " tasks compared\n");
  }
  if (c.arms.size() >= 3) o += between_table(c) + unbeaten_line(c);
  for (const auto& n : c.not_compared) o += "not compared: " + n + "\n";
  for (const auto& r : c.runs)
    for (const auto& n : r.evaluation.not_evaluated) o += "not evaluated (run " + r.label + "): " + n + "\n";
  char buf[128];
  std::snprintf(buf, sizeof buf, "%zu runs compared in %.2fs\n", c.runs.size(), c.seconds);
  return o + buf;
}

std::vector<std::vector<Tally>> tally_between(const Comparison& c) {
  std::vector<std::vector<Tally>> out(c.arms.size(), std::vector<Tally>(c.arms.size()));
  for (const auto& t : c.tasks) {
    for (std::size_t b = 1; b < t.between.size(); ++b) {
      for (std::size_t a = 0; a < b; ++a) {
        if (!t.between[b][a]) continue;
        Tally n;
        count(*t.between[b][a], t.metric, n);
        out[b][a].better += n.better;
        out[b][a].worse += n.worse;
        out[b][a].undecided += n.undecided;
        out[a][b].better += n.worse;
        out[a][b].worse += n.better;
        out[a][b].undecided += n.undecided;
      }
    }
  }
  return out;
}

bool shown_better(const std::string& metric, const tasks::Interval& difference) {
  const double sign = tasks::lower_is_better(metric) ? -1.0 : 1.0;
  return std::min(sign * difference.lo, sign * difference.hi) > 0;
}

std::vector<std::size_t> unbeaten_arms(const ComparedTask& t) {
  std::vector<bool> beaten(t.score.size(), false);
  for (std::size_t b = 1; b < t.between.size(); ++b) {
    for (std::size_t a = 0; a < b && a < t.between[b].size(); ++a) {
      if (!t.between[b][a]) continue;
      const tasks::Interval& d = t.between[b][a]->interval;  // b's less a's
      if (shown_better(t.metric, d)) beaten[a] = true;
      if (shown_better(t.metric, {-d.hi, -d.lo})) beaten[b] = true;
    }
  }
  std::vector<std::size_t> out;
  for (std::size_t a = 0; a < t.score.size(); ++a)
    if (t.score[a] && !beaten[a]) out.push_back(a);
  return out;
}

std::string comparison_json(const Comparison& c) {
  ordered_json runs = ordered_json::array();
  for (const auto& r : c.runs) {
    runs.push_back({{"label", r.label},
                    {"arm", c.arms[r.arm].label},
                    {"path", printable(r.path)},
                    {"out_dir", printable(r.out_dir)},
                    {"trunk", printable(r.trunk)},
                    {"differs_from", r.differs_from},
                    {"differs", printed(r.differs)},
                    {"seconds", r.evaluation.seconds},
                    {"pass_with", r.pass_with},
                    {"heads", evaluation_heads_json(r.evaluation)},
                    {"not_evaluated", r.evaluation.not_evaluated}});
  }
  ordered_json arms = ordered_json::array();
  for (const auto& a : c.arms) {
    ordered_json labels = ordered_json::array();
    for (const std::size_t r : a.runs) labels.push_back(c.runs[r].label);
    arms.push_back({{"label", a.label}, {"runs", labels}});
  }
  const auto counts = tally_between(c);
  const auto tallied = [](const Tally& n) {
    return ordered_json{{"better", n.better}, {"worse", n.worse}, {"no_difference", n.undecided}};
  };
  ordered_json against = ordered_json::object();
  for (std::size_t a = 1; a < c.arms.size(); ++a) against[c.arms[a].label] = tallied(counts[a][0]);
  ordered_json tasks = ordered_json::array();
  for (const auto& t : c.tasks) {
    ordered_json per_arm = ordered_json::object(), versus = ordered_json::object();
    for (std::size_t a = 0; a < c.arms.size(); ++a) {
      const auto& s = t.score[a];
      if (!s) continue;
      ordered_json per_run = ordered_json::object();
      for (const std::size_t r : c.arms[a].runs)
        per_run[c.runs[r].label] = tasks::metric_value(c.runs[r].evaluation.heads[*t.head[r]].eval, t.metric);
      per_arm[c.arms[a].label] = {
          {"value", s->value}, {"interval", interval_pair(s->interval)}, {"runs", per_run}};
      if (!t.versus[a]) continue;
      ordered_json metrics = ordered_json::object();
      for (const auto& d : t.differences[a])
        metrics[d.metric] = {{"difference", d.difference}, {"interval", interval_pair(d.interval)}};
      versus[c.arms[a].label] = {{"difference", t.versus[a]->difference},
                                 {"interval", interval_pair(t.versus[a]->interval)},
                                 {"metrics", metrics}};
    }
    ordered_json unbeaten = ordered_json::array();
    for (const std::size_t a : unbeaten_arms(t)) unbeaten.push_back(c.arms[a].label);
    ordered_json task{{"task", t.task},
                      {"metric", t.metric},
                      {"arms", per_arm},
                      {"versus_A", versus},
                      {"unbeaten", unbeaten}};
    if (c.arms.size() >= 3) {
      ordered_json pairs = ordered_json::object();
      for (std::size_t b = 2; b < t.between.size(); ++b)
        for (std::size_t a = 1; a < b; ++a)
          if (const auto& v = t.between[b][a])
            pairs[c.arms[b].label + " - " + c.arms[a].label] = {{"difference", v->difference},
                                                                {"interval", interval_pair(v->interval)}};
      task["between"] = pairs;
    }
    tasks.push_back(std::move(task));
  }
  ordered_json between = ordered_json::object();
  for (std::size_t b = 0; b < c.arms.size(); ++b) {
    ordered_json row = ordered_json::object();
    for (std::size_t a = 0; a < c.arms.size(); ++a)
      if (a != b) row[c.arms[a].label] = tallied(counts[b][a]);
    between[c.arms[b].label] = row;
  }
  const ordered_json out{{"input", printable(c.input)},
                         {"eval_split", c.eval_split},
                         {"rows", c.rows},
                         {"resamples", c.resamples},
                         {"level", c.level},
                         {"seed", c.seed},
                         {"runs", runs},
                         {"arms", arms},
                         {"paired_by_seed", c.paired_by_seed},
                         {"against_A", against},
                         {"between", between},
                         {"tasks", tasks},
                         {"not_compared", c.not_compared},
                         {"seconds", c.seconds}};
  return out.dump(2) + "\n";
}

}  // namespace canopy::runners
