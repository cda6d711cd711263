#include "canopy/runners/shared_top.h"

#include <cmath>
#include <mutex>
#include <sstream>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"

namespace canopy::runners {

namespace {

bool all_finite(const at::Tensor& t) { return t.isfinite().all().item<bool>(); }

}  // namespace

SharedTop::SharedTop(trunk::Trunk trunk, const TopConfig& config, const datasets::CacheMeta& meta,
                     double default_lr)
    : trunk_(std::move(trunk)), config_(config), parts_(meta.row_parts) {
  trunk_.check_cacheable();
  const trunk::TopSplit& split = trunk_.split();
  CANOPY_CHECK(split.tunes && split.boundary == meta.boundary, ConfigError, "the cache holds the output of ",
               meta.boundary, " but trunk.freeze cuts the trunk at ",
               split.tunes ? split.boundary : std::string("nothing (fully frozen)"),
               "; run `canopy cache` with this config");
  CANOPY_CHECK(parts_.size() == 1 + split.top_inputs.size(), DataError, "the cache's rows hold ",
               parts_.size(), " part(s) but the top reads ", 1 + split.top_inputs.size());
  if (config_.lr == 0.0) config_.lr = 0.1 * default_lr;
  // One group per top block, the top-most first at config.lr, each further down / lr_decay.
  std::vector<std::vector<at::Tensor>> groups;
  const auto& blocks = split.top_blocks;
  for (std::size_t d = 0; d < blocks.size(); ++d) {
    const auto named = trunk_.trainable_parameters(blocks[blocks.size() - 1 - d]);
    if (named.empty()) continue;
    std::vector<at::Tensor> ps;
    for (const auto& [name, p] : named) {
      params_.emplace_back(name, p);
      ps.push_back(p);
    }
    groups.push_back(std::move(ps));
    base_lrs_.push_back(config_.lr / std::pow(config_.lr_decay, static_cast<double>(d)));
  }
  std::int64_t counted = 0;
  for (const auto& p : params_) counted += p.second.numel();
  CANOPY_CHECK(counted == trunk_.parameter_counts().second, ConfigError, "the trunk has ",
               trunk_.parameter_counts().second, " trainable parameters, ", counted,
               " of them in the top's blocks (", join(blocks, ", "),
               "): trainable parameters outside the trunk's blocks cannot train over a cache");
  optimizer_ = tasks::make_optimizer(config_.optimizer, groups, config_.lr, config_.weight_decay, 0.9);
  start_epoch(0, 1);  // each group's own rate
  feature_dim_ = forward(at::zeros({1, meta.feature_dim}, at::kFloat), false).size(1);
}

SharedTop::~SharedTop() = default;

std::vector<at::Tensor> SharedTop::unpack(const at::Tensor& rows) const {
  const at::Tensor x = rows.to(at::kFloat);
  std::vector<at::Tensor> parts;
  std::int64_t at = 0;
  for (const auto& p : parts_) {
    std::vector<std::int64_t> shape{x.size(0)};
    shape.insert(shape.end(), p.shape.begin(), p.shape.end());
    parts.push_back(x.slice(1, at, at + p.numel()).reshape(shape));
    at += p.numel();
  }
  CANOPY_CHECK(at == x.size(1), DataError, "cached rows hold ", x.size(1), " values, the layout ", at);
  // Texts: positions past the longest mask in the batch change nothing; leave them out.
  if (parts.size() >= 2 && parts[1].dim() == 2 && parts[0].dim() >= 2 &&
      parts[0].size(1) == parts[1].size(1)) {
    const at::Tensor used = parts[1].ne(0).any(0).nonzero();
    const std::int64_t len = used.numel() ? used.max().item<std::int64_t>() + 1 : 1;
    parts[0] = parts[0].slice(1, 0, len);
    parts[1] = parts[1].slice(1, 0, len);
  }
  return parts;
}

at::Tensor SharedTop::forward(const at::Tensor& rows, bool training) {
  // The graph executor's profiling passes could swap in other kernels after a few runs; a
  // resumed run must compute what an uninterrupted one did.
  torch::jit::GraphOptimizerEnabledGuard plain(false);
  trunk_.train(training);
  const auto parts = unpack(rows);
  if (training) return trunk_.top_features(parts).to(c10::kCPU);
  c10::NoGradGuard no_grad;
  return trunk_.top_features(parts).to(c10::kCPU);
}

at::Tensor SharedTop::features(const at::Tensor& rows, std::int64_t batch) {
  std::vector<at::Tensor> out;
  for (std::int64_t i = 0; i < rows.size(0); i += batch) {
    out.push_back(forward(rows.slice(0, i, std::min(rows.size(0), i + batch)), false));
  }
  return out.empty() ? at::empty({0, feature_dim_}, at::kFloat) : at::cat(out, 0).contiguous();
}

void SharedTop::step(const at::Tensor& z, const at::Tensor& grad) {
  torch::jit::GraphOptimizerEnabledGuard plain(false);
  optimizer_->zero_grad();
  torch::autograd::backward({z}, {grad.to(z.device())});
  for (const auto& [name, p] : params_) {
    CANOPY_CHECK(!p.grad().defined() || all_finite(p.grad()), Error,
                 "the shared top's gradient is not finite in ", name,
                 " (every head's own gradient was finite)");
  }
  optimizer_->step();
  for (const auto& [name, p] : params_) {
    CANOPY_CHECK(all_finite(p), Error, "the shared top's weights are not finite after the step (", name,
                 "); lower trunk.lr");
  }
}

void SharedTop::start_epoch(std::int64_t epoch, std::int64_t total) {
  // Constant or cosine (validate_job_config refuses step for the top).
  const double factor = tasks::lr_factor(config_.schedule, epoch, total, 1, 1.0);
  auto& groups = optimizer_->param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) groups[g].options().set_lr(base_lrs_[g] * factor);
}

