#include "canopy/runners/metrics_sink.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"
#include "canopy/runners/tensorboard.h"

namespace canopy::runners {

namespace {
constexpr const char* kCsvHeader =
    "epoch,task,state,train_loss,eval_accuracy,eval_macro_f1,seconds,eval_mae,eval_rmse,eval_r2,"
    "eval_top5_accuracy";

// The eval metrics a head reports, by name (what eval_<name> and eval/<name> carry).
std::vector<std::pair<std::string, double>> eval_metrics(const tasks::EvalMetrics& m) {
  std::vector<std::pair<std::string, double>> out{{"accuracy", m.accuracy}, {"macro_f1", m.macro_f1}};
  if (m.mean_ap) out.emplace_back("mean_ap", *m.mean_ap);
  if (m.top5) out.emplace_back("top5_accuracy", *m.top5);
  if (m.nll) out.emplace_back("nll", *m.nll);
  if (m.ece) out.emplace_back("ece", *m.ece);
  if (m.regression) {
    out.emplace_back("mae", m.regression->mae);
    out.emplace_back("rmse", m.regression->rmse);
    out.emplace_back("r2", m.regression->r2);
  }
  return out;
}

std::int64_t epoch_of_row(const std::string& line, bool csv, const std::string& path, std::int64_t number) {
  if (csv) {
    char* end = nullptr;
    const long long epoch = std::strtoll(line.c_str(), &end, 10);
    CANOPY_CHECK(end != line.c_str() && *end == ',', DataError, "metrics file '", path, "' line ", number,
                 ": no epoch in '", line, "'");
    return epoch;
  }
  try {
    return nlohmann::json::parse(line).at("epoch").get<std::int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw DataError(detail::str_cat("metrics file '", path, "' line ", number, ": ", e.what()));
  }
}
}  // namespace

void truncate_metrics(const std::string& path, std::int64_t epochs, bool csv, const std::string& header) {
  if (!is_regular_file(path)) return;
  std::istringstream in(read_file(path));
  std::string out, line, pad;
  std::int64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.empty()) continue;
    if (csv && number == 1) {
      if (header.size() > line.size() && header.compare(0, line.size() + 1, line + ",") == 0) {
        pad.assign(static_cast<std::size_t>(std::count(
                       header.begin() + static_cast<std::ptrdiff_t>(line.size()), header.end(), ',')),
                   ',');
        line = header;
      }
      out += line + "\n";
    } else if (epoch_of_row(line, csv, path, number) <= epochs) {
      out += line + pad + "\n";
    }
  }
  write_file_atomic(path, out);
}

MetricsSink::MetricsSink(const std::string& out_dir, const std::vector<std::string>& task_names,
                         bool tensorboard, std::int64_t resume_epoch)
    : out_dir_(out_dir), names_(task_names) {
  const std::string jsonl_path = out_dir + "/metrics.jsonl", csv_path = out_dir + "/metrics.csv";
  const bool resume = resume_epoch >= 0;
  if (resume) {
    truncate_metrics(jsonl_path, resume_epoch, false);
    truncate_metrics(csv_path, resume_epoch, true, kCsvHeader);
  }
  const auto mode = resume ? std::ios::app : std::ios::trunc;
  jsonl_.open(jsonl_path, mode);
  csv_.open(csv_path, mode);
  CANOPY_CHECK(jsonl_ && csv_, IoError, "cannot write metrics in '", out_dir, "': ", describe_errno(errno));
  if (!resume || file_size(csv_path) == 0) {
    csv_ << kCsvHeader << "\n";
  }
  if (tensorboard) {
    for (const auto& name : names_)
      tensorboard_.push_back(std::make_unique<EventWriter>(out_dir + "/tensorboard/" + name));
  }
}

MetricsSink::~MetricsSink() = default;

