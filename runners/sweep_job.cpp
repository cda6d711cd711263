#include "canopy/runners/sweep_job.h"

#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <fstream>
#include <iomanip>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "canopy/core/dir_lock.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/sha256.h"
#include "canopy/core/stop.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/feature_cache.h"
#include "canopy/runners/cache_job.h"
#include "canopy/runners/checkpoint_store.h"
#include "canopy/runners/compare_job.h"
#include "canopy/runners/run_inspect.h"
#include "canopy/runners/shared_top.h"
#include "canopy/runners/train_job.h"
#include "canopy/runners/train_report.h"
#include "canopy/tasks/intervals.h"
#include "canopy/trunk/trunk.h"

namespace canopy::runners {

namespace {

// The sweep places these itself; --seeds gives the seeds.
bool placed_by_sweep(const std::string& key) {
  return key == "train.out_dir" || key == "cache.path" || key == "train.seed";
}

std::string key_of(const std::string& assignment) { return trim(assignment.substr(0, assignment.find('='))); }

// A value as part of a folder name: letters, digits, '.', '+' and '-' kept, the rest '_'.
std::string name_part(const std::string& value) {
  std::string out;
  for (const char ch : value) {
    const bool kept = std::isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '+' || ch == '-';
    out += kept ? ch : '_';
  }
  return out.empty() ? "_" : out;
}

// Every combination of the varied values, the first key's value changing slowest.
std::vector<std::vector<std::size_t>> combinations(const SweepOptions& o) {
  std::vector<std::vector<std::size_t>> out{{}};
  for (const auto& [key, values] : o.vary) {
    std::vector<std::vector<std::size_t>> next;
    for (const auto& partial : out) {
      for (std::size_t v = 0; v < values.size(); ++v) {
        next.push_back(partial);
        next.back().push_back(v);
      }
    }
    out = std::move(next);
  }
  return out;
}

void check_options(const SweepOptions& o) {
  check_sweep_folder(o.out);
  CANOPY_CHECK(!o.vary.empty(), ConfigError,
               "canopy sweep: give the key to vary and its values, e.g. --vary trunk.freeze=all,first:13");
  std::set<std::string> keys;
  for (const auto& [key, values] : o.vary) {
    CANOPY_CHECK(!placed_by_sweep(key), ConfigError, "canopy sweep: --vary ", key,
                 ": the sweep sets train.out_dir and cache.path itself, and --seeds gives the seeds");
    CANOPY_CHECK(keys.insert(key).second, ConfigError, "canopy sweep: --vary ", key,
                 " is given twice; give its values once, comma-separated");
    CANOPY_CHECK(std::none_of(values.begin(), values.end(), [](const std::string& v) { return v.empty(); }),
                 ConfigError, "canopy sweep: --vary ", key, " has an empty value");
    const std::set<std::string> distinct(values.begin(), values.end());
    CANOPY_CHECK(distinct.size() == values.size(), ConfigError, "canopy sweep: --vary ", key, "=",
                 join(values, ","), " names a value twice");
  }
  for (const auto& s : o.overrides) {
    CANOPY_CHECK(!placed_by_sweep(key_of(s)), ConfigError, "canopy sweep: --set ", s,
                 ": the sweep sets train.out_dir and cache.path itself (under --out), and --seeds gives "
                 "the seeds");
    CANOPY_CHECK(!keys.count(key_of(s)), ConfigError, "canopy sweep: --set ", s, " sets a key --vary varies");
  }
  const std::set<std::int64_t> seeds(o.seeds.begin(), o.seeds.end());
  CANOPY_CHECK(seeds.size() == o.seeds.size(), ConfigError, "canopy sweep: --seeds names a seed twice");
  CANOPY_CHECK(std::all_of(o.seeds.begin(), o.seeds.end(), [](std::int64_t s) { return s >= 0; }),
               ConfigError, "canopy sweep: --seeds are >= 0");
}

// A run's cost as `canopy inspect`'s report of its out_dir has it (its checkpoint's record).
RunCost cost_in_report(const nlohmann::json& report) {
  const auto checkpoint = report.value("checkpoint", nlohmann::json());
  if (!checkpoint.is_object() || !checkpoint.value("train_seconds", nlohmann::json()).is_number()) return {};
  return {checkpoint["train_seconds"].get<double>(),
          checkpoint.value("machines", std::vector<std::string>{})};
}

// What out_dir holds, and so what running the run does; refused when it holds a run of
// another configuration (epochs aside) or something that is not a run.
void read_out_dir(SweepRun& run) {
  const std::string& dir = run.config.train.out_dir;
  if (!path_exists(dir) || (is_directory(dir) && list_dir(dir).empty())) return;
  CANOPY_CHECK(is_directory(dir) && is_run_dir(dir), ConfigError, "canopy sweep: '", dir,
               "' is there and is not a training run's out_dir; remove it, or sweep into another --out");
  const auto report = nlohmann::json::parse(inspect_run(dir, false, nullptr, true));
  const std::string status = report.value("status", "");
  CANOPY_CHECK(status != "running", DataError, "canopy sweep: ", report.value("status_text", status), " ('",
               dir, "'); wait for it, or sweep into another --out");
  CANOPY_CHECK(status != "unreadable", DataError, "canopy sweep: '", dir,
               "': ", report.value("status_text", status), "; remove it to train it anew");
  if (status == "no_checkpoint") return;
  run.recorded = cost_in_report(report);
  const std::string saved_path = join_path(dir, "config.ini");
  CANOPY_CHECK(is_regular_file(saved_path), ConfigError, "canopy sweep: '", dir,
               "' holds a run without its config.ini; remove it, or sweep into another --out");
  std::istringstream saved_text(read_file(saved_path)), now_text(dump_config(run.config));
  const auto saved = read_config_values(saved_text, saved_path);
  const auto now = read_config_values(now_text, run.config.source);
  std::vector<std::string> other, epochs;
  for (const auto& change : map_changes(saved, now)) {
    const std::string key = change.substr(0, change.find(' '));
    if (key == "cache.path")  // the sweep's own: the folder is the features' fingerprint
      other.push_back(
          "the features it read: their cache fingerprint changed since it ran (the data files, the trunk or "
          "the preprocessing differ; " +
          change + ")");
    else
      (is_epochs_key(key) ? epochs : other).push_back(change);
  }
  CANOPY_CHECK(
      other.empty(), ConfigError, "canopy sweep: '", dir, "' holds a run of another configuration (",
      join(other, ", "),
      "); remove it, or sweep into another --out (only train.epochs and task.NAME.epochs may change: "
      "the run then trains on)");
  if (status == "finished" && epochs.empty()) {
    run.action = SweepAction::kDone;
    run.why = "finished";
    return;
  }
  // What `--resume` would refuse (fewer epochs than a head began, a cosine schedule over them) is
  // refused now, before the runs before it train.
  const std::string refused = resume_refusal(run.config);
  CANOPY_CHECK(refused.empty(), ConfigError, "canopy sweep: '", dir, "' cannot go on to this configuration",
               refused, "; remove it to train it anew, or sweep into another --out");
  if (status == "finished") {
    run.action = SweepAction::kTrainOn;
    run.why = "finished, trains on: " + join(epochs, ", ");
    return;
  }
  run.action = SweepAction::kResume;  // stopped, or not every head exported
  run.why = status == "stopped" ? "stopped before its end" : "every head finished, not every head exported";
  if (!epochs.empty()) run.why += "; " + join(epochs, ", ");
}

const char* action_word(SweepAction a) {
  switch (a) {
    case SweepAction::kTrain:
      return "train";
    case SweepAction::kResume:
      return "resume";
    case SweepAction::kTrainOn:
      return "train on";
    case SweepAction::kDone:
      return "done before";
  }
  return "";
}

// Runs `argv` in a process of its own (its own process group, so that a terminal's Ctrl-C
// reaches this process alone, which passes it on once; SIGTERM to it should this process die),
// its standard output appended to `log_path`. A stop asked of this process (StopOnSignal) is
// sent on to it as SIGUSR1, which canopy takes as a stop and `mpirun` and `srun` pass on to
// their ranks (SIGTERM or SIGINT would have `mpirun` end them a second later). Returns its exit
// status, 128 + N when signal N ended it.
int run_child(const std::vector<std::string>& argv, const std::string& log_path) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  CANOPY_CHECK(log_fd >= 0, IoError, "cannot open '", log_path, "': ", describe_errno(errno));
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid == 0) {  // only async-signal-safe calls from here to exec
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(128 + SIGTERM);  // the sweep died before prctl
    ::dup2(log_fd, STDOUT_FILENO);
    ::execvp(args[0], args.data());
    const char msg[] = "canopy sweep: cannot start the run's process\n";
    [[maybe_unused]] const auto n = ::write(STDERR_FILENO, msg, sizeof msg - 1);
    ::_exit(127);
  }
  const int fork_errno = errno;
  ::close(log_fd);
  CANOPY_CHECK(pid > 0, Error, "canopy sweep: cannot start a process: ", describe_errno(fork_errno));
  ::setpgid(pid, pid);
  bool passed_on = false;
  int status = 0;
  while (true) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    CANOPY_CHECK(r == 0 || errno == EINTR, Error, "canopy sweep: waiting for a run: ", describe_errno(errno));
    if (!passed_on && stop_signal() != 0) {
      ::kill(pid, SIGUSR1);
      passed_on = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// The time the runs after `done` will take, from those this sweep ran: each by its setting's
// mean, or the mean over every setting for one not run yet; and each cache still to build by
// the mean of those built (none built: not counted).
std::string time_left(const SweepPlan& plan, std::size_t done, const std::set<std::string>& ready) {
  std::map<std::size_t, std::pair<double, int>> by_setting;
  double all = 0;
  int timed = 0;
  for (std::size_t i = 0; i <= done; ++i) {
    const SweepRun& r = plan.runs[i];
    if (r.exit_code != 0) continue;
    by_setting[r.setting].first += r.seconds;
    ++by_setting[r.setting].second;
    all += r.seconds;
    ++timed;
  }
  double left = 0;
  int runs = 0;
  std::set<std::string> to_build;
  for (std::size_t i = done + 1; i < plan.runs.size(); ++i) {
    const SweepRun& r = plan.runs[i];
    if (r.action == SweepAction::kDone) continue;
    const auto it = by_setting.find(r.setting);
    left += it != by_setting.end() ? it->second.first / it->second.second : all / std::max(timed, 1);
    ++runs;
    if (!ready.count(r.config.cache.path)) to_build.insert(r.config.cache.path);
  }
  double built = 0;
  int builds = 0;
  for (const auto& [cache, seconds] : plan.built_now) {
    built += seconds;
    ++builds;
  }
  if (builds > 0) left += static_cast<double>(to_build.size()) * built / builds;
  if (timed == 0 || runs == 0) return "";
  return detail::str_cat("; about ", format_duration(left), " for the ", count_of(runs, "run"), " left");
}

// The run's command: `program run --config ... --set ...` (--resume where it goes on), after
// --run-with's words.
std::vector<std::string> run_argv(const SweepPlan& plan, const SweepRun& run, const std::string& program,
                                  const std::string& progress, const std::string& command = "run") {
  std::vector<std::string> argv = plan.options.run_with;
  for (const std::string& word : {program, command, std::string("--config"), plan.options.config})
    argv.push_back(word);
  for (const auto& s : run.overrides) {
    argv.push_back("--set");
    argv.push_back(s);
  }
  if (command == "run" && run.action != SweepAction::kTrain) argv.push_back("--resume");
  if (command == "cache") argv.push_back("--check-tasks");  // the runs would refuse them after the pass
  argv.push_back("--progress");
  argv.push_back(progress);
  return argv;
}

std::string setting_of(const SweepPlan& plan, const SweepRun& run) {
  return plan.settings[run.setting] + ", seed " + std::to_string(run.config.train.seed);
}

// Each run's training time in the sweeps into `out` before (its sweep.json): out_dir -> seconds.
std::map<std::string, double> earlier_train_seconds(const std::string& out) {
  std::map<std::string, double> seconds;
  const std::string path = join_path(out, "sweep.json");
  if (!is_regular_file(path)) return seconds;
  try {
    const auto j = nlohmann::json::parse(read_file(path));
    for (const auto& run : j.at("runs")) {
      // A time its checkpoint recorded is read from the checkpoint again, not added to.
      if (run.value("timed_by", "process") == "checkpoint") continue;
      seconds[run.at("out_dir").get<std::string>()] = run.value("train_seconds", run.value("seconds", 0.0));
    }
  } catch (const nlohmann::json::exception&) {
    log_info("'" + path + "' cannot be read: the earlier runs' times are not known; it is written anew");
  }
  return seconds;
}

// The time each cache took to build in the sweeps into `out` before (sweep.json's
// "cache_seconds"): cache path -> seconds.
std::map<std::string, double> earlier_cache_seconds(const std::string& out) {
  std::map<std::string, double> seconds;
  const std::string path = join_path(out, "sweep.json");
  if (!is_regular_file(path)) return seconds;
  try {
    seconds = nlohmann::json::parse(read_file(path)).value("cache_seconds", seconds);
  } catch (const nlohmann::json::exception&) {  // said by earlier_train_seconds
  }
  return seconds;
}

// Loads each distinct trunk configuration the runs have (a varied tap, freeze or trunk file),
// so that one no run could cache (a tap the trunk lacks, a policy with no prefix to cache) is
// refused before any run trains, naming its setting. A trunk file not there is left to the run
// (training over a frozen trunk needs only its cache).
void check_trunks(const SweepPlan& plan) {
  std::map<std::string, std::vector<const SweepRun*>> groups;  // by trunk setting, in first use order
  std::vector<std::string> order;
  for (const auto& run : plan.runs) {
    const trunk::TrunkConfig& t = run.config.trunk;
    const std::string key =
        detail::str_cat(t.path, "\n", t.sha256, "\n", join(t.taps, ","), "\n", join(t.expand, ","), "\n",
                        trunk::describe(t.freeze), "\n", t.pooling, "\n", t.device);
    if (!groups.count(key)) order.push_back(key);
    groups[key].push_back(&run);
  }
  for (const auto& key : order) {
    const auto& runs = groups.at(key);
    if (!is_regular_file(runs.front()->config.trunk.path)) continue;
    const auto context = [&](const SweepRun& run) {
      return "canopy sweep: setting '" + plan.settings[run.setting] + "': ";
    };
    std::optional<trunk::Trunk> trunk;
    adding_context(context(*runs.front()), [&] {
      trunk.emplace(trunk::Trunk::load(runs.front()->config.trunk));
      trunk->check_cacheable();
    });
    // What each run would refuse only once it trains, after the runs before it: a freezing
    // schedule or a loss weighting over a trunk frozen whole, an autofreeze its top cannot take.
    std::set<std::string> checked;
    for (const SweepRun* run : runs) {
      const TopConfig& top = run->config.top;
      const std::string what = detail::str_cat(to_string(top.schedule), " ", top.min_trainable, " ",
                                               to_string(run->config.train.weighting));
      if (!checked.insert(what).second) continue;
      adding_context(context(*run), [&] {
        if (trunk->split().tunes)
          check_top(*trunk, top);
        else
          refuse_top_keys_without_top(run->config);
      });
    }
  }
}

// Whether `dir` holds a cache of the features `fingerprint` names: complete and its files as
// its manifest records, or (`complete` false) any state a run would go on from.
bool holds_cache(const std::string& dir, const std::string& fingerprint, bool complete) {
  if (!is_regular_file(datasets::manifest_path(dir))) return false;
  try {
    const datasets::Manifest m = datasets::read_manifest(dir);
    return m.meta.fingerprint == fingerprint &&
           (!complete || (m.complete && datasets::files_out_of_step(dir, m).empty()));
  } catch (const DataError&) {
    return false;
  }
}

// A cache a setting's runs may read where it is: how it was named (the config's cache.path, or
// the --cache-from that named it), where it is, and what it holds, read once for the plan.
struct Candidate {
  std::string named;
  std::string target;  // real_path
  std::string fingerprint, description;
  bool complete = false;  // and its files as its manifest records
  std::string problem;    // why its manifest cannot be read
};

Candidate read_candidate(const std::string& named, const std::string& cache) {
  Candidate c;
  c.named = named;
  c.target = real_path(cache);
  try {
    const datasets::Manifest m = datasets::read_manifest(cache);
    c.fingerprint = m.meta.fingerprint;
    c.description = m.meta.description;
    c.complete = m.complete && datasets::files_out_of_step(cache, m).empty();
  } catch (const DataError& e) {
    c.problem = e.what();
  }
  return c;
}

// The caches that may hold a setting's features already: the config's own (`own`, when there
// is one), then each --cache-from's: a cache, or every cache in an earlier sweep's folder
// (ConfigError for anything else).
std::vector<Candidate> candidate_caches(const SweepOptions& options, const std::string& own) {
  std::vector<Candidate> out;
  if (is_regular_file(datasets::manifest_path(own))) out.push_back(read_candidate(own, own));
  for (const auto& dir : options.cache_from) {
    if (!is_sweep_dir(dir)) {
      CANOPY_CHECK(is_regular_file(datasets::manifest_path(dir)), ConfigError, "canopy sweep: --cache-from '",
                   dir, "' is neither a feature cache nor a sweep's folder (no ",
                   datasets::manifest_path(dir), ")");
      out.push_back(read_candidate(dir, dir));
      continue;
    }
    const std::string folder = join_path(dir, "caches");  // every cache it built or linked
    const std::size_t before = out.size();
    for (const auto& name : is_directory(folder) ? list_dir(folder) : std::vector<std::string>{})
      if (is_regular_file(datasets::manifest_path(join_path(folder, name))))
        out.push_back(read_candidate(dir, join_path(folder, name)));
    CANOPY_CHECK(out.size() > before, ConfigError, "canopy sweep: --cache-from '", dir,
                 "' is a sweep's folder with no cache in it yet");
  }
  return out;
}

// Where a setting's runs read their features. They build `cache` (under <out>/caches) unless
// the same features are cached already: there, through a link an earlier sweep made, or in a
// complete candidate, which the sweep then links to rather than computing them again.
void place_cache(SweepPlan& plan, const std::string& cache, const std::string& fingerprint,
                 const std::vector<Candidate>& candidates) {
  if (is_symlink(cache)) {
    const std::string target = real_path(cache);
    if (!target.empty() && holds_cache(target, fingerprint, false)) {
      plan.links[cache] = target;
      return;
    }
    plan.stale_links.push_back(cache);  // removed, moved or rebuilt from other inputs since
  } else if (path_exists(cache)) {
    return;  // the sweep's own
  }
  for (const Candidate& c : candidates) {
    if (c.complete && c.fingerprint == fingerprint && !c.target.empty() && c.target != real_path(cache)) {
      plan.links[cache] = c.target;
      return;
    }
  }
}

// Each --cache-from no setting reads, and why: a line each for plan.unread.
std::vector<std::string> unread_caches(const SweepPlan& plan, const std::vector<Candidate>& candidates,
                                       const std::string& first_description) {
  std::vector<std::string> out;
  for (const auto& dir : plan.options.cache_from) {
    std::vector<const Candidate*> named;
    for (const Candidate& c : candidates)
      if (c.named == dir) named.push_back(&c);
    const bool read = std::any_of(named.begin(), named.end(), [&](const Candidate* c) {
      return std::any_of(plan.links.begin(), plan.links.end(),
                         [&](const auto& l) { return l.second == c->target; });
    });
    if (read) continue;
    std::string why = "it holds none of these settings' features", own;
    for (const Candidate* c : named)  // the same features as a cache the sweep has of its own
      for (const auto& [cache, fingerprint] : plan.fingerprints)
        if (own.empty() && c->fingerprint == fingerprint) own = cache;
    if (!own.empty()) {
      why = "the sweep's own " + own + " holds the same features already";
    } else if (is_sweep_dir(dir)) {
      why = "none of its caches holds these settings' features";
    } else if (const Candidate& c = *named.front(); !c.problem.empty()) {
      why = c.problem;
    } else if (!c.complete) {
      why = "it is unfinished (canopy cache with its config completes it)";
    } else if (const auto changes = describe_changes(c.description, first_description); !changes.empty()) {
      why += " (against the first setting's: " + join(changes, "; ") + ")";
    }
    out.push_back(dir + ": not read; " + why);
  }
  return out;
}

// Each setting's folder name: each varied key's last part and its value ("freeze-first_13"),
// cut to "setting<N>" when long, numbered when two would be alike.
std::vector<std::string> folder_names(const SweepOptions& options,
                                      const std::vector<std::vector<std::size_t>>& combos) {
  std::vector<std::string> names;
  for (const auto& combo : combos) {
    std::vector<std::string> named;
    for (std::size_t k = 0; k < combo.size(); ++k) {
      const auto& [key, values] = options.vary[k];
      named.push_back(name_part(key.substr(key.rfind('.') + 1)) + "-" + name_part(values[combo[k]]));
    }
    names.push_back(join(named, "_"));
  }
  for (std::size_t s = 0; s < names.size(); ++s)  // a folder name stays well within NAME_MAX
    if (names[s].size() > 100) names[s] = "setting" + std::to_string(s + 1);
  const std::set<std::string> distinct(names.begin(), names.end());
  if (distinct.size() != names.size())  // values that differ only in characters a name leaves out
    for (std::size_t s = 0; s < names.size(); ++s) names[s] = std::to_string(s + 1) + "_" + names[s];
  return names;
}

// A setting as said: "trunk.freeze = first:13, trunk.schedule = gradual".
std::string setting_said(const SweepOptions& options, const std::vector<std::size_t>& combo) {
  std::vector<std::string> said;
  for (std::size_t k = 0; k < combo.size(); ++k)
    said.push_back(options.vary[k].first + " = " + options.vary[k].second[combo[k]]);
  return join(said, ", ");
}

// Said before the runs when every key varied is a task's: a grid trains those in one run.
std::string grid_hint(const SweepOptions& options) {
  const auto task_key = [](const auto& v) { return v.first.rfind("task.", 0) == 0; };
  if (!std::all_of(options.vary.begin(), options.vary.end(), task_key)) return "";
  const auto& [key, values] = options.vary.front();
  return detail::str_cat("every key varied is a task's: a grid in the config (", key, " = ",
                         join(values, values.front().find(',') == std::string::npos ? ", " : " | "),
                         ") trains those heads in one run, each batch of features read once for all of "
                         "them (docs/training.md, Grids of heads)");
}

// One run of setting `s` and `seed`, its configuration resolved; its cache placed by the caller.
SweepRun plan_run(const SweepOptions& options, std::size_t s, const std::vector<std::size_t>& combo,
                  std::int64_t seed, const std::string& name) {
  SweepRun run;
  run.setting = s;
  run.name = name + "-s" + std::to_string(seed);
  run.overrides = options.overrides;
  for (std::size_t k = 0; k < combo.size(); ++k)
    run.overrides.push_back(options.vary[k].first + "=" + options.vary[k].second[combo[k]]);
  run.overrides.push_back("train.seed=" + std::to_string(seed));
  run.overrides.push_back("train.out_dir=" + join_path(options.out, run.name));
  run.config = load_job_config(options.config, run.overrides);
  run.log = join_path(join_path(options.out, "logs"), run.name + ".log");
  return run;
}

}  // namespace

void check_sweep_folder(const std::string& out) {
  CANOPY_CHECK(!out.empty(), ConfigError, "canopy sweep: --out DIR is required (the sweep's folder)");
  CANOPY_CHECK(!is_run_dir(out), ConfigError, "canopy sweep: --out '", out,
               "' is a training run's out_dir; a sweep's runs go in a folder of its own");
  CANOPY_CHECK(!is_regular_file(join_path(out, "manifest.json")), ConfigError, "canopy sweep: --out '", out,
               "' is a feature cache; a sweep's runs go in a folder of its own");
}

SweepPlan plan_sweep(const SweepOptions& options) {
  check_options(options);
  SweepPlan plan;
  plan.options = options;
  const auto combos = combinations(options);
  CANOPY_CHECK(combos.size() >= 2 && combos.size() <= 26, ConfigError, "canopy sweep: ", combos.size(),
               " setting", combos.size() == 1 ? "" : "s",
               " (the product of the values varied): a sweep compares 2 to 26");
  const std::map<std::string, double> earlier = earlier_train_seconds(options.out);
  const std::map<std::string, double> built_before = earlier_cache_seconds(options.out);
  const JobConfig base = load_job_config(options.config, options.overrides);
  const std::vector<Candidate> candidates = candidate_caches(options, base.cache.path);
  std::vector<std::int64_t> seeds = options.seeds;
  if (seeds.empty()) seeds.push_back(base.train.seed);
  const std::vector<std::string> names = folder_names(options, combos);
  std::string first_description;  // the first setting's features, to say how a --cache-from differs
  for (std::size_t s = 0; s < combos.size(); ++s) {
    plan.settings.push_back(setting_said(options, combos[s]));
    std::string cache;  // the setting's: neither the seed nor the out_dir changes the features
    for (const std::int64_t seed : seeds) {
      SweepRun run = plan_run(options, s, combos[s], seed, names[s]);
      // Runs reading the same features share one cache: its folder is their fingerprint (which
      // hashes the trunk file and stamps every data file: once per setting).
      if (cache.empty()) {
        const std::string description = expected_cache_description(run.config);
        const std::string fingerprint = sha256_hex(description);
        if (first_description.empty()) first_description = description;
        cache = join_path(join_path(options.out, "caches"), fingerprint.substr(0, 16));
        if (std::find(plan.caches.begin(), plan.caches.end(), cache) == plan.caches.end()) {
          plan.caches.push_back(cache);
          plan.fingerprints[cache] = fingerprint;
          place_cache(plan, cache, fingerprint, candidates);
          if (built_before.count(cache) && !plan.links.count(cache))
            plan.built_before[cache] = built_before.at(cache);
        }
      }
      run.overrides.push_back("cache.path=" + cache);
      run.config.cache.path = cache;
      read_out_dir(run);
      if (run.action != SweepAction::kTrain && earlier.count(run.config.train.out_dir))
        run.seconds_before = earlier.at(run.config.train.out_dir);
      plan.runs.push_back(std::move(run));
    }
  }
  plan.unread = unread_caches(plan, candidates, first_description);
  plan.hint = grid_hint(options);
  check_trunks(plan);
  return plan;
}

std::string format_plan(const SweepPlan& plan) {
  std::ostringstream o;
  const std::size_t seeds = plan.runs.size() / plan.settings.size();
  o << "sweep " << plan.options.out << ": "
    << count_of(static_cast<std::int64_t>(plan.settings.size()), "setting") << " x "
    << count_of(static_cast<std::int64_t>(seeds), "seed") << ", "
    << count_of(static_cast<std::int64_t>(plan.runs.size()), "run") << " of " << plan.options.config << ", "
    << count_of(static_cast<std::int64_t>(plan.caches.size()), "cache")
    << (plan.links.empty() ? ""
                           : " (" + std::to_string(plan.links.size()) +
                                 (plan.links.size() == 1 ? " read where it is)" : " read where they are)"))
    << "\n";
  std::vector<std::vector<std::string>> rows{{"setting", "seed", "out_dir", "cache", "to do"}};
  for (const auto& r : plan.runs) {
    const std::string todo =
        r.why.empty() ? action_word(r.action) : action_word(r.action) + (" (" + r.why + ")");
    rows.push_back({plan.settings[r.setting], std::to_string(r.config.train.seed), r.config.train.out_dir,
                    r.config.cache.path, todo});
  }
  o << aligned_columns(rows);
  o << format_links(plan);
  return o.str();
}

std::string format_links(const SweepPlan& plan) {
  std::ostringstream o;
  for (const auto& link : plan.stale_links)
    if (!plan.links.count(link))
      o << link << ": the cache it links to is gone or holds other features now; the link goes, the runs "
        << "build the cache there\n";
  for (const auto& [cache, target] : plan.links)
    o << cache << " -> " << target << ": the same features, cached already; read where they are, not built "
      << "again\n";
  for (const auto& said : plan.unread) o << "--cache-from " << said << "\n";
  return o.str();
}

namespace {

// A run's or a cache's process that failed otherwise than by a stop (exit `rc`): a ConfigError
// where it refused its configuration (exit 2: so does the sweep), else a DataError, naming it
// and its log.
[[noreturn]] void child_failed(const std::string& what, int rc, const std::string& log_path) {
  const std::string failed = detail::str_cat(
      what, " failed (exit ", rc, rc > 128 ? " (" + signal_name(rc - 128) + ")" : std::string(),
      "; its error above, its report in ", log_path,
      "); the runs before it are kept: run the same command to go on once it is mended");
  if (rc == 2) throw ConfigError(failed);
  throw DataError(failed);
}

// Builds the cache `run` reads, as `canopy cache` (under --run-with's launch) in a process of its
// own, unless it is up to date: so that a run's time is its training alone, and the cache's is
// said apart. A stop ends it at its next shard (what it wrote kept: the next sweep resumes it).
void build_cache(SweepPlan& plan, const SweepRun& run, const std::string& which, const std::string& program,
                 const std::string& progress, std::ostream& log) {
  const std::string& cache = run.config.cache.path;
  if (holds_cache(cache, plan.fingerprints.at(cache), true)) return;
  const std::string cache_log =
      join_path(join_path(plan.options.out, "logs"), "cache-" + cache.substr(cache.rfind('/') + 1) + ".log");
  log << "canopy sweep: building the cache " << cache << " for " << which << " (its report: " << cache_log
      << ")\n"
      << std::flush;
  const std::vector<std::string> argv = run_argv(plan, run, program, progress, "cache");
  std::ofstream(cache_log, std::ios::app) << "\n== " << join(argv, " ") << "\n";
  const auto start = std::chrono::steady_clock::now();
  const int rc = run_child(argv, cache_log);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (rc == 0) {
    plan.built_now[cache] += seconds;
    log << "canopy sweep: the cache " << cache << " built in " << format_duration(seconds) << "\n";
    write_file_atomic(join_path(plan.options.out, "sweep.json"), sweep_json(plan));
    return;
  }
  if (is_stop_status(rc)) {
    const int signal = stop_signal() != 0 ? stop_signal() : rc - 128;  // the sweep's, passed on as SIGUSR1
    throw Stopped(
        signal,
        detail::str_cat("stopped by ", signal_name(signal), " while the cache ", cache, " was built for ",
                        which, "; the shards it finished are kept: run the same command to go on"));
  }
  child_failed("building the cache " + cache + " for " + which, rc, cache_log);
}

// The plan's links under <out>/caches made, the stale ones removed; said on `log`. A file
// system without links: the cache is built after all.
void make_links(SweepPlan& plan, std::ostream& log) {
  for (const auto& link : plan.stale_links) remove_symlink(link);
  for (auto it = plan.links.begin(); it != plan.links.end();) {
    const auto& [cache, target] = *it;
    if (is_symlink(cache)) {
      ++it;
      continue;
    }
    make_dirs(parent_path(cache));
    try {
      make_symlink(target, cache);
      ++it;
    } catch (const IoError& e) {  // a file system without links: the cache is built after all
      log << "canopy sweep: " << e.what() << "; the runs build the cache there instead\n";
      it = plan.links.erase(it);
    }
  }
  log << format_links(plan);
}

}  // namespace

void run_sweep(SweepPlan& plan, const std::string& program, const std::string& progress, std::ostream& log) {
  make_dirs(join_path(plan.options.out, "logs"));
  make_links(plan, log);
  const std::string record = join_path(plan.options.out, "sweep.json");
  write_file_atomic(record, sweep_json(plan));
  const std::size_t n = plan.runs.size();
  std::set<std::string> ready;  // caches up to date: the others are built before the first run reading them
  for (const auto& cache : plan.caches)
    if (holds_cache(cache, plan.fingerprints.at(cache), true)) ready.insert(cache);
  for (std::size_t i = 0; i < n; ++i) {
    SweepRun& run = plan.runs[i];
    const std::string which = detail::str_cat("run ", i + 1, " of ", n, " (", setting_of(plan, run), ")");
    if (run.action == SweepAction::kDone) {
      log << "canopy sweep: " << which << ": finished before, kept (" << run.config.train.out_dir << ")\n";
      continue;
    }
    if (stop_signal() != 0) {
      throw Stopped(stop_signal(), detail::str_cat("stopped by ", signal_name(stop_signal()), " before ",
                                                   which, "; run the same command to go on"));
    }
    const std::string& cache = run.config.cache.path;
    if (plan.links.count(cache) && !holds_cache(cache, plan.fingerprints.at(cache), true)) {
      // The cache it links to changed under the sweep (rebuilt from other inputs, removed): the
      // run must not rebuild it there, in its owner's place; the sweep builds its own.
      log << "canopy sweep: " << cache << " -> " << plan.links.at(cache)
          << ": that cache no longer holds these features complete; the link goes, the sweep builds its "
             "own\n";
      remove_symlink(cache);
      plan.links.erase(cache);
      ready.erase(cache);
    }
    if (!ready.count(cache)) {
      build_cache(plan, run, which, program, progress, log);
      ready.insert(cache);
    }
    const char* doing = run.action == SweepAction::kTrain    ? "training"
                        : run.action == SweepAction::kResume ? "resuming from its checkpoint"
                                                             : "training on";
    log << "canopy sweep: " << which << ": " << doing << " in " << run.config.train.out_dir
        << " (its report: " << run.log << ")\n"
        << std::flush;
    const std::vector<std::string> argv = run_argv(plan, run, program, progress);
    std::ofstream(run.log, std::ios::app) << "\n== " << join(argv, " ") << "\n";
    const auto start = std::chrono::steady_clock::now();
    run.exit_code = run_child(argv, run.log);
    run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    run.recorded = recorded_cost(run.config.train.out_dir);
    write_file_atomic(record, sweep_json(plan));
    const int rc = run.exit_code;
    if (rc == 0) {
      log << "canopy sweep: " << which << ": done in " << format_duration(run.seconds)
          << time_left(plan, i, ready) << "\n";
      continue;
    }
    if (rc == 3) {
      log << "canopy sweep: " << which << ": a head FAILED (see " << run.log << "); the sweep goes on\n";
      continue;
    }
    if (is_stop_status(rc)) {
      const int signal = stop_signal() != 0 ? stop_signal() : rc - 128;
      throw Stopped(
          signal,
          detail::str_cat("stopped by ", signal_name(signal), ": ", which, " stopped in ",
                          run.config.train.out_dir, ", what it had done kept at its checkpoint",
                          i > 0 ? " (the runs before it kept)" : "", "; run the same command to go on"));
    }
    child_failed(which, rc, run.log);
  }
}

std::string this_program() {
  std::string path(4096, '\0');
  const ssize_t n = ::readlink("/proc/self/exe", path.data(), path.size());
  CANOPY_CHECK(n > 0 && static_cast<std::size_t>(n) < path.size(), Error,
               "cannot read this program's path (/proc/self/exe): ", describe_errno(errno));
  path.resize(static_cast<std::size_t>(n));
  // Replaced since it started (a rebuild): the path names the new file.
  constexpr std::string_view kDeleted = " (deleted)";
  if (ends_with(path, kDeleted)) path.resize(path.size() - kDeleted.size());
  return path;
}

namespace {

// What each setting costs, beside what it scores, from a sweep's record (sweep.json): its mean
// training time per run against the first setting's (earlier sweeps' included), then each cache,
// the settings reading it and its build time (or where it is read).
// Each setting's mean training time per run, over its runs whose time is known.
std::map<std::string, double> mean_train_seconds(const nlohmann::ordered_json& record) {
  std::map<std::string, std::pair<double, int>> timed;  // setting -> seconds, runs
  for (const auto& r : record.value("runs", nlohmann::ordered_json::array())) {
    if (const double t = r.value("train_seconds", 0.0); t > 0) {
      timed[r.value("setting", "")].first += t;
      ++timed[r.value("setting", "")].second;
    }
  }
  std::map<std::string, double> mean;
  for (const auto& [setting, t] : timed) mean[setting] = t.first / t.second;
  return mean;
}

std::string cost_lines(const nlohmann::ordered_json& record) {
  const auto settings = record.value("settings", std::vector<std::string>{});
  std::map<std::string, std::vector<std::string>> readers;  // cache -> its settings, in order
  for (const auto& r : record.value("runs", nlohmann::ordered_json::array())) {
    const std::string setting = r.value("setting", "");
    auto& rs = readers[r.value("cache", "")];
    if (std::find(rs.begin(), rs.end(), setting) == rs.end()) rs.push_back(setting);
  }
  const auto mean = mean_train_seconds(record);
  std::ostringstream o;
  std::vector<std::string> per_setting;
  for (const auto& s : settings) {
    if (!mean.count(s)) continue;
    std::string cost = s + ": " + format_duration(mean.at(s));
    if (s != settings.front() && mean.count(settings.front())) {
      char ratio[32];
      std::snprintf(ratio, sizeof ratio, " (%.1fx)", mean.at(s) / mean.at(settings.front()));
      cost += ratio;
    }
    per_setting.push_back(cost);
  }
  if (!per_setting.empty()) o << "training time per run, mean: " << join(per_setting, "; ") << "\n";
  std::size_t by_process = 0, by_checkpoint = 0;
  for (const auto& r : record.value("runs", nlohmann::ordered_json::array())) {
    if (r.value("train_seconds", 0.0) <= 0) continue;
    const std::string by = r.value("timed_by", "");
    by_process += by == "process";
    by_checkpoint += by == "checkpoint";
  }
  if (by_process > 0 && by_checkpoint > 0)
    o << "(" << count_of(static_cast<std::int64_t>(by_process), "run")
      << " without a training time in the checkpoint: counted by the process's time, start-up included)\n";
  const auto links = record.value("links", std::map<std::string, std::string>{});
  const auto built = record.value("cache_seconds", std::map<std::string, double>{});
  std::vector<std::string> caches;
  for (const auto& cache : record.value("caches", std::vector<std::string>{})) {
    const std::string how = links.count(cache)   ? "read where it is (" + links.at(cache) + ")"
                            : built.count(cache) ? "built in " + format_duration(built.at(cache))
                                                 : "there before";
    caches.push_back(join(readers[cache], " and ") + ": " + how);
  }
  if (!caches.empty()) o << "caches: " << join(caches, "; ") << "\n";
  return o.str();
}

std::string arm_of(std::size_t setting) { return std::string(1, static_cast<char>('A' + setting)); }

// Arm b's difference from arm a on a task of compare.json (versus_A, between; read the other
// way round where only a - b is recorded): {"difference", "interval"}, or null.
nlohmann::ordered_json arm_difference(const nlohmann::ordered_json& task, const std::string& b,
                                      const std::string& a) {
  using nlohmann::ordered_json;
  const auto pair = [&](const std::string& hi, const std::string& lo) -> ordered_json {
    if (lo == "A") return task.value("versus_A", ordered_json::object()).value(hi, ordered_json());
    return task.value("between", ordered_json::object()).value(hi + " - " + lo, ordered_json());
  };
  if (b > a) return pair(b, a);
  const ordered_json d = pair(a, b);
  if (d.is_null()) return d;
  const double lo = d["interval"][0], hi = d["interval"][1];
  return {{"difference", -d["difference"].get<double>()}, {"interval", {-hi, -lo}}};
}

// Of the `arms` arms shown better than `arm` on a task (the difference's interval clear of 0 on
// the better side), the one with the largest difference: {"task", "by", "metric",
// "difference", "interval"}, or null when none is.
nlohmann::ordered_json largest_shown_better(const nlohmann::ordered_json& task, const std::string& arm,
                                            std::size_t arms) {
  using nlohmann::ordered_json;
  const std::string metric = task.value("metric", "");
  const double sign = tasks::lower_is_better(metric) ? -1.0 : 1.0;
  ordered_json best;
  for (std::size_t i = 0; i < arms; ++i) {
    const ordered_json d = arm_difference(task, arm_of(i), arm);
    if (d.is_null() ||
        !shown_better(metric, {d["interval"][0].get<double>(), d["interval"][1].get<double>()}))
      continue;
    if (best.is_null() || sign * d["difference"].get<double>() > sign * best["difference"].get<double>())
      best = {{"task", task.value("task", "")},
              {"by", arm_of(i)},
              {"metric", metric},
              {"difference", d["difference"]},
              {"interval", d["interval"]}};
  }
  return best;
}

// What a sweep's comparison suggests choosing, by cost: per task, the cheapest setting that no
// other is shown better than on it (compare.json's "unbeaten"; cost: the setting's mean training
// time per run, in the settings' order where a time is unknown), the cheapest such on every task,
// and for each cheaper choice, the tasks some setting is shown better on, with the largest such
// difference. {"cost", "settings": [{"arm", "setting", "seconds" (null: unknown)}] cheapest first,
// "per_task": {task: arm}, "every_task": arm or null, "shown_worse": {arm: [{"task", "by", "metric",
// "difference", "interval"}]}}; null when the comparison has no task's unbeaten arms.
nlohmann::ordered_json sweep_choice(const nlohmann::ordered_json& record,
                                    const nlohmann::ordered_json& compared) {
  using nlohmann::ordered_json;
  const auto settings = record.value("settings", std::vector<std::string>{});
  const auto mean = mean_train_seconds(record);
  // Cheapest first: the settings with a known time by it, then the others in their order.
  const auto cheaper = [&](const std::string& a, const std::string& b) {
    const auto i = static_cast<std::size_t>(a.at(0) - 'A'), j = static_cast<std::size_t>(b.at(0) - 'A');
    const bool ti = i < settings.size() && mean.count(settings[i]),
               tj = j < settings.size() && mean.count(settings[j]);
    if (ti != tj) return ti;
    if (ti && mean.at(settings[i]) != mean.at(settings[j]))
      return mean.at(settings[i]) < mean.at(settings[j]);
    return i < j;
  };
  static const ordered_json kNone = ordered_json::array();
  const ordered_json& tasks_compared = compared.contains("tasks") ? compared.at("tasks") : kNone;
  ordered_json per_task = ordered_json::object();
  std::map<std::string, std::vector<std::string>> unbeaten;  // task -> its unbeaten arms
  std::vector<std::string> candidates;                       // arms unbeaten on every task so far
  for (const auto& t : tasks_compared) {
    auto arms = t.value("unbeaten", std::vector<std::string>{});
    if (arms.empty()) continue;
    std::sort(arms.begin(), arms.end(), cheaper);
    if (unbeaten.empty()) candidates = arms;
    per_task[t.value("task", "")] = arms.front();
    unbeaten[t.value("task", "")] = arms;
    candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                    [&](const std::string& a) {
                                      return std::find(arms.begin(), arms.end(), a) == arms.end();
                                    }),
                     candidates.end());
  }
  if (per_task.empty()) return nullptr;
  std::sort(candidates.begin(), candidates.end(), cheaper);
  const std::string every = candidates.empty() ? "" : candidates.front();
  ordered_json shown_worse = ordered_json::object();
  std::set<std::string> chosen;
  for (const auto& [task, arm] : per_task.items()) chosen.insert(arm.get<std::string>());
  for (const auto& arm : chosen) {
    if (arm == every) continue;
    ordered_json lost = ordered_json::array();
    for (const auto& t : tasks_compared) {
      const auto keep = unbeaten.find(t.value("task", ""));
      if (keep == unbeaten.end() || std::count(keep->second.begin(), keep->second.end(), arm)) continue;
      if (ordered_json w = largest_shown_better(t, arm, settings.size()); !w.is_null()) lost.push_back(w);
    }
    shown_worse[arm] = lost;
  }
  std::vector<std::string> order;  // every arm, cheapest first
  for (std::size_t i = 0; i < settings.size(); ++i) order.push_back(arm_of(i));
  std::sort(order.begin(), order.end(), cheaper);
  ordered_json listed = ordered_json::array();
  for (const auto& arm : order) {
    const std::string& setting = settings[static_cast<std::size_t>(arm[0] - 'A')];
    listed.push_back({{"arm", arm},
                      {"setting", setting},
                      {"seconds", mean.count(setting) ? ordered_json(mean.at(setting)) : ordered_json()}});
  }
  // Where the times were measured: each arm's timed runs' machines. Times from two machines
  // do not compare (another CPU, other cores, a GPU), and the choice says so.
  ordered_json machines = ordered_json::object();
  std::set<std::string> distinct;
  for (const auto& r : record.value("runs", ordered_json::array())) {
    if (r.value("train_seconds", 0.0) <= 0) continue;
    const auto at = std::find(settings.begin(), settings.end(), r.value("setting", ""));
    if (at == settings.end()) continue;
    ordered_json& mine = machines[arm_of(static_cast<std::size_t>(at - settings.begin()))];
    if (mine.is_null()) mine = ordered_json::array();
    for (const auto& m : r.value("machines", std::vector<std::string>{})) {
      distinct.insert(m);
      if (std::find(mine.begin(), mine.end(), m) == mine.end()) mine.push_back(m);
    }
  }
  return {{"cost", "training seconds per run, mean"},
          {"settings", listed},
          {"per_task", per_task},
          {"every_task", every.empty() ? ordered_json() : ordered_json(every)},
          {"shown_worse", shown_worse},
          {"machines", machines},
          {"one_machine", distinct.size() <= 1}};
}