std::string SharedTop::describe() const {
  std::int64_t n = 0;
  for (const auto& p : params_) n += p.second.numel();
  std::ostringstream o;
  o << join(blocks(), ", ") << " (" << n << " parameters; " << tasks::to_string(config_.optimizer) << " lr "
    << config_.lr << " for the top block";
  if (base_lrs_.size() > 1) o << ", / " << config_.lr_decay << " per block down";
  o << ")";
  return o.str();
}

void SharedTop::save_checkpoint(const std::string& path) const {
  torch::serialize::OutputArchive archive;
  for (const auto& [name, p] : params_) archive.write("param:" + name, p.detach());
  torch::serialize::OutputArchive opt;
  optimizer_->save(opt);
  archive.write("canopy.optimizer", opt);
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    archive.write("canopy.default_rng", gen.get_state());
  }
  std::ostringstream bytes;
  archive.save_to(bytes);
  write_file_atomic(path, bytes.str());
}

void SharedTop::load_checkpoint(const std::string& path) {
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
    c10::NoGradGuard no_grad;
    for (auto& [name, p] : params_) {
      at::Tensor saved;
      archive.read("param:" + name, saved);
      CANOPY_CHECK(saved.sizes() == p.sizes(), DataError, "checkpoint '", path, "': ", name, " has shape ",
                   saved.sizes(), ", the trunk's ", p.sizes());
      p.copy_(saved);
    }
    torch::serialize::InputArchive opt;
    archive.read("canopy.optimizer", opt);
    optimizer_->load(opt);
    at::Tensor rng;
    archive.read("canopy.default_rng", rng);
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(rng);
  } catch (const c10::Error& e) {
    throw DataError(
        detail::str_cat("cannot restore the shared top from '", path, "': ", e.what_without_backtrace()));
  }
}

std::string SharedTop::export_trunk(const std::string& path) const { return trunk_.save(path); }

}  // namespace canopy::runners
