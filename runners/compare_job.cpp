#include "canopy/runners/compare_job.h"

#include <chrono>
#include <cstdio>
#include <set>
#include <sstream>

#include <ATen/ops/equal.h>
#include <ATen/ops/ne.h>
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
  out += ", tap " + trunk::describe_taps(c.trunk) + ", " + c.trunk.pooling + " pooling";
  if (c.data.source != "arff" && c.preprocess.resize > 0)
    out += ", images " + std::to_string(c.preprocess.resize);
  return out;
}

// The resolved config's keys whose values differ from `base`'s, as "key = value (A: value)";
// train.out_dir, which differs between any two runs, left out.
std::vector<std::string> keys_differing(const JobConfig& base, const JobConfig& c) {
  const auto values = [](const JobConfig& j) {
    std::istringstream in(dump_config(j));
    auto v = read_config_values(in, j.source);
    v.erase("train.out_dir");
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
  const auto section = [](const std::string& key) { return key.substr(0, key.find('.', 5) + 1); };
  std::vector<std::string> out;
  for (const auto& t : b_tasks)
    if (!a_tasks.count(t)) out.push_back("[" + t.substr(0, t.size() - 1) + "] (A: none)");
  for (const auto& t : a_tasks)
    if (!b_tasks.count(t)) out.push_back("no [" + t.substr(0, t.size() - 1) + "] (A: one)");
  for (const auto& [key, value] : b) {
    const auto it = a.find(key);
    if (key.rfind("task.", 0) == 0 && (!a_tasks.count(section(key)) || !b_tasks.count(section(key))))
      continue;
    if (it == a.end()) {
      out.push_back(key + " = " + value + " (A: none)");
    } else if (it->second != value && !read_by_neither(key)) {
      out.push_back(key + " = " + value + " (A: " + it->second + ")");
    }
  }
  for (const auto& [key, value] : a) {
    if (key.rfind("task.", 0) == 0 && (!a_tasks.count(section(key)) || !b_tasks.count(section(key))))
      continue;
    if (!b.count(key)) out.push_back(key + ": none (A: " + value + ")");
  }
  return out;
}

std::string run_name(const ComparedRun& r) { return "run " + r.label + " (" + r.path + ")"; }

ordered_json printed(const std::vector<std::string>& lines) {
  ordered_json out = ordered_json::array();
  for (const auto& l : lines) out.push_back(printable(l));
  return out;
}

ordered_json interval_pair(const tasks::Interval& i) { return {i.lo, i.hi}; }
}  // namespace

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

