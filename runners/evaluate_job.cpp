#include "canopy/runners/evaluate_job.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <sstream>

#include <ATen/ops/cat.h>
#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/strings.h"
#include "canopy/runners/exported_model.h"
#include "canopy/runners/head_card.h"
#include "canopy/runners/input_data.h"

namespace canopy::runners {

namespace {
using nlohmann::ordered_json;

// A head to score: the task as its card says it was trained (label source, label map, kind:
// the config may have changed since) and the input's labels mapped to its targets.
struct Scored {
  tasks::TaskConfig trained;
  at::Tensor targets;
  std::vector<at::Tensor> outputs;  // per trunk batch
};

// Which labels a head scores, for comparing heads on the same ones: the source and its map.
std::string scored_labels(const tasks::TaskConfig& trained) {
  std::string labels = trained.labels;
  for (const auto v : trained.label_map) labels += " " + std::to_string(v);
  return labels;
}

std::string percent(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f%%", 100 * v);
  return buf;
}
}  // namespace

std::string input_said(const std::string& input, const std::string& eval_split) {
  return input.empty() ? "the eval split (" + eval_split + ")" : "'" + printable(input) + "'";
}

ScoredInput score_input(const JobConfig& config, const tasks::HeadRegistry& registry,
                        const EvaluateOptions& options, ProgressStyle style, const std::string& what) {
  return std::move(score_inputs({&config}, registry, options, style, what).front());
}

std::vector<ScoredInput> score_inputs(const std::vector<const JobConfig*>& configs,
                                      const tasks::HeadRegistry& registry, const EvaluateOptions& options,
                                      ProgressStyle style, const std::string& what) {
  const auto start = std::chrono::steady_clock::now();
  const JobConfig& config = *configs.front();
  // The first run's trunk; every run's heads on it, each knowing its run.
  ExportedModel model = load_exported_model(config, registry);
  std::vector<std::size_t> run_of(model.heads.size(), 0);
  for (std::size_t r = 1; r < configs.size(); ++r) {
    for (auto& h : load_exported_heads(*configs[r], registry, model.trunk)) {
      model.heads.push_back(std::move(h));
      run_of.push_back(r);
    }
  }
  InputData data = options.input.empty()
                       ? load_eval_split(config, options.limit)
                       : load_labelled_input(config, options.input, options.labels, options.limit);
  InputSplit& input = data.splits.at("input");
  std::vector<ScoredInput> out(configs.size());
  for (auto& o : out) {
    o.evaluation.input = options.input;
    o.evaluation.eval_split = options.input.empty() ? config.train.eval_split : "";
    o.evaluation.rows = input.rows;
  }
  // The heads the input has labels for, each with its targets; the others are left out of the pass.
  std::vector<Scored> scored;
  std::vector<ExportedHead> heads;
  std::vector<std::size_t> scored_run;
  for (std::size_t k = 0; k < model.heads.size(); ++k) {
    ExportedHead& h = model.heads[k];
    Evaluation& e = out[run_of[k]].evaluation;
    Scored s;
    s.trained = h.config;
    s.trained.kind = h.kind;
    s.trained.labels = h.card.value("label_source", h.config.labels);
    s.trained.label_map = h.card.value("label_map", h.config.label_map);
    const auto labels = input.labels.find(s.trained.labels);
    if (labels == input.labels.end()) {
      e.not_evaluated.push_back(
          detail::str_cat("task '", h.task(), "': the input has no labels '", s.trained.labels,
                          "' (it has: ", join(data.label_sources, ", "), ")",
                          s.trained.labels != "all_labels" ? ""
                          : config.data.source == "arff"
                              ? "; all_labels needs every label file data.train_files names, in its order"
                          : reads_text_table(config.data)
                              ? "; all_labels needs every label column of data.train, each of two values"
                              : ""));
      continue;
    }
    s.targets = tasks::source_targets(s.trained, h.out_features, labels->second);
    scored.push_back(std::move(s));
    heads.push_back(std::move(h));
    scored_run.push_back(run_of[k]);
  }
  for (std::size_t r = 0; r < out.size(); ++r) {
    CANOPY_CHECK(std::count(scored_run.begin(), scored_run.end(), r) > 0, DataError,
                 input_said(options.input, config.train.eval_split), " has labels for none of the heads",
                 configs.size() > 1 ? " of " + configs[r]->train.out_dir : std::string(), ": ",
                 join(out[r].evaluation.not_evaluated, "; "));
  }
  model.heads = std::move(heads);

  Progress progress(what, input.rows, data.unit, style);
  run_model_pass(model, input, config, progress, "evaluating", "evaluated",
                 [&](std::int64_t, const std::vector<at::Tensor>& outputs) {
                   for (std::size_t k = 0; k < outputs.size(); ++k) scored[k].outputs.push_back(outputs[k]);
                 });
  progress.finish();
  // The outputs are the card's calibrated logits (temperature applied in the pass).
  for (std::size_t k = 0; k < scored.size(); ++k) {
    const ExportedHead& h = model.heads[k];
    ScoredInput& o = out[scored_run[k]];
    Evaluation& e = o.evaluation;
    std::vector<tasks::HeadOutputs>& heads_out = o.outputs;
    TaskResult r;
    r.name = h.task();
    r.kind = h.kind;
    r.class_names = h.class_names;
    r.temperature = h.temperature;
    r.state = tasks::TaskState::kDone;
    r.labels = scored_labels(scored[k].trained);
    const at::Tensor outputs = at::cat(scored[k].outputs);
    heads_out.push_back(
        {h.kind, outputs, scored[k].targets, h.out_features, h.target_mean, h.target_std, h.cutoffs, 1.0});
    r.eval = tasks::evaluate_head(heads_out.back(), tasks::Monitor::kAuto);
    r.interval_level = config.train.interval_level;
    e.heads.push_back(std::move(r));
    e.card_scores.push_back(h.kind == tasks::TaskKind::kRegression ? h.card.value("eval_r2", 0.0)
                                                                   : h.card.value("eval_accuracy", 0.0));
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (auto& o : out) o.evaluation.seconds = seconds;
  return out;
}

Evaluation run_evaluate(const JobConfig& config, const tasks::HeadRegistry& registry,
                        const EvaluateOptions& options, ProgressStyle style) {
  const auto start = std::chrono::steady_clock::now();
  ScoredInput scored = score_input(config, registry, options, style, "evaluate");
  Evaluation& e = scored.evaluation;
  // Every head on the same resamples of the input's rows (paired).
  if (config.train.bootstrap_resamples > 0) {
    std::vector<tasks::Resampled> resampled =
        tasks::bootstrap(scored.outputs, {config.train.bootstrap_resamples, config.train.interval_level,
                                          static_cast<std::uint64_t>(config.train.seed)});
    for (std::size_t k = 0; k < resampled.size(); ++k) e.heads[k].resampled = std::move(resampled[k]);
  }
  e.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return std::move(e);
}

std::string format_evaluation(const Evaluation& e) {
  std::ostringstream o;
  std::size_t w_name = 4;
  for (const auto& t : e.heads) w_name = std::max(w_name, t.name.size());
  const bool top5 = std::any_of(e.heads.begin(), e.heads.end(),
                                [](const TaskResult& t) { return t.eval.top5.has_value(); });
  char buf[512];
  std::snprintf(buf, sizeof buf, "%-*s  %-10s  %8s", int(w_name), "task", "kind", "accuracy");
  o << buf << (top5 ? "     top-5" : "");
  std::snprintf(buf, sizeof buf, "  %8s  %8s  %s\n", "macro-F1", "mean AP", "card (the run's eval split)");
  o << buf;
  for (std::size_t i = 0; i < e.heads.size(); ++i) {
    const auto& t = e.heads[i];
    const bool regression = t.kind == tasks::TaskKind::kRegression;
    std::string acc = "-", f1 = "-", ap = "-", t5 = "-", card;
    if (!regression) {
      acc = percent(t.eval.accuracy);
      std::snprintf(buf, sizeof buf, "%.4f", t.eval.macro_f1);
      f1 = buf;
      card = percent(e.card_scores[i]);
    } else {
      std::snprintf(buf, sizeof buf, "R^2 %.4f", e.card_scores[i]);
      card = buf;
    }
    if (t.eval.mean_ap) {
      std::snprintf(buf, sizeof buf, "%.4f", *t.eval.mean_ap);
      ap = buf;
    }
    if (t.eval.top5) t5 = percent(*t.eval.top5);
    std::snprintf(buf, sizeof buf, "%-*s  %-10s  %8s", int(w_name), t.name.c_str(), tasks::to_string(t.kind),
                  acc.c_str());
    o << buf;
    if (top5) {
      std::snprintf(buf, sizeof buf, "  %8s", t5.c_str());
      o << buf;
    }
    std::snprintf(buf, sizeof buf, "  %8s  %8s  %s\n", f1.c_str(), ap.c_str(), card.c_str());
    o << buf;
  }
  const std::string where = input_said(e.input, e.eval_split);
  o << regression_lines(e.heads, where) << calibration_lines(e.heads, where, false)
    << interval_lines(e.heads, where) << per_class_tables(e.heads, where) << per_label_tables(e.heads, where);
  for (const auto& n : e.not_evaluated) o << "not evaluated: " << n << "\n";
  std::snprintf(buf, sizeof buf, "%zu head%s evaluated on %lld rows in %.2fs\n", e.heads.size(),
                e.heads.size() == 1 ? "" : "s", static_cast<long long>(e.rows), e.seconds);
  o << buf;
  return o.str();
}

ordered_json evaluation_heads_json(const Evaluation& e) {
  const auto versus = compare_with_best(e.heads);
  ordered_json heads = ordered_json::array();
  for (std::size_t i = 0; i < e.heads.size(); ++i) {
    const auto& t = e.heads[i];
    ordered_json h{{"task", t.name}, {"kind", tasks::to_string(t.kind)}, {"rows", t.eval.count}};
    if (const auto& r = t.eval.regression) {
      h["mae"] = r->mae;
      h["rmse"] = r->rmse;
      h["r2"] = r->r2;
      h["card_eval_r2"] = e.card_scores[i];
    } else {
      h["accuracy"] = t.eval.accuracy;
      h["macro_f1"] = t.eval.macro_f1;
      if (t.eval.top5) h["top5_accuracy"] = *t.eval.top5;
      if (t.eval.mean_ap) h["mean_ap"] = *t.eval.mean_ap;
      if (t.kind == tasks::TaskKind::kMultilabel) h["per_label"] = per_label_report(t.eval, t.class_names);
      if (t.kind == tasks::TaskKind::kMulticlass) {
        if (t.eval.nll) h["nll"] = *t.eval.nll;  // of the card's calibrated probabilities
        if (t.eval.ece) h["ece"] = *t.eval.ece;
        h["per_class"] = per_class_report(t.eval, t.class_names);
        h["confusion"] = confusion_rows(t.eval.confusion);
      }
      h["card_eval_accuracy"] = e.card_scores[i];
    }
    if (t.resampled) h["intervals"] = intervals_json(*t.resampled, t.interval_level);
    if (const auto& v = versus[i]) {
      h["versus_best"] = {{"best", v->other},
                          {"metric", v->metric},
                          {"difference", v->difference},
                          {"interval", {v->interval.lo, v->interval.hi}}};
    }
    heads.push_back(std::move(h));
  }
  return heads;
}

std::string evaluation_json(const Evaluation& e) {
  // The path as given, bytes that are not UTF-8 written \xNN (a JSON writer refuses them).
  const ordered_json out{
      {"input", printable(e.input)}, {"eval_split", e.eval_split},        {"rows", e.rows},
      {"seconds", e.seconds},        {"heads", evaluation_heads_json(e)}, {"not_evaluated", e.not_evaluated}};
  return out.dump(2) + "\n";
}

}  // namespace canopy::runners
