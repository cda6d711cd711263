#include "canopy/tasks/fused_optimizer.h"

#include <memory>
#include <tuple>
#include <vector>

#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/utils.h>

namespace canopy::tasks {

namespace {
// What the fused kernels read as flat float arrays: a parameter, its gradient and its
// moments must all be dense, contiguous float32 CPU tensors of the same size.
bool flat(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided &&
         t.is_contiguous() && t.sizes() == like.sizes();
}

// What Adam and AdamW share: `Options` and `State` are their option and per-parameter state
// types, `fused` the kernel.
template <typename Options, typename State, typename Kernel>
bool step_fused(torch::optim::Optimizer& optimizer, std::unordered_map<void*, at::Tensor>& steps,
                Kernel fused) {
  for (auto& group : optimizer.param_groups()) {
    if (static_cast<const Options&>(group.options()).amsgrad()) return false;
    for (const auto& p : group.params()) {
      if (!flat(p, p) || (p.grad().defined() && !flat(p.grad(), p))) return false;
      const auto it = optimizer.state().find(p.unsafeGetTensorImpl());
      if (it == optimizer.state().end()) continue;
      const auto& s = static_cast<const State&>(*it->second);
      if (!flat(s.exp_avg(), p) || !flat(s.exp_avg_sq(), p)) return false;
    }
  }
  torch::NoGradGuard no_grad;
  auto& state = optimizer.state();
  for (auto& group : optimizer.param_groups()) {
    const auto& options = static_cast<const Options&>(group.options());
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, counts;
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      void* key = p.unsafeGetTensorImpl();
      auto it = state.find(key);
      if (it == state.end()) {
        // As the optimizer's own first step makes it.
        auto fresh = std::make_unique<State>();
        fresh->step(0);
        fresh->exp_avg(at::zeros_like(p, at::MemoryFormat::Preserve));
        fresh->exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
        it = state.emplace(key, std::move(fresh)).first;
      }
      auto& s = static_cast<State&>(*it->second);
      s.step(s.step() + 1);
      at::Tensor& count = steps[key];
      if (!count.defined()) count = at::scalar_tensor(0.0, at::kFloat);
      *count.data_ptr<float>() = static_cast<float>(s.step());
      params.push_back(p);
      grads.push_back(p.grad());
      exp_avgs.push_back(s.exp_avg());
      exp_avg_sqs.push_back(s.exp_avg_sq());
      counts.push_back(count);
    }
    if (params.empty()) continue;
    fused(params, grads, exp_avgs, exp_avg_sqs, counts, options.lr(), std::get<0>(options.betas()),
          std::get<1>(options.betas()), options.weight_decay(), options.eps());
  }
  return true;
}
}  // namespace

void FusedOptimizerStep::operator()(torch::optim::Optimizer& optimizer) {
  bool done = false;
  if (dynamic_cast<torch::optim::Adam*>(&optimizer)) {
    done = step_fused<torch::optim::AdamOptions, torch::optim::AdamParamState>(
        optimizer, steps_,
        [](auto& p, auto& g, auto& m, auto& v, auto& n, double lr, double b1, double b2, double wd,
           double eps) {
          at::_fused_adam_(p, g, m, v, {}, n, lr, b1, b2, wd, eps, /*amsgrad=*/false, /*maximize=*/false);
        });
  } else if (dynamic_cast<torch::optim::AdamW*>(&optimizer)) {
    done = step_fused<torch::optim::AdamWOptions, torch::optim::AdamWParamState>(
        optimizer, steps_,
        [](auto& p, auto& g, auto& m, auto& v, auto& n, double lr, double b1, double b2, double wd,
           double eps) {
          at::_fused_adamw_(p, g, m, v, {}, n, lr, b1, b2, wd, eps, /*amsgrad=*/false, /*maximize=*/false);
        });
  }
  if (!done) optimizer.step();
}

}  // namespace canopy::tasks