Comparison run_compare(const std::vector<JobConfig>& configs, const std::vector<std::string>& paths,
                       const tasks::HeadRegistry& registry, const EvaluateOptions& options,
                       ProgressStyle style) {
  const auto start = std::chrono::steady_clock::now();
  CANOPY_CHECK(configs.size() >= 2 && configs.size() == paths.size() && configs.size() <= 26, ConfigError,
               "canopy compare: name 2 to 26 runs (training out_dirs or config files), got ", configs.size(),
               "; e.g. canopy compare runs/frozen runs/top2 --input FILE");
  const TrainConfig& baseline = configs.front().train;
  CANOPY_CHECK(baseline.bootstrap_resamples > 0, ConfigError,
               "canopy compare: heads are compared on resamples of the rows, and run A's "
               "train.bootstrap_resamples is 0; --set train.bootstrap_resamples=1000");
  Comparison c;
  c.input = options.input;
  c.level = baseline.interval_level;
  c.seed = static_cast<std::uint64_t>(baseline.seed);
  // Runs whose heads read the same features share one trunk pass (one group in memory at a time).
  const auto label_of = [](std::size_t r) { return std::string(1, static_cast<char>('A' + r)); };
  std::vector<std::string> signature;
  for (const auto& config : configs) signature.push_back(features_signature(config));
  std::vector<ScoredInput> scored(configs.size());
  std::vector<std::optional<std::size_t>> shared_with(configs.size());
  for (std::size_t r = 0; r < configs.size(); ++r) {
    if (shared_with[r]) continue;
    std::vector<std::size_t> group{r};
    for (std::size_t s = r + 1; s < configs.size(); ++s) {
      if (!signature[r].empty() && signature[s] == signature[r]) {
        group.push_back(s);
        shared_with[s] = r;
      }
    }
    std::vector<const JobConfig*> group_configs;
    std::string what = "compare ";
    for (const std::size_t g : group) {
      group_configs.push_back(&configs[g]);
      what += label_of(g);
    }
    // An error while loading or scoring names the runs it came from.
    std::string runs_named;
    for (const std::size_t g : group)
      runs_named += (runs_named.empty() ? "run " : ", run ") + label_of(g) + " (" + paths[g] + ")";
    const auto named = [&](const Error& e) { return "canopy compare: " + runs_named + ": " + e.what(); };
    std::vector<ScoredInput> results;
    try {
      results = score_inputs(group_configs, registry, options, style, what);
    } catch (const ConfigError& e) {
      throw ConfigError(named(e));
    } catch (const DataError& e) {
      throw DataError(named(e));
    } catch (const IoError& e) {
      throw IoError(named(e));
    }
    for (std::size_t i = 0; i < group.size(); ++i) scored[group[i]] = std::move(results[i]);
  }
  for (std::size_t r = 0; r < configs.size(); ++r) {
    ComparedRun run;
    run.label = label_of(r);
    run.path = paths[r];
    run.out_dir = configs[r].train.out_dir;
    run.trunk = describe_run(configs[r]);
    if (shared_with[r]) run.pass_with = label_of(*shared_with[r]);
    if (r > 0) run.differs = keys_differing(configs[0], configs[r]);
    run.evaluation = scored[r].evaluation;
    if (r > 0) {
      CANOPY_CHECK(run.evaluation.rows == c.rows, DataError, "canopy compare: ", run_name(run), " read ",
                   run.evaluation.rows, " rows from '", printable(options.input), "', ", run_name(c.runs[0]),
                   " read ", c.rows, ": the runs read the input differently (their data.* keys differ)");
    } else {
      c.rows = run.evaluation.rows;
    }
    c.runs.push_back(std::move(run));
  }

  // Every head of every run on the same resamples of the rows.
  std::vector<tasks::HeadOutputs> all;
  for (const auto& s : scored) all.insert(all.end(), s.outputs.begin(), s.outputs.end());
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

  // The baseline's tasks in its order, each matched by name in the other runs.
  const auto find = [](const Evaluation& e, const std::string& task) -> std::optional<std::size_t> {
    for (std::size_t i = 0; i < e.heads.size(); ++i)
      if (e.heads[i].name == task) return i;
    return std::nullopt;
  };
  const Evaluation& a = c.runs[0].evaluation;
  for (std::size_t i = 0; i < a.heads.size(); ++i) {
    const TaskResult& base = a.heads[i];
    ComparedTask t;
    t.task = base.name;
    t.metric = compared_metric(base.kind);
    t.head.assign(c.runs.size(), std::nullopt);
    t.versus.assign(c.runs.size(), std::nullopt);
    t.differences.assign(c.runs.size(), {});
    t.head[0] = i;
    for (std::size_t r = 1; r < c.runs.size(); ++r) {
      const ComparedRun& run = c.runs[r];
      const auto j = find(run.evaluation, base.name);
      if (!j) {
        c.not_compared.push_back(detail::str_cat("task '", base.name, "': not in ", run_name(run)));
        continue;
      }
      const TaskResult& other = run.evaluation.heads[*j];
      if (!same_labels(base, other)) {
        c.not_compared.push_back(detail::str_cat(
            "task '", base.name, "': ", run_name(run), " scores ", other.labels, " (",
            tasks::to_string(other.kind), ", ", other.class_names.size(), " classes), run A ", base.labels,
            " (", tasks::to_string(base.kind), ", ", base.class_names.size(), " classes)"));
        continue;
      }
      const at::Tensor& want = scored[0].outputs[i].targets;
      const at::Tensor& got = scored[r].outputs[*j].targets;
      CANOPY_CHECK(at::equal(want, got), DataError, "canopy compare: task '", base.name, "': ", run_name(run),
                   " read other labels from '", printable(options.input), "' than run A (",
                   at::ne(want, got).sum().item<std::int64_t>(),
                   " values differ): the runs read the input's rows differently (their data.* keys differ)");
      t.head[r] = *j;
      for (std::size_t m = 0; m < other.resampled->names.size(); ++m) {
        const std::string& name = other.resampled->names[m];
        const std::vector<double>* theirs = base.resampled->find(name);
        if (!theirs) continue;
        t.differences[r].push_back(
            {base.name, name, tasks::metric_value(other.eval, name) - tasks::metric_value(base.eval, name),
             tasks::difference_interval(other.resampled->values[m], *theirs, c.level), c.resamples});
        if (name == t.metric) t.versus[r] = t.differences[r].back();
      }
    }
    c.tasks.push_back(std::move(t));
  }
  for (std::size_t r = 1; r < c.runs.size(); ++r) {
    for (const auto& h : c.runs[r].evaluation.heads) {
      if (!find(a, h.name))
        c.not_compared.push_back(detail::str_cat("task '", h.name, "': in ", run_name(c.runs[r]),
                                                 ", not in run A (", c.runs[0].path, ")"));
    }
  }
  c.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return c;
}