// A task a setting is shown worse on, as sweep_choice's "shown_worse" has it, in words:
// "group_linear (C - B +0.09 points [+0.01, +0.19])".
std::string worse_text(const nlohmann::ordered_json& w, const std::string& arm) {
  Paired p;
  p.metric = w.value("metric", "");
  p.difference = w.value("difference", 0.0);
  p.interval.lo = w["interval"][0];
  p.interval.hi = w["interval"][1];
  const PairedText said = paired_text(p);
  return w.value("task", "") + " (" + w.value("by", "") + " - " + arm + " " + said.difference +
         said.interval + ")";
}

// sweep_choice as lines: a line per setting chosen for some task (its cost and tasks), cheapest
// first, the setting unbeaten on every task, and what each cheaper choice is shown worse on.
std::string choice_text(const nlohmann::ordered_json& choice) {
  using nlohmann::ordered_json;
  if (choice.is_null()) return "";
  std::map<std::string, std::vector<std::string>> tasks_of;  // arm -> the tasks it is chosen for
  for (const auto& [task, arm] : choice["per_task"].items()) tasks_of[arm.get<std::string>()].push_back(task);
  std::map<std::string, ordered_json> setting;  // arm -> its entry
  std::vector<std::string> arms;                // the arms chosen for some task, cheapest first
  for (const auto& s : choice["settings"]) {
    setting[s.value("arm", "")] = s;
    if (tasks_of.count(s.value("arm", ""))) arms.push_back(s.value("arm", ""));
  }
  const auto time_of = [&](const std::string& arm) {
    const auto& t = setting[arm]["seconds"];
    return t.is_null() ? std::string("time unknown") : format_duration(t.get<double>());
  };
  const std::size_t n_tasks = choice["per_task"].size();
  constexpr std::size_t kShown = 6;  // tasks named in a line, the rest counted
  std::ostringstream o;
  o << "choosing by cost (training time per run): per task, the cheapest setting no other is shown better "
       "than on it\n";
  if (!choice.value("one_machine", true)) {
    std::vector<std::string> where;
    for (const auto& [arm, ms] : choice["machines"].items())
      where.push_back(arm + " on " + join(ms.get<std::vector<std::string>>(), " and "));
    o << "  the times were measured on more than one machine, so they do not compare: " << join(where, "; ")
      << " (train the runs compared on one machine to choose by cost)\n";
  }
  std::vector<std::vector<std::string>> rows;
  for (const auto& arm : arms) {
    auto listed = tasks_of[arm];
    std::string said = listed.size() == n_tasks
                           ? "every task (" + std::to_string(n_tasks) + ")"
                           : count_of(static_cast<std::int64_t>(listed.size()), "task") + ": ";
    if (listed.size() != n_tasks) {
      const std::size_t more = listed.size() > kShown + 1 ? listed.size() - kShown : 0;  // never "1 more"
      listed.resize(listed.size() - more);
      said += join(listed, ", ") + (more ? ", " + std::to_string(more) + " more" : "");
    }
    rows.push_back({"  " + arm, setting[arm].value("setting", ""), time_of(arm), said});
  }
  o << aligned_columns(rows);
  const std::string every = choice["every_task"].is_null() ? "" : choice["every_task"].get<std::string>();
  if (every.empty())
    o << "no setting is unbeaten on every task: which to choose depends on which tasks matter most\n";
  else
    o << "the cheapest setting unbeaten on every task: " << every << " ("
      << setting[every].value("setting", "") << "), " << time_of(every) << " per run\n";
  for (const auto& arm : arms) {
    if (arm == every || !choice["shown_worse"].contains(arm)) continue;
    const auto& worse = choice["shown_worse"][arm];
    std::vector<std::string> lost;
    for (const auto& w : worse) {
      if (lost.size() == kShown / 2 && worse.size() > kShown / 2 + 1) {
        lost.push_back(std::to_string(worse.size() - kShown / 2) + " more (canopy inspect --json)");
        break;
      }
      lost.push_back(worse_text(w, arm));
    }
    std::string cost;
    const auto& mine = setting[arm]["seconds"];
    if (!every.empty() && !mine.is_null() && !setting[every]["seconds"].is_null()) {
      char ratio[64];
      std::snprintf(ratio, sizeof ratio, ", at %.2fx %s's training time,",
                    mine.get<double>() / setting[every]["seconds"].get<double>(), every.c_str());
      cost = ratio;
    }
    o << arm << cost << " is shown worse on " << worse.size() << " of " << n_tasks
      << " tasks: " << join(lost, "; ") << "\n";
  }
  return o.str();
}

}  // namespace

