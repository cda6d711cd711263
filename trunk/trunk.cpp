#include "canopy/trunk/trunk.h"


#include <c10/core/InferenceMode.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/script.h>  // torch::jit::freeze, optimize_for_inference

#include "canopy/core/device.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/progress.h"
#include "canopy/core/sha256.h"

namespace canopy::trunk {

struct Trunk::Impl {
  TrunkConfig config;
  std::string sha256;
  c10::Device device{c10::kCPU};
  torch::jit::Module module;  // as loaded: eval mode, requires_grad=false everywhere
  torch::jit::Module runner;  // what encode() runs: `module` or its frozen, optimised clone
};

void validate_trunk_config(const TrunkConfig& c) {
  CANOPY_CHECK(!c.path.empty(), ConfigError, "trunk.path is empty: give a TorchScript file");
  CANOPY_CHECK(c.pooling == "avg" || c.pooling == "flatten" || c.pooling == "none", ConfigError,
               "trunk.pooling: expected avg, flatten or none, got '", c.pooling, "'");
  CANOPY_CHECK(c.sha256.empty() || c.sha256.size() == 64, ConfigError,
               "trunk.sha256: expected 64 hex digits, got '", c.sha256, "' (", c.sha256.size(),
               " characters)");
}

std::string verified_trunk_sha256(const TrunkConfig& config) {
  CANOPY_CHECK(is_regular_file(config.path), DataError, "trunk file '", config.path,
               "' does not exist (run scripts/setup to export the default trunk)");
  const std::string sha = sha256_file(config.path);
  CANOPY_CHECK(config.sha256.empty() || sha == config.sha256, DataError, "trunk '", config.path,
               "' has SHA-256 ", sha, " but the config pins ", config.sha256, "; refusing to load it");
  return sha;
}

Trunk::Trunk(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Trunk::Trunk(Trunk&&) noexcept = default;
Trunk& Trunk::operator=(Trunk&&) noexcept = default;
Trunk::~Trunk() = default;

Trunk Trunk::load(const TrunkConfig& config) {
  validate_trunk_config(config);
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  // Hash before loading: the file is executable code and must be the one that was pinned.
  impl->sha256 = verified_trunk_sha256(config);
  if (config.sha256.empty()) {
    log_info("trunk '" + config.path + "' is not pinned; to pin it add: sha256 = " + impl->sha256);
  }
  impl->device = choose_device(config.device);
  try {
    impl->module = torch::jit::load(config.path, impl->device);
  } catch (const c10::Error& e) {
    throw DataError(detail::str_cat("cannot load trunk '", config.path,
                                    "' as TorchScript: ", e.what_without_backtrace()));
  }
  for (auto p : impl->module.parameters()) p.set_requires_grad(false);
  impl->module.eval();
  impl->runner = impl->module;
  if (config.optimize) {
    torch::jit::Module frozen = torch::jit::freeze(impl->module);
    impl->runner = torch::jit::optimize_for_inference(frozen);
  }
  return Trunk(std::move(impl));
}

at::Tensor Trunk::encode(const at::Tensor& batch) {
  CANOPY_CHECK(batch.dim() >= 1 && batch.size(0) > 0, DataError,
               "trunk input batch must be non-empty, got shape ", batch.sizes());
  c10::InferenceMode guard;
  at::Tensor out;
  try {
    out = impl_->runner.forward({batch.to(impl_->device, at::kFloat)}).toTensor();
  } catch (const c10::Error& e) {
    throw DataError(detail::str_cat("trunk '", impl_->config.path, "' failed on input of shape ",
                                    batch.sizes(), ": ", e.what_without_backtrace()));
  }
  const std::string& pooling = impl_->config.pooling;
  if (pooling == "avg") {
    CANOPY_CHECK(out.dim() >= 2, DataError, "trunk.pooling = avg needs output [N, C, ...], got ",
                 out.sizes());
    if (out.dim() > 2) out = out.flatten(2).mean(2);
  } else if (pooling == "flatten") {
    out = out.flatten(1);
  } else {
    CANOPY_CHECK(out.dim() == 2, DataError, "trunk.pooling = none needs output [N, D], got ",
                 out.sizes(), "; choose avg or flatten");
  }
  return out.to(c10::kCPU, at::kFloat).contiguous();
}

const std::string& Trunk::sha256() const { return impl_->sha256; }
const TrunkConfig& Trunk::config() const { return impl_->config; }
c10::Device Trunk::device() const { return impl_->device; }

std::vector<std::pair<std::string, at::Tensor>> Trunk::state_snapshot() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : impl_->module.named_parameters(true)) {
    out.emplace_back("param:" + p.name, p.value.detach().clone());
  }
  for (const auto& b : impl_->module.named_buffers(true)) {
    out.emplace_back("buffer:" + b.name, b.value.detach().clone());
  }
  return out;
}

std::pair<std::int64_t, std::int64_t> Trunk::parameter_counts() const {
  std::int64_t total = 0, trainable = 0;
  for (const auto& p : impl_->module.parameters(true)) {
    total += p.numel();
    if (p.requires_grad()) trainable += p.numel();
  }
  return {total, trainable};
}

}  // namespace canopy::trunk
