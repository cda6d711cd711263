#include "canopy/runners/weighting.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include <ATen/TensorOperators.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>

#include "canopy/core/error.h"
#include "canopy/core/tensor_values.h"

namespace canopy::runners {

namespace {
constexpr double kFamoEps = 1e-8;
constexpr double kFamoDecay = 1e-3;

std::vector<double> softmax(const std::vector<double>& x) {
  const double m = *std::max_element(x.begin(), x.end());
  std::vector<double> e(x.size());
  double sum = 0;
  for (std::size_t i = 0; i < x.size(); ++i) sum += e[i] = std::exp(x[i] - m);
  for (auto& v : e) v /= sum;
  return e;
}

at::Tensor to_tensor(const std::vector<double>& v) {
  return at::from_blob(const_cast<double*>(v.data()), {static_cast<std::int64_t>(v.size())}, at::kDouble)
      .clone();
}

}  // namespace

Weighting parse_weighting(const std::string& name, const std::string& where) {
  static const std::map<std::string, Weighting> kinds{
      {"sum", Weighting::kSum}, {"static", Weighting::kStatic}, {"uncertainty", Weighting::kUncertainty},
      {"dwa", Weighting::kDwa}, {"famo", Weighting::kFamo},     {"pcgrad", Weighting::kPcgrad}};
  const auto it = kinds.find(name);
  CANOPY_CHECK(it != kinds.end(), ConfigError, where,
               ": expected sum, static, uncertainty, dwa, famo or pcgrad, got '", name, "'");
  return it->second;
}

const char* to_string(Weighting w) {
  switch (w) {
    case Weighting::kSum:
      return "sum";
    case Weighting::kStatic:
      return "static";
    case Weighting::kUncertainty:
      return "uncertainty";
    case Weighting::kDwa:
      return "dwa";
    case Weighting::kFamo:
      return "famo";
    case Weighting::kPcgrad:
      return "pcgrad";
  }
  return "?";
}

std::vector<double> uncertainty_weights(const std::vector<double>& s) {
  std::vector<double> w(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) w[i] = 0.5 * std::exp(-s[i]);
  return w;
}

std::vector<double> uncertainty_gradient(const std::vector<double>& s, const std::vector<double>& losses) {
  std::vector<double> g(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) g[i] = -0.5 * std::exp(-s[i]) * losses[i] + 0.5;
  return g;
}

std::vector<double> dwa_weights(const std::vector<double>& last, const std::vector<double>& before_last,
                                double temperature) {
  std::vector<double> r(last.size());
  for (std::size_t i = 0; i < r.size(); ++i) r[i] = last[i] / before_last[i] / temperature;
  auto w = softmax(r);
  for (auto& v : w) v *= static_cast<double>(w.size());
  return w;
}

std::vector<double> famo_weights(const std::vector<double>& logits, const std::vector<double>& losses) {
  const auto z = softmax(logits);
  double c = 0;
  for (std::size_t i = 0; i < z.size(); ++i) c += z[i] / (losses[i] + kFamoEps);
  std::vector<double> w(z.size());
  for (std::size_t i = 0; i < z.size(); ++i) w[i] = z[i] / (c * (losses[i] + kFamoEps));
  return w;
}

std::vector<double> famo_logits_gradient(const std::vector<double>& logits, const std::vector<double>& before,
                                         const std::vector<double>& after) {
  const auto z = softmax(logits);
  std::vector<double> delta(z.size());
  for (std::size_t i = 0; i < z.size(); ++i)
    delta[i] = std::log(before[i] + kFamoEps) - std::log(after[i] + kFamoEps);
  double zd = 0;
  for (std::size_t i = 0; i < z.size(); ++i) zd += z[i] * delta[i];
  std::vector<double> g(z.size());
  for (std::size_t i = 0; i < z.size(); ++i) g[i] = z[i] * (delta[i] - zd);  // J_softmax^T delta
  return g;
}

at::Tensor pcgrad(const std::vector<at::Tensor>& grads, const std::vector<std::vector<std::size_t>>& orders) {
  at::Tensor total;
  for (std::size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) continue;
    at::Tensor g = grads[i].to(at::kDouble).flatten();
    for (std::size_t j : orders[i]) {
      if (j == i || !grads[j].defined()) continue;
      const at::Tensor other = grads[j].to(at::kDouble).flatten();
      const double dot = g.dot(other).item<double>();
      if (dot < 0) g = g - dot / other.dot(other).item<double>() * other;
    }
    total = total.defined() ? total + g : g;
  }
  for (const auto& g : grads) {
    if (g.defined()) return total.to(g.scalar_type()).reshape(g.sizes());
  }
  return total;
}

LossWeighting::LossWeighting(Weighting kind, std::vector<double> static_weights, double lr,
                             std::uint64_t seed)
    : kind_(kind), static_(std::move(static_weights)), lr_(lr), seed_(seed) {
  const std::size_t n = static_.size();
  if (kind_ == Weighting::kUncertainty || kind_ == Weighting::kFamo) {
    params_.assign(n, 0.0);
    m_.assign(n, 0.0);
    v_.assign(n, 0.0);
  }
}