void MetricsSink::record(std::int64_t epoch, std::size_t task, const HeadRun& run) {
  const auto named = eval_metrics(run.eval);
  nlohmann::ordered_json row{{"epoch", epoch + 1},
                             {"task", names_.at(task)},
                             {"state", state_name(run.state)},
                             {"train_loss", run.train_loss}};
  for (const auto& [name, value] : named) row["eval_" + name] = value;
  row["seconds"] = run.seconds;
  jsonl_ << row.dump() << "\n";
  csv_ << epoch + 1 << "," << csv_field(names_[task]) << "," << state_name(run.state) << "," << run.train_loss
       << "," << run.eval.accuracy << "," << run.eval.macro_f1 << "," << run.seconds;
  if (const auto& e = run.eval.regression) {
    csv_ << "," << e->mae << "," << e->rmse << "," << e->r2;
  } else {
    csv_ << ",,,";
  }
  csv_ << ",";
  if (run.eval.top5) csv_ << *run.eval.top5;
  csv_ << "\n";
  if (!tensorboard_.empty() && !run.failed()) {
    EventWriter& tb = *tensorboard_[task];
    tb.add_scalar("train/loss", static_cast<float>(run.train_loss), epoch + 1);
    for (const auto& [name, value] : named)
      tb.add_scalar("eval/" + name, static_cast<float>(value), epoch + 1);
    tb.flush();
  }
}

void MetricsSink::record_top(std::int64_t epoch, const TopEpoch& top, const std::vector<double>& weights) {
  nlohmann::ordered_json row{
      {"epoch", epoch + 1},
      {"task", "@trunk"},
      {"training", top.training},
      {"level", top.level.empty() ? nlohmann::ordered_json() : nlohmann::ordered_json(top.level)}};
  if (!top.rates.empty()) {
    nlohmann::ordered_json rates = nlohmann::ordered_json::object();
    for (const auto& [block, r] : top.rates)
      rates[block] = std::isfinite(r) ? nlohmann::ordered_json(r) : nullptr;
    row["change_rates"] = rates;
  }
  row["steps"] = top.steps;
  row["lr"] = top.lr;
  row["grad_norm"] = std::isfinite(top.grad_norm) ? nlohmann::ordered_json(top.grad_norm) : nullptr;
  row["clipped_steps"] = top.clipped;
  if (std::isfinite(top.score)) {
    row["validation_score"] = top.score;
    row["best_epoch"] = top.best_epoch;
  }
  nlohmann::ordered_json w = nlohmann::ordered_json::object();
  for (std::size_t i = 0; i < weights.size() && i < names_.size(); ++i) w[names_[i]] = weights[i];
  row["loss_weights"] = w;
  jsonl_ << row.dump() << "\n";
  if (tensorboard_.empty()) return;
  if (!top_tensorboard_) top_tensorboard_ = std::make_unique<EventWriter>(out_dir_ + "/tensorboard/@trunk");
  EventWriter& tb = *top_tensorboard_;
  tb.add_scalar("trunk/trainable_blocks", static_cast<float>(top.training.size()), epoch + 1);
  tb.add_scalar("trunk/lr", static_cast<float>(top.lr), epoch + 1);
  if (std::isfinite(top.grad_norm))
    tb.add_scalar("trunk/grad_norm", static_cast<float>(top.grad_norm), epoch + 1);
  if (top.steps > 0) {
    tb.add_scalar("trunk/clipped_fraction",
                  static_cast<float>(static_cast<double>(top.clipped) / static_cast<double>(top.steps)),
                  epoch + 1);
  }
  if (std::isfinite(top.score))
    tb.add_scalar("trunk/validation_score", static_cast<float>(top.score), epoch + 1);
  for (const auto& [block, r] : top.rates) {
    if (std::isfinite(r)) tb.add_scalar("trunk/change_rate/" + block, static_cast<float>(r), epoch + 1);
  }
  for (std::size_t i = 0; i < weights.size() && i < names_.size(); ++i) {
    tb.add_scalar("loss_weight/" + names_[i], static_cast<float>(weights[i]), epoch + 1);
  }
  tb.flush();
}

void MetricsSink::flush() {
  jsonl_.flush();
  csv_.flush();
  CANOPY_CHECK(jsonl_ && csv_, IoError, "writing metrics in '", out_dir_,
               "' failed: ", describe_errno(errno));
}

}  // namespace canopy::runners
