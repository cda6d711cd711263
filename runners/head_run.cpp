#include "canopy/runners/head_run.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include <ATen/ops/from_blob.h>
#include <nlohmann/json.hpp>

#include "canopy/core/error.h"

namespace canopy::runners {

const char* state_name(tasks::TaskState state) {
  switch (state) {
    case tasks::TaskState::kTraining:
      return "training";
    case tasks::TaskState::kDone:
      return "done";
    case tasks::TaskState::kFailed:
      return "FAILED";
  }
  return "?";
}

namespace {
// Doubles travel as their bits: exact, and NaN (a step a head sat out) is not JSON.
std::uint64_t bits(double x) {
  std::uint64_t b = 0;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
double real(const nlohmann::json& j) {
  const auto b = j.get<std::uint64_t>();
  double x = 0;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
}  // namespace

std::string encode_run(const HeadRun& r) {
  nlohmann::json e{
      {"count", r.eval.count}, {"accuracy", bits(r.eval.accuracy)}, {"macro_f1", bits(r.eval.macro_f1)}};
  if (r.eval.confusion.defined()) {
    const at::Tensor c = r.eval.confusion.to(at::kLong).contiguous();
    e["confusion"] =
        std::vector<std::int64_t>(c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel());
    e["classes"] = c.size(0);
  }
  if (r.eval.mean_ap) e["mean_ap"] = bits(*r.eval.mean_ap);
  if (r.eval.top5) e["top5"] = bits(*r.eval.top5);
  if (r.eval.monitor != tasks::Monitor::kAuto) e["monitor"] = static_cast<int>(r.eval.monitor);
  if (r.eval.nll) e["nll"] = bits(*r.eval.nll);
  if (r.eval.ece) e["ece"] = bits(*r.eval.ece);
  if (const auto& g = r.eval.regression) e["regression"] = {bits(g->mae), bits(g->rmse), bits(g->r2)};
  const nlohmann::json j{{"state", static_cast<int>(r.state)},
                         {"failure", r.failure},
                         {"epochs", r.epochs},
                         {"train_loss", bits(r.train_loss)},
                         {"loss_sum", bits(r.loss_sum)},
                         {"loss_count", r.loss_count},
                         {"last_loss", bits(r.last_loss)},
                         {"seconds", bits(r.seconds)},
                         {"best_score", bits(r.best_score)},
                         {"best_epoch", r.best_epoch},
                         {"stop_note", r.stop_note},
                         {"eval", e}};
  return j.dump();
}

void decode_run(const std::string& text, HeadRun& r) {
  const auto j = nlohmann::json::parse(text);
  r.state = static_cast<tasks::TaskState>(j.at("state").get<int>());
  r.failure = j.at("failure").get<std::string>();
  r.epochs = j.at("epochs").get<std::int64_t>();
  r.train_loss = real(j.at("train_loss"));
  r.loss_sum = real(j.at("loss_sum"));
  r.loss_count = j.at("loss_count").get<std::int64_t>();
  r.last_loss = real(j.at("last_loss"));
  r.seconds = real(j.at("seconds"));
  r.best_score = real(j.at("best_score"));
  r.best_epoch = j.at("best_epoch").get<std::int64_t>();
  r.stop_note = j.at("stop_note").get<std::string>();
  const auto& e = j.at("eval");
  r.eval = tasks::EvalMetrics{};
  r.eval.count = e.at("count").get<std::int64_t>();
  r.eval.accuracy = real(e.at("accuracy"));
  r.eval.macro_f1 = real(e.at("macro_f1"));
  if (e.contains("confusion")) {
    auto values = e.at("confusion").get<std::vector<std::int64_t>>();
    const std::int64_t k = e.at("classes").get<std::int64_t>();
    r.eval.confusion = at::from_blob(values.data(), {k, k}, at::kLong).clone();
  }
  if (e.contains("mean_ap")) r.eval.mean_ap = real(e.at("mean_ap"));
  if (e.contains("top5")) r.eval.top5 = real(e.at("top5"));
  if (e.contains("monitor")) r.eval.monitor = static_cast<tasks::Monitor>(e.at("monitor").get<int>());
  if (e.contains("nll")) r.eval.nll = real(e.at("nll"));
  if (e.contains("ece")) r.eval.ece = real(e.at("ece"));
  if (e.contains("regression")) {
    const auto& g = e.at("regression");
    r.eval.regression = tasks::RegressionErrors{real(g.at(0)), real(g.at(1)), real(g.at(2))};
  }
}

void HeadRun::start_epoch() {
  loss_sum = 0.0;
  loss_count = 0;
}

void HeadRun::add_loss(double loss) {
  loss_sum += loss;
  ++loss_count;
  last_loss = loss;
}

void HeadRun::fail(std::int64_t epoch, std::int64_t step, const std::string& why) {
  state = tasks::TaskState::kFailed;
  failure = detail::str_cat("epoch ", epoch + 1, " step ", step + 1, ": ", why);
}

void HeadRun::fail_evaluation(std::int64_t epoch, const std::string& why) {
  state = tasks::TaskState::kFailed;
  failure = detail::str_cat("epoch ", epoch + 1, " evaluation: ", why);
}

bool HeadRun::finish_epoch(std::int64_t epoch, std::int64_t total, const tasks::EvalMetrics& metrics,
                           std::int64_t patience) {
  if (failed()) return false;
  epochs = epoch + 1;
  train_loss = loss_count ? loss_sum / static_cast<double>(loss_count) : 0.0;
  eval = metrics;
  const bool improved = eval.score() > best_score;
  if (improved) {
    best_score = eval.score();
    best_epoch = epochs;
  }
  if (epochs >= total) {
    state = tasks::TaskState::kDone;
  } else if (patience > 0 && epochs - best_epoch >= patience) {
    stop_early();  // the others go on
  }
  return improved;
}

void HeadRun::stop_early() {
  state = tasks::TaskState::kDone;
  char why[160];
  std::snprintf(why, sizeof why, "stopped early at epoch %lld (best %s %.4f at epoch %lld)",
                static_cast<long long>(epochs), eval.score_name(), eval.score_value(best_score),
                static_cast<long long>(best_epoch));
  stop_note = why;
}

bool HeadRun::go_on_to(std::int64_t total, std::int64_t patience) {
  if (state != tasks::TaskState::kDone || !stop_note.empty() || epochs >= total) return false;
  if (patience > 0 && epochs - best_epoch >= patience) {
    stop_early();
    return false;
  }
  state = tasks::TaskState::kTraining;
  return true;
}

void HeadRun::stop_by_halving(double score, std::size_t kept, std::size_t of) {
  state = tasks::TaskState::kDone;
  char why[200];
  std::snprintf(why, sizeof why, "%s at epoch %lld (%s %.4f; %zu of %zu went on)", kHalvingStop,
                static_cast<long long>(epochs), eval.score_name(), eval.score_value(score), kept, of);
  stop_note = why;
}

bool halving_cut_after(std::int64_t epochs, std::int64_t first, std::int64_t factor) {
  if (first <= 0 || epochs < first) return false;
  for (std::int64_t cut = first;; cut *= factor) {
    if (cut == epochs) return true;
    if (cut > epochs / factor) return false;  // the next cut is past `epochs` (and no overflow)
  }
}

std::size_t halving_keep(std::size_t n, std::int64_t factor) {
  return (n + static_cast<std::size_t>(factor) - 1) / static_cast<std::size_t>(factor);
}

std::vector<std::size_t> halving_stops(const std::vector<double>& scores, std::int64_t factor) {
  const std::size_t n = scores.size();
  const std::size_t keep = halving_keep(n, factor);
  std::vector<std::size_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = i;
  auto rank = [&](std::size_t i) { return std::isnan(scores[i]) ? -HUGE_VAL : scores[i]; };  // NaN last
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return rank(a) > rank(b); });
  std::vector<std::size_t> stops(order.begin() + static_cast<std::ptrdiff_t>(keep), order.end());
  std::sort(stops.begin(), stops.end());
  return stops;
}

}  // namespace canopy::runners