std::vector<double> LossWeighting::weights() const {
  const std::size_t n = static_.size();
  switch (kind_) {
    case Weighting::kStatic:
      return static_;
    case Weighting::kUncertainty:
      return uncertainty_weights(params_);
    case Weighting::kDwa:
      if (epoch_losses_.size() < 2) return std::vector<double>(n, 1.0);
      return dwa_weights(epoch_losses_[1], epoch_losses_[0], 2.0);
    case Weighting::kFamo:
      if (prev_losses_.empty()) return std::vector<double>(n, 1.0 / static_cast<double>(n));
      return famo_weights(params_, prev_losses_);
    default:
      return std::vector<double>(n, 1.0);
  }
}

void LossWeighting::adam_step(std::vector<double>& x, const std::vector<double>& grad, double weight_decay) {
  constexpr double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  t_ += 1;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double g = grad[i] + weight_decay * x[i];
    m_[i] = b1 * m_[i] + (1 - b1) * g;
    v_[i] = b2 * v_[i] + (1 - b2) * g * g;
    const double mh = m_[i] / (1 - std::pow(b1, t_)), vh = v_[i] / (1 - std::pow(b2, t_));
    x[i] -= lr_ * mh / (std::sqrt(vh) + eps);
  }
}

void LossWeighting::after_step(const std::vector<double>& losses) {
  // A task that did not train this step (failed, or done) keeps its last loss.
  std::vector<double> l = losses;
  for (std::size_t i = 0; i < l.size(); ++i) {
    if (!std::isfinite(l[i])) l[i] = prev_losses_.empty() ? 1.0 : prev_losses_[i];
  }
  if (kind_ == Weighting::kUncertainty) adam_step(params_, uncertainty_gradient(params_, l), 0.0);
  if (kind_ == Weighting::kFamo && !prev_losses_.empty()) {
    adam_step(params_, famo_logits_gradient(params_, prev_losses_, l), kFamoDecay);
  }
  prev_losses_ = std::move(l);
}

void LossWeighting::end_epoch(const std::vector<double>& mean_losses) {
  if (kind_ != Weighting::kDwa) return;
  std::vector<double> l = mean_losses;
  for (std::size_t i = 0; i < l.size(); ++i) {
    if (!std::isfinite(l[i]) || l[i] <= 0) l[i] = epoch_losses_.empty() ? 1.0 : epoch_losses_.back()[i];
  }
  epoch_losses_.push_back(std::move(l));
  if (epoch_losses_.size() > 2) epoch_losses_.erase(epoch_losses_.begin());
}

at::Tensor LossWeighting::combine(const std::vector<at::Tensor>& grads, std::int64_t global_step) const {
  if (kind_ != Weighting::kPcgrad) {
    at::Tensor total;
    for (const auto& g : grads) {
      if (g.defined()) total = total.defined() ? total + g : g;
    }
    return total;
  }
  // The order each task is projected in depends only on (seed, step): a resumed run agrees.
  std::mt19937_64 rng(seed_ * 0x9E3779B97F4A7C15ULL + static_cast<std::uint64_t>(global_step));
  std::vector<std::vector<std::size_t>> orders(grads.size());
  for (auto& o : orders) {
    o.resize(grads.size());
    std::iota(o.begin(), o.end(), 0);
    for (std::size_t k = o.size(); k > 1; --k) std::swap(o[k - 1], o[rng() % k]);
  }
  return pcgrad(grads, orders);
}

std::map<std::string, at::Tensor> LossWeighting::state() const {
  std::map<std::string, at::Tensor> s;
  s["params"] = to_tensor(params_);
  s["m"] = to_tensor(m_);
  s["v"] = to_tensor(v_);
  s["t"] = to_tensor({t_});
  s["prev_losses"] = to_tensor(prev_losses_);
  std::vector<double> flat;
  for (const auto& e : epoch_losses_) flat.insert(flat.end(), e.begin(), e.end());
  s["epoch_losses"] = to_tensor(flat);
  return s;
}

void LossWeighting::load_state(const std::map<std::string, at::Tensor>& s) {
  const auto get = [&](const char* k) {
    const auto it = s.find(k);
    CANOPY_CHECK(it != s.end(), DataError, "the checkpoint's weighting state has no '", k, "'");
    return tensor_values(it->second);
  };
  params_ = get("params");
  m_ = get("m");
  v_ = get("v");
  t_ = get("t").at(0);
  prev_losses_ = get("prev_losses");
  const auto flat = get("epoch_losses");
  const std::size_t n = static_.size();
  epoch_losses_.clear();
  for (std::size_t i = 0; n && i + n <= flat.size(); i += n)
    epoch_losses_.emplace_back(flat.begin() + i, flat.begin() + i + n);
  CANOPY_CHECK(params_.size() == m_.size() && (prev_losses_.empty() || prev_losses_.size() == n), DataError,
               "the checkpoint's weighting state is for ", prev_losses_.size(), " tasks, this run has ", n);
}

}  // namespace canopy::runners
