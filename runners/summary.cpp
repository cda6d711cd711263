// The summary a training run prints: one row per head, regression errors, per-class F1
// tables, fused groups, failures and notes, and the run's totals.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iomanip>
#include <numeric>
#include <optional>
#include <sstream>

#include "canopy/core/error.h"
#include "canopy/core/strings.h"
#include "canopy/runners/head_run.h"
#include "canopy/runners/train_report.h"

namespace canopy::runners {

bool TrainReport::any_failed() const {
  return std::any_of(tasks.begin(), tasks.end(),
                     [](const TaskResult& t) { return t.state == tasks::TaskState::kFailed; });
}

// Per-class F1: one table per set of classes and per-class support (heads on the same labels),
// a column per multiclass head that predicts them.
std::string per_class_tables(const std::vector<TaskResult>& results, const std::string& where) {
  // Per task: its classes and per-class stats (empty for tasks without a table).
  using Key = std::pair<std::vector<std::string>, std::vector<std::int64_t>>;
  std::vector<Key> keys(results.size());
  std::vector<std::vector<tasks::ClassStats>> all_stats(results.size());
  std::vector<Key> sets;
  for (std::size_t i = 0; i < results.size(); ++i) {
    const auto& t = results[i];
    if (t.kind != tasks::TaskKind::kMulticlass || !t.eval.confusion.defined()) continue;
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
    for (std::size_t i = 0; i < results.size(); ++i) {
      if (!all_stats[i].empty() && keys[i] == key) {
        cols.push_back(&results[i]);
        stats.push_back(all_stats[i]);
      }
    }
    std::size_t w_class = 5;
    for (const auto& n : names) w_class = std::max(w_class, n.size());
    o << "\nper-class F1 on " << where << "\n" << std::string(w_class, ' ');
    for (const auto* t : cols)
      o << "  " << std::string(std::max<std::size_t>(t->name.size(), 6) - t->name.size(), ' ') << t->name;
    o << "  support\n";
    const auto k = static_cast<std::int64_t>(names.size());
    for (std::int64_t c = 0; c < k; ++c) {
      o << names[static_cast<std::size_t>(c)]
        << std::string(w_class - names[static_cast<std::size_t>(c)].size(), ' ');
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

// Per label of each multilabel head: its threshold, precision, recall and F1 at it, average
// precision, and how many rows carry it and are given it; a table per head, its labels being
// its own. Past kLabelRowsShown + 10 labels (a multi-hot source's), the kLabelRowsShown that the
// most rows carry, the rest counted (every label is in the head's card and in --json output).
constexpr std::size_t kLabelRowsShown = 30;
std::string per_label_tables(const std::vector<TaskResult>& results, const std::string& where) {
  std::ostringstream o;
  for (const auto& t : results) {
    if (t.kind != tasks::TaskKind::kMultilabel || t.eval.labels.empty() ||
        t.state == tasks::TaskState::kFailed)
      continue;
    std::vector<std::size_t> shown(t.eval.labels.size());
    std::iota(shown.begin(), shown.end(), std::size_t{0});
    const bool cut = shown.size() > kLabelRowsShown + 10;
    if (cut) {
      std::stable_sort(shown.begin(), shown.end(), [&](std::size_t a, std::size_t b) {
        return t.eval.labels[a].support > t.eval.labels[b].support;
      });
      shown.resize(kLabelRowsShown);
    }
    std::size_t w_label = 5;
    for (const auto& n : t.class_names) w_label = std::max(w_label, n.size());
    o << "\nper-label scores of '" << t.name << "' on " << where
      << " (a label is given where its probability is over its threshold"
      << (cut ? detail::str_cat("; the ", kLabelRowsShown, " of ", t.eval.labels.size(),
                                " labels most rows carry")
              : std::string())
      << ")\n"
      << std::left << std::setw(static_cast<int>(w_label)) << "label" << std::right
      << "  threshold  precision  recall      F1      AP  support  predicted\n";
    char row[160];
    for (const std::size_t j : shown) {
      const auto& s = t.eval.labels[j];
      char ap[16] = "      -";
      if (s.average_precision) std::snprintf(ap, sizeof ap, "%7.3f", *s.average_precision);
      std::snprintf(row, sizeof row, "  %9.3f  %9.3f  %6.3f  %6.3f  %s  %7lld  %9lld\n", s.threshold,
                    s.precision, s.recall, s.f1, ap, static_cast<long long>(s.support),
                    static_cast<long long>(s.predicted));
      const std::string name = j < t.class_names.size() ? t.class_names[j] : std::to_string(j);
      o << std::left << std::setw(static_cast<int>(w_label)) << name << std::right << row;
    }
    if (cut) {
      o << "... " << t.eval.labels.size() - shown.size()
        << " labels more: every label's scores are in the head's card (per_label) and in `canopy evaluate "
           "--json`\n";
    }
  }
  return o.str();
}

namespace {
// One row per head: its head, labels, optimizer, epochs and scores on the eval split (and on
// the validation split, and top-5, when the run has them), and its state.
std::string results_table(const TrainReport& report) {
  std::ostringstream o;
  std::size_t w_name = 4, w_head = 4, w_labels = 6, w_opt = 9;
  for (const auto& t : report.tasks) {
    w_opt = std::max(w_opt, t.optimizer.size());
    w_name = std::max(w_name, t.name.size());
    w_head = std::max(w_head, t.head.size());
    w_labels = std::max(w_labels, t.labels.size());
  }
  const bool validation = report.validation_rows > 0;
  // Top-5 accuracy, where a task has more than 5 classes.
  const bool top5 = std::any_of(report.tasks.begin(), report.tasks.end(),
                                [](const TaskResult& t) { return t.eval.top5.has_value(); });
  char buf[512];
  std::snprintf(buf, sizeof buf, "%-*s  %-*s  %-*s  %-*s  %6s  %8s%s%s  %8s  %7s\n", int(w_name), "task",
                int(w_head), "head", int(w_labels), "labels", int(w_opt), "optimizer", "epochs", "accuracy",
                top5 ? "     top-5" : "", validation ? "  val-acc." : "", "macro-F1", "state");
  o << buf;
  for (const auto& t : report.tasks) {
    char acc[32] = "       -", f1[32] = "       -", val[32] = "", t5[32] = "";  // regression: see below
    if (t.kind != tasks::TaskKind::kRegression) {
      std::snprintf(acc, sizeof acc, "%7.2f%%", 100 * t.eval.accuracy);
      std::snprintf(f1, sizeof f1, "%8.4f", t.eval.macro_f1);
    }
    if (top5) {
      if (t.eval.top5) {
        std::snprintf(t5, sizeof t5, "  %7.2f%%", 100 * *t.eval.top5);
      } else {
        std::snprintf(t5, sizeof t5, "  %8s", "-");
      }
    }
    if (validation) {
      if (t.validation && t.kind != tasks::TaskKind::kRegression) {
        std::snprintf(val, sizeof val, "  %8.2f%%", 100 * t.validation->accuracy);
      } else {
        std::snprintf(val, sizeof val, "  %9s", "-");
      }
    }
    std::snprintf(buf, sizeof buf, "%-*s  %-*s  %-*s  %-*s  %6lld  %8s%s%s  %8s  %7s\n", int(w_name),
                  t.name.c_str(), int(w_head), t.head.c_str(), int(w_labels), t.labels.c_str(), int(w_opt),
                  t.optimizer.c_str(), static_cast<long long>(t.epochs), acc, t5, val, f1,
                  state_name(t.state));
    o << buf;
  }
  return o.str();
}

}  // namespace

std::string metric_label(const std::string& metric) {
  if (metric == "macro_f1") return "macro-F1";
  if (metric == "mean_ap") return "mean AP";
  if (metric == "r2") return "R^2";
  if (metric == "nll") return "NLL";
  if (metric == "mae") return "MAE";
  if (metric == "rmse") return "RMSE";
  return metric;
}

PairedText paired_text(const Paired& p) {
  const bool points = p.metric == "accuracy";
  const auto number = [&](double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, points ? "%+.2f" : "%+.4f", points ? 100 * v : v);
    return std::string(buf);
  };
  return {number(p.difference) + (points ? " points" : ""),
          " [" + number(p.interval.lo) + ", " + number(p.interval.hi) + "]",
          p.interval.lo <= 0 && p.interval.hi >= 0 ? ": no difference these rows can show" : ""};
}

namespace {

// "grid 'probe': probe@lr=0.01 leads probe@lr=0.001 by +0.40 points of accuracy on the validation
// split [-0.60, +1.40] (95%, 1000 resamples, paired): no difference these rows can show".
std::string lead_line(const TaskResult& t, const Paired& lead) {
  const PairedText said = paired_text(lead);
  char level[32];
  std::snprintf(level, sizeof level, "%g%%", 100 * t.interval_level);
  return detail::str_cat("grid '", t.name, "': ", t.winner, " leads ", lead.other, " by ", said.difference,
                         " of ", metric_label(lead.metric),
                         tasks::lower_is_better(lead.metric) ? " (lower)" : "", " on the validation split",
                         said.interval, " (", level, ", ", lead.resamples, " resamples, paired)", said.said,
                         "\n");
}

// A line per grid: its members, how many finished (and were cut), the best three on the
// validation split, and what was exported.
std::string grid_lines(const TrainReport& report) {
  std::ostringstream o;
  char buf[512];
  for (const auto& t : report.tasks) {
    if (t.grid.empty()) continue;
    std::vector<const GridMember*> ranked;
    for (const auto& m : t.grid) {
      if (m.state == tasks::TaskState::kDone) ranked.push_back(&m);
    }
    std::stable_sort(ranked.begin(), ranked.end(), [](const GridMember* a, const GridMember* b) {
      return a->validation_score > b->validation_score;
    });
    const bool r2 = t.kind == tasks::TaskKind::kRegression;
    const auto monitor = t.validation ? t.validation->monitor : tasks::Monitor::kAuto;
    const auto cut = std::count_if(t.grid.begin(), t.grid.end(),
                                   [](const GridMember& m) { return m.note.rfind(kHalvingStop, 0) == 0; });
    o << "grid '" << t.name << "': " << t.grid.size() << " heads, " << ranked.size() << " finished"
      << (cut ? " (" + std::to_string(cut) + " of them cut by successive halving)" : std::string())
      << "; best on the validation split:";
    for (std::size_t k = 0; k < ranked.size() && k < 3; ++k) {
      if (monitor != tasks::Monitor::kAuto) {  // task.NAME.monitor's metric, as messages name it
        std::snprintf(buf, sizeof buf, "%s %s (%s %.4f, epoch %lld)", k ? ";" : "", ranked[k]->name.c_str(),
                      t.validation->score_name(), t.validation->score_value(ranked[k]->validation_score),
                      static_cast<long long>(ranked[k]->exported_epoch));
      } else {
        std::snprintf(buf, sizeof buf, r2 ? "%s %s (R^2 %.4f, epoch %lld)" : "%s %s (%.2f%%, epoch %lld)",
                      k ? ";" : "", ranked[k]->name.c_str(),
                      r2 ? ranked[k]->validation_score : 100 * ranked[k]->validation_score,
                      static_cast<long long>(ranked[k]->exported_epoch));
      }
      o << buf;
    }
    o << (t.state == tasks::TaskState::kDone ? "; exported as '" + t.name + "' (card lists every member)"
                                             : "")
      << "\n";
    if (const auto& g = t.grid_lead) o << lead_line(t, *g);
  }
  return o.str();
}

}  // namespace

std::string calibration_lines(const std::vector<TaskResult>& results, const std::string& where,
                              bool calibrated_only) {
  std::ostringstream o;
  char buf[512];
  for (const auto& t : results) {
    if (!t.eval.nll || !t.eval.ece || t.state == tasks::TaskState::kFailed) continue;
    if (calibrated_only && t.temperature == 1.0) continue;
    std::snprintf(buf, sizeof buf, "task '%s': probabilities at temperature %.4g: NLL %.4f, ECE %.4f on %s\n",
                  t.name.c_str(), t.temperature, *t.eval.nll, *t.eval.ece, where.c_str());
    o << buf;
  }
  return o.str();
}

namespace {
// What a result's intervals show, in order: (metric, label) per kind.
std::vector<std::pair<const char*, const char*>> shown_metrics(tasks::TaskKind kind) {
  if (kind == tasks::TaskKind::kRegression) return {{"r2", "R^2"}, {"mae", "MAE"}};
  if (kind == tasks::TaskKind::kMultilabel) return {{"accuracy", "exact match"}, {"macro_f1", "macro-F1"}};
  return {{"accuracy", "accuracy"}, {"macro_f1", "macro-F1"}};
}

}  // namespace

const char* compared_metric(tasks::TaskKind kind) {
  if (kind == tasks::TaskKind::kRegression) return "r2";
  return kind == tasks::TaskKind::kMultilabel ? "macro_f1" : "accuracy";
}

std::string shown(const std::string& metric, double v, bool percent_sign) {
  char buf[64];
  if (metric == "accuracy")
    std::snprintf(buf, sizeof buf, percent_sign ? "%.2f%%" : "%.2f", 100 * v);
  else if (metric == "mae" || metric == "rmse")
    std::snprintf(buf, sizeof buf, "%.4g", v);
  else
    std::snprintf(buf, sizeof buf, "%.4f", v);
  return buf;
}

std::string shown_with_interval(const std::string& metric, double v, const tasks::Interval& in) {
  return shown(metric, v, true) + " [" + shown(metric, in.lo, false) + ", " + shown(metric, in.hi, false) +
         "]";
}

bool same_labels(const TaskResult& a, const TaskResult& b) {
  return a.kind == b.kind && a.labels == b.labels && a.class_names == b.class_names;
}

namespace {
bool comparable(const TaskResult& a, const TaskResult& b) {
  return same_labels(a, b) && a.resampled && b.resampled && a.resampled->rows == b.resampled->rows &&
         a.resampled->resamples() == b.resampled->resamples();
}
}  // namespace

std::vector<std::optional<Paired>> compare_with_best(const std::vector<TaskResult>& results) {
  std::vector<std::optional<Paired>> out(results.size());
  for (std::size_t i = 0; i < results.size(); ++i) {
    const TaskResult& r = results[i];
    if (!r.resampled || r.state != tasks::TaskState::kDone) continue;
    const std::string metric = compared_metric(r.kind);
    std::optional<std::size_t> best;
    for (std::size_t j = 0; j < results.size(); ++j) {
      if (results[j].state != tasks::TaskState::kDone || !comparable(r, results[j])) continue;
      if (!best ||
          tasks::metric_value(results[j].eval, metric) > tasks::metric_value(results[*best].eval, metric))
        best = j;
    }
    if (!best || *best == i) continue;
    const std::vector<double>* mine = r.resampled->find(metric);
    const std::vector<double>* theirs = results[*best].resampled->find(metric);
    if (!mine || !theirs) continue;
    out[i] = Paired{results[*best].name, metric,
                    tasks::metric_value(r.eval, metric) - tasks::metric_value(results[*best].eval, metric),
                    tasks::difference_interval(*mine, *theirs, r.interval_level), mine->size()};
  }
  return out;
}

std::string interval_lines(const std::vector<TaskResult>& results, const std::string& where) {
  const auto versus = compare_with_best(results);
  std::vector<std::vector<std::string>> rows;
  const TaskResult* any = nullptr;
  for (std::size_t i = 0; i < results.size(); ++i) {
    const TaskResult& r = results[i];
    if (!r.resampled || r.state != tasks::TaskState::kDone) continue;
    any = &r;
    std::vector<std::string> row{r.name};
    for (const auto& [metric, label] : shown_metrics(r.kind)) {
      const std::vector<double>* values = r.resampled->find(metric);
      if (!values) continue;
      const tasks::Interval in = tasks::percentile_interval(*values, r.interval_level);
      row.push_back(std::string(label) + " " +
                    shown_with_interval(metric, tasks::metric_value(r.eval, metric), in));
    }
    row.resize(3);
    if (const auto& v = versus[i]) {
      const PairedText said = paired_text(*v);
      row.push_back(said.difference + " vs " + v->other + said.interval + said.said);
    } else {
      const auto others = std::count_if(results.begin(), results.end(), [&](const TaskResult& o) {
        return &o != &r && o.state == tasks::TaskState::kDone && comparable(r, o);
      });
      if (others > 0) row.push_back("the best of " + std::to_string(others + 1) + " on its labels");
    }
    rows.push_back(std::move(row));
  }
  if (!any) return "";
  char level[32];
  std::snprintf(level, sizeof level, "%g%%", 100 * any->interval_level);
  return detail::str_cat("\n", level, " intervals on ", where, " (", any->resampled->resamples(),
                         " resamples of its ", any->resampled->rows,
                         " rows); each head against the best on the same labels, paired (accuracy in points; "
                         "multilabel: macro-F1; regression: R^2)\n") +
         aligned_columns(rows);
}

std::string regression_lines(const std::vector<TaskResult>& results, const std::string& where) {
  std::ostringstream o;
  char buf[512];
  for (const auto& t : results) {
    if (!t.eval.regression || t.state == tasks::TaskState::kFailed) continue;
    std::snprintf(buf, sizeof buf, "task '%s' (regression): MAE %.4g, RMSE %.4g, R^2 %.4f on %s\n",
                  t.name.c_str(), t.eval.regression->mae, t.eval.regression->rmse, t.eval.regression->r2,
                  where.c_str());
    o << buf;
  }
  return o.str();
}

namespace {
// The fused groups, then per head: its failure, its note, and an exported epoch other than
// the last.
std::string notes(const TrainReport& report) {
  std::ostringstream o;
  for (const auto& f : report.fused) o << "fused: " << f << "\n";
  for (const auto& f : report.not_fused) o << "not fused (slower fused here): " << f << "\n";
  for (const auto& t : report.tasks) {
    if (t.state == tasks::TaskState::kFailed) o << "task '" << t.name << "' FAILED at " << t.failure << "\n";
    if (!t.note.empty()) o << "task '" << t.name << "' " << t.note << "\n";
    if (t.state == tasks::TaskState::kDone && t.exported_epoch > 0 && t.exported_epoch != t.epochs)
      o << "task '" << t.name << "' exported epoch " << t.exported_epoch << " of " << t.epochs
        << " (its best on the validation split)\n";
  }
  return o.str();
}

// The run's totals: heads (a grid's members each), rows, features and times.
std::string totals_line(const TrainReport& report) {
  std::size_t heads = 0;
  for (const auto& t : report.tasks) heads += t.grid.empty() ? 1 : t.grid.size();
  char chosen[96] = "";
  if (report.validation_rows > 0)
    std::snprintf(chosen, sizeof chosen, "chosen on %lld validation rows, ",
                  static_cast<long long>(report.validation_rows));
  char buf[512];
  std::snprintf(
      buf, sizeof buf,
      "%zu head%s, %lld train rows x %lld features, %sevaluated on %lld rows; load %.2fs, train %.2fs", heads,
      heads == 1 ? "" : "s", static_cast<long long>(report.train_rows),
      static_cast<long long>(report.feature_dim), chosen, static_cast<long long>(report.eval_rows),
      report.load_seconds, report.train_seconds);
  std::string line = buf;
  // A resumed run's training before this process, as its checkpoint records it.
  if (!report.resumed_from.empty() && report.run_train_seconds > report.train_seconds + 0.005) {
    std::snprintf(buf, sizeof buf, " (%.2fs in all, with the training before it resumed)",
                  report.run_train_seconds);
    line += buf;
  }
  return line + "\n";
}
}  // namespace

std::string format_summary(const TrainReport& report) {
  const std::string where = "the eval split";
  return results_table(report) + grid_lines(report) + regression_lines(report.tasks, where) +
         calibration_lines(report.tasks, where, true) + interval_lines(report.tasks, where) +
         per_class_tables(report.tasks, where) + per_label_tables(report.tasks, where) + notes(report) +
         totals_line(report);
}

}  // namespace canopy::runners