std::string choice_lines(const std::string& sweep_record, const std::string& comparison) {
  return choice_text(
      sweep_choice(nlohmann::ordered_json::parse(sweep_record), nlohmann::ordered_json::parse(comparison)));
}

std::string choice_json(const std::string& sweep_record, const std::string& comparison) {
  return sweep_choice(nlohmann::ordered_json::parse(sweep_record), nlohmann::ordered_json::parse(comparison))
      .dump();
}

std::string describe_choice(const std::string& choice) {
  return choice_text(nlohmann::ordered_json::parse(choice));
}

RunCost recorded_cost(const std::string& out_dir) {
  try {
    const CheckpointRecord record = CheckpointStore::read_record(join_path(out_dir, "checkpoint"), false);
    return {record.train_seconds, record.machines};
  } catch (const Error&) {  // no checkpoint, or one that does not parse: no time recorded
    return {};
  }
}

std::string arms_record(const std::vector<std::string>& names,
                        const std::vector<std::vector<RunCost>>& costs) {
  nlohmann::ordered_json record{{"settings", names}, {"runs", nlohmann::ordered_json::array()}};
  bool timed = false;
  for (std::size_t a = 0; a < names.size() && a < costs.size(); ++a) {
    for (const RunCost& c : costs[a]) {
      record["runs"].push_back(
          {{"setting", names[a]}, {"train_seconds", c.seconds}, {"machines", c.machines}});
      timed = timed || c.seconds > 0;
    }
  }
  return timed ? record.dump() : std::string();
}

