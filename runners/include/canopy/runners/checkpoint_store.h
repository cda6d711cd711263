// Checkpoints of a training run, in <out_dir>/checkpoint:
//   <task>.<generation>.pt   each task's head, optimizer and RNG state (tasks::Task's format)
//   @top.<generation>.pt     the trunk's shared top, when one trains (SharedTop's format)
//   state.json               the generation, the position (epoch, step), the configuration
//                            that wrote it, every head's HeadRun, the fusion decisions the
//                            run followed, a CRC-32C of every file above (under mpirun,
//                            every rank's) and one of itself (JSON)
// A save serialises every task of a new generation (concurrently when the store is given a
// way to), writes each file (temporary name, fsync, rename; on a thread of its own when the
// store is asynchronous), syncs the directory once, then
// replaces state.json atomically, then removes older generations: a run killed at any point
// leaves one complete, usable checkpoint. A head that no longer trains (done, stopped or
// failed) and was already so in the previous generation is not serialised again: its file
// there, already durable, is hard-linked under the new generation's name (copied where the
// filesystem has no hard links), with the CRC-32C recorded for it then.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <future>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "canopy/runners/fusion_choice.h"
#include "canopy/runners/head_run.h"
#include "canopy/runners/shared_top.h"
#include "canopy/tasks/task.h"

namespace canopy::runners {

// Where training stands: `epoch` epochs done and `step` steps of the next.
struct CheckpointPosition {
  std::int64_t epoch = 0;
  std::int64_t step = 0;
};

// "1 epoch and 32 steps done", "15 epochs done".
std::string describe_done(const CheckpointPosition& at);

// How two configurations (key -> value) differ: ": train.epochs (15 -> 20), ..." (the first 8
// keys that differ, and how many more), or "" when none does.
std::string config_changes(const std::map<std::string, std::string>& saved,
                           const std::map<std::string, std::string>& now);

// A checkpoint as its state.json records it, read without loading any weights (canopy
// inspect on a training run's out_dir).
struct CheckpointRecord {
  std::int64_t generation = 0;
  CheckpointPosition position;
  bool top = false;                   // it holds a trained trunk top
  double train_seconds = 0.0;         // the training time it holds (0: not recorded)
  int ranks = 1;                      // the MPI ranks of the job that wrote it
  std::vector<std::string> machines;  // where it trained (machine_description), in order; empty: not recorded
  FusionDecisions fusion;             // train.fuse = auto: the decisions it followed, by group
  std::vector<std::pair<std::string, HeadRun>> runs;  // per task, in task order (no confusion matrices)
  // With verify: state.json against its own checksum, and every file of the generation
  // (each head's, the top's) there and matching the CRC-32C state.json records for it; one
  // line per problem, empty when all is well.
  std::vector<std::string> problems;
};

class CheckpointStore {
 public:
  // `config_identity` is the resolved configuration; a checkpoint written under another is
  // refused on load.
  CheckpointStore(std::string dir, std::string config_identity);
  ~CheckpointStore();  // waits for a save still being written
  CheckpointStore(const CheckpointStore&) = delete;
  CheckpointStore& operator=(const CheckpointStore&) = delete;

  const std::string& dir() const { return dir_; }
  std::string state_path() const { return dir_ + "/state.json"; }
  bool exists() const;

  // Under mpirun, the tasks this rank trains (and writes; empty: all). Every rank calls
  // save() together: each writes its tasks' files, then rank 0 commits the generation
  // (state.json, which lists every task's run) once all are written.
  void set_owned(std::vector<bool> owned) { owned_ = std::move(owned); }

  // How save() serialises the tasks: for_each(n, body) calls body(0) .. body(n - 1),
  // concurrently or not (the trainer passes StepRunner::for_each); body does not throw.
  // Default: one after another.
  using ForEach = std::function<void(std::size_t, const std::function<void(std::size_t)>&)>;
  void set_for_each(ForEach for_each) { for_each_ = std::move(for_each); }

  // Asynchronous saves: save() serialises the heads and returns; a thread of its own writes,
  // syncs and commits the generation while training goes on. A save with a shared top or
  // under mpirun stays synchronous (the top's level files are pruned after it; the ranks' barriers go with
  // it). The next save, flush, load and load_task wait for it first; an error of the write (a full disk) is
  // thrown by the next of them. Until it is committed, the previous generation is the checkpoint, whole, as
  // after any crash.
  void set_async(bool async) { async_ = async; }
  // Waits for an asynchronous save to be committed; throws its error.
  void flush();

