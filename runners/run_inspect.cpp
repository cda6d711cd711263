#include "canopy/runners/run_inspect.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <optional>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "canopy/core/dir_lock.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/sha256.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/level_file.h"
#include "canopy/runners/card_check.h"
#include "canopy/runners/checkpoint_store.h"
#include "canopy/runners/config.h"
#include "canopy/runners/train_report.h"

namespace canopy::runners {

namespace {

using nlohmann::ordered_json;

// A checkpoint's fusion decisions as --json gives them: {"a + b": true, ...} (true: fused).
ordered_json fusion_json(const FusionDecisions& fusion) {
  ordered_json j = ordered_json::object();
  for (const auto& [group, d] : fusion) j[group] = d.fuse;
  return j;
}

// What config.ini says of one head.
struct PlannedHead {
  std::int64_t epochs = 0;  // the most it trains
  bool regression = false;
  std::string exported_as;  // its task's name, or its grid's
};

// What config.ini says of the run.
struct PlannedRun {
  std::map<std::string, PlannedHead> heads;
  std::vector<std::string> exports;  // each exported name once, in task order
  std::string selection;             // the split heads are scored on every epoch
  std::string cache;
};

std::optional<PlannedRun> read_plan(const std::string& config_path, std::string& why_not) {
  if (!is_regular_file(config_path)) {
    why_not = "no config.ini";
    return std::nullopt;
  }
  try {
    const JobConfig c = load_job_config(config_path);
    PlannedRun plan;
    for (const auto& t : c.tasks) {
      const std::string& exported = t.written_name();
      plan.heads[t.name] = {task_epochs(t, c.train), t.kind == tasks::TaskKind::kRegression, exported};
      if (std::find(plan.exports.begin(), plan.exports.end(), exported) == plan.exports.end())
        plan.exports.push_back(exported);
    }
    plan.selection = has_validation(c.train) ? std::string("validation") : c.train.eval_split;
    plan.cache = c.cache.path;
    return plan;
  } catch (const Error& e) {
    why_not = e.what();
    return std::nullopt;
  }
}

// An exported head: its card's scores, and (checked when asked) what fails its checksums.
struct Exported {
  std::string name;
  bool regression = false;
  double test_score = 0.0;                                 // accuracy, or R^2, on the eval split
  std::optional<std::pair<double, double>> test_interval;  // the card's bootstrap interval of it
  double level = 0.95;
  std::optional<double> validation_accuracy;
  std::string trunk_sha256;  // the trunk the card pins
  std::vector<std::string> problems;
};

std::vector<Exported> read_exports(const std::string& heads_dir, bool verify) {
  std::vector<Exported> out;
  if (!is_directory(heads_dir)) return out;
  std::vector<std::string> names = list_dir(heads_dir);
  std::sort(names.begin(), names.end());
  for (const auto& file : names) {
    if (file.size() < 6 || file.compare(file.size() - 5, 5, ".json") != 0) continue;
    const std::string path = join_path(heads_dir, file);
    Exported e;
    e.name = file.substr(0, file.size() - 5);
    try {
      ordered_json card = ordered_json::parse(read_file(path));
      const std::string card_problem = card_checksum_problem(card, path);
      if (verify && !card_problem.empty()) e.problems.push_back(card_problem);
      e.regression = card.value("kind", "multiclass") == "regression";
      const char* score = e.regression ? "r2" : "accuracy";
      e.test_score = card.at(std::string("eval_") + score).get<double>();
      if (card.contains("eval_intervals") && card.at("eval_intervals").contains(score)) {
        const auto& in = card.at("eval_intervals");
        e.test_interval = std::make_pair(in.at(score).at(0).get<double>(), in.at(score).at(1).get<double>());
        e.level = in.value("level", 0.95);
      }
      e.trunk_sha256 = card.value("trunk_sha256", "");
      if (!e.regression && card.contains("validation") && card.at("validation").contains("accuracy"))
        e.validation_accuracy = card.at("validation").at("accuracy").get<double>();
      if (verify) {
        const std::string weights = join_path(heads_dir, card.at("weights").get<std::string>());
        const std::string problem = is_regular_file(weights) ? weights_problem(card, path, weights)
                                                             : "weights '" + weights + "' are missing";
        if (!problem.empty()) e.problems.push_back(problem);
      }
    } catch (const nlohmann::json::exception& x) {
      e.problems.push_back(detail::str_cat("card '", path, "' is malformed: ", x.what()));
    }
    out.push_back(std::move(e));
  }
  return out;
}

std::string score_text(double score, bool regression) {
  if (score < -1e299) return "-";
  char buf[48];
  if (regression) {
    std::snprintf(buf, sizeof buf, "R^2 %.4f", score);
  } else {
    std::snprintf(buf, sizeof buf, "%.2f%%", 100 * score);
  }
  return buf;
}

// A run with the trunk's top trained: what metrics.jsonl last said of it (the blocks
// training, the cache level read) and the fine-tuned trunk it exported; checked when asked:
// trunk.pt against the SHA-256 the exported cards pin, the level against its rows' hash.
struct TopFacts {
  std::int64_t epoch = 0;  // the last epoch metrics.jsonl records for the top
  std::vector<std::string> training;
  std::string level;  // "" when the top reads the cache itself
  // That epoch's optimizer steps, the top block's last rate, the mean gradient norm (before
  // clipping; absent without steps or in runs from before they were recorded) and the steps
  // clipped.
  std::int64_t steps = 0, clipped = 0;
  std::optional<double> lr, grad_norm;
  std::int64_t best_epoch = 0;  // train.export = best: the epoch exported so far, its validation score
  double best_score = 0;
  std::string trunk;           // <out_dir>/trunk.pt, when written
  bool trunk_checked = false;  // against the cards' pins (none before the export)
  std::vector<std::string> problems;
};

// `resume`: the command that exports the trunk again from the checkpoint.
std::optional<TopFacts> read_top(const std::string& dir, const std::vector<Exported>& exported, bool verify,
                                 const std::string& resume) {
  const std::string metrics = join_path(dir, "metrics.jsonl");
  const std::string trunk = join_path(dir, "trunk.pt");
  std::optional<TopFacts> top;
  double best_score = 0;  // of the rows read so far, the one whose epoch is its best_epoch
  if (is_regular_file(metrics)) {
    std::istringstream in(read_file(metrics));
    for (std::string line; std::getline(in, line);) {
      if (line.find("@trunk") == std::string::npos) continue;  // a head's row: not parsed
      const auto row = ordered_json::parse(line, nullptr, false);
      if (row.is_discarded() || !row.is_object() || row.value("task", "") != "@trunk") continue;
      top.emplace();
      top->epoch = row.value("epoch", std::int64_t{0});
      if (row.contains("training") && row.at("training").is_array())
        top->training = row.at("training").get<std::vector<std::string>>();
      if (row.contains("level") && row.at("level").is_string())
        top->level = row.at("level").get<std::string>();
      top->steps = row.value("steps", std::int64_t{0});
      top->clipped = row.value("clipped_steps", std::int64_t{0});
      if (row.contains("lr") && row.at("lr").is_number()) top->lr = row.at("lr").get<double>();
      if (row.contains("grad_norm") && row.at("grad_norm").is_number())
        top->grad_norm = row.at("grad_norm").get<double>();
      // The best epoch's row came before (or is this one): its score is the best's.
      top->best_epoch = row.value("best_epoch", std::int64_t{0});
      if (top->best_epoch == top->epoch) best_score = row.value("validation_score", 0.0);
    }
    if (top) top->best_score = best_score;
  }
  if (!top && !is_regular_file(trunk)) return std::nullopt;
  if (!top) top.emplace();
  if (is_regular_file(trunk)) top->trunk = trunk;
  if (!verify) return top;
  if (!top->trunk.empty()) {
    std::vector<std::string> pins;
    for (const auto& e : exported) {
      if (!e.trunk_sha256.empty() && std::find(pins.begin(), pins.end(), e.trunk_sha256) == pins.end())
        pins.push_back(e.trunk_sha256);
    }
    top->trunk_checked = !pins.empty();
    const std::string sha = pins.empty() ? std::string() : sha256_file(trunk);
    for (const auto& pin : pins) {
      if (pin != sha) {
        top->problems.push_back(detail::str_cat("the fine-tuned trunk '", trunk, "' has SHA-256 ",
                                                sha.substr(0, 16), "…, the exported cards pin ",
                                                pin.substr(0, 16), "…: canopy predict would refuse it; `",
                                                resume, "` exports it again from the checkpoint"));
      }
    }
  }
  if (!top->level.empty()) {
    const std::string path =
        join_path(join_path(dir, datasets::kLevelDir), datasets::level_file_name(top->level));
    try {
      datasets::verify_level(path);
    } catch (const Error& e) {
      top->problems.push_back(detail::str_cat(e.what(), "; `", resume, "` computes it again from the cache"));
    }
  }
  return top;
}

// Everything inspect reads of a run's out_dir.
struct RunFacts {
  std::string dir, config_path;
  std::optional<PlannedRun> plan;
  std::string why_no_plan;
  std::optional<CheckpointRecord> record;
  std::string why_no_record;  // state.json there but unreadable
  std::vector<Exported> exported;
  std::optional<TopFacts> top;
  std::optional<std::string> writer;  // who trains in it now

