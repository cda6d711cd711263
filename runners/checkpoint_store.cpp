#include "canopy/runners/checkpoint_store.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <sstream>
#include <utility>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "canopy/core/crc32c.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/json_checksum.h"
#include "canopy/core/mpi.h"
#include "canopy/core/strings.h"
#include "canopy/runners/config.h"

namespace canopy::runners {

namespace {
using nlohmann::ordered_json;

ordered_json run_to_json(const std::string& name, const HeadRun& r) {
  return {{"name", name},
          {"state", static_cast<int>(r.state)},
          {"failure", r.failure},
          {"epochs", r.epochs},
          {"train_loss", r.train_loss},
          {"eval_accuracy", r.eval.accuracy},
          {"eval_macro_f1", r.eval.macro_f1},
          {"loss_sum", r.loss_sum},
          {"loss_count", r.loss_count},
          {"seconds", r.seconds},
          {"best_score", r.best_score},
          {"best_epoch", r.best_epoch},
          {"stop_note", r.stop_note}};
}

std::string hex_crc32c(const std::string& bytes) { return crc32c_hex(crc32c(bytes.data(), bytes.size())); }

// Hard-links `from` as `to` (replacing a `to` a crashed run left). False where the filesystem
// has no hard links (the caller copies); IoError on any other failure.
bool hard_link(const std::string& from, const std::string& to) {
  if (::link(from.c_str(), to.c_str()) == 0) return true;
  if (errno == EEXIST && std::remove(to.c_str()) == 0 && ::link(from.c_str(), to.c_str()) == 0) return true;
  const int err = errno;
  if (err == EPERM || err == EXDEV || err == ENOTSUP || err == EOPNOTSUPP || err == EMLINK) return false;
  throw IoError(
      detail::str_cat("checkpoint: cannot link '", from, "' as '", to, "': ", describe_write_error(err)));
}

// state.json's text: the position, the runs, a CRC-32C of each head file this process wrote
// (`files`, by file name) and, last, one of the text itself without that field
// (`state_crc32c`). A flipped bit in a head file would otherwise resume, or export, other
// weights with exit 0.
std::string state_text(std::int64_t generation, const CheckpointPosition& position, const std::string& config,
                       bool top, double train_seconds, const std::vector<std::string>& machines,
                       const std::string& fusion, const ordered_json& tasks, const ordered_json& files) {
  ordered_json state{{"generation", generation},
                     {"epoch", position.epoch},
                     {"step", position.step},
                     {"config", config},
                     {"top", top},
                     {"train_seconds", train_seconds},
                     {"ranks", mpi::size()},
                     {"machines", machines},
                     {"fusion", fusion.empty() ? ordered_json::object() : ordered_json::parse(fusion)},
                     {"tasks", tasks},
                     {"files", files}};
  seal_json(state, "state_crc32c");
  return state.dump(1) + "\n";
}

void run_from_json(const ordered_json& j, HeadRun& r) {
  const int state = j.at("state").get<int>();
  CANOPY_CHECK(state >= 0 && state <= 2, DataError, "checkpoint: task state ", state, " is not 0, 1 or 2");
  r.state = static_cast<tasks::TaskState>(state);
  r.failure = j.at("failure").get<std::string>();
  r.epochs = j.at("epochs").get<std::int64_t>();
  r.train_loss = j.at("train_loss").get<double>();
  r.eval.accuracy = j.at("eval_accuracy").get<double>();
  r.eval.macro_f1 = j.at("eval_macro_f1").get<double>();
  r.loss_sum = j.at("loss_sum").get<double>();
  r.loss_count = j.at("loss_count").get<std::int64_t>();
  r.seconds = j.at("seconds").get<double>();
  r.best_score = j.at("best_score").get<double>();
  r.best_epoch = j.at("best_epoch").get<std::int64_t>();
  r.stop_note = j.at("stop_note").get<std::string>();
}

// Where `task`'s file of generation `generation` lies in the checkpoint directory `dir`.
std::string checkpoint_file(const std::string& dir, const std::string& task, std::int64_t generation) {
  return dir + "/" + task + "." + std::to_string(generation) + ".pt";
}

// state.json at `path`, parsed (DataError when it does not parse), with its own checksum taken
// off and compared: `problem` says how it does not match ("" when it does, or when it records
// none, as before the checksums).
struct StateFile {
  ordered_json state;
  std::string problem;
};
StateFile read_state(const std::string& path) {
  StateFile f;
  try {
    f.state = ordered_json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw DataError(detail::str_cat("checkpoint '", path, "' is malformed: ", e.what()));
  }
  if (const auto crc = unseal_json(f.state, "state_crc32c"); crc && crc->first != crc->second) {
    f.problem = detail::str_cat("checkpoint '", path, "' does not match its checksum (CRC-32C ", crc->second,
                                ", recorded ", crc->first, ")");
  }
  return f;
}

// A file's bytes against the CRC-32C `state` (read from `state_path`) records for it: how it
// does not match, or "" (also when it records none, as before the checksums).
std::string file_problem(const ordered_json& state, const std::string& state_path, const std::string& file) {
  const std::string name = file.substr(file.rfind('/') + 1);
  if (!state.contains("files") || !state.at("files").contains(name)) return {};
  const std::string recorded = state.at("files").at(name).get<std::string>();
  const std::string got = hex_crc32c(read_file(file));
  if (got == recorded) return {};
  return detail::str_cat("checkpoint file '", file, "' does not match the checksum that '", state_path,
                         "' records for it (CRC-32C ", got, ", recorded ", recorded, ")");
}
}  // namespace

namespace {
// A configuration's text as key -> value; empty when it does not parse.
std::optional<CheckpointStore::ConfigValues> config_values(const std::string& text,
                                                           const std::string& source) {
  try {
    std::istringstream in(text);
    return read_config_values(in, source);
  } catch (const ConfigError&) {
    return std::nullopt;
  }
}
}  // namespace

std::string config_changes(const std::map<std::string, std::string>& saved,
                           const std::map<std::string, std::string>& now) {
  const std::vector<std::string> changes = map_changes(saved, now);
  if (changes.empty()) return "";
  constexpr std::size_t kShown = 8;
  std::vector<std::string> shown(changes.begin(), changes.begin() + std::min(changes.size(), kShown));
  return ": " + join(shown, ", ") +
         (changes.size() > kShown ? " and " + std::to_string(changes.size() - kShown) + " more" : "");
}

CheckpointStore::CheckpointStore(std::string dir, std::string config_identity)
    : dir_(std::move(dir)),
      config_identity_(std::move(config_identity)),
      for_each_([](std::size_t n, const std::function<void(std::size_t)>& body) {
        for (std::size_t k = 0; k < n; ++k) body(k);
      }) {}

bool CheckpointStore::exists() const { return is_regular_file(state_path()); }

std::string describe_done(const CheckpointPosition& at) {
  return count_of(at.epoch, "epoch") + (at.step > 0 ? " and " + count_of(at.step, "step") : std::string()) +
         " done";
}

std::string CheckpointStore::resume_point() const {
  CANOPY_CHECK(committed_, Error, "checkpoint: no generation of '", dir_, "' is committed");
  return detail::str_cat("the checkpoint in '", dir_, "' is whole and resumes at epoch ",
                         committed_->epoch + 1, " step ", committed_->step);
}

std::optional<CheckpointPosition> CheckpointStore::peek(const std::string& dir) {
  const std::string state = dir + "/state.json";
  if (!is_regular_file(state)) return std::nullopt;
  try {
    const auto st = nlohmann::json::parse(read_file(state));
    return CheckpointPosition{st.at("epoch").get<std::int64_t>(), st.at("step").get<std::int64_t>()};
  } catch (const std::exception&) {
    return std::nullopt;  // unreadable: --resume says what is wrong with it
  }
}

CheckpointRecord CheckpointStore::read_record(const std::string& dir, bool verify) {
  const std::string path = dir + "/state.json";
  CANOPY_CHECK(is_regular_file(path), DataError, "no checkpoint in '", dir, "'");
  CheckpointRecord record;
  const StateFile state = read_state(path);
  const ordered_json& st = state.state;
  if (verify && !state.problem.empty()) record.problems.push_back(state.problem);
  try {
    record.generation = st.at("generation").get<std::int64_t>();
    record.position = {st.at("epoch").get<std::int64_t>(), st.at("step").get<std::int64_t>()};
    record.top = st.contains("top") && st.at("top").get<bool>();
    record.train_seconds = st.value("train_seconds", 0.0);  // not recorded before 2026-12-06
    record.ranks = st.value("ranks", 1);
    record.machines = st.value("machines", std::vector<std::string>{});  // not recorded before 2026-12-06
    record.fusion = read_fusion_decisions(st.contains("fusion") ? st.at("fusion").dump() : std::string());
    for (const auto& t : st.at("tasks")) {
      HeadRun run;
      run_from_json(t, run);
      record.runs.emplace_back(t.at("name").get<std::string>(), std::move(run));
    }
  } catch (const nlohmann::json::exception& e) {
    throw DataError(detail::str_cat("checkpoint '", path, "' is malformed: ", e.what()));
  }
  if (!verify) return record;
  std::vector<std::string> owners;  // whose files the generation holds
  for (const auto& [name, run] : record.runs) owners.push_back(name);
  if (record.top) owners.emplace_back("@top");
  for (const auto& owner : owners) {
    const std::string file = checkpoint_file(dir, owner, record.generation);
    const std::string problem =
        is_regular_file(file) ? file_problem(st, path, file) : "checkpoint file '" + file + "' is missing";
    if (!problem.empty()) record.problems.push_back(problem);
  }
  return record;
}

void CheckpointStore::start_clock(const std::string& machine) {
  if (std::find(machines_.begin(), machines_.end(), machine) == machines_.end()) machines_.push_back(machine);
  clock_start_ = std::chrono::steady_clock::now();
}

double CheckpointStore::train_seconds() const {
  if (!clock_start_) return seconds_before_;
  return seconds_before_ +
         std::chrono::duration<double>(std::chrono::steady_clock::now() - *clock_start_).count();
}

std::string CheckpointStore::task_file(const std::string& task, std::int64_t generation) const {
  return checkpoint_file(dir_, task, generation);
}

void CheckpointStore::save(const CheckpointPosition& position, const std::vector<tasks::Task*>& tasks,
                           const std::vector<HeadRun>& runs, const SharedTop* top) {
  CANOPY_CHECK(tasks.size() == runs.size(), Error, "checkpoint: ", tasks.size(), " tasks, ", runs.size(),
               " runs");
  flush();  // the previous generation committed, or its error thrown, before a new one
  make_dirs(dir_);
  ++generation_;
  ordered_json tasks_json = ordered_json::array();
  std::vector<std::size_t> writes;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    if (owned_.empty() || owned_.at(i)) writes.push_back(i);
    tasks_json.push_back(run_to_json(tasks[i]->name(), runs[i]));
  }
  // Serialised now, side by side (for_each_); the first error in task order is thrown. A head
  // whose file in the previous generation is final is linked, not serialised again.
  std::vector<File> files(writes.size());
  std::vector<std::string> crcs_of(writes.size());
  std::vector<std::size_t> serialise;
  for (std::size_t k = 0; k < writes.size(); ++k) {
    const std::string& name = tasks[writes[k]]->name();
    files[k].path = task_file(name, generation_);
    const auto w = written_.find(name);
    if (w != written_.end() && w->second.final && w->second.generation == generation_ - 1) {
      files[k].same_as = task_file(name, generation_ - 1);
      crcs_of[k] = w->second.crc;
    } else {
      serialise.push_back(k);
    }
  }
  std::vector<std::exception_ptr> errors(serialise.size());
  for_each_(serialise.size(), [&](std::size_t s) {
    const std::size_t k = serialise[s];
    try {
      files[k].contents = tasks[writes[k]]->checkpoint_bytes();
      crcs_of[k] = hex_crc32c(files[k].contents);
    } catch (...) {
      errors[s] = std::current_exception();
    }
  });
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  ordered_json crcs = ordered_json::object();
  for (std::size_t k = 0; k < writes.size(); ++k) {
    crcs[files[k].path.substr(files[k].path.rfind('/') + 1)] = crcs_of[k];
    written_[tasks[writes[k]]->name()] = {generation_, crcs_of[k], !runs[writes[k]].training()};
  }
  if (top && mpi::rank() == 0) {
    File f{task_file("@top", generation_), top->checkpoint_bytes(), ""};
    crcs[f.path.substr(f.path.rfind('/') + 1)] = hex_crc32c(f.contents);
    files.push_back(std::move(f));
  }
  if (mpi::distributed()) {
    // Rank 0 writes state.json: it records every rank's files (other ranks get nothing back).
    for (const auto& theirs : mpi::gather(crcs.dump())) crcs.update(ordered_json::parse(theirs));
  }
  std::string state = state_text(generation_, position, config_identity_, top != nullptr, train_seconds(),
                                 machines_, fusion_source_ ? fusion_source_() : fusion_, tasks_json, crcs);
  if (async_ && !top && !mpi::distributed()) {
    // Written, synced and committed by a thread of its own while training goes on.
    pending_ =
        std::async(std::launch::async, [this, files = std::move(files), state = std::move(state),
                                        generation = generation_] { commit(files, state, generation); });
    pending_position_ = position;
    return;
  }
  commit(files, state, generation_);
  committed_ = position;
}

