#include "canopy/runners/train_job.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/sha256.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/batch_source.h"
#include "canopy/datasets/feature_cache.h"
#include "canopy/heads/fused.h"
#include "canopy/heads/head.h"
#include "canopy/runners/cache_job.h"
#include "canopy/runners/export.h"
#include "canopy/runners/tensorboard.h"

namespace canopy::runners {

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

const char* state_name(tasks::TaskState s) {
  switch (s) {
    case tasks::TaskState::kTraining: return "training";
    case tasks::TaskState::kDone: return "done";
    case tasks::TaskState::kFailed: return "FAILED";
  }
  return "?";
}

// Each thread that runs head work sets LibTorch's intra-op thread count once: a worker
// keeps what it had when it first touched LibTorch otherwise, and more intra-op threads
// than cores on top of the TBB workers oversubscribes the machine.
void configure_thread(std::int64_t intra_op_threads) {
  thread_local std::int64_t configured = -1;
  if (configured != intra_op_threads) {
    at::set_num_threads(static_cast<int>(intra_op_threads));
    configured = intra_op_threads;
  }
}

// Precision, recall, F1 and support of each class on the eval split (multiclass heads; an
// empty list for multilabel ones), as JSON.
std::string per_class_report(const tasks::ClassificationMetrics& m, const std::vector<std::string>& names) {
  if (!m.confusion.defined() || m.confusion.dim() != 2) return "[]";
  const auto stats = tasks::per_class_stats(m.confusion);
  std::ostringstream o;
  o.precision(6);
  o << "[";
  for (std::size_t i = 0; i < stats.size(); ++i) {
    const auto& s = stats[i];
    o << (i ? ", " : "") << "{\"class\": \"" << json_escape(i < names.size() ? names[i] : std::to_string(i))
      << "\", \"precision\": " << s.precision << ", \"recall\": " << s.recall << ", \"f1\": " << s.f1
      << ", \"support\": " << s.support << "}";
  }
  o << "]";
  return o.str();
}

// The eval metrics a head reports, by name: what metrics.jsonl (eval_<name>) and
// TensorBoard (eval/<name>) carry.
std::vector<std::pair<std::string, double>> eval_metrics(const tasks::ClassificationMetrics& m) {
  std::vector<std::pair<std::string, double>> out{{"accuracy", m.accuracy}, {"macro_f1", m.macro_f1}};
  if (m.mean_ap >= 0) out.emplace_back("mean_ap", m.mean_ap);
  if (m.regression) {
    out.emplace_back("mae", m.mae);
    out.emplace_back("rmse", m.rmse);
    out.emplace_back("r2", m.r2);
  }
  return out;
}

// The cached tap, from the cache's description (caches made before taps say nothing: the output).
std::string tap_of(const datasets::CacheMeta& meta) {
  const auto parts = parse_description(meta.description);
  const auto it = parts.find("tap");
  return it == parts.end() ? "output" : it->second;
}

void save_head(tasks::Task& task, const TaskResult& r, const datasets::CacheMeta& meta,
               std::int64_t in_features, const std::string& dir) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& p : task.head().named_parameters(true)) tensors.emplace_back(p.key(), p.value());
  for (const auto& b : task.head().named_buffers(true)) tensors.emplace_back(b.key(), b.value());
  const auto& c = task.config();
  std::map<std::string, std::string> md = {{"format", "pt"},
                                           {"canopy.task", c.name},
                                           {"canopy.head", c.head},
                                           {"canopy.architecture", task.head().describe()}};
  save_safetensors(dir + "/" + c.name + ".safetensors", tensors, md);

  std::ostringstream card;
  card.precision(10);
  auto str_list = [](const std::vector<std::string>& xs) {
    std::string o = "[";
    for (std::size_t i = 0; i < xs.size(); ++i) o += (i ? ", \"" : "\"") + json_escape(xs[i]) + "\"";
    return o + "]";
  };
  card << "{\n  \"task\": \"" << json_escape(c.name) << "\",\n"
       << "  \"kind\": \"" << c.kind << "\",\n"
       << "  \"head\": \"" << json_escape(c.head) << "\",\n"
       << "  \"architecture\": \"" << json_escape(task.head().describe()) << "\",\n"
       << "  \"in_features\": " << in_features << ",\n"
       << "  \"out_features\": " << task.num_classes() << ",\n"
       << "  \"head_params\": {";
  bool first = true;
  for (const auto& [k, v] : c.head_params) {
    card << (first ? "" : ", ") << "\"" << json_escape(k) << "\": \"" << json_escape(v) << "\"";
    first = false;
  }
  card << "},\n  \"label_source\": \"" << json_escape(c.labels) << "\",\n  \"label_map\": [";
  for (std::size_t i = 0; i < c.label_map.size(); ++i) card << (i ? ", " : "") << c.label_map[i];
  card << "],\n  \"class_names\": " << str_list(r.class_names) << ",\n"
       << "  \"trunk_sha256\": \"" << meta.trunk_sha256 << "\",\n"
       << "  \"cache_fingerprint\": \"" << meta.fingerprint << "\",\n"
       << "  \"preprocessing\": \"" << json_escape(meta.preprocessing) << "\",\n"
       << "  \"pooling\": \"" << json_escape(meta.pooling) << "\",\n"
       << "  \"tap\": \"" << json_escape(tap_of(meta)) << "\",\n"
       << "  \"epochs\": " << r.epochs << ",\n"
       << "  \"eval_accuracy\": " << r.eval.accuracy << ",\n"
       << "  \"eval_macro_f1\": " << r.eval.macro_f1 << ",\n"
       << "  \"eval_mean_ap\": " << (r.eval.mean_ap < 0 ? std::string("null") : std::to_string(r.eval.mean_ap)) << ",\n"
       << "  \"per_class\": " << per_class_report(r.eval, r.class_names) << ",\n";
  if (r.eval.regression) {
    card << "  \"target_mean\": " << task.target_mean() << ",\n  \"target_std\": " << task.target_std()
         << ",\n  \"eval_mae\": " << r.eval.mae << ",\n  \"eval_rmse\": " << r.eval.rmse << ",\n  \"eval_r2\": " << r.eval.r2
         << ",\n";
  }
  card
       << "  \"weights\": \"" << json_escape(c.name) << ".safetensors\"\n}\n";
  write_file_atomic(dir + "/" + c.name + ".json", card.str());
}
}  // namespace