std::string format_sweep(const SweepPlan& plan) {
  // What was done with each run, from its action and its exit status.
  const auto done = [](const SweepRun& r) -> std::string {
    if (r.exit_code < 0) return r.action == SweepAction::kDone ? "done before" : "not run";
    if (r.exit_code == 3) return "a head FAILED";
    if (r.exit_code != 0) return "exit " + std::to_string(r.exit_code);
    return r.action == SweepAction::kResume    ? "resumed"
           : r.action == SweepAction::kTrainOn ? "trained on"
                                               : "trained";
  };
  std::map<std::string, int> tally;
  double seconds = 0;
  for (const auto& r : plan.runs) {
    ++tally[done(r)];
    seconds += r.seconds;
  }
  std::vector<std::string> said;
  for (const auto& [what, count] : tally) said.push_back(std::to_string(count) + " " + what);
  std::ostringstream o;
  o << "sweep " << plan.options.out << ": " << count_of(static_cast<std::int64_t>(plan.runs.size()), "run")
    << " (" << join(said, ", ") << ") in " << format_duration(seconds) << "; each run's report in "
    << join_path(plan.options.out, "logs") << "\n";
  std::vector<std::vector<std::string>> rows{{"setting", "seed", "out_dir", "done", "time"}};
  for (const auto& r : plan.runs) {
    rows.push_back({plan.settings[r.setting], std::to_string(r.config.train.seed), r.config.train.out_dir,
                    done(r), r.exit_code >= 0 ? format_duration(r.seconds) : "-"});
  }
  o << aligned_columns(rows);
  o << cost_lines(nlohmann::ordered_json::parse(sweep_json(plan)));
  return o.str();
}