void CheckpointStore::commit(const std::vector<File>& files, const std::string& state,
                             std::int64_t generation) const {
  // Each file atomic (temporary name, fsync, rename), or a hard link to an unchanged head's
  // durable file; their names made durable together by one sync of the directory.
  for (const auto& f : files) {
    if (f.same_as.empty()) {
      write_file_atomic(f.path, f.contents, false);
    } else if (!hard_link(f.same_as, f.path)) {
      write_file_atomic(f.path, read_file(f.same_as), false);
    }
  }
  fsync_dir(dir_);
  mpi::barrier();  // every rank's files of this generation are written
  if (mpi::rank() != 0) {
    mpi::barrier();  // rank 0 has committed it and removed the others
    return;
  }
  write_file_atomic(state_path(), state);
  remove_other_generations(generation);
  mpi::barrier();
}

void CheckpointStore::flush() {
  if (!pending_.valid()) return;
  pending_.get();
  committed_ = pending_position_;
}

CheckpointStore::~CheckpointStore() {
  if (pending_.valid()) pending_.wait();  // an error of this last write is lost with the store
}

void CheckpointStore::remove_other_generations(std::int64_t keep) const {
  for (const auto& name : list_dir(dir_)) {
    const auto dot = name.rfind(".pt");
    if (dot == std::string::npos || dot + 3 != name.size() || name.find(".tmp.") != std::string::npos)
      continue;
    const auto gen_dot = name.rfind('.', dot - 1);
    if (gen_dot != std::string::npos && std::atoll(name.c_str() + gen_dot + 1) != keep) {
      std::remove((dir_ + "/" + name).c_str());
    }
  }
}

