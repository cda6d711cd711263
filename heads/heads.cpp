#include <sstream>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/TensorOperators.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/any.h>
#include <mutex>

#include "canopy/core/error.h"
#include "canopy/heads/dropout.h"
#include "canopy/heads/linear.h"
#include "canopy/heads/mlp.h"

namespace canopy::heads {

Head::Head() : rng_(at::detail::createCPUGenerator(0)) {}

void Head::seed(std::uint64_t seed) {
  std::lock_guard<std::mutex> lock(rng_.mutex());
  rng_.set_current_seed(seed);
}

namespace {
// Inverted dropout keyed by the head's own generator (canopy/heads/dropout.h).
class SeededDropoutImpl : public torch::nn::Module {
 public:
  SeededDropoutImpl(double p, at::Generator rng)
      : p_(p), rng_(std::move(rng)) {}  // shares the head's generator
  torch::Tensor forward(const torch::Tensor& x) {
    if (!is_training() || p_ == 0.0) return x;
    return hashed_dropout(x, p_, rng_);
  }

 private:
  double p_;
  at::Generator rng_;
};
TORCH_MODULE(SeededDropout);
}  // namespace

LinearHead::LinearHead(const LinearHeadOptions& options) : options_(options) {
  CANOPY_CHECK(options.in_features() > 0 && options.out_features() > 0, ConfigError,
               "linear head: in_features and out_features must be > 0, got ", options.in_features(), " and ",
               options.out_features());
  linear_ = register_module(
      "linear",
      torch::nn::Linear(
          torch::nn::LinearOptions(options.in_features(), options.out_features()).bias(options.bias())));
}

torch::Tensor LinearHead::forward(const torch::Tensor& features) { return linear_->forward(features); }

std::map<std::string, std::string> LinearHead::config_values() const {
  return {{"bias", options_.bias() ? "true" : "false"}};
}

std::string LinearHead::describe() const {
  std::ostringstream out;
  out << "linear " << options_.in_features() << "-" << options_.out_features();
  return out.str();
}

void validate_mlp_options(const MlpHeadOptions& o) {
  CANOPY_CHECK(o.in_features() > 0 && o.out_features() > 0, ConfigError,
               "mlp head: in_features and out_features must be > 0, got ", o.in_features(), " and ",
               o.out_features());
  CANOPY_CHECK(!o.hidden().empty(), ConfigError,
               "mlp head: hidden must list at least one layer size (use head = linear for none)");
  for (auto h : o.hidden()) {
    CANOPY_CHECK(h > 0, ConfigError, "mlp head: every hidden size must be > 0, got ", h);
  }
  const auto& a = o.activation();
  CANOPY_CHECK(a == "relu" || a == "gelu" || a == "tanh" || a == "silu", ConfigError,
               "mlp head: activation must be relu, gelu, tanh or silu, got '", a, "'");
  CANOPY_CHECK(o.dropout() >= 0.0 && o.dropout() < 1.0, ConfigError,
               "mlp head: dropout must be in [0, 1), got ", o.dropout());
}

MlpHead::MlpHead(const MlpHeadOptions& options) : options_(options) {
  validate_mlp_options(options);
  torch::nn::Sequential seq;
  std::int64_t in = options.in_features();
  for (auto h : options.hidden()) {
    seq->push_back(torch::nn::Linear(in, h));
    const auto& a = options.activation();
    if (a == "relu")
      seq->push_back(torch::nn::ReLU());
    else if (a == "gelu")
      seq->push_back(torch::nn::GELU());
    else if (a == "tanh")
      seq->push_back(torch::nn::Tanh());
    else
      seq->push_back(torch::nn::SiLU());
    if (options.dropout() > 0) seq->push_back(SeededDropout(options.dropout(), rng()));
    in = h;
  }
  seq->push_back(torch::nn::Linear(in, options.out_features()));
  layers_ = register_module("layers", seq);
}

torch::Tensor MlpHead::forward(const torch::Tensor& features) { return layers_->forward(features); }

torch::nn::Linear MlpHead::first() const { return torch::nn::Linear(layers_->ptr<torch::nn::LinearImpl>(0)); }

torch::Tensor MlpHead::forward_after_first(torch::Tensor x) {
  for (auto it = layers_->begin() + 1; it != layers_->end(); ++it) x = it->forward(x);
  return x;
}

std::map<std::string, std::string> MlpHead::config_values() const {
  std::string hidden;
  for (auto h : options_.hidden()) hidden += (hidden.empty() ? "" : ",") + std::to_string(h);
  std::ostringstream dropout;
  dropout << options_.dropout();
  return {{"hidden", hidden}, {"activation", options_.activation()}, {"dropout", dropout.str()}};
}

std::string MlpHead::describe() const {
  std::ostringstream out;
  out << "mlp " << options_.in_features();
  for (auto h : options_.hidden()) out << "-" << h;
  out << "-" << options_.out_features() << " " << options_.activation();
  if (options_.dropout() > 0) out << " dropout=" << options_.dropout();
  return out.str();
}

}  // namespace canopy::heads
