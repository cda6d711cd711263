// A head maps a batch of cached features [B, D] to outputs [B, K]. Heads are plain
// torch::nn modules with no task knowledge: the task owns labels, loss and metrics.
#pragma once

#include <map>
#include <memory>
#include <string>

#include <ATen/core/Generator.h>
#include <torch/nn/module.h>

namespace canopy::heads {

class Head : public torch::nn::Module {
 public:
  Head();
  virtual torch::Tensor forward(const torch::Tensor& features) = 0;
  // A one-line description of the architecture, e.g. "mlp 1280-256-10 relu dropout=0.1".
  virtual std::string describe() const = 0;
  // The head's options as config values (`head.<name>` keys), every one with defaults
  // included: what the head's card records, so the head can be rebuilt from the card alone.
  // The default (a head that does not say) is none; the card then keeps the config's values.
  virtual std::map<std::string, std::string> config_values() const { return {}; }

  // The head's own random generator, for dropout and anything else random in training.
  // Heads train concurrently: a shared global generator would make results depend on
  // thread timing. The task seeds it; checkpoints save and restore its state.
  at::Generator& rng() { return rng_; }
  void seed(std::uint64_t seed);

 private:
  at::Generator rng_;
};

using HeadPtr = std::shared_ptr<Head>;

}  // namespace canopy::heads