void CheckpointStore::load_task(tasks::Task& task) {
  flush();
  task.load_checkpoint(task_file(task.name(), generation_));
}

CheckpointPosition CheckpointStore::load(const std::vector<tasks::Task*>& tasks, std::vector<HeadRun>& runs,
                                         SharedTop* top) {
  flush();
  const std::string path = state_path();
  CANOPY_CHECK(exists(), DataError, "--resume: no checkpoint in '", dir_,
               "' (train without --resume to start)");
  const StateFile state = read_state(path);
  const ordered_json& st = state.state;
  const char* restart = "it is corrupt; train without --resume to start again";
  CANOPY_CHECK(state.problem.empty(), DataError, state.problem, ": ", restart);
  const auto check_file = [&](const std::string& file) {
    const std::string problem = file_problem(st, path, file);
    CANOPY_CHECK(problem.empty(), DataError, problem, ": ", restart);
  };
  CheckpointPosition position;
  try {
    position.epoch = st.at("epoch").get<std::int64_t>();
    position.step = st.at("step").get<std::int64_t>();
    const std::string recorded_config = st.at("config").get<std::string>();
    if (recorded_config != config_identity_) {
      const auto saved = config_values(recorded_config, "the saved configuration");
      const auto now = config_values(config_identity_, "the configuration");
      const std::string same = detail::str_cat("; resume with the same config (see ",
                                               join_path(parent_path(dir_), "config.ini"), ")");
      std::string refused = saved && now ? config_changes(*saved, *now) + same : same;
      if (saved && now && config_check_) refused = config_check_(*saved, *now, position);
      CANOPY_CHECK(refused.empty(), ConfigError,
                   "--resume: the configuration differs from the one that wrote '", path, "'", refused);
    }
    const auto& saved = st.at("tasks");
    CANOPY_CHECK(saved.size() == tasks.size(), DataError, "checkpoint '", path, "' holds ", saved.size(),
                 " tasks, the config has ", tasks.size());
    generation_ = st.at("generation").get<std::int64_t>();
    seconds_before_ = st.value("train_seconds", 0.0);
    machines_ = st.value("machines", std::vector<std::string>{});
    fusion_ =
        st.contains("fusion") ? st.at("fusion").dump() : std::string();  // not recorded before 2026-12-06
    runs.assign(tasks.size(), HeadRun{});
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      const auto& t = saved.at(i);
      const std::string name = t.at("name").get<std::string>();
      CANOPY_CHECK(name == tasks[i]->name(), DataError, "checkpoint task ", i, " is '", name,
                   "', config has '", tasks[i]->name(), "'");
      check_file(task_file(name, generation_));
      tasks[i]->load_checkpoint(task_file(name, generation_));
      run_from_json(t, runs[i]);
    }
    const bool has_top = st.contains("top") && st.at("top").get<bool>();
    CANOPY_CHECK(has_top == (top != nullptr), DataError, "checkpoint '", path, "' ",
                 has_top ? "holds a trained trunk top but this run has none"
                         : "holds no trunk top but this run trains one");
    if (top) {
      check_file(task_file("@top", generation_));
      top->load_checkpoint(task_file("@top", generation_));
    }
  } catch (const nlohmann::json::exception& e) {
    throw DataError(detail::str_cat("checkpoint '", path, "' is malformed: ", e.what()));
  }
  committed_ = position;
  return position;
}

}  // namespace canopy::runners
