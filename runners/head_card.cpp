#include "canopy/runners/head_card.h"

#include <map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/json_checksum.h"
#include "canopy/core/sha256.h"
#include "canopy/core/tensor_values.h"
#include "canopy/runners/cache_job.h"
#include "canopy/runners/card_check.h"
#include "canopy/runners/export.h"
#include "canopy/runners/head_run.h"

namespace canopy::runners {

using nlohmann::ordered_json;

// Precision, recall, F1 and support of each class (multiclass heads; empty otherwise).
ordered_json per_class_report(const tasks::EvalMetrics& m, const std::vector<std::string>& names) {
  ordered_json out = ordered_json::array();
  if (!m.confusion.defined() || m.confusion.dim() != 2) return out;
  const auto stats = tasks::per_class_stats(m.confusion);
  for (std::size_t i = 0; i < stats.size(); ++i) {
    const auto& s = stats[i];
    out.push_back({{"class", i < names.size() ? names[i] : std::to_string(i)},
                   {"precision", s.precision},
                   {"recall", s.recall},
                   {"f1", s.f1},
                   {"support", s.support}});
  }
  return out;
}

ordered_json intervals_json(const tasks::Resampled& resampled, double level) {
  ordered_json in{{"level", level}, {"resamples", resampled.resamples()}, {"rows", resampled.rows}};
  for (std::size_t m = 0; m < resampled.names.size(); ++m) {
    const tasks::Interval i = tasks::percentile_interval(resampled.values[m], level);
    in[resampled.names[m]] = {i.lo, i.hi};
  }
  return in;
}

ordered_json confusion_rows(const at::Tensor& confusion) {
  ordered_json rows = ordered_json::array();
  const at::Tensor c = confusion.to(at::kLong).contiguous();
  const auto* v = c.data_ptr<std::int64_t>();
  const std::int64_t k = c.size(0);
  for (std::int64_t i = 0; i < k; ++i) rows.push_back(std::vector<std::int64_t>(v + i * k, v + (i + 1) * k));
  return rows;
}

ordered_json per_label_report(const tasks::EvalMetrics& m, const std::vector<std::string>& names) {
  ordered_json out = ordered_json::array();
  for (std::size_t i = 0; i < m.labels.size(); ++i) {
    const auto& s = m.labels[i];
    out.push_back(
        {{"label", i < names.size() ? names[i] : std::to_string(i)},
         {"threshold", s.threshold},
         {"precision", s.precision},
         {"recall", s.recall},
         {"f1", s.f1},
         {"average_precision", s.average_precision ? ordered_json(*s.average_precision) : ordered_json()},
         {"support", s.support},
         {"predicted", s.predicted}});
  }
  return out;
}

namespace {

// A part of the cache's description (cache_description), or `absent`, what a description
// without it means (a cache made before taps: the output; any float32 cache: float32).
std::string description_part(const datasets::CacheMeta& meta, const std::string& key, const char* absent) {
  const auto parts = parse_description(meta.description);
  const auto it = parts.find(key);
  return it == parts.end() ? absent : it->second;
}

// What the head is and the features it reads, and its main metrics on the eval split.
ordered_json head_and_features(const tasks::Task& task, const TaskResult& r, const datasets::CacheMeta& meta,
                               std::int64_t in_features) {
  const auto& c = task.config();
  std::map<std::string, std::string> head_params = c.head_params;  // the head's own word wins
  for (const auto& [k, v] : task.head().config_values()) head_params[k] = v;
  for (const auto& k : task.unused_head_options()) head_params.erase(k);  // a grid's, for other heads
  return {{"task", r.name},
          {"kind", tasks::to_string(c.kind)},
          {"head", c.head},
          {"architecture", task.head().describe()},
          {"in_features", in_features},
          {"out_features", task.num_classes()},
          {"head_params", head_params},
          {"label_source", c.labels},
          {"label_map", c.label_map},
          {"class_names", r.class_names},
          {"trunk_sha256", meta.trunk_sha256},
          {"cache_fingerprint", meta.fingerprint},
          {"preprocessing", meta.preprocessing},
          {"pooling", meta.pooling},
          {"tap", description_part(meta, "tap", "output")},
          {"trunk_precision", description_part(meta, "precision", "float32")},
          {"epochs", r.epochs},
          {"eval_accuracy", r.eval.accuracy},
          {"eval_macro_f1", r.eval.macro_f1},
          {"eval_mean_ap", r.eval.mean_ap ? ordered_json(*r.eval.mean_ap) : ordered_json()},
          {"eval_top5_accuracy", r.eval.top5 ? ordered_json(*r.eval.top5) : ordered_json()},
          {"per_class", per_class_report(r.eval, r.class_names)}};
}

// The loss's weights as the head trained with them: as configured, or balanced from the
// training rows' labels.
void add_loss_weights(ordered_json& card, const tasks::Task& task) {
  const auto& c = task.config();
  if (task.class_weights().defined()) {
    card["class_weights"] = tensor_values(task.class_weights());
    card["class_weights_balanced"] = c.balanced_class_weights;
  }
  if (task.positive_weights().defined()) {
    card["positive_weights"] = tensor_values(task.positive_weights());
    card["positive_weights_balanced"] = c.balanced_positive_weights;
  }
}

// What only the task's kind has: a multiclass head's probabilities (softmax(logits /
// temperature)) and how well they fit, and its confusion matrix; a multilabel head's labels and
// their cuts; a regression's target scale and errors. On the eval split.
void add_kind_part(ordered_json& card, const tasks::Task& task, const TaskResult& r) {
  const auto& c = task.config();
  if (c.kind == tasks::TaskKind::kMulticlass) {
    card["temperature"] = task.temperature();
    if (r.eval.nll) card["eval_nll"] = *r.eval.nll;
    if (r.eval.ece) card["eval_ece"] = *r.eval.ece;
    const auto& fit = task.temperature_fit();
    if (fit && r.validation) {  // fitted on the validation rows r.validation scores at it
      card["calibration"] = {{"method", "temperature"},
                             {"validation_rows", r.validation->count},
                             {"validation_nll_before", fit->nll_before},
                             {"validation_nll", r.validation->nll.value_or(0.0)}};
    }
    if (r.eval.confusion.defined()) card["confusion"] = confusion_rows(r.eval.confusion);
  }
  if (c.kind == tasks::TaskKind::kMultilabel) {
    card["per_label"] = per_label_report(r.eval, r.class_names);
    // How the labels are given: as configured, and each label's cut on the head's logits
    // (what canopy predict compares, as float32) with its probability.
    card["threshold"] = c.threshold;
    card["threshold_logits"] = task.cutoffs();
    std::vector<double> probabilities;
    for (double cut : task.cutoffs()) probabilities.push_back(tasks::logit_threshold(cut));
    card["thresholds"] = probabilities;
  }
  if (const auto& e = r.eval.regression) {
    card["target_mean"] = task.target_mean();
    card["target_std"] = task.target_std();
    card["eval_mae"] = e->mae;
    card["eval_rmse"] = e->rmse;
    card["eval_r2"] = e->r2;
  }
}

// How the exported weights were chosen: the epoch, the metric, its validation scores, and a
// grid's members with theirs (in the monitor's units).
void add_choice(ordered_json& card, const tasks::Task& task, const TaskResult& r) {
  const auto& c = task.config();
  card["exported_epoch"] = r.exported_epoch;
  card["monitor"] = tasks::to_string(c.monitor);
  if (const auto& v = r.validation) {
    ordered_json val{{"rows", v->count}, {"accuracy", v->accuracy}, {"macro_f1", v->macro_f1}};
    if (v->top5) val["top5_accuracy"] = *v->top5;
    if (v->regression) val["r2"] = v->regression->r2;
    card["validation"] = val;
  }
  if (r.grid.empty()) return;
  ordered_json members = ordered_json::array();
  for (const auto& m : r.grid) {
    ordered_json member{{"name", m.name},
                        {"values", m.point},
                        {"state", state_name(m.state)},
                        {"epochs", m.epochs},
                        {"exported_epoch", m.exported_epoch},
                        {"validation_score",
                         r.validation ? r.validation->score_value(m.validation_score) : m.validation_score},
                        {"seconds", m.seconds}};
    const std::string& why = m.failure.empty() ? m.note : m.failure;
    if (!why.empty()) member["note"] = why;  // why it failed, or stopped before its last epoch
    members.push_back(std::move(member));
  }
  card["grid"] = {
      {"winner", r.winner}, {"values", c.grid_point}, {"keys", c.grid_axes}, {"members", members}};
  if (const auto& g = r.grid_lead) {
    card["grid"]["lead"] = {{"runner_up", g->other},     {"metric", g->metric},
                            {"lead", g->difference},     {"interval", {g->interval.lo, g->interval.hi}},
                            {"level", r.interval_level}, {"resamples", g->resamples}};
  }
}

// The intervals of the eval split's metrics (train.bootstrap_resamples).
void add_intervals(ordered_json& card, const TaskResult& r) {
  if (r.resampled) card["eval_intervals"] = intervals_json(*r.resampled, r.interval_level);
}

// The card of `task` trained with `r` on features of `meta`'s cache, its parts in this order.
ordered_json head_card(const tasks::Task& task, const TaskResult& r, const datasets::CacheMeta& meta,
                       std::int64_t in_features) {
  ordered_json card = head_and_features(task, r, meta, in_features);
  add_loss_weights(card, task);
  add_kind_part(card, task, r);
  add_intervals(card, r);
  if (!meta.row_parts.empty()) {  // the heads read the fine-tuned trunk's features
    card["trunk_file"] = meta.trunk_path;
    card["trunk_boundary"] = meta.boundary;
    card["top_precision"] = meta.top_precision.empty() ? "float32" : meta.top_precision;
  }
  add_choice(card, task, r);
  card["weights"] = r.name + ".safetensors";
  return card;
}
}  // namespace

std::string export_head(tasks::Task& task, const TaskResult& r, const datasets::CacheMeta& meta,
                        std::int64_t in_features, const std::string& dir) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& p : task.head().named_parameters(true)) tensors.emplace_back(p.key(), p.value());
  for (const auto& b : task.head().named_buffers(true)) tensors.emplace_back(b.key(), b.value());
  const auto& c = task.config();
  const std::map<std::string, std::string> md = {{"format", "pt"},
                                                 {"canopy.task", r.name},
                                                 {"canopy.head", c.head},
                                                 {"canopy.architecture", task.head().describe()}};
  const std::string weights = join_path(dir, r.name + ".safetensors");
  save_safetensors(weights, tensors, md);
  auto card = head_card(task, r, meta, in_features);
  card["weights_sha256"] = sha256_file(weights);  // `canopy predict` loads only these bytes
  seal_json(card, "card_crc32c");                 // and reads only this card
  write_file_atomic(join_path(dir, r.name + ".json"), card.dump(2) + "\n");
  return weights;
}

std::string card_checksum_problem(nlohmann::ordered_json& card, const std::string& card_path) {
  const auto crc = unseal_json(card, "card_crc32c");
  if (!crc || crc->first == crc->second) return {};
  return detail::str_cat("head card '", card_path, "' does not match its checksum (CRC-32C ", crc->second,
                         ", recorded ", crc->first, ")");
}

std::string weights_problem(const nlohmann::ordered_json& card, const std::string& card_path,
                            const std::string& weights_path) {
  if (!card.contains("weights_sha256")) return {};
  const std::string want = card.at("weights_sha256"), got = sha256_file(weights_path);
  if (got == want) return {};
  return detail::str_cat("weights '", weights_path, "' have sha256 ", got, ", the card '", card_path,
                         "' says ", want);
}

}  // namespace canopy::runners