std::string sweep_json(const SweepPlan& plan) {
  nlohmann::ordered_json j;
  j["command"] = plan.options.command;
  j["config"] = plan.options.config;
  j["out"] = plan.options.out;
  j["run_with"] = plan.options.run_with;
  nlohmann::ordered_json vary = nlohmann::ordered_json::object();
  for (const auto& [key, values] : plan.options.vary) vary[key] = values;
  j["vary"] = vary;
  std::vector<std::int64_t> seeds;
  for (const auto& r : plan.runs)
    if (r.setting == 0) seeds.push_back(static_cast<std::int64_t>(r.config.train.seed));
  j["seeds"] = seeds;
  j["settings"] = plan.settings;
  j["caches"] = plan.caches;
  j["links"] = plan.links;
  std::map<std::string, double> cache_seconds = plan.built_before;
  for (const auto& [cache, seconds] : plan.built_now) cache_seconds[cache] += seconds;
  j["cache_seconds"] = cache_seconds;
  j["runs"] = nlohmann::ordered_json::array();
  for (const auto& r : plan.runs) {
    j["runs"].push_back({{"setting", plan.settings[r.setting]},
                         {"seed", r.config.train.seed},
                         {"out_dir", r.config.train.out_dir},
                         {"cache", r.config.cache.path},
                         {"log", r.log},
                         {"action", action_word(r.action)},
                         {"exit_code", r.exit_code},
                         {"seconds", r.seconds},
                         {"train_seconds", r.train_seconds()},
                         {"timed_by", r.timed_by_checkpoint() ? "checkpoint" : "process"},
                         {"machines", r.recorded.machines}});
  }
  return j.dump(2) + "\n";
}