  // Which differences between the configuration that wrote the checkpoint (`saved`) and this
  // run's (`now`, both as key -> value) load() lets through, the checkpoint being at `at`: ""
  // when the run may go on, else what is refused and why (": <key> (a -> b)...; ..."). Without
  // one, any difference is refused with the keys that differ.
  using ConfigValues = std::map<std::string, std::string>;
  using ConfigCheck = std::function<std::string(const ConfigValues& saved, const ConfigValues& now,
                                                const CheckpointPosition& at)>;
  void set_config_check(ConfigCheck check) { config_check_ = std::move(check); }

  // The training time a generation records (state.json's train_seconds): what the loaded
  // checkpoint recorded (0 for a new run), plus the time since start_clock() was called.
  // The time a killed run spent after its last checkpoint is not in it (it trains that part
  // again), so it is the time the run's training took, as if in one go, give or take a window.
  // `machine` (machine_description()) is where this run trains: state.json's machines are the
  // loaded checkpoint's and this one, each once, so that times from two machines are told apart.
  void start_clock(const std::string& machine);
  double train_seconds() const;

  // The fusion decisions (train.fuse = auto) a generation records, as JSON text
  // (fusion_decisions_json): what `source` gives at each save. fusion() is the loaded
  // checkpoint's ("" when it records none), for the resumed run to follow.
  void set_fusion_source(std::function<std::string()> source) { fusion_source_ = std::move(source); }
  const std::string& fusion() const { return fusion_; }

  // Writes a new generation holding `tasks` and `runs` (same length, task order).
  void save(const CheckpointPosition& position, const std::vector<tasks::Task*>& tasks,
            const std::vector<HeadRun>& runs, const SharedTop* top = nullptr);
  // Restores every task and its run from the newest checkpoint. DataError when there is
  // none or it is malformed or names other tasks; ConfigError when the configuration differs
  // (where the config check, if any, refuses the difference).
  // With `top`, the checkpoint must hold a shared top, which is restored too.
  CheckpointPosition load(const std::vector<tasks::Task*>& tasks, std::vector<HeadRun>& runs,
                          SharedTop* top = nullptr);
  // Restores one task from the generation this store last wrote or loaded (under mpirun, a
  // head another rank trained until then).
  void load_task(tasks::Task& task);
  // Where the checkpoint in `dir` stands, read from its state.json without checking or loading
  // anything; empty when there is none or it does not parse.
  static std::optional<CheckpointPosition> peek(const std::string& dir);
  // The record of the checkpoint in `dir`; DataError when it has none or state.json does not parse.
  static CheckpointRecord read_record(const std::string& dir, bool verify);
  // Where the checkpoint whole on disk resumes (the generation last committed or loaded);
  // empty while this run has none. A save still being written is not counted.
  const std::optional<CheckpointPosition>& committed() const { return committed_; }
  // "the checkpoint in '<dir>' is whole and resumes at epoch E step S", from committed().
  std::string resume_point() const;

 private:
  std::string task_file(const std::string& task, std::int64_t generation) const;
  void remove_other_generations(std::int64_t keep) const;
  // Writes a serialised generation (the heads' files and the top's) and commits it: state.json,
  // then the older generations removed; under mpirun with the ranks' barriers.
  struct File {
    std::string path;
    std::string contents;
    std::string same_as;  // the previous generation's file of an unchanged head, linked
  };
  void commit(const std::vector<File>& files, const std::string& state, std::int64_t generation) const;

  std::string dir_;
  std::string config_identity_;
  ConfigCheck config_check_;
  std::int64_t generation_ = 0;
  std::vector<bool> owned_;
  ForEach for_each_;
  bool async_ = false;
  std::future<void> pending_;
  CheckpointPosition pending_position_;
  std::optional<CheckpointPosition> committed_;
  double seconds_before_ = 0.0;        // the loaded generation's train_seconds
  std::vector<std::string> machines_;  // the loaded generation's machines, then this run's
  std::function<std::string()> fusion_source_;
  std::string fusion_;  // the loaded generation's fusion decisions (JSON), "" for none
  std::optional<std::chrono::steady_clock::time_point> clock_start_;
  struct Written {
    std::int64_t generation = 0;
    std::string crc;     // of its bytes
    bool final = false;  // written when its head no longer trained: it will not change
  };
  std::map<std::string, Written> written_;  // by task: its file this process last wrote or linked
};

}  // namespace canopy::runners