  std::string resume_command() const { return "canopy train --config " + config_path + " --resume"; }
  const PlannedHead* planned(const std::string& head) const {
    if (!plan) return nullptr;
    const auto it = plan->heads.find(head);
    return it == plan->heads.end() ? nullptr : &it->second;
  }
  std::vector<std::string> problems() const {
    std::vector<std::string> all = record ? record->problems : std::vector<std::string>{};
    for (const auto& e : exported) all.insert(all.end(), e.problems.begin(), e.problems.end());
    if (top) all.insert(all.end(), top->problems.begin(), top->problems.end());
    return all;
  }
  bool good() const { return why_no_record.empty() && problems().empty(); }
};

RunFacts read_run(const std::string& dir, bool verify) {
  RunFacts f;
  f.dir = dir;
  f.config_path = join_path(dir, "config.ini");
  f.plan = read_plan(f.config_path, f.why_no_plan);
  const std::string checkpoint_dir = join_path(dir, "checkpoint");
  if (is_regular_file(join_path(checkpoint_dir, "state.json"))) {
    try {
      f.record = CheckpointStore::read_record(checkpoint_dir, verify);
    } catch (const Error& e) {
      f.why_no_record = e.what();
    }
  }
  f.exported = read_exports(join_path(dir, "heads"), verify);
  f.top = read_top(dir, f.exported, verify, f.resume_command());
  f.writer = DirLock::writer(dir);
  return f;
}

// The names config.ini exports that heads/ lacks though a head of each finished.
std::vector<std::string> unexported(const RunFacts& f) {
  std::vector<std::string> missing;
  if (!f.plan || !f.record) return missing;
  for (const auto& name : f.plan->exports) {
    const bool finished = std::any_of(f.record->runs.begin(), f.record->runs.end(), [&](const auto& r) {
      const PlannedHead* p = f.planned(r.first);
      return p && p->exported_as == name && !r.second.failed();
    });
    const bool there =
        std::any_of(f.exported.begin(), f.exported.end(), [&](const Exported& e) { return e.name == name; });
    if (finished && !there) missing.push_back(name);
  }
  return missing;
}

// Where the run stands: one word (for --json) and the sentence.
struct Status {
  std::string kind, text;
};

Status status_of(const RunFacts& f) {
  const std::string resume = "`" + f.resume_command() + "`";
  if (f.writer) {
    return {"running", "running: " + (f.writer->empty() ? std::string("a canopy process") : *f.writer) +
                           " is training in it now; the checkpoint below is the last it committed"};
  }
  if (!f.why_no_record.empty())
    return {"unreadable", "its checkpoint cannot be read (" + f.why_no_record + ")"};
  if (!f.record) {
    if (!f.exported.empty()) return {"finished", "finished (no checkpoint left)"};
    return {"no_checkpoint", "no checkpoint: the run stopped before its first; run the same command again"};
  }
  const bool training = std::any_of(f.record->runs.begin(), f.record->runs.end(),
                                    [](const auto& r) { return r.second.training(); });
  if (training) {
    const int ranks = f.record->ranks;
    return {"stopped",
            "stopped before its end (killed, stopped, or an error): " + resume +
                " goes on from its checkpoint" +
                (ranks > 1 ? " (written by " + std::to_string(ranks) +
                                 " MPI ranks: start it under the same mpirun, or any number of ranks)"
                           : std::string())};
  }
  const std::vector<std::string> missing = unexported(f);
  if (!missing.empty()) {
    return {"not_exported", "every head finished, but " + join(missing, ", ") + " " +
                                (missing.size() == 1 ? "is" : "are") + " not exported: " + resume +
                                " exports them"};
  }
  return {"finished", "finished; `" + f.resume_command() +
                          " --set train.epochs=N` (or task.NAME.epochs) trains its heads on to N epochs"};
}

// The table of heads, columns padded to their widest cell.
std::string head_table(const RunFacts& f) {
  std::vector<std::vector<std::string>> rows;
  rows.push_back(
      {"head", "state", "epochs", std::string("best on ") + (f.plan ? f.plan->selection : "eval"), "note"});
  for (const auto& [name, run] : f.record->runs) {
    const PlannedHead* p = f.planned(name);
    std::string epochs = std::to_string(run.epochs);
    if (p) epochs += "/" + std::to_string(p->epochs);
    std::string best = score_text(run.best_score, p && p->regression);
    if (run.best_epoch > 0) best += " (epoch " + std::to_string(run.best_epoch) + ")";
    rows.push_back({name, state_name(run.state), epochs, best, run.failed() ? run.failure : run.stop_note});
  }
  return aligned_columns(rows);
}

std::string report_text(const RunFacts& f, const Status& status, bool verify) {
  std::ostringstream o;
  o << "training run " << f.dir << "\n";
  if (f.plan) {
    o << "  config      " << f.config_path << ": "
      << count_of(static_cast<std::int64_t>(f.plan->heads.size()), "head") << ", cache " << f.plan->cache
      << "\n";
  } else {
    o << "  config      " << f.config_path << ": cannot be read (" << f.why_no_plan << ")\n";
  }
  o << "  status      " << status.text << "\n";
  if (f.record) {
    o << "  checkpoint  generation " << f.record->generation << ": " << describe_done(f.record->position)
      << (f.record->top ? ", with the trunk's trained top" : "");
    if (f.record->train_seconds > 0)
      o << ", in " << format_duration(f.record->train_seconds) << " of training";
    if (!f.record->machines.empty()) o << " on " << join(f.record->machines, ", then on ");
    o << "\n";
    for (const auto& [group, d] : f.record->fusion)
      o << "  fusion      " << group << ": " << (d.fuse ? "fused" : "alone") << " (kept on --resume)\n";
    if (verify && f.record->problems.empty()) {
      const auto files = static_cast<std::int64_t>(f.record->runs.size() + (f.record->top ? 1 : 0));
      o << "  verified    state.json and its " << count_of(files, "file")
        << " match the checksums it records\n";
    }
    for (const auto& p : f.record->problems) o << "  CORRUPT     " << p << "\n";
  }
  if (f.top) {
    const TopFacts& t = *f.top;
    if (t.epoch > 0) {
      o << "  top         after epoch " << t.epoch << ": "
        << (t.training.empty() ? std::string("every block held frozen")
                               : join(t.training, ", ") + " training");
      if (!t.level.empty())
        o << "; reads the cache level " << join_path(datasets::kLevelDir, datasets::level_file_name(t.level));
      if (t.lr && t.grad_norm) o << "; " << describe_top_steps(*t.lr, *t.grad_norm, t.clipped, t.steps);
      o << "\n";
      if (t.best_epoch > 0) {
        char line[160];
        std::snprintf(
            line, sizeof line,
            "  best        epoch %lld: validation score %.4f (train.export = best exports its top and "
            "heads)\n",
            static_cast<long long>(t.best_epoch), t.best_score);
        o << line;
      }
    }
    if (!t.trunk.empty())
      o << "  trunk       " << t.trunk << " (the fine-tuned trunk the heads were exported with)\n";
    for (const auto& p : t.problems) o << "  CORRUPT     " << p << "\n";
    if (verify && t.problems.empty() && (t.trunk_checked || !t.level.empty())) {
      o << "  verified    "
        << (t.trunk_checked && !t.level.empty()
                ? "the fine-tuned trunk matches the SHA-256 the cards pin, the cache level its rows' hash"
            : t.trunk_checked ? "the fine-tuned trunk matches the SHA-256 the cards pin"
                              : "the cache level matches its rows' hash")
        << "\n";
    }
  }
  if (f.exported.empty()) o << "  exported    none yet\n";
  std::size_t width = 0;
  for (const auto& e : f.exported) width = std::max(width, e.name.size());
  bool exports_intact = true;
  for (std::size_t i = 0; i < f.exported.size(); ++i) {
    const auto& e = f.exported[i];
    o << (i == 0 ? "  exported    " : "              ") << e.name
      << std::string(width - e.name.size() + 2, ' ') << score_text(e.test_score, e.regression);
    if (e.test_interval) {
      const char* metric = e.regression ? "r2" : "accuracy";
      char level[32];
      std::snprintf(level, sizeof level, " (%g%%)", 100 * e.level);
      o << " [" << shown(metric, e.test_interval->first, false) << ", "
        << shown(metric, e.test_interval->second, false) << "]" << level;
    }
    o << " on the eval split";
    if (e.validation_accuracy) o << " (validation " << score_text(*e.validation_accuracy, false) << ")";
    o << "\n";
    exports_intact = exports_intact && e.problems.empty();
  }
  for (const auto& e : f.exported) {
    for (const auto& p : e.problems) o << "  CORRUPT     " << p << "\n";
  }
  if (verify && !f.exported.empty() && exports_intact) {
    o << "  verified    every exported card matches its checksum, and its weights their SHA-256\n";
  }
  if (f.record) o << "\n" << head_table(f);
  return o.str();
}

std::string report_json(const RunFacts& f, const Status& status, bool verify) {
  const bool resumable = status.kind == "stopped" || status.kind == "not_exported";
  ordered_json j{{"out_dir", f.dir},
                 {"config", f.config_path},
                 {"status", status.kind},
                 {"status_text", status.text},
                 {"holder", f.writer ? ordered_json(*f.writer) : ordered_json()},
                 {"resume_command", resumable ? ordered_json(f.resume_command()) : ordered_json()},
                 {"cache", f.plan ? ordered_json(f.plan->cache) : ordered_json()}};
  j["checkpoint"] =
      f.record
          ? ordered_json{{"generation", f.record->generation},
                         {"epoch", f.record->position.epoch},
                         {"step", f.record->position.step},
                         {"top", f.record->top},
                         {"ranks", f.record->ranks},
                         {"machines", f.record->machines},
                         {"fusion", fusion_json(f.record->fusion)},
                         {"train_seconds", f.record->train_seconds > 0 ? ordered_json(f.record->train_seconds)
                                                                       : ordered_json()}}
          : ordered_json();
  j["heads"] = ordered_json::array();
  for (const auto& [name, run] : f.record ? f.record->runs : std::vector<std::pair<std::string, HeadRun>>{}) {
    const PlannedHead* p = f.planned(name);
    j["heads"].push_back(
        {{"name", name},
         {"state", state_name(run.state)},
         {"epochs", run.epochs},
         {"epochs_planned", p ? ordered_json(p->epochs) : ordered_json()},
         {"best_score", run.best_score < -1e299 ? ordered_json() : ordered_json(run.best_score)},
         {"best_epoch", run.best_epoch},
         {"note", run.failed() ? run.failure : run.stop_note}});
  }
  j["top"] =
      f.top ? ordered_json{{"epoch", f.top->epoch},
                           {"training", f.top->training},
                           {"level", f.top->level.empty() ? ordered_json() : ordered_json(f.top->level)},
                           {"lr", f.top->lr ? ordered_json(*f.top->lr) : ordered_json()},
                           {"grad_norm", f.top->grad_norm ? ordered_json(*f.top->grad_norm) : ordered_json()},
                           {"clipped_steps", f.top->clipped},
                           {"best_epoch",
                            f.top->best_epoch > 0 ? ordered_json(f.top->best_epoch) : ordered_json()},
                           {"best_validation_score",
                            f.top->best_epoch > 0 ? ordered_json(f.top->best_score) : ordered_json()},
                           {"trunk", f.top->trunk.empty() ? ordered_json() : ordered_json(f.top->trunk)}}
            : ordered_json();
  j["exported"] = ordered_json::array();
  for (const auto& e : f.exported) {
    j["exported"].push_back(
        {{"name", e.name},
         {e.regression ? "test_r2" : "test_accuracy", e.test_score},
         {"test_interval",
          e.test_interval ? ordered_json({e.test_interval->first, e.test_interval->second}) : ordered_json()},
         {"validation_accuracy",
          e.validation_accuracy ? ordered_json(*e.validation_accuracy) : ordered_json()}});
  }
  j["problems"] = f.problems();
  j["verified"] = verify;
  j["ok"] = f.good();
  return j.dump(1) + "\n";
}

}  // namespace

bool is_run_dir(const std::string& dir) {
  if (is_regular_file(join_path(dir, "manifest.json"))) return false;  // a cache
  return is_regular_file(join_path(dir, "config.ini")) || is_directory(join_path(dir, "checkpoint"));
}

std::string inspect_run(const std::string& dir, bool verify, bool* ok, bool json) {
  const RunFacts facts = read_run(dir, verify);
  const Status status = status_of(facts);
  if (ok) *ok = facts.good();
  return json ? report_json(facts, status, verify) : report_text(facts, status, verify);
}

}  // namespace canopy::runners