bool is_sweep_dir(const std::string& dir) { return is_regular_file(join_path(dir, "sweep.json")); }

namespace {

// sweep.json's record with each run's status now, "counts", "running" and "compare" added.
nlohmann::ordered_json sweep_status(const std::string& dir, bool& readable) {
  const std::string path = join_path(dir, "sweep.json");
  nlohmann::ordered_json sweep;
  try {
    sweep = nlohmann::ordered_json::parse(read_file(path));
    (void)sweep.at("runs").size();
  } catch (const nlohmann::json::exception& e) {
    throw DataError(detail::str_cat("'", path, "' is not a sweep's record: ", e.what()));
  }
  readable = true;
  std::map<std::string, int> counts;
  for (auto& run : sweep["runs"]) {
    const std::string out_dir = run.value("out_dir", "");
    std::string status = "not_started", text = "not started";
    if (is_directory(out_dir) && is_run_dir(out_dir)) {
      const auto report = nlohmann::json::parse(inspect_run(out_dir, false, nullptr, true));
      status = report.value("status", "unreadable");
      text = report.value("status_text", status);
      // The cost as the run's checkpoint records it now: a run trained on by hand since the
      // sweep recorded it (canopy train --resume) costs what it took in all.
      if (const RunCost cost = cost_in_report(report); cost.seconds > 0) {
        run["train_seconds"] = cost.seconds;
        run["timed_by"] = "checkpoint";
        run["machines"] = cost.machines;
      }
    } else if (path_exists(out_dir) && !(is_directory(out_dir) && list_dir(out_dir).empty())) {
      status = "unreadable";
      text = "there, and not a training run's out_dir";
    }
    readable = readable && status != "unreadable";
    ++counts[status];
    run["status"] = status;
    run["status_text"] = text;
  }
  sweep["counts"] = counts;
  const auto writer = DirLock::writer(dir);
  sweep["running"] = writer ? nlohmann::ordered_json(writer->empty() ? "a canopy process" : *writer)
                            : nlohmann::ordered_json(nullptr);
  const std::string compare_path = join_path(dir, "compare.json");
  if (is_regular_file(compare_path)) {
    try {
      const auto c = nlohmann::ordered_json::parse(read_file(compare_path));
      sweep["compare"] = {{"path", compare_path},
                          {"input", c.value("input", "")},
                          {"eval_split", c.value("eval_split", "")},
                          {"rows", c.value("rows", 0)},
                          {"against_A", c.value("against_A", nlohmann::ordered_json::object())},
                          {"between", c.value("between", nlohmann::ordered_json::object())}};
      sweep["choice"] = sweep_choice(sweep, c);
    } catch (const nlohmann::json::exception& e) {
      sweep["compare"] = {{"path", compare_path}, {"error", e.what()}};
    }
  }
  return sweep;
}

}  // namespace

