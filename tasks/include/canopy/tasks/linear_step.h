// Training steps of linear classification heads without autograd.
//
// A linear head under cross-entropy has a gradient that needs no graph: with logits
// z = W x + b and p = softmax(z), the loss's gradient w.r.t. z is p minus the target
// distribution, scaled by the batch's (weighted) size, and W's gradient is that times x. For
// the heads canopy trains most (linear probes of a few classes over cached features) the
// step's arithmetic is two small matrix products, and recording and replaying autograd's
// graph around them (the concatenation, log-softmax, NLL, their backward functions, the
// gradient buffers) cost as much again as the products' remainder: a group of 4 linear
// heads of 1280 x 10 at batch 256 on one thread took 0.85 ms per forward and backward
// through autograd, 0.60 ms this way, of which 0.57 ms are the two products
// (docs/performance.md).
//
// linear_softmax_step is fused_train_step's and Task::train_step's path for such heads: the
// same forward (heads::fused_forward), the loss and its gradient w.r.t. the logits in one
// pass per head, one product for all the heads' weight gradients, each head's optimizer
// step. Everything else (MLP heads, other losses, a shared top's output that needs its own
// gradient, a GPU) keeps autograd.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace canopy::tasks {

class Task;

// Whether `tasks` step through linear_softmax_step: every head a built-in linear head (not a
// subclass) of the same input width, all with a bias or none; every task single-label
// classification; `features` a float [B, D] tensor on the CPU that does not require grad.
bool takes_linear_softmax_step(const std::vector<Task*>& tasks, const at::Tensor& features);

// The forward and backward halves of a step: begins each task's step, returns each task's loss
// (unweighted) and sets the gradients of the heads whose loss is finite; no optimizer step.
std::vector<double> linear_softmax_gradients(const std::vector<Task*>& tasks, const at::Tensor& features,
                                             const std::vector<at::Tensor>& targets);

// One step of `tasks` on `features` with `targets` (class indices [B], one tensor per task),
// as fused_train_step does it: returns each task's loss (unweighted); a task whose loss is
// not finite does not step, and with `failures` (one entry per task) it is named there and
// no task steps.
std::vector<double> linear_softmax_step(const std::vector<Task*>& tasks, const at::Tensor& features,
                                        const std::vector<at::Tensor>& targets,
                                        std::vector<std::string>* failures);

// The cross-entropy of `logits` laid out [C, B] (a class per row; float, contiguous) against
// `targets` (int64 [B]) as LibTorch's cross_entropy computes it: the mean over the batch, or
// with `class_weights` ([C], or undefined) the mean weighted by each row's target class, and
// with `label_smoothing` e the target (1 - e) on the class and e / C spread over all classes.
// Writes the loss's gradient w.r.t. the logits, times `scale`, to `grad` ([C, B], float,
// contiguous) and returns the loss. A class index outside [0, C) is a DataError.
double softmax_cross_entropy_cb(const at::Tensor& logits, const at::Tensor& targets,
                                const at::Tensor& class_weights, double label_smoothing, double scale,
                                const at::Tensor& grad);

}  // namespace canopy::tasks