std::string format_comparison(const Comparison& c) {
  char level[32];
  std::snprintf(level, sizeof level, "%g%%", 100 * c.level);
  std::string o = detail::str_cat(
      "compared on '", printable(c.input), "': ", c.rows, " rows, every head of every run on the same ",
      c.resamples, " resamples of them (", level, " intervals; differences from run A, paired)\n");
  std::vector<std::vector<std::string>> runs;
  for (const auto& r : c.runs) {
    char secs[64];
    std::snprintf(secs, sizeof secs, "%.2f s", r.evaluation.seconds);
    if (!r.pass_with.empty()) std::snprintf(secs, sizeof secs, "in %s's pass", r.pass_with.c_str());
    runs.push_back(
        {"  " + r.label, printable(r.path), r.trunk, count_of(r.evaluation.heads.size(), "head"), secs});
  }
  o += aligned_columns(runs);
  for (const auto& r : c.runs) {
    if (r.label == "A") continue;
    constexpr std::size_t kShown = 8;
    std::vector<std::string> shown_keys(r.differs.begin(),
                                        r.differs.begin() + std::min(r.differs.size(), kShown));
    if (r.differs.size() > kShown)
      shown_keys.push_back(std::to_string(r.differs.size() - kShown) + " more (--json)");
    o += "  " + r.label + " differs from A in " +
         (r.differs.empty() ? std::string("no key") : printable(join(shown_keys, "; "))) + "\n";
  }
  o += "\n";
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> header{"task", "metric"};
  for (const auto& r : c.runs) header.push_back(r.label);
  for (std::size_t r = 1; r < c.runs.size(); ++r) header.push_back(c.runs[r].label + " - A");
  rows.push_back(header);
  for (const auto& t : c.tasks) {
    const bool any =
        std::any_of(t.versus.begin(), t.versus.end(), [](const auto& v) { return v.has_value(); });
    if (!any) continue;
    std::vector<std::string> row{t.task, metric_label(t.metric)};
    for (std::size_t r = 0; r < c.runs.size(); ++r) {
      if (!t.head[r]) {
        row.push_back("-");
        continue;
      }
      const TaskResult& h = c.runs[r].evaluation.heads[*t.head[r]];
      const tasks::Interval in = tasks::percentile_interval(*h.resampled->find(t.metric), c.level);
      row.push_back(shown(t.metric, tasks::metric_value(h.eval, t.metric), true) + " [" +
                    shown(t.metric, in.lo, false) + ", " + shown(t.metric, in.hi, false) + "]");
    }
    for (std::size_t r = 1; r < c.runs.size(); ++r) {
      if (!t.versus[r]) {
        row.push_back("-");
        continue;
      }
      const PairedText said = paired_text(*t.versus[r]);
      row.push_back(said.difference + said.interval + (said.said.empty() ? "" : " (no difference shown)"));
    }
    rows.push_back(std::move(row));
  }
  o += aligned_columns(rows);
  const bool undecided = std::any_of(c.tasks.begin(), c.tasks.end(), [](const ComparedTask& t) {
    return std::any_of(t.versus.begin(), t.versus.end(),
                       [](const auto& v) { return v && v->interval.lo <= 0 && v->interval.hi >= 0; });
  });
  if (undecided)
    o += "(no difference shown: the difference's interval holds 0, so these rows cannot tell the two heads "
         "apart)\n";
  for (const auto& n : c.not_compared) o += "not compared: " + n + "\n";
  for (const auto& r : c.runs)
    for (const auto& n : r.evaluation.not_evaluated) o += "not evaluated (run " + r.label + "): " + n + "\n";
  char buf[128];
  std::snprintf(buf, sizeof buf, "%zu runs compared in %.2fs\n", c.runs.size(), c.seconds);
  return o + buf;
}

std::string comparison_json(const Comparison& c) {
  ordered_json runs = ordered_json::array();
  for (const auto& r : c.runs) {
    runs.push_back({{"label", r.label},
                    {"path", printable(r.path)},
                    {"out_dir", printable(r.out_dir)},
                    {"trunk", printable(r.trunk)},
                    {"differs_from_A", printed(r.differs)},
                    {"seconds", r.evaluation.seconds},
                    {"pass_with", r.pass_with},
                    {"heads", evaluation_heads_json(r.evaluation)},
                    {"not_evaluated", r.evaluation.not_evaluated}});
  }
  ordered_json tasks = ordered_json::array();
  for (const auto& t : c.tasks) {
    ordered_json per_run = ordered_json::object(), versus = ordered_json::object();
    for (std::size_t r = 0; r < c.runs.size(); ++r) {
      if (!t.head[r]) continue;
      const TaskResult& h = c.runs[r].evaluation.heads[*t.head[r]];
      per_run[c.runs[r].label] = {
          {"value", tasks::metric_value(h.eval, t.metric)},
          {"interval", interval_pair(tasks::percentile_interval(*h.resampled->find(t.metric), c.level))}};
      if (!t.versus[r]) continue;
      ordered_json metrics = ordered_json::object();
      for (const auto& d : t.differences[r])
        metrics[d.metric] = {{"difference", d.difference}, {"interval", interval_pair(d.interval)}};
      versus[c.runs[r].label] = {{"difference", t.versus[r]->difference},
                                 {"interval", interval_pair(t.versus[r]->interval)},
                                 {"metrics", metrics}};
    }
    tasks.push_back({{"task", t.task}, {"metric", t.metric}, {"runs", per_run}, {"versus_A", versus}});
  }
  const ordered_json out{{"input", printable(c.input)},
                         {"rows", c.rows},
                         {"resamples", c.resamples},
                         {"level", c.level},
                         {"seed", c.seed},
                         {"runs", runs},
                         {"tasks", tasks},
                         {"not_compared", c.not_compared},
                         {"seconds", c.seconds}};
  return out.dump(2) + "\n";
}

}  // namespace canopy::runners
