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
#include "canopy/core/json_checksum.h"
#include "canopy/core/sha256.h"
#include "canopy/core/strings.h"
#include "canopy/runners/checkpoint_store.h"
#include "canopy/runners/config.h"

namespace canopy::runners {

namespace {

// What config.ini says of each head (by name) and of the heads it exports.
struct PlannedRun {
  std::map<std::string, std::int64_t> epochs;  // per head: the epochs it trains at most
  std::map<std::string, bool> regression;
  std::vector<std::string> exports;  // a task's name, or its grid's
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
      plan.epochs[t.name] = task_epochs(t, c.train);
      plan.regression[t.name] = t.kind == tasks::TaskKind::kRegression;
      const std::string exported = t.grid.empty() ? t.name : t.grid;
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

// An exported head: its card's test score, checked when asked.
struct Exported {
  std::string name;
  std::string score;       // on the eval split: "81.00%", "R^2 0.8985"
  std::string validation;  // " (validation 77.50%)" with a validation split
  bool regression = false;
  double test_score = 0.0;  // accuracy, or R^2
  std::optional<double> validation_accuracy;
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
      nlohmann::ordered_json card = nlohmann::ordered_json::parse(read_file(path));
      const auto crc = unseal_json(card, "card_crc32c");
      if (verify && crc && crc->first != crc->second) {
        e.problems.push_back(detail::str_cat("card '", path, "' does not match its checksum (CRC-32C ",
                                             crc->second, ", recorded ", crc->first, ")"));
      }
      char buf[96];
      e.regression = card.value("kind", "multiclass") == "regression";
      e.test_score = card.at(e.regression ? "eval_r2" : "eval_accuracy").get<double>();
      if (e.regression) {
        std::snprintf(buf, sizeof buf, "R^2 %.4f", e.test_score);
      } else {
        std::snprintf(buf, sizeof buf, "%.2f%%", 100 * e.test_score);
      }
      e.score = buf;
      if (card.contains("validation") && card.at("validation").contains("accuracy") &&
          card.value("kind", "multiclass") != "regression") {
        e.validation_accuracy = card.at("validation").at("accuracy").get<double>();
        std::snprintf(buf, sizeof buf, " (validation %.2f%%)", 100 * *e.validation_accuracy);
        e.validation = buf;
      }
      if (verify) {
        const std::string weights = join_path(heads_dir, card.at("weights").get<std::string>());
        if (!is_regular_file(weights)) {
          e.problems.push_back("weights '" + weights + "' are missing");
        } else if (card.contains("weights_sha256") && sha256_file(weights) != card.at("weights_sha256")) {
          e.problems.push_back("weights '" + weights + "' do not match the SHA-256 their card records");
        }
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

// The table of heads, columns padded to their widest cell.
std::string head_table(const CheckpointRecord& record, const std::optional<PlannedRun>& plan) {
  std::vector<std::vector<std::string>> rows;
  rows.push_back(
      {"head", "state", "epochs", std::string("best on ") + (plan ? plan->selection : "eval"), "note"});
  for (const auto& [name, run] : record.runs) {
    const bool regression = plan && plan->regression.count(name) && plan->regression.at(name);
    std::string epochs = std::to_string(run.epochs);
    if (plan && plan->epochs.count(name)) epochs += "/" + std::to_string(plan->epochs.at(name));
    std::string best = score_text(run.best_score, regression);
    if (run.best_epoch > 0) best += " (epoch " + std::to_string(run.best_epoch) + ")";
    rows.push_back({name, state_name(run.state), epochs, best, run.failed() ? run.failure : run.stop_note});
  }
  std::vector<std::size_t> width(rows.front().size(), 0);
  for (const auto& r : rows) {
    for (std::size_t c = 0; c < r.size(); ++c) width[c] = std::max(width[c], r[c].size());
  }
  std::ostringstream o;
  for (const auto& r : rows) {
    std::string line;
    for (std::size_t c = 0; c < r.size(); ++c) {
      line += r[c];
      if (c + 1 < r.size()) line += std::string(width[c] - r[c].size() + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    o << line << "\n";
  }
  return o.str();
}

}  // namespace

bool is_run_dir(const std::string& dir) {
  if (is_regular_file(join_path(dir, "manifest.json"))) return false;  // a cache
  return is_regular_file(join_path(dir, "config.ini")) || is_directory(join_path(dir, "checkpoint"));
}

std::string inspect_run(const std::string& dir, bool verify, bool* ok, bool json) {
  std::ostringstream o;
  const std::string config_path = join_path(dir, "config.ini");
  std::string why_no_plan;
  const std::optional<PlannedRun> plan = read_plan(config_path, why_no_plan);
  const std::string checkpoint_dir = join_path(dir, "checkpoint");
  std::optional<CheckpointRecord> record;
  std::string why_no_record;
  if (is_regular_file(join_path(checkpoint_dir, "state.json"))) {
    try {
      record = CheckpointStore::read_record(checkpoint_dir, verify);
    } catch (const Error& e) {
      why_no_record = e.what();
    }
  }
  const std::vector<Exported> exported = read_exports(join_path(dir, "heads"), verify);
  const std::optional<std::string> writer = DirLock::writer(dir);
  const std::string resume = "canopy train --config " + config_path + " --resume";

  o << "training run " << dir << "\n";
  if (plan) {
    o << "  config      " << config_path << ": " << plan->epochs.size() << " head"
      << (plan->epochs.size() == 1 ? "" : "s") << ", cache " << plan->cache << "\n";
  } else {
    o << "  config      " << config_path << ": cannot be read (" << why_no_plan << ")\n";
  }

  // Where it stands, and what goes on from there.
  const bool all_finished = record && std::none_of(record->runs.begin(), record->runs.end(),
                                                   [](const auto& r) { return r.second.training(); });
  std::vector<std::string> missing;  // exports the config promises that heads/ lacks
  if (plan && record) {
    for (const auto& name : plan->exports) {
      // A task's head, or a grid's members (`name@...`): one that did not fail exports it.
      const bool any_finished = std::any_of(record->runs.begin(), record->runs.end(), [&](const auto& r) {
        return (r.first == name || r.first.rfind(name + "@", 0) == 0) && !r.second.failed();
      });
      const bool there =
          std::any_of(exported.begin(), exported.end(), [&](const Exported& e) { return e.name == name; });
      if (any_finished && !there) missing.push_back(name);
    }
  }
  std::string status, kind;  // the sentence, and one word for --json
  if (writer) {
    kind = "running";
    status = "running: " + (writer->empty() ? std::string("a canopy process") : *writer) +
             " is training in it now; the checkpoint below is the last it committed";
  } else if (!record && !why_no_record.empty()) {
    kind = "unreadable";
    status = "its checkpoint cannot be read (" + why_no_record + ")";
  } else if (!record) {
    kind = exported.empty() ? "no_checkpoint" : "finished";
    status = exported.empty() ? "no checkpoint: the run stopped before its first; run the same command again"
                              : "finished (no checkpoint left)";
  } else if (!all_finished) {
    kind = "stopped";
    status =
        "stopped before its end (killed, stopped, or an error): `" + resume + "` goes on from its checkpoint";
  } else if (!missing.empty()) {
    kind = "not_exported";
    status = "every head finished, but " + join(missing, ", ") + " " + (missing.size() == 1 ? "is" : "are") +
             " not exported: `" + resume + "` exports them";
  } else {
    kind = "finished";
    status = "finished";
  }
  o << "  status      " << status << "\n";
  if (record) {
    o << "  checkpoint  generation " << record->generation << ": " << describe_done(record->position)
      << (record->top ? ", with the trunk's trained top" : "") << "\n";
  }

  bool good = record || why_no_record.empty();
  if (verify && record) {
    const std::size_t files = record->runs.size() + (record->top ? 1 : 0);
    if (record->problems.empty()) {
      o << "  verified    state.json and its " << files << " file" << (files == 1 ? "" : "s")
        << " match the checksums it records\n";
    }
    for (const auto& p : record->problems) o << "  CORRUPT     " << p << "\n";
    good = good && record->problems.empty();
  }
  if (exported.empty()) o << "  exported    none yet\n";
  std::size_t width = 0;
  for (const auto& e : exported) width = std::max(width, e.name.size());
  for (std::size_t i = 0; i < exported.size(); ++i) {
    const auto& e = exported[i];
    o << (i == 0 ? "  exported    " : "              ") << e.name
      << std::string(width - e.name.size() + 2, ' ') << e.score << " on the eval split" << e.validation
      << "\n";
  }
  std::size_t checked = 0;
  for (const auto& e : exported) {
    for (const auto& p : e.problems) o << "  CORRUPT     " << p << "\n";
    checked += e.problems.empty() ? 1 : 0;
    good = good && e.problems.empty();
  }
  if (verify && !exported.empty() && checked == exported.size()) {
    o << "  verified    every exported card matches its checksum, and its weights their SHA-256\n";
  }
  if (record) o << "\n" << head_table(*record, plan);
  if (ok) *ok = good;
  if (!json) return o.str();

  // The same, for scripts: one JSON object.
  using nlohmann::ordered_json;
  ordered_json j{
      {"out_dir", dir},
      {"config", config_path},
      {"status", kind},
      {"status_text", status},
      {"holder", writer ? ordered_json(*writer) : ordered_json()},
      {"resume_command", kind == "stopped" || kind == "not_exported" ? ordered_json(resume) : ordered_json()},
      {"cache", plan ? ordered_json(plan->cache) : ordered_json()}};
  j["checkpoint"] = record ? ordered_json{{"generation", record->generation},
                                          {"epoch", record->position.epoch},
                                          {"step", record->position.step},
                                          {"top", record->top}}
                           : ordered_json();
  j["heads"] = ordered_json::array();
  for (const auto& [name, run] : record ? record->runs : std::vector<std::pair<std::string, HeadRun>>{}) {
    const auto planned =
        plan ? plan->epochs.find(name) : std::map<std::string, std::int64_t>::const_iterator{};
    j["heads"].push_back(
        {{"name", name},
         {"state", state_name(run.state)},
         {"epochs", run.epochs},
         {"epochs_planned",
          plan && planned != plan->epochs.end() ? ordered_json(planned->second) : ordered_json()},
         {"best_score", run.best_score < -1e299 ? ordered_json() : ordered_json(run.best_score)},
         {"best_epoch", run.best_epoch},
         {"note", run.failed() ? run.failure : run.stop_note}});
  }
  j["exported"] = ordered_json::array();
  for (const auto& e : exported) {
    j["exported"].push_back(
        {{"name", e.name},
         {e.regression ? "test_r2" : "test_accuracy", e.test_score},
         {"validation_accuracy",
          e.validation_accuracy ? ordered_json(*e.validation_accuracy) : ordered_json()}});
  }
  j["problems"] = ordered_json::array();
  if (record) {
    for (const auto& p : record->problems) j["problems"].push_back(p);
  }
  for (const auto& e : exported) {
    for (const auto& p : e.problems) j["problems"].push_back(p);
  }
  j["verified"] = verify;
  j["ok"] = good;
  return j.dump(1) + "\n";
}

}  // namespace canopy::runners
