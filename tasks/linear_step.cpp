#include "canopy/tasks/linear_step.h"

#include <cmath>
#include <limits>
#include <typeinfo>

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "canopy/core/error.h"
#include "canopy/heads/fused.h"
#include "canopy/heads/linear.h"
#include "canopy/tasks/task.h"

namespace canopy::tasks {

namespace {
const heads::LinearHead* linear_head(const Task& t) {
  const heads::Head& h = t.head();
  return typeid(h) == typeid(heads::LinearHead) ? static_cast<const heads::LinearHead*>(&h) : nullptr;
}

bool flat_float(const at::Tensor& t) {
  return t.defined() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu();
}

// Adds `g` to the parameter's gradient, or sets it when there is none: rows of the step's one
// gradient product, contiguous, so the fused optimizer step takes them as they are; detached,
// so that they are not an autograd view (the optimizer's zero_grad detaches gradients in
// place, which a view refuses).
void add_grad(const at::Tensor& param, const at::Tensor& g) {
  at::Tensor& grad = param.mutable_grad();
  if (grad.defined()) {
    grad.add_(g);
  } else {
    grad = g.detach();
  }
}
}  // namespace

bool takes_linear_softmax_step(const std::vector<Task*>& tasks, const at::Tensor& features) {
  if (tasks.empty() || !features.defined() || features.requires_grad() || features.dim() != 2 ||
      features.scalar_type() != at::kFloat || !features.device().is_cpu()) {
    return false;
  }
  const heads::LinearHead* lead = linear_head(*tasks.front());
  for (const Task* t : tasks) {
    const heads::LinearHead* h = linear_head(*t);
    if (!h || t->regression() || t->multilabel() || h->options().in_features() != features.size(1) ||
        h->options().bias() != lead->options().bias() || !h->linear()->weight.device().is_cpu() ||
        h->linear()->weight.scalar_type() != at::kFloat) {
      return false;
    }
  }
  return true;
}

double softmax_cross_entropy_cb(const at::Tensor& logits, const at::Tensor& targets,
                                const at::Tensor& class_weights, double label_smoothing, double scale,
                                const at::Tensor& grad) {
  CANOPY_CHECK(logits.dim() == 2 && flat_float(logits) && grad.sizes() == logits.sizes() && flat_float(grad),
               Error,
               "softmax_cross_entropy_cb: logits and grad must be float [C, B] contiguous CPU tensors, got ",
               logits.sizes(), " and ", grad.sizes());
  const std::int64_t classes = logits.size(0), batch = logits.size(1);
  CANOPY_CHECK(targets.dim() == 1 && targets.size(0) == batch && targets.scalar_type() == at::kLong &&
                   targets.is_contiguous() && targets.device().is_cpu(),
               Error, "softmax_cross_entropy_cb: targets must be int64 [", batch, "], got ", targets.sizes(),
               " ", targets.scalar_type());
  CANOPY_CHECK(!class_weights.defined() || (flat_float(class_weights) && class_weights.numel() == classes),
               Error, "softmax_cross_entropy_cb: ", class_weights.numel(), " class weights for ", classes,
               " classes");
  const float* z = logits.data_ptr<float>();
  float* g = grad.data_ptr<float>();
  const std::int64_t* t = targets.data_ptr<std::int64_t>();
  const float* w = class_weights.defined() ? class_weights.data_ptr<float>() : nullptr;
  for (std::int64_t j = 0; j < batch; ++j) {
    CANOPY_CHECK(t[j] >= 0 && t[j] < classes, DataError, "class index ", t[j], " is out of range for ",
                 classes, " classes");
  }
  // Rows are classes and columns samples: every loop runs along a row, across the batch.
  std::vector<float> top(static_cast<std::size_t>(batch), -std::numeric_limits<float>::infinity());
  std::vector<float> sum(static_cast<std::size_t>(batch), 0.0f);
  for (std::int64_t c = 0; c < classes; ++c) {
    const float* row = z + c * batch;
    // Written so that a NaN logit makes the column's maximum NaN (std::max would skip it).
    for (std::int64_t j = 0; j < batch; ++j) top[j] = row[j] > top[j] || std::isnan(row[j]) ? row[j] : top[j];
  }
  for (std::int64_t c = 0; c < classes; ++c) {
    const float* row = z + c * batch;
    float* out = g + c * batch;
    for (std::int64_t j = 0; j < batch; ++j) {
      out[j] = std::exp(row[j] - top[j]);
      sum[j] += out[j];
    }
  }
  const double e = label_smoothing;
  double weight_sum = 0.0;  // the sum of every class's weight
  for (std::int64_t c = 0; c < classes; ++c) weight_sum += w ? w[c] : 1.0;
  // loss = [(1 - e) sum_j w_t(j) (lse_j - z_t(j),j) + e / C sum_j sum_c w_c (lse_j - z_c,j)] / sum_j w_t(j)
  double total = 0.0, norm = 0.0;
  std::vector<double> lse(static_cast<std::size_t>(batch));
  for (std::int64_t j = 0; j < batch; ++j) {
    const double wt = w ? w[t[j]] : 1.0;
    lse[j] = static_cast<double>(top[j]) + std::log(static_cast<double>(sum[j]));
    total += (1.0 - e) * wt * (lse[j] - z[t[j] * batch + j]);
    norm += wt;
  }
  if (e != 0.0) {
    double smooth = 0.0;
    for (std::int64_t c = 0; c < classes; ++c) {
      const float* row = z + c * batch;
      const double wc = w ? w[c] : 1.0;
      for (std::int64_t j = 0; j < batch; ++j) smooth += wc * (lse[j] - row[j]);
    }
    total += e / static_cast<double>(classes) * smooth;
  }
  // d loss / d z_c,j = [(1 - e) w_t(j) (p_c,j - [c = t(j)]) + e / C (p_c,j sum_k w_k - w_c)] / norm,
  // written as p_c,j a_j - [c = t(j)] b_j - w_c k.
  const double s = scale / norm;
  const double k = s * e / static_cast<double>(classes);
  std::vector<float> a(static_cast<std::size_t>(batch)), b(static_cast<std::size_t>(batch));
  for (std::int64_t j = 0; j < batch; ++j) {
    const double wt = w ? w[t[j]] : 1.0;
    b[j] = static_cast<float>(s * (1.0 - e) * wt);
    a[j] = static_cast<float>((s * (1.0 - e) * wt + k * weight_sum) / sum[j]);
  }
  for (std::int64_t c = 0; c < classes; ++c) {
    float* out = g + c * batch;
    const float shift = static_cast<float>(k * (w ? w[c] : 1.0));
    for (std::int64_t j = 0; j < batch; ++j) out[j] = out[j] * a[j] - shift;
  }
  for (std::int64_t j = 0; j < batch; ++j) g[t[j] * batch + j] -= b[j];
  return total / norm;
}

std::vector<double> linear_softmax_gradients(const std::vector<Task*>& tasks, const at::Tensor& features,
                                             const std::vector<at::Tensor>& targets) {
  CANOPY_CHECK(tasks.size() == targets.size(), Error, tasks.size(), " tasks but ", targets.size(),
               " targets");
  CANOPY_CHECK(
      takes_linear_softmax_step(tasks, features), Error,
      "linear_softmax_gradients: the tasks are not all linear classification heads over these features");
  std::vector<heads::Head*> heads;
  for (Task* t : tasks) {
    t->begin_step();
    heads.push_back(&t->head());
  }
  const torch::NoGradGuard no_grad;
  // Every member's logits are a [C_i, B] block of one [sum C_i, B] product (transposed views).
  const std::vector<at::Tensor> outputs = heads::fused_forward(heads, features);
  std::int64_t rows = 0;
  for (const auto& o : outputs) rows += o.size(1);
  const at::Tensor grad = at::empty({rows, features.size(0)}, features.options());
  std::vector<double> values(tasks.size());
  std::int64_t at_row = 0;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const std::int64_t classes = outputs[i].size(1);
    values[i] = softmax_cross_entropy_cb(outputs[i].t(), targets[i].contiguous(), tasks[i]->class_weights(),
                                         tasks[i]->config().label_smoothing, tasks[i]->loss_weight(),
                                         grad.slice(0, at_row, at_row + classes));
    at_row += classes;
  }
  // Each head's rows of the weight gradients depend on its own rows of `grad` only.
  const at::Tensor weight_grad = at::mm(grad, features);
  const bool bias = static_cast<const heads::LinearHead&>(*heads.front()).options().bias();
  const at::Tensor bias_grad = bias ? at::sum(grad, {1}) : at::Tensor();
  at_row = 0;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const std::int64_t classes = outputs[i].size(1);
    if (std::isfinite(values[i])) {
      const auto& linear = static_cast<const heads::LinearHead&>(*heads[i]).linear();
      add_grad(linear->weight, weight_grad.slice(0, at_row, at_row + classes));
      if (bias) add_grad(linear->bias, bias_grad.slice(0, at_row, at_row + classes));
    }
    at_row += classes;
  }
  return values;
}

std::vector<double> linear_softmax_step(const std::vector<Task*>& tasks, const at::Tensor& features,
                                        const std::vector<at::Tensor>& targets,
                                        std::vector<std::string>* failures) {
  const std::vector<double> values = linear_softmax_gradients(tasks, features, targets);
  if (failures) {
    bool failed = false;
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      if (!std::isfinite(values[i])) {
        (*failures)[i] = detail::str_cat("loss is ", values[i]);
      } else if (!tasks[i]->gradients_finite()) {
        (*failures)[i] = detail::str_cat("gradient is not finite (loss ", values[i], ")");
      }
      failed = failed || !(*failures)[i].empty();
    }
    if (failed) return values;
  }
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    if (std::isfinite(values[i])) tasks[i]->finish_step();
  }
  return values;
}

}  // namespace canopy::tasks