std::string inspect_sweep(const std::string& dir, bool json, bool* ok) {
  bool readable = true;
  nlohmann::ordered_json sweep = sweep_status(dir, readable);
  const auto counts = sweep["counts"].get<std::map<std::string, int>>();
  const std::string compare_path = join_path(dir, "compare.json");
  if (ok) *ok = readable;
  if (json) return sweep.dump(2) + "\n";

  std::ostringstream o;
  o << "sweep " << dir << "\n";
  if (!sweep["running"].is_null())
    o << "  status      running: " << sweep["running"].get<std::string>() << " is sweeping in it now\n";
  o << "  config      " << sweep.value("config", "") << "\n  settings    "
    << join(sweep.value("settings", std::vector<std::string>{}), "; ") << "\n  seeds       ";
  std::vector<std::string> seeds;
  for (const auto& s : sweep.value("seeds", std::vector<std::int64_t>{})) seeds.push_back(std::to_string(s));
  o << join(seeds, ", ") << "\n  runs        ";
  std::vector<std::string> said;
  for (const auto& [status, count] : counts) said.push_back(std::to_string(count) + " " + status);
  o << sweep["runs"].size() << " (" << join(said, ", ") << ")\n";
  std::vector<std::string> caches;
  for (const auto& c : sweep.value("caches", std::vector<std::string>{})) {
    std::string cache = c;
    if (is_symlink(c)) cache += " -> " + (real_path(c).empty() ? "a folder no longer there" : real_path(c));
    caches.push_back(cache + (is_regular_file(join_path(c, "manifest.json")) ? "" : " (not built)"));
  }
  o << "  caches      " << join(caches, ", ") << "\n";
  std::vector<std::vector<std::string>> rows{{"setting", "seed", "out_dir", "status"}};
  for (const auto& run : sweep["runs"])
    rows.push_back({run.value("setting", ""), std::to_string(run.value("seed", 0)), run.value("out_dir", ""),
                    run.value("status", "")});
  std::istringstream table(aligned_columns(rows));
  for (std::string line; std::getline(table, line);) o << "  " << line << "\n";
  std::istringstream costs(cost_lines(sweep));
  bool first = true;
  for (std::string line; std::getline(costs, line); first = false)
    o << (first ? "  cost        " : "              ") << line << "\n";
  if (sweep.contains("compare") && sweep["compare"].contains("against_A")) {
    const auto& c = sweep["compare"];
    const std::string on = c.value("input", "").empty() ? "the eval split (" + c.value("eval_split", "") + ")"
                                                        : "'" + c.value("input", "") + "'";
    o << "  compared    on " << on << ", " << c.value("rows", 0) << " rows (" << compare_path << ")\n";
    // Arm "A" is the first setting, "B" the second, ...
    const auto settings = sweep.value("settings", std::vector<std::string>{});
    const auto named = [&](const std::string& arm) {
      const auto i = static_cast<std::size_t>(arm.empty() ? 0 : arm[0] - 'A');
      return i < settings.size() ? arm + " (" + settings[i] + ")" : arm;
    };
    const auto against = [&](const std::string& arm, const std::string& other,
                             const nlohmann::ordered_json& t) {
      o << "              " << named(arm) << " against " << named(other) << ": better on "
        << t.value("better", 0) << ", worse on " << t.value("worse", 0) << ", no difference shown on "
        << t.value("no_difference", 0) << "\n";
    };
    for (const auto& [arm, t] : c["against_A"].items()) against(arm, "A", t);
    const auto between = c.value("between", nlohmann::ordered_json::object());
    for (const auto& [arm, row] : between.items())
      for (const auto& [other, t] : row.items())
        if (other != "A" && other < arm) against(arm, other, t);
    std::istringstream choice(choice_text(sweep.value("choice", nlohmann::ordered_json())));
    bool first_line = true;
    for (std::string line; std::getline(choice, line); first_line = false)
      o << (first_line ? "  choice      " : "              ") << line << "\n";
  }
  const bool unfinished = counts.size() != 1 || !counts.count("finished");
  const std::string command = sweep.value("command", "");
  if (unfinished && !command.empty()) o << "  go on       " << command << "\n";
  return o.str();
}

std::vector<std::vector<JobConfig>> sweep_arms(const SweepPlan& plan) {
  std::vector<std::vector<JobConfig>> arms(plan.settings.size());
  for (const auto& r : plan.runs) arms[r.setting].push_back(r.config);
  return arms;
}

std::vector<std::vector<std::string>> sweep_arm_paths(const SweepPlan& plan) {
  std::vector<std::vector<std::string>> arms(plan.settings.size());
  for (const auto& r : plan.runs) arms[r.setting].push_back(r.config.train.out_dir);
  return arms;
}

}  // namespace canopy::runners