bool TrainReport::any_failed() const {
  return std::any_of(tasks.begin(), tasks.end(),
                     [](const TaskResult& t) { return t.state == tasks::TaskState::kFailed; });
}

namespace {
std::string config_identity(const JobConfig& config) {
  const std::string dump = dump_config(config);
  return dump.substr(dump.find('\n') + 1);  // without the line naming the source file
}

// Keeps the metrics lines of epochs <= `epochs` (a resumed run rewrites the rest).
void truncate_metrics(const std::string& path, std::int64_t epochs, bool csv) {
  if (!is_regular_file(path)) return;
  std::istringstream in(read_file(path));
  std::string out, line;
  bool header = csv;
  while (std::getline(in, line)) {
    if (header) {
      out += line + "\n";
      header = false;
      continue;
    }
    std::int64_t epoch = 0;
    if (csv) {
      epoch = std::atoll(line.c_str());
    } else {
      const auto at = line.find("\"epoch\": ");
      if (at != std::string::npos) epoch = std::atoll(line.c_str() + at + 10);
    }
    if (epoch <= epochs) out += line + "\n";
  }
  write_file_atomic(path, out);
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

  const auto cache = datasets::FeatureCache::open(config.cache.path);
  if (config.train.check_fingerprint) {
    const std::string expected = expected_cache_description(config);
    if (sha256_hex(expected) != cache.meta().fingerprint) {
      throw DataError(detail::str_cat(
          "feature cache '", config.cache.path, "' was built from different inputs than ",
          config.source, " describes; changed: ",
          join(describe_changes(cache.meta().description, expected), "; "),
          ". Run `canopy cache --config ", config.source, "` to rebuild it"));
    }
  }
  const auto method = datasets::parse_read_method(config.cache.read_method);
  const datasets::SplitData eval = cache.load_split(config.train.eval_split, method);
  report.train_rows = cache.rows(config.train.train_split);
  report.eval_rows = eval.features.size(0);
  report.feature_dim = cache.feature_dim();
  CANOPY_CHECK(report.train_rows > 0, DataError, "split '", config.train.train_split, "' of '",
               config.cache.path, "' is empty");
  // The train split is read whole when it fits under the cap, else streamed.
  const auto cap = static_cast<std::uint64_t>(config.cache.memory_cap_mb * 1024 * 1024);
  std::unique_ptr<datasets::BatchSource> source;
  if (cap == 0 || cache.feature_bytes(config.train.train_split) <= cap) {
    source = datasets::make_in_memory_source(cache.load_split(config.train.train_split, method),
                                             config.train.batch_size, config.train.seed);
  } else {
    source = datasets::make_streaming_source(cache, config.train.train_split, config.train.batch_size,
                                             config.train.seed, cap, method);
  }
  const at::Tensor eval_features = eval.features.to(at::kFloat);
  report.load_seconds = since(load_start);

  // Build every task (serially: seeding is global) and its evaluation targets.
  std::vector<std::unique_ptr<tasks::Task>> all;
  std::vector<at::Tensor> eval_targets;
  std::vector<TaskResult> results;
  for (std::size_t i = 0; i < config.tasks.size(); ++i) {
    const auto& tc = config.tasks[i];
    const auto src_eval = eval.labels.find(tc.labels);
    CANOPY_CHECK(src_eval != eval.labels.end(), ConfigError, "task '", tc.name, "': labels = '",
                 tc.labels, "' but the cache has label sources: ", join(cache.meta().label_sources, ", "));
    std::int64_t source_classes = static_cast<std::int64_t>(cache.meta().class_names.size());
    if (cache.meta().is_float_label(tc.labels)) {
      CANOPY_CHECK(tc.kind == "regression", DataError, "task '", tc.name, "': label source '", tc.labels,
                   "' holds real values; use kind = regression");
      source_classes = 0;  // real values: a regression target
    } else if (tc.labels != "class" || source_classes == 0) {
      source_classes = src_eval->second.max().item<std::int64_t>() + 1;
    }
    // Seeded by name, not position: adding or removing a task changes no other task's run.
    const std::uint64_t name_seed = std::stoull(sha256_hex(tc.name).substr(0, 15), nullptr, 16);
    all.push_back(std::make_unique<tasks::Task>(tc, registry, report.feature_dim, source_classes,
                                                config.train.seed * 1000003ULL + name_seed));
    const auto stats = cache.meta().label_stats.find(tc.labels);
    if (tc.kind == "regression" && stats != cache.meta().label_stats.end()) {
      all.back()->set_target_scale(stats->second.first, stats->second.second);
    }
    eval_targets.push_back(all.back()->targets(eval.labels.at(tc.labels)));
    TaskResult r;
    r.name = tc.name;
    r.head = all.back()->head().describe();
    r.kind = tc.kind;
    r.labels = tc.kind == "regression"   ? tc.labels + " (regression, " + (tc.loss.empty() ? "mse" : tc.loss) + ")"
               : tc.kind == "multilabel" ? tc.labels + " -> " + std::to_string(all.back()->num_classes()) + " labels"
               : tc.label_map.empty()  ? tc.labels
                                       : tc.labels + " -> " + std::to_string(all.back()->num_classes()) + " groups";
    std::ostringstream opt;
    opt << tc.optimizer << " lr=" << tc.lr << (tc.schedule == "constant" ? "" : " " + tc.schedule);
    r.optimizer = opt.str();
    r.class_names = tc.class_names;  // multilabel: the labels; regression: none
    if (tc.kind == "multiclass") {
      if (r.class_names.empty() && tc.label_map.empty()) r.class_names = cache.meta().class_names;
      for (auto k = static_cast<std::int64_t>(r.class_names.size()); k < all.back()->num_classes(); ++k) {
        r.class_names.push_back(std::to_string(k));
      }
    }
    results.push_back(r);
  }

  const std::string ckpt_dir = config.train.out_dir + "/checkpoint";
  const std::string state_path = ckpt_dir + "/state.json";
  std::vector<double> loss_sum(all.size()), seconds(all.size());
  std::vector<std::int64_t> loss_count(all.size());
  std::int64_t start_epoch = 0, start_step = 0, generation = 0;
  if (resume) {
    CANOPY_CHECK(is_regular_file(state_path), DataError, "--resume: no checkpoint in '", ckpt_dir,
                 "' (train without --resume to start)");
    nlohmann::json st;
    try {
      st = nlohmann::json::parse(read_file(state_path));
    } catch (const nlohmann::json::exception& e) {
      throw DataError(detail::str_cat("checkpoint '", state_path, "' is malformed: ", e.what()));
    }
    CANOPY_CHECK(st.at("config").get<std::string>() == config_identity(config), ConfigError,
                 "--resume: the configuration differs from the one that wrote '", state_path,
                 "'; resume with the same config (see ", config.train.out_dir, "/config.ini)");
    generation = st.at("generation");
    start_epoch = st.at("epoch");
    start_step = st.at("step");
    for (std::size_t i = 0; i < all.size(); ++i) {
      const auto& t = st.at("tasks").at(i);
      CANOPY_CHECK(t.at("name").get<std::string>() == results[i].name, DataError, "checkpoint task ", i,
                   " is '", t.at("name").get<std::string>(), "', config has '", results[i].name, "'");
      all[i]->load_checkpoint(ckpt_dir + "/" + results[i].name + "." + std::to_string(generation) + ".pt");
      all[i]->state = static_cast<tasks::TaskState>(t.at("state").get<int>());
      all[i]->failure = t.at("failure");
      results[i].epochs = t.at("epochs");
      results[i].train_loss = t.at("train_loss");
      results[i].eval.accuracy = t.at("eval_accuracy");
      results[i].eval.macro_f1 = t.at("eval_macro_f1");
      loss_sum[i] = t.at("loss_sum");
      loss_count[i] = t.at("loss_count");
      seconds[i] = t.at("seconds");
      all[i]->best_score = t.at("best_score");
      all[i]->best_epoch = t.at("best_epoch");
      all[i]->stop_note = t.at("stop_note");
    }
    report.resumed_from = "epoch " + std::to_string(start_epoch + 1) + " step " + std::to_string(start_step);
    log_info("resuming from the checkpoint at " + report.resumed_from);
    truncate_metrics(config.train.out_dir + "/metrics.jsonl", start_epoch, false);
    truncate_metrics(config.train.out_dir + "/metrics.csv", start_epoch, true);
  }
  make_dirs(config.train.out_dir + "/heads");
  make_dirs(ckpt_dir);
  write_file_atomic(config.train.out_dir + "/config.ini", dump_config(config));
  const auto mode = resume ? std::ios::app : std::ios::trunc;
  std::ofstream jsonl(config.train.out_dir + "/metrics.jsonl", mode);
  std::ofstream csv(config.train.out_dir + "/metrics.csv", mode);
  CANOPY_CHECK(jsonl && csv, IoError, "cannot write metrics in '", config.train.out_dir, "'");
  if (!resume) csv << "epoch,task,state,train_loss,eval_accuracy,eval_macro_f1,seconds,eval_mae,eval_rmse,eval_r2\n";
  std::vector<std::unique_ptr<EventWriter>> tensorboard;
  if (config.train.tensorboard) {
    for (const auto& r : results) {
      tensorboard.push_back(std::make_unique<EventWriter>(config.train.out_dir + "/tensorboard/" + r.name));
    }
  }

  // A checkpoint is a generation of per-task files plus state.json, which names the
  // generation and is replaced last: a run killed at any point leaves a usable one.
  auto checkpoint = [&](std::int64_t epoch, std::int64_t step) {
    ++generation;
    nlohmann::json tasks_json = nlohmann::json::array();
    for (std::size_t i = 0; i < all.size(); ++i) {
      const std::string file = ckpt_dir + "/" + results[i].name + "." + std::to_string(generation) + ".pt";
      const std::string tmp = temp_path_for(file);
      all[i]->save_checkpoint(tmp);
      fsync_path(tmp);
      rename_durable(tmp, file);
      tasks_json.push_back({{"name", results[i].name},
                            {"state", static_cast<int>(all[i]->state)},
                            {"failure", all[i]->failure},
                            {"epochs", results[i].epochs},
                            {"train_loss", results[i].train_loss},
                            {"eval_accuracy", results[i].eval.accuracy},
                            {"eval_macro_f1", results[i].eval.macro_f1},
                            {"loss_sum", loss_sum[i]},
                            {"loss_count", loss_count[i]},
                            {"seconds", seconds[i]},
                            {"best_score", all[i]->best_score},
                            {"best_epoch", all[i]->best_epoch},
                            {"stop_note", all[i]->stop_note}});
    }
    const nlohmann::json st{{"generation", generation}, {"epoch", epoch},  {"step", step},
                            {"config", config_identity(config)}, {"tasks", tasks_json}};
    write_file_atomic(state_path, st.dump(1) + "\n");
    for (const auto& name : list_dir(ckpt_dir)) {  // older generations
      const auto dot = name.rfind(".pt");
      if (dot == std::string::npos || name.find(".tmp.") != std::string::npos) continue;
      const auto gen_dot = name.rfind('.', dot - 1);
      if (gen_dot != std::string::npos && std::atoll(name.c_str() + gen_dot + 1) != generation) {
        std::remove((ckpt_dir + "/" + name).c_str());
      }
    }
  };

  const std::int64_t workers = config.train.workers > 0
                                   ? config.train.workers
                                   : std::max<std::int64_t>(1, std::thread::hardware_concurrency());
  tbb::task_arena arena(static_cast<int>(workers));
  const std::int64_t n = report.train_rows;
  const std::int64_t bs = config.train.batch_size;
  const std::int64_t steps_per_epoch = (n + bs - 1) / bs;
  std::int64_t max_epochs = config.train.epochs;
  for (const auto& t : config.tasks) max_epochs = std::max(max_epochs, t.epochs);
  auto epochs_of = [&](std::size_t i) {
    return config.tasks[i].epochs > 0 ? config.tasks[i].epochs : config.train.epochs;
  };
  log_info("training " + std::to_string(all.size()) + " heads concurrently on " + std::to_string(n) +
           " x " + std::to_string(report.feature_dim) + " features, " + source->describe() + " (" +
           std::to_string(workers) + " TBB workers x " + std::to_string(config.train.intra_op_threads) +
           " LibTorch thread(s))");
  // Fusion: heads with the same fusion key, in task order, in groups whose fused
  // first-layer activations (batch x widths x 4 bytes) stay within train.fuse_kib.
  std::vector<std::string> fusion_keys;
  std::vector<std::int64_t> widths;
  for (const auto& t : all) {
    fusion_keys.push_back(config.train.fuse ? heads::fusion_key(t->head()) : "");
    widths.push_back(heads::fused_width(t->head()));
  }
  const double fuse_bytes = config.train.fuse_kib * 1024.0;
  std::vector<std::int64_t> cost;  // parameters per head
  for (const auto& t : all) {
    std::int64_t params = 0;
    for (const auto& p : t->head().parameters()) params += p.numel();
    cost.push_back(params);
  }
  // The work of one step: fused groups of the heads still training, and lone heads. With
  // fewer units than workers, the largest group is halved until every worker has one.
  auto plan_units = [&](const std::vector<std::size_t>& active) {
    std::vector<std::vector<std::size_t>> units;
    std::map<std::string, std::size_t> open_unit;  // key -> the unit still taking heads
    std::map<std::size_t, double> unit_bytes;
    for (std::size_t i : active) {
      if (all[i]->state != tasks::TaskState::kTraining) continue;
      const double bytes = static_cast<double>(config.train.batch_size * widths[i] * 4);
      const auto it = open_unit.find(fusion_keys[i]);
      if (!fusion_keys[i].empty() && it != open_unit.end() && unit_bytes[it->second] + bytes <= fuse_bytes) {
        units[it->second].push_back(i);
        unit_bytes[it->second] += bytes;
        continue;
      }
      if (!fusion_keys[i].empty()) {
        open_unit[fusion_keys[i]] = units.size();
        unit_bytes[units.size()] = bytes;
      }
      units.push_back({i});
    }
    // Largest work first (by parameter count, a proxy for multiply-adds): each step ends
    // when its slowest worker does, and starting the big units first balances the rest.
    std::stable_sort(units.begin(), units.end(), [&](const auto& a, const auto& b) {
      std::int64_t wa = 0, wb = 0;
      for (std::size_t i : a) wa += cost[i];
      for (std::size_t i : b) wb += cost[i];
      return wa > wb;
    });
    while (static_cast<std::int64_t>(units.size()) < workers) {
      auto largest = std::max_element(units.begin(), units.end(),
                                      [](const auto& a, const auto& b) { return a.size() < b.size(); });
      if (largest == units.end() || largest->size() < 2) break;
      const auto half = static_cast<std::ptrdiff_t>(largest->size() / 2);
      std::vector<std::size_t> second(largest->begin() + half, largest->end());
      largest->resize(static_cast<std::size_t>(half));
      units.push_back(std::move(second));
    }
    return units;
  };
  {
    std::vector<std::size_t> everyone;
    for (std::size_t i = 0; i < all.size(); ++i) everyone.push_back(i);
    for (const auto& unit : plan_units(everyone)) {
      if (unit.size() < 2) continue;
      std::string line;
      for (std::size_t i : unit) line += (line.empty() ? "" : " + ") + results[i].name;
      report.fused.push_back(line + " (" + fusion_keys[unit.front()] + ")");
      log_info("fused " + std::to_string(unit.size()) + " heads: " + report.fused.back());
    }
  }
  auto fail = [&](std::size_t i, std::int64_t epoch, std::int64_t step, const std::string& why) {
    all[i]->state = tasks::TaskState::kFailed;
    all[i]->failure = detail::str_cat("epoch ", epoch + 1, " step ", step + 1, ": ", why);
  };
  // Trains one unit on a batch. Isolation: an exception never leaves here (TBB would
  // cancel every other unit's work); only the head it came from fails. A fused group that
  // throws is retried head by head, which finds the culprit.
  auto train_unit = [&](const std::vector<std::size_t>& unit, const at::Tensor& x, const datasets::Batch& batch,
                        std::int64_t epoch, std::int64_t step) {
    const auto t0 = Clock::now();
    std::vector<tasks::Task*> group;
    std::vector<at::Tensor> targets;
    std::vector<std::size_t> members;
    for (std::size_t i : unit) {
      try {
        targets.push_back(all[i]->targets(batch.labels.at(all[i]->config().labels)));
        group.push_back(all[i].get());
        members.push_back(i);
      } catch (const std::exception& e) {
        fail(i, epoch, step, e.what());
      }
    }
    bool done = false;
    if (group.size() >= 2) {
      try {
        const std::vector<double> losses = tasks::fused_train_step(group, x, targets);
        for (std::size_t k = 0; k < members.size(); ++k) {
          if (std::isfinite(losses[k])) {
            loss_sum[members[k]] += losses[k];
            ++loss_count[members[k]];
          } else {
            fail(members[k], epoch, step, detail::str_cat("loss is ", losses[k]));
          }
        }
        done = true;
      } catch (const std::exception&) {
      }
    }
    if (!done) {
      for (std::size_t k = 0; k < members.size(); ++k) {
        try {
          loss_sum[members[k]] += group[k]->train_step(x, targets[k]);
          ++loss_count[members[k]];
        } catch (const std::exception& e) {
          fail(members[k], epoch, step, e.what());
        }
      }
    }
    const double share = since(t0) / static_cast<double>(std::max<std::size_t>(1, unit.size()));
    for (std::size_t i : unit) seconds[i] += share;
  };

  const auto train_start = Clock::now();
  Progress progress("train", (max_epochs - start_epoch) * steps_per_epoch - start_step, "steps", style);
  for (std::int64_t epoch = start_epoch; epoch < max_epochs; ++epoch) {
    const bool resumed_epoch = resume && epoch == start_epoch;
    std::vector<std::size_t> active;
    for (std::size_t i = 0; i < all.size(); ++i) {
      if (all[i]->state != tasks::TaskState::kTraining) continue;
      if (epoch >= epochs_of(i)) {
        all[i]->state = tasks::TaskState::kDone;
        continue;
      }
      active.push_back(i);
      if (!resumed_epoch) {
        loss_sum[i] = 0;
        loss_count[i] = 0;
      }
    }
    if (active.empty()) break;
    for (std::size_t i : active) all[i]->start_epoch(epoch, epochs_of(i));
    source->start_epoch(epoch);
    datasets::Batch batch;
    std::int64_t step = 0;
    if (resumed_epoch) {  // the data order depends only on (seed, epoch): skip what was done
      for (; step < start_step && source->next(batch); ++step) {
      }
    }
    for (; source->next(batch); ++step) {
      // The batch is read once and shared, read-only, by every head.
      const at::Tensor& x = batch.features;
      const auto units = plan_units(active);
      arena.execute([&] {
        tbb::parallel_for(tbb::blocked_range<std::size_t>(0, units.size(), 1),
                          [&](const tbb::blocked_range<std::size_t>& range) {
          configure_thread(config.train.intra_op_threads);
          for (std::size_t u = range.begin(); u != range.end(); ++u) train_unit(units[u], x, batch, epoch, step);
        });
      });
      progress.advance(1);
      if (config.train.fail_fast) {
        for (std::size_t i : active) {
          CANOPY_CHECK(all[i]->state != tasks::TaskState::kFailed, Error, "head '", results[i].name,
                       "' FAILED at ", all[i]->failure, "; stopping every head (train.fail_fast / --fail-fast)");
        }
      }
      const std::int64_t global_step = epoch * steps_per_epoch + step + 1;
      if (config.train.checkpoint_steps > 0 && global_step % config.train.checkpoint_steps == 0 &&
          step + 1 < steps_per_epoch) {
        checkpoint(epoch, step + 1);
      }
    }
    // Evaluate every head that trained this epoch, concurrently as well.
    std::vector<tasks::ClassificationMetrics> metrics(all.size());
    arena.execute([&] {
      tbb::parallel_for(std::size_t(0), active.size(), [&](std::size_t k) {
        configure_thread(config.train.intra_op_threads);
        const std::size_t i = active[k];
        if (all[i]->state == tasks::TaskState::kFailed) return;
        try {
          metrics[i] = all[i]->evaluate(eval_features, eval_targets[i]);
        } catch (const std::exception& e) {
          all[i]->state = tasks::TaskState::kFailed;
          all[i]->failure = detail::str_cat("epoch ", epoch + 1, " evaluation: ", e.what());
        }
      });
    });
    for (std::size_t i : active) {
      auto& r = results[i];
      auto& task = *all[i];
      if (task.state != tasks::TaskState::kFailed) {
        r.epochs = epoch + 1;
        r.train_loss = loss_count[i] ? loss_sum[i] / static_cast<double>(loss_count[i]) : 0.0;
        r.eval = metrics[i];
        if (r.eval.score() > task.best_score) {
          task.best_score = r.eval.score();
          task.best_epoch = epoch + 1;
        }
        const auto patience = task.config().early_stop_patience;
        if (patience > 0 && epoch + 1 - task.best_epoch >= patience && epoch + 1 < epochs_of(i)) {
          task.state = tasks::TaskState::kDone;  // the others go on
          char why[160];
          std::snprintf(why, sizeof why, "stopped early at epoch %lld (best %s %.4f at epoch %lld)",
                        static_cast<long long>(epoch + 1), r.eval.regression ? "R^2" : "accuracy", task.best_score,
                        static_cast<long long>(task.best_epoch));
          task.stop_note = why;
        }
      }
      const auto named = eval_metrics(r.eval);
      jsonl << "{\"epoch\": " << epoch + 1 << ", \"task\": \"" << json_escape(r.name) << "\", \"state\": \""
            << state_name(task.state) << "\", \"train_loss\": " << r.train_loss;
      for (const auto& [name, value] : named) jsonl << ", \"eval_" << name << "\": " << value;
      jsonl << ", \"seconds\": " << seconds[i] << "}\n";
      csv << epoch + 1 << "," << r.name << "," << state_name(task.state) << "," << r.train_loss << ","
          << r.eval.accuracy << "," << r.eval.macro_f1 << "," << seconds[i];
      if (r.eval.regression) {
        csv << "," << r.eval.mae << "," << r.eval.rmse << "," << r.eval.r2 << "\n";
      } else {
        csv << ",,,\n";
      }
      if (!tensorboard.empty() && task.state != tasks::TaskState::kFailed) {
        tensorboard[i]->add_scalar("train/loss", static_cast<float>(r.train_loss), epoch + 1);
        for (const auto& [name, value] : named) {
          tensorboard[i]->add_scalar("eval/" + name, static_cast<float>(value), epoch + 1);
        }
        tensorboard[i]->flush();
      }
    }
    jsonl.flush();
    csv.flush();
    checkpoint(epoch + 1, 0);
    {
      std::ostringstream line;
      line << "epoch " << epoch + 1 << "/" << max_epochs << ":";
      for (std::size_t i = 0; i < all.size(); ++i) {
        char buf[160];
        const bool ran = std::find(active.begin(), active.end(), i) != active.end();
        if (all[i]->state == tasks::TaskState::kFailed) {
          std::snprintf(buf, sizeof buf, " %s FAILED", results[i].name.c_str());
        } else if (!ran) {
          std::snprintf(buf, sizeof buf, " %s done", results[i].name.c_str());
        } else {
          const auto& e = results[i].eval;
          std::snprintf(buf, sizeof buf, e.regression ? " %s R^2 %.3f%s" : " %s %.1f%%%s", results[i].name.c_str(),
                        e.regression ? e.r2 : 100 * e.accuracy,
                        all[i]->state == tasks::TaskState::kDone ? " (stopped)" : "");
        }
        line << buf;
      }
      progress.message(line.str());
    }
  }
  for (auto& t : all) {
    if (t->state == tasks::TaskState::kTraining) t->state = tasks::TaskState::kDone;
  }
  progress.finish();
  report.train_seconds = since(train_start);
  report.source_peak_bytes = source->peak_bytes();
  report.source = source->describe();

  const std::string heads_dir = config.train.out_dir + "/heads";
  for (std::size_t i = 0; i < all.size(); ++i) {
    auto& r = results[i];
    r.state = all[i]->state;
    r.failure = all[i]->failure;
    r.seconds = seconds[i];
    r.note = all[i]->stop_note;
    if (r.state == tasks::TaskState::kDone) {
      // The exported metrics come from the exported weights (a resumed run carries no
      // confusion matrix over from before the interruption).
      r.eval = all[i]->evaluate(eval_features, eval_targets[i]);
      save_head(*all[i], r, cache.meta(), report.feature_dim, heads_dir);
      r.weights_path = heads_dir + "/" + r.name + ".safetensors";
    }
  }
  report.tasks = std::move(results);
  return report;
}

namespace {
// Per-class F1 on the eval split: one table per set of classes and per-class support
// (heads on the same labels), a column per multiclass head that predicts them.
std::string per_class_tables(const TrainReport& report) {
  // Per task: its classes and per-class stats (empty for tasks without a table).
  using Key = std::pair<std::vector<std::string>, std::vector<std::int64_t>>;
  std::vector<Key> keys(report.tasks.size());
  std::vector<std::vector<tasks::ClassStats>> all_stats(report.tasks.size());
  std::vector<Key> sets;
  for (std::size_t i = 0; i < report.tasks.size(); ++i) {
    const auto& t = report.tasks[i];
    if (t.kind != "multiclass" || !t.eval.confusion.defined()) continue;
    all_stats[i] = tasks::per_class_stats(t.eval.confusion);
    keys[i].first = t.class_names;
    for (const auto& s : all_stats[i]) keys[i].second.push_back(s.support);
    if (std::find(sets.begin(), sets.end(), keys[i]) == sets.end()) sets.push_back(keys[i]);
  }
  std::ostringstream o;
  for (const auto& key : sets) {
    const auto& names = key.first;
    std::vector<const TaskResult*> cols;
    std::vector<std::vector<tasks::ClassStats>> stats;
    for (std::size_t i = 0; i < report.tasks.size(); ++i) {
      if (!all_stats[i].empty() && keys[i] == key) {
        cols.push_back(&report.tasks[i]);
        stats.push_back(all_stats[i]);
      }
    }
    std::size_t w_class = 5;
    for (const auto& n : names) w_class = std::max(w_class, n.size());
    o << "\nper-class F1 on the eval split\n" << std::string(w_class, ' ');
    for (const auto* t : cols) o << "  " << std::string(std::max<std::size_t>(t->name.size(), 6) - t->name.size(), ' ') << t->name;
    o << "  support\n";
    const auto k = static_cast<std::int64_t>(names.size());
    for (std::int64_t c = 0; c < k; ++c) {
      o << names[static_cast<std::size_t>(c)] << std::string(w_class - names[static_cast<std::size_t>(c)].size(), ' ');
      std::int64_t support = 0;
      for (std::size_t j = 0; j < cols.size(); ++j) {
        const auto* t = cols[j];
        const auto& s = stats[j][static_cast<std::size_t>(c)];
        support = s.support;
        char cell[32];
        std::snprintf(cell, sizeof cell, "%.3f", s.f1);
        o << "  " << std::string(std::max<std::size_t>(t->name.size(), 6) - std::strlen(cell), ' ') << cell;
      }
      o << "  " << std::setw(7) << support << "\n";
    }
  }
  return o.str();
}
}  // namespace

std::string format_summary(const TrainReport& report) {
  std::ostringstream o;
  std::size_t w_name = 4, w_head = 4, w_labels = 6, w_opt = 9;
  for (const auto& t : report.tasks) {
    w_opt = std::max(w_opt, t.optimizer.size());
    w_name = std::max(w_name, t.name.size());
    w_head = std::max(w_head, t.head.size());
    w_labels = std::max(w_labels, t.labels.size());
  }
  char buf[512];
  std::snprintf(buf, sizeof buf, "%-*s  %-*s  %-*s  %-*s  %6s  %8s  %8s  %7s\n", int(w_name), "task",
                int(w_head), "head", int(w_labels), "labels", int(w_opt), "optimizer", "epochs", "accuracy",
                "macro-F1", "state");
  o << buf;
  for (const auto& t : report.tasks) {
    char acc[32] = "       -", f1[32] = "       -";  // regression: see the lines below
    if (!t.eval.regression) {
      std::snprintf(acc, sizeof acc, "%7.2f%%", 100 * t.eval.accuracy);
      std::snprintf(f1, sizeof f1, "%8.4f", t.eval.macro_f1);
    }
    std::snprintf(buf, sizeof buf, "%-*s  %-*s  %-*s  %-*s  %6lld  %8s  %8s  %7s\n", int(w_name), t.name.c_str(),
                  int(w_head), t.head.c_str(), int(w_labels), t.labels.c_str(), int(w_opt), t.optimizer.c_str(),
                  static_cast<long long>(t.epochs), acc, f1, state_name(t.state));
    o << buf;
  }
  for (const auto& t : report.tasks) {
    if (!t.eval.regression || t.state == tasks::TaskState::kFailed) continue;
    std::snprintf(buf, sizeof buf, "task '%s' (regression): MAE %.4g, RMSE %.4g, R^2 %.4f on the eval split\n",
                  t.name.c_str(), t.eval.mae, t.eval.rmse, t.eval.r2);
    o << buf;
  }
  o << per_class_tables(report);
  for (const auto& f : report.fused) o << "fused: " << f << "\n";
  for (const auto& t : report.tasks) {
    if (t.state == tasks::TaskState::kFailed) o << "task '" << t.name << "' FAILED at " << t.failure << "\n";
    if (!t.note.empty()) o << "task '" << t.name << "' " << t.note << "\n";
  }
  std::snprintf(buf, sizeof buf,
                "%zu heads, %lld train rows x %lld features, evaluated on %lld rows; load %.1fs, train %.1fs\n",
                report.tasks.size(), static_cast<long long>(report.train_rows),
                static_cast<long long>(report.feature_dim), static_cast<long long>(report.eval_rows),
                report.load_seconds, report.train_seconds);
  o << buf;
  return o.str();
}

}  // namespace canopy::runners
