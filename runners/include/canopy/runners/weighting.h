// How the tasks' losses combine into the gradient that reaches a shared top
// (train.weighting; see docs/fine-tuning.md). Each task's loss is scaled by its weight for
// the step (the head's own gradient too, as a weighted total loss would scale it):
//   sum          every weight 1
//   static       task.<name>.loss_weight
//   uncertainty  Kendall et al. 2018: w = 1 / (2 exp(s)), s a learnable log-variance per task
//                trained on 0.5 exp(-s) L + 0.5 s (Adam, train.weighting_lr)
//   dwa          Liu et al. 2019: w = K softmax(r / 2), r = L(e-1) / L(e-2) from the epoch mean
//                losses; 1 for the first two epochs
//   famo         Liu et al. 2023: logits xi, z = softmax(xi), w = z / (c D), D = L - 0 + 1e-8,
//                c = sum z / D; xi steps (Adam, train.weighting_lr, weight decay 1e-3) on
//                delta = log D(before) - log D(after) through the softmax's Jacobian. The loss a
//                step is weighted by is the previous step's (a concurrent step learns every
//                loss and gradient in one pass), and "after" is the next step's batch
//   pcgrad       Yu et al. 2020: the per-task gradients at the top's output, each projected off
//                the others it conflicts with (negative dot product), in a seeded random order,
//                then summed; every weight 1 (heads are not fused under pcgrad)
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace canopy::runners {

enum class Weighting { kSum, kStatic, kUncertainty, kDwa, kFamo, kPcgrad };
Weighting parse_weighting(const std::string& name, const std::string& where);
const char* to_string(Weighting weighting);

// The formulas, on plain numbers.
std::vector<double> uncertainty_weights(const std::vector<double>& log_vars);
// d/ds of 0.5 exp(-s) L + 0.5 s.
std::vector<double> uncertainty_gradient(const std::vector<double>& log_vars,
                                         const std::vector<double>& losses);
std::vector<double> dwa_weights(const std::vector<double>& last, const std::vector<double>& before_last,
                                double temperature);
std::vector<double> famo_weights(const std::vector<double>& logits, const std::vector<double>& losses);
std::vector<double> famo_logits_gradient(const std::vector<double>& logits, const std::vector<double>& before,
                                         const std::vector<double>& after);
// PCGrad on flattened per-task gradients; orders[i]: the other tasks in the order task i is
// projected off them. Undefined gradients (tasks that did not train) take no part.
at::Tensor pcgrad(const std::vector<at::Tensor>& grads, const std::vector<std::vector<std::size_t>>& orders);

// One run's weighting: its state (log-variances, logits, loss history, optimiser moments)
// goes into the checkpoint, so a resumed run weights exactly as an uninterrupted one.
class LossWeighting {
 public:
  LossWeighting(Weighting kind, std::vector<double> static_weights, double lr, std::uint64_t seed);

  Weighting kind() const { return kind_; }
  // Whether the top needs each task's gradient apart (pcgrad) rather than their sum.
  bool per_task_gradients() const { return kind_ == Weighting::kPcgrad; }
  // Each task's loss weight for the coming step.
  std::vector<double> weights() const;
  // After a step: each task's loss (NaN where it did not train).
  void after_step(const std::vector<double>& losses);
  // At an epoch's end: each task's mean training loss (NaN where it did not train).
  void end_epoch(const std::vector<double>& mean_losses);
  // The gradient for the top from each task's (pcgrad: projected; others: summed).
  at::Tensor combine(const std::vector<at::Tensor>& grads, std::int64_t global_step) const;

  std::map<std::string, at::Tensor> state() const;
  void load_state(const std::map<std::string, at::Tensor>& state);

 private:
  void adam_step(std::vector<double>& x, const std::vector<double>& grad, double weight_decay);

  Weighting kind_;
  std::vector<double> static_;
  double lr_;
  std::uint64_t seed_;
  std::vector<double> params_;  // log-variances (uncertainty) or logits (famo)
  std::vector<double> m_, v_;   // Adam's moments
  double t_ = 0;                // Adam's step count
  std::vector<double> prev_losses_;
  std::vector<std::vector<double>> epoch_losses_;  // dwa: the last two epochs' means
};

}  // namespace canopy::runners
