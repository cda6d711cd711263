// `canopy sweep`: one training run per setting of the keys it varies and per seed, each in its
// own out_dir under one folder, then (given labelled inputs) `canopy compare` of the settings,
// each setting's seeds one arm. It is the loop a choice of how much to freeze (or which tap,
// which rate) asks for, with what the loop by hand gets wrong taken care of: runs that read the
// same features share one cache (its path is the features' fingerprint; a link to the config's
// own cache when that holds them already), every setting is
// checked before anything trains, a run is its own `canopy run` process (its report in a log
// file), a stopped sweep goes on where it stopped when run again (finished runs kept, a stopped
// run resumed from its checkpoint), and a sweep run again with more epochs trains every run on.
#pragma once

#include <cstdint>
#include <map>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "canopy/runners/config.h"

namespace canopy::runners {

struct SweepOptions {
  std::string config;                  // the config file every run starts from
  std::vector<std::string> overrides;  // --set (and --allow-unpinned): every run's
  // The keys varied and their values: every combination is one setting.
  std::vector<std::pair<std::string, std::vector<std::string>>> vary;
  std::vector<std::int64_t> seeds;  // empty: the config's train.seed alone
  std::string out;                  // the sweep's folder
  // Feature caches to read where they are (--cache-from) for the settings whose features they
  // hold, as the config's own cache.path is: each must be a cache (ConfigError otherwise).
  std::vector<std::string> cache_from;
  // A command each run is started under, as words (--run-with, split at spaces), e.g.
  // {"mpirun", "-np", "4"}: the run then spreads its work over that launch's ranks.
  std::vector<std::string> run_with;
  std::string command;  // the command that runs it again (sweep.json records it)
};

// What running a run of the sweep does, from what its out_dir holds.
enum class SweepAction {
  kTrain,    // nothing there yet (or no checkpoint): `canopy run`
  kResume,   // a run stopped before its end: `canopy run --resume`
  kTrainOn,  // a finished run of fewer (or other) epochs: `canopy run --resume` trains it on
  kDone,     // a finished run of this very configuration: kept
};

// What a trained run cost, as its out_dir's checkpoint records it: its training time (0: not
// recorded, or no checkpoint) and the machines it trained on (machine_description, in order).
struct RunCost {
  double seconds = 0.0;
  std::vector<std::string> machines;
};
RunCost recorded_cost(const std::string& out_dir);

struct SweepRun {
  std::size_t setting = 0;             // index into SweepPlan::settings
  std::string name;                    // its folder's name under out, e.g. "freeze-first_13-s0"
  std::vector<std::string> overrides;  // its `canopy run`'s --set values, in order
  JobConfig config;                    // resolved: train.out_dir, cache.path, train.seed set
  std::string log;                     // <out>/logs/<name>.log: its cache and training reports
  SweepAction action = SweepAction::kTrain;
  std::string why;  // what its out_dir holds, for the actions other than kTrain
  // Set by run_sweep: the run's exit status (-1: not run by this sweep) and its time.
  int exit_code = -1;
  double seconds = 0.0;
  // What training it took in earlier sweeps into this folder (their sweep.json), for a run
  // kept, resumed or trained on; 0 when unknown or trained anew.
  double seconds_before = 0.0;
  // What its checkpoint records (training time alone, a resumed or trained-on run's included;
  // where it trained), read when planned and after it runs.
  RunCost recorded;
  // What the run cost, as `canopy compare` counts it: the checkpoint's training time, or where
  // the checkpoint records none (trained before canopy recorded it, or no checkpoint) its
  // processes' time, earlier sweeps' included.
  bool timed_by_checkpoint() const { return recorded.seconds > 0; }
  double train_seconds() const { return timed_by_checkpoint() ? recorded.seconds : seconds_before + seconds; }
};

struct SweepPlan {
  SweepOptions options;
  std::vector<std::string> settings;  // "trunk.freeze = first:13", one per combination of values
  std::vector<std::string> caches;    // each distinct cache.path the runs read, in first use order
  // Caches read where they are rather than built again: a cache path under <out>/caches -> the
  // cache of the same features it links to (the config's own cache.path, or what an earlier
  // sweep linked); run_sweep makes the links.
  std::map<std::string, std::string> links;
  // Links under <out>/caches whose cache is gone or holds other features now: run_sweep removes
  // them, and the runs build the cache there (unless `links` names another to read).
  std::vector<std::string> stale_links;
  std::vector<std::string> unread;                  // each --cache-from no setting reads, and why
  std::map<std::string, std::string> fingerprints;  // cache path -> the features' fingerprint
  // Each cache's build time (`canopy cache`, run by run_sweep before the first run that reads
  // it when it is not up to date): in earlier sweeps into this folder, and in this one.
  std::map<std::string, double> built_before, built_now;
  std::vector<SweepRun> runs;  // setting by setting, each setting's seeds in order
  // Said before the runs when every key varied is a task's: a grid trains those in one run.
  std::string hint;
};

// Resolves every run's configuration (a bad key or value is a ConfigError before anything
// runs), loads each distinct trunk setting once (a tap it lacks, a freeze with no prefix to
// cache: a ConfigError naming the setting) and reads what each out_dir holds. Refused
// (ConfigError): a key varied twice, a value given twice, train.out_dir, cache.path or
// train.seed varied or --set (the sweep places them; --seeds gives the seeds), fewer than 2 or
// more than 26 settings (what compare takes), an out_dir holding a run of another
// configuration than epochs alone, or a folder there that is not a training run's. A
// DataError: a process training in an out_dir now.
SweepPlan plan_sweep(const SweepOptions& options);
// Refuses (ConfigError) an --out that is empty, a training run's out_dir or a feature cache.
void check_sweep_folder(const std::string& out);

// The plan as `--dry-run` prints it: settings, caches, and each run's out_dir and action.
std::string format_plan(const SweepPlan& plan);
// A line per cache read where it is (a link) and per link that goes.
std::string format_links(const SweepPlan& plan);

// Runs every run not done, one at a time, each as `program run --config ... --set ...` (after
// options.run_with's words, when given, found on PATH) in a process of its own (its standard output appended
// to its log; its errors and progress on this process's standard error); writes <out>/sweep.json after each.
// A run that ends with a head FAILED (exit 3) is recorded and the sweep goes on. A signal that asks this
// process to stop (StopOnSignal) is passed to the run, which stops at its next checkpoint: throws Stopped.
// Another failure of a run throws a DataError naming it and its log; the runs before it are
// kept. `log` gets a line as each run starts and ends.
void run_sweep(SweepPlan& plan, const std::string& program, const std::string& progress, std::ostream& log);

// This process's executable (/proc/self/exe), which run_sweep runs each run with.
std::string this_program();

// The table of runs after run_sweep: setting, seed, out_dir, what was done, time; then each
// setting's mean training time per run (earlier sweeps' included), against the first setting's.
std::string format_sweep(const SweepPlan& plan);
// What the sweep's comparison suggests choosing, from its record (sweep_json's text) and the
// comparison's (comparison_json's): a line per setting that is, for some tasks, the cheapest
// setting no other is shown better than on the task (cost: the setting's mean training time per
// run), with those tasks; the cheapest setting unbeaten on every task (or that none is); and for
// each cheaper choice the tasks it is shown worse on, each with the largest difference shown.
std::string choice_lines(const std::string& sweep_record, const std::string& comparison);
// The same choice as JSON ("null" when no task has unbeaten arms), as `canopy inspect --json` has it,
// and choice_json's text as choice_lines words it ("" for "null").
std::string choice_json(const std::string& sweep_record, const std::string& comparison);
std::string describe_choice(const std::string& choice);
// A record of trained runs for choice_json, as a sweep's would be, for `canopy compare`: arm a
// (A, B, ...) named names[a], its runs' costs costs[a]. Empty ("") when no run records a time:
// there is no cost to choose by.
std::string arms_record(const std::vector<std::string>& names,
                        const std::vector<std::vector<RunCost>>& costs);
// {"command", "config", "out", "run_with", "vary": {key: [values]}, "seeds", "settings", "caches",
// "links": {cache: the cache it links to}, "runs":
// [{"setting", "seed", "out_dir", "cache", "log", "action", "exit_code", "seconds"}]}
std::string sweep_json(const SweepPlan& plan);

// Whether `dir` is a sweep's folder (its sweep.json is there).
bool is_sweep_dir(const std::string& dir);
// `canopy inspect SWEEP_DIR`: the sweep's settings and each run's status now (finished, stopped,
// running, not started), read from sweep.json and each out_dir as `canopy inspect` reads a run;
// its caches, the comparison's tally and what to choose (choice_lines) when there is one,
// whether a sweep runs in it now, and the command that goes on. With `json`, one object:
// sweep.json's with each run's "status" and "status_text", "counts", "running" (the process
// sweeping there, or null), "compare" (compare.json's against_A, between, rows, input,
// eval_split) and "choice" (what choice_lines says, as JSON) added once compare.json is there. `ok` is set to
// whether every run could be read.
std::string inspect_sweep(const std::string& dir, bool json, bool* ok = nullptr);

// Each setting's runs, as `canopy compare` takes them: one arm per setting.
std::vector<std::vector<JobConfig>> sweep_arms(const SweepPlan& plan);
std::vector<std::vector<std::string>> sweep_arm_paths(const SweepPlan& plan);

}  // namespace canopy::runners
