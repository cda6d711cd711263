#include "canopy/runners/shared_top.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <mutex>
#include <sstream>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/GradMode.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "canopy/core/crc32c.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/mpi.h"
#include "canopy/core/progress.h"
#include "canopy/core/sha256.h"
#include "canopy/core/strings.h"
#include "canopy/core/tensor_values.h"
#include "canopy/datasets/level_file.h"

namespace canopy::runners {

namespace {

bool all_finite(const at::Tensor& t) { return t.isfinite().all().item<bool>(); }

// The L2 norm of all of `ts` (one reduction each, one wait for the result).
double l2_norm(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> norms;
  for (const auto& t : ts) norms.push_back(t.norm());
  return norms.empty() ? 0.0 : at::stack(norms).norm().item<double>();
}

// Whether every value of every tensor is finite. Their L2 norm is finite when they are, and
// costs a fast reduction each and one wait against isfinite's four passes and a wait per
// tensor (8 % of an autofreeze run of the demo's top went to checking its weights and
// gradients so); only when it is not (a value that is not, or finite ones whose squares
// overflow) are they looked at one by one.
bool all_finite(const std::vector<at::Tensor>& ts) {
  if (std::isfinite(l2_norm(ts))) return true;
  return std::all_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return all_finite(t); });
}

}  // namespace

void check_top(trunk::Trunk& trunk, const TopConfig& config) {
  const std::vector<std::string>& blocks = trunk.split().top_blocks;
  std::int64_t counted = 0;
  for (const auto& block : blocks)
    for (const auto& named : trunk.trainable_parameters(block)) counted += named.second.numel();
  CANOPY_CHECK(counted == trunk.parameter_counts().second, ConfigError, "the trunk has ",
               trunk.parameter_counts().second, " trainable parameters, ", counted,
               " of them in the top's blocks (", join(blocks, ", "),
               "): trainable parameters outside the trunk's blocks cannot train over a cache");
  if (config.schedule != FreezeSchedule::kAutofreeze) return;
  const auto n = static_cast<std::int64_t>(blocks.size());
  CANOPY_CHECK(n > config.min_trainable, ConfigError, "trunk.schedule = autofreeze over a top of ", n,
               " block(s) (", join(blocks, ", "), ") with trunk.min_trainable = ", config.min_trainable,
               " can freeze nothing; train more blocks (trunk.freeze = first:N) or lower min_trainable");
  // Every place a level may sit must be a clean cut of the trunk.
  for (std::int64_t b = 0; b + config.min_trainable < n; ++b) {
    const std::string problem = trunk.cut_problem(blocks[static_cast<std::size_t>(b)]);
    CANOPY_CHECK(problem.empty(), ConfigError, "trunk.schedule = autofreeze: ", problem);
  }
}

SharedTop::SharedTop(trunk::Trunk trunk, const TopConfig& config, const datasets::CacheMeta& meta,
                     double default_lr, std::int64_t train_rows, std::int64_t steps_per_epoch,
                     std::string level_dir)
    : trunk_(std::move(trunk)),
      config_(config),
      parts_(meta.row_parts),
      cache_fingerprint_(meta.fingerprint),
      train_rows_(train_rows),
      level_dir_(std::move(level_dir)) {
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
  check_top(trunk_, config_);
  optimizer_ = tasks::make_optimizer(config_.optimizer, groups, config_.lr, config_.weight_decay, 0.9);
  top_blocks_ = blocks;
  for (const auto& b : top_blocks_) {
    std::vector<at::Tensor> ps;
    for (const auto& named : trunk_.trainable_parameters(b)) ps.push_back(named.second);
    block_params_.push_back(std::move(ps));
  }
  norm_sum_.assign(top_blocks_.size(), 0.0);
  rates_.assign(top_blocks_.size(), std::numeric_limits<double>::quiet_NaN());
  steps_per_epoch_ = std::max<std::int64_t>(1, steps_per_epoch);
  interval_ = config_.freeze_interval > 0 ? config_.freeze_interval : steps_per_epoch_;
  text_ = parts_.size() >= 2 && parts_[1].shape.size() == 1 && !parts_[0].shape.empty() &&
          parts_[0].shape[0] == parts_[1].shape[0];
  start_epoch(0, 1, 0);  // the first epoch's frozen blocks
  feature_dim_ = forward(at::zeros({1, meta.feature_dim}, at::kFloat), false).size(1);
}

SharedTop::~SharedTop() = default;

std::vector<at::Tensor> SharedTop::unpack(const at::Tensor& rows, std::int64_t* len_out) const {
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
  if (len_out) *len_out = -1;
  if (text_) {
    const at::Tensor used = parts[1].ne(0).any(0).nonzero();
    const std::int64_t len = used.numel() ? used.max().item<std::int64_t>() + 1 : 1;
    parts[0] = parts[0].slice(1, 0, len);
    parts[1] = parts[1].slice(1, 0, len);
    if (len_out) *len_out = len;
  }
  return parts;
}

at::Tensor SharedTop::as_stored(const at::Tensor& out, std::int64_t len) const {
  return len < 0 ? out : at::constant_pad_nd(out, {0, 0, 0, parts_[1].shape[0] - out.size(1)});
}

std::string SharedTop::feed(std::vector<at::Tensor>& parts, std::int64_t len, const at::Tensor& index) {
  std::string from = trunk_.split().boundary;
  if (level_ < 0 && pending_ < 0) return from;
  // Levels are read and stored by row: batches of a split in memory, or streamed with disk
  // levels, come with their rows' positions.
  CANOPY_CHECK(
      index.defined(), Error,
      "internal: autofreeze's cache level is read and stored by row, and a training batch came without "
      "its rows' indices");
  if (level_ >= 0) {
    at::Tensor rows;
    if (!level_reader_) {
      rows = level_rows_.index_select(0, index);
    } else {
      try {
        rows = level_reader_->read(index);
      } catch (const DataError& e) {  // derived data: computed instead
        drop_disk_level(e.what());
      } catch (const IoError& e) {
        drop_disk_level(e.what());
      }
    }
    if (rows.defined()) {
      std::vector<std::int64_t> shape{index.size(0)};
      shape.insert(shape.end(), level_shape_.begin(), level_shape_.end());
      parts[0] = rows.reshape(shape);
      if (len >= 0) parts[0] = parts[0].slice(1, 0, len);
      from = top_blocks_[static_cast<std::size_t>(level_)];
    }
  }
  if (pending_ >= 0) {
    const std::string& to = top_blocks_[static_cast<std::size_t>(pending_)];
    at::Tensor out;
    {
      c10::NoGradGuard no_grad;  // every block up to `to` is frozen
      out = trunk_.span(from, to, parts).to(c10::kCPU, at::kFloat);
    }
    const at::Tensor stored = as_stored(out, len);
    if (level_writer_) {
      try {
        level_writer_->write(index, stored.flatten(1));
      } catch (const IoError& e) {
        log_info(std::string("autofreeze: ") + e.what() + "; the blocks up to " + to +
                 " are computed in every step, and stored again from the next epoch");
        level_writer_.reset();
        pending_ = -1;
      }
    } else {
      if (!pending_rows_.defined()) {
        pending_shape_.assign(stored.sizes().begin() + 1, stored.sizes().end());
        pending_rows_ = at::zeros({train_rows_, stored[0].numel()}, at::kFloat);
      }
      pending_rows_.index_copy_(0, index, stored.flatten(1));
    }
    parts[0] = out;
    from = to;
  }
  return from;
}

bool SharedTop::disk_levels() const { return disk_rows_ > 0 && allreduce_bucket_bytes_ == 0; }

bool SharedTop::level_goes_to_disk(std::int64_t level, const std::vector<std::int64_t>& shape) {
  if (!disk_levels() || !why_not_in_memory_) return false;
  const auto bytes = static_cast<std::uint64_t>(train_rows_) *
                     static_cast<std::uint64_t>(c10::multiply_integers(shape)) * sizeof(float);
  const std::string why = why_not_in_memory_(bytes);
  if (why.empty()) return false;
  log_info("autofreeze: the cache level of " + top_blocks_[static_cast<std::size_t>(level)] + " (" +
           format_mib(static_cast<double>(bytes)) + ") is kept on disk, not in memory: " + why);
  return true;
}

bool SharedTop::begin_level(std::int64_t level) {
  if (!disk_levels()) return train_rows_in_memory_.defined();
  const auto shape = block_shape(level);  // one pass on one row, for both
  if (train_rows_in_memory_.defined() && !level_goes_to_disk(level, shape)) return true;
  return open_level_writer(level, shape);
}

bool SharedTop::open_level_writer(std::int64_t level, const std::vector<std::int64_t>& shape) {
  const std::string& block = top_blocks_[static_cast<std::size_t>(level)];
  try {
    level_writer_ = std::make_unique<datasets::LevelWriter>(
        level_path(level), disk_rows_, c10::multiply_integers(shape), block, level_fingerprint(level));
  } catch (const IoError& e) {
    log_info(std::string("autofreeze: ") + e.what() + "; the blocks up to " + block +
             " are computed in every step instead");
    return false;
  }
  pending_shape_ = shape;
  return true;
}

bool SharedTop::open_level_reader(std::int64_t level) {
  const std::string& block = top_blocks_[static_cast<std::size_t>(level)];
  std::string problem;
  try {
    auto reader = std::make_unique<datasets::LevelReader>(level_path(level));
    const auto shape = block_shape(level);
    if (reader->fingerprint() != level_fingerprint(level)) {
      problem = detail::str_cat("cache level '", level_path(level),
                                "' was not made by this run's frozen blocks over this cache (fingerprint ",
                                reader->fingerprint().substr(0, 12), ", expected ",
                                level_fingerprint(level).substr(0, 12), ")");
    } else if (reader->rows() != disk_rows_ || reader->values() != c10::multiply_integers(shape)) {
      problem = detail::str_cat("cache level '", level_path(level), "' holds ", reader->rows(), " rows of ",
                                reader->values(), " values, the training rows ", disk_rows_,
                                " and the block's output ", shape);
    } else {
      level_reader_ = std::move(reader);
      level_shape_ = shape;
      return true;
    }
  } catch (const DataError& e) {
    problem = e.what();
  }
  log_info("autofreeze: " + problem + "; the blocks up to " + block +
           " are computed in every step, and stored again from the next epoch");
  return false;
}

void SharedTop::drop_disk_level(const std::string& why) {
  log_info("autofreeze: " + why + "; the blocks up to " + top_blocks_[static_cast<std::size_t>(level_)] +
           " are computed in every step from here, and stored again from the next epoch");
  level_reader_.reset();
  level_ = -1;
}

at::Tensor SharedTop::forward(const at::Tensor& rows, bool training, const at::Tensor& index) {
  // The graph executor's profiling passes could swap in other kernels after a few runs; a
  // resumed run must compute what an uninterrupted one did.
  torch::jit::GraphOptimizerEnabledGuard plain(false);
  trunk_.train(training);
  std::int64_t len = -1;
  auto parts = unpack(rows, &len);
  if (training) {
    const std::string from = feed(parts, len, index);
    return trunk_.top_features_from(from, parts).to(c10::kCPU);
  }
  return evaluate(parts, std::nullopt);
}

// Evaluation starts from the cache; with the frozen blocks' output kept (keeps_eval_level), batch
// `kept` of it is read (and computed, the first time) and only the blocks above run.
at::Tensor SharedTop::evaluate(std::vector<at::Tensor>& parts, std::optional<std::size_t> kept) {
  c10::NoGradGuard no_grad;
  if (!kept) return trunk_.top_features(parts).to(c10::kCPU);
  const std::string& to = top_blocks_[static_cast<std::size_t>(frozen_ - 1)];
  if (*kept == eval_level_.outs.size())
    eval_level_.outs.push_back(trunk_.span(trunk_.split().boundary, to, parts).to(c10::kCPU, at::kFloat));
  parts[0] = eval_level_.outs[*kept];
  return trunk_.top_features_from(to, parts).to(c10::kCPU);
}

void SharedTop::replay(const at::Tensor& rows, const at::Tensor& index) {
  if (pending_ < 0) return;
  torch::jit::GraphOptimizerEnabledGuard plain(false);
  trunk_.train(true);
  std::int64_t len = -1;
  auto parts = unpack(rows, &len);
  feed(parts, len, index);
}

at::Tensor SharedTop::features(const at::Tensor& rows, std::int64_t batch) {
  const bool kept = keeps_eval_level(rows, batch);
  std::vector<at::Tensor> out;
  torch::jit::GraphOptimizerEnabledGuard plain(false);  // as forward()
  trunk_.train(false);
  for (std::int64_t i = 0, k = 0; i < rows.size(0); i += batch, ++k) {
    auto parts = unpack(rows.slice(0, i, std::min(rows.size(0), i + batch)));
    out.push_back(evaluate(parts, kept ? std::optional<std::size_t>(k) : std::nullopt));
  }
  return out.empty() ? at::empty({0, feature_dim_}, at::kFloat) : at::cat(out, 0).contiguous();
}

// The blocks held frozen at the bottom of the top do not change until a block above them does
// (autofreeze's never do; gradual's until they are unfrozen), so their output on the
// evaluation rows is computed at the first evaluation that finds them frozen and kept while
// they stay so: later evaluations run only the blocks above. Kept in memory when a training
// level of that size would be (cache.memory_cap_mb); else every evaluation runs the whole top.
bool SharedTop::keeps_eval_level(const at::Tensor& rows, std::int64_t batch) {
  const auto n = static_cast<std::int64_t>(top_blocks_.size());
  if (frozen_ <= 0 || frozen_ >= n || rows.size(0) == 0) {
    eval_level_ = EvalLevel{};
    return false;
  }
  if (eval_level_.rows.defined() && eval_level_.rows.data_ptr() == rows.data_ptr() &&
      eval_level_.rows.sizes() == rows.sizes() && eval_level_.batch == batch && eval_level_.frozen == frozen_)
    return true;
  eval_level_ = EvalLevel{};  // the one kept before, freed first
  const auto bytes = static_cast<std::uint64_t>(rows.size(0)) *
                     static_cast<std::uint64_t>(c10::multiply_integers(block_shape(frozen_ - 1))) *
                     sizeof(float);
  if (why_not_in_memory_ && !why_not_in_memory_(bytes).empty()) return false;
  eval_level_ = EvalLevel{rows, batch, frozen_, {}};
  const std::string& block = top_blocks_[static_cast<std::size_t>(frozen_ - 1)];
  log_info(detail::str_cat("top: evaluation keeps the output of ", block, " on its ", rows.size(0), " rows (",
                           format_mib(static_cast<double>(bytes)),
                           ") while the blocks up to it stay frozen, ",
                           "and runs the blocks above it alone"));
  return true;
}

void SharedTop::all_reduce_gradients() {
  const auto t0 = std::chrono::steady_clock::now();
  // Every rank trains the same blocks, so the same parameters (in the same order) take part;
  // one that has no gradient on this rank (no rows in its slice) adds zeros.
  std::vector<at::Tensor> grads;
  for (const auto& [name, p] : params_) {
    if (!p.requires_grad()) continue;
    if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
    grads.push_back(p.grad());
  }
  const std::int64_t bucket = std::max<std::int64_t>(1, allreduce_bucket_bytes_ / 4);
  for (std::size_t k = 0; k < grads.size();) {
    // A bucket: consecutive gradients up to `bucket` floats (a larger one goes alone).
    std::size_t end = k;
    std::int64_t n = 0;
    while (end < grads.size() && (end == k || n + grads[end].numel() <= bucket)) n += grads[end++].numel();
    std::vector<at::Tensor> flat;
    for (std::size_t i = k; i < end; ++i) flat.push_back(grads[i].to(at::kFloat).reshape({-1}));
    at::Tensor buffer = at::cat(flat).contiguous();
    mpi::all_reduce_sum(buffer.data_ptr<float>(), buffer.numel());
    std::int64_t at = 0;
    for (std::size_t i = k; i < end; ++i) {
      grads[i].copy_(buffer.slice(0, at, at + grads[i].numel()).view(grads[i].sizes()));
      at += grads[i].numel();
    }
    k = end;
  }
  allreduce_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++allreduce_steps_;
}

std::uint64_t hash_weights(const std::vector<at::Tensor>& tensors, std::uint64_t h) {
  for (const auto& t : tensors) {
    const at::Tensor c = t.detach().to(at::kCPU).contiguous();
    h = h * 1000003ULL + crc32c(c.data_ptr(), static_cast<std::size_t>(c.numel() * c.element_size()));
  }
  return h;
}

std::uint64_t SharedTop::weights_hash() const {
  std::vector<at::Tensor> weights;
  for (const auto& [name, p] : params_) weights.push_back(p);
  return hash_weights(weights);
}

void SharedTop::step(const at::Tensor& z, const at::Tensor& grad, std::int64_t step_in_epoch) {
  if (allreduce_bucket_bytes_ == 0 && !z.requires_grad())
    return;  // every block held frozen (gradual's warm-up)
  torch::jit::GraphOptimizerEnabledGuard plain(false);
  optimizer_->zero_grad();
  if (z.requires_grad() && z.numel() > 0) torch::autograd::backward({z}, {grad.to(z.device())});
  if (allreduce_bucket_bytes_ > 0) all_reduce_gradients();
  std::vector<at::Tensor> grads, stepped;
  for (const auto& [name, p] : params_) {
    if (!p.grad().defined()) continue;
    grads.push_back(p.mutable_grad());
    stepped.push_back(p);
  }
  // A gradient with a value that is not finite has a norm that is not: the check costs a
  // search only then (a finite gradient whose norm overflows float32 is scaled to zero).
  const double norm = l2_norm(grads);
  if (!std::isfinite(norm)) {
    for (const auto& [name, p] : params_) {
      CANOPY_CHECK(!p.grad().defined() || all_finite(p.grad()), Error,
                   "the shared top's gradient is not finite in ", name,
                   " (every head's own gradient was finite)");
    }
  }
  if (config_.schedule == FreezeSchedule::kAutofreeze) track_gradients();  // before clipping
  if (trains()) {
    clip_gradient(grads, norm);
    epoch_norm_sum_ += norm;
    ++epoch_steps_;
  }
  // The warm-up counts the top's training steps of the whole run, so a resumed run (whose
  // epoch and step the loop gives) takes the uninterrupted one's rates.
  const double factor = rate_factor(steps_before_ + step_in_epoch);
  auto& groups = optimizer_->param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) groups[g].options().set_lr(base_lrs_[g] * factor);
  last_lr_ = base_lrs_.empty() ? 0.0 : base_lrs_[0] * factor;
  optimizer_step_(*optimizer_);
  if (all_finite(stepped)) return;  // the step changed only these
  for (const auto& [name, p] : params_) {
    CANOPY_CHECK(all_finite(p), Error, "the shared top's weights are not finite after the step (", name,
                 "); lower trunk.lr");
  }
}

void SharedTop::start_epoch(std::int64_t epoch, std::int64_t total, std::int64_t first_step) {
  // Constant or cosine (validate_job_config refuses step for the top).
  epoch_factor_ = tasks::lr_factor(config_.lr_schedule, epoch, total, 1, 1.0);  // step() applies it
  const auto n = static_cast<std::int64_t>(top_blocks_.size());
  if (config_.schedule == FreezeSchedule::kGradual) {
    hold(n - gradual_trainable(epoch, n, config_.warmup_epochs, config_.unfreeze_every));
  } else {
    hold(frozen_);
  }
  steps_before_ = steps_before(epoch);
  if (first_step == 0) {  // a new epoch's statistics (resumed mid-epoch, the checkpoint's go on)
    epoch_norm_sum_ = 0;
    epoch_steps_ = epoch_clipped_ = 0;
    last_lr_ = base_lrs_.empty() ? 0.0 : base_lrs_[0] * rate_factor(steps_before_);
  }
  // Autofreeze: the highest frozen block's output is stored during this epoch. A block frozen
  // during an epoch is stored from the next one's start: a run resumed in the middle of that
  // epoch (the block frozen in its checkpoint) waits for it too.
  // A level is kept by row: in memory beside a split in memory, on disk when the split
  // streams or the level is too large to hold (begin_level). Without either (a streamed split
  // under mpirun, or with trunk.level_on_disk = false) the frozen blocks are computed in every
  // step instead (without autograd, as gradual's held blocks).
  if (config_.schedule == FreezeSchedule::kAutofreeze && first_step == 0 && frozen_ - 1 > level_ &&
      pending_ < 0 && begin_level(frozen_ - 1)) {
    pending_ = frozen_ - 1;
    pending_rows_ = at::Tensor();
    log_info("autofreeze: storing the output of " + top_blocks_[static_cast<std::size_t>(pending_)] +
             " during this epoch's forward passes (a cache level read from the next epoch on" +
             (level_writer_ ? ", on disk: " + format_mib(static_cast<double>(level_writer_->bytes())) + ")"
                            : std::string(")")));
  }
}

double SharedTop::rate_factor(std::int64_t k) const {
  if (k >= config_.lr_warmup_steps) return epoch_factor_;
  return epoch_factor_ * static_cast<double>(k + 1) / static_cast<double>(config_.lr_warmup_steps);
}

std::int64_t SharedTop::steps_before(std::int64_t epoch) const {
  if (config_.schedule != FreezeSchedule::kGradual) return epoch * steps_per_epoch_;
  const auto n = static_cast<std::int64_t>(top_blocks_.size());
  std::int64_t epochs = 0;
  for (std::int64_t e = 0; e < epoch; ++e)
    epochs += gradual_trainable(e, n, config_.warmup_epochs, config_.unfreeze_every) > 0 ? 1 : 0;
  return epochs * steps_per_epoch_;
}

// As torch.nn.utils.clip_grad_norm_: the norm of the per-parameter norms; every gradient
// times max_norm / (norm + 1e-6) when that is below 1.
void SharedTop::clip_gradient(std::vector<at::Tensor>& grads, double norm) {
  const double coef = config_.max_grad_norm / (norm + 1e-6);
  if (config_.max_grad_norm > 0 && coef < 1.0) {
    for (auto& g : grads) g.mul_(coef);
    ++epoch_clipped_;
  }
}

void SharedTop::hold(std::int64_t frozen) {
  frozen_ = frozen;
  trunk_.hold_frozen(std::vector<std::string>(top_blocks_.begin(), top_blocks_.begin() + frozen_));
}

void SharedTop::track_gradients() {
  const auto n = static_cast<std::int64_t>(top_blocks_.size());
  for (std::int64_t b = frozen_; b < n; ++b) {
    double sq = 0;
    for (const auto& p : block_params_[static_cast<std::size_t>(b)]) {
      if (p.grad().defined()) sq += p.grad().to(at::kDouble).pow(2).sum().item<double>();
    }
    norm_sum_[static_cast<std::size_t>(b)] += std::sqrt(sq);
  }
  if (++interval_steps_ < interval_) return;
  std::vector<double> mean(norm_sum_.size());
  for (std::size_t b = 0; b < mean.size(); ++b) mean[b] = norm_sum_[b] / static_cast<double>(interval_steps_);
  if (!norm_prev_.empty()) {
    const auto all = change_rates(norm_prev_, mean);
    const std::vector<double> trainable(all.begin() + frozen_, all.end());
    for (std::int64_t b = frozen_; b < n; ++b)
      rates_[static_cast<std::size_t>(b)] = all[static_cast<std::size_t>(b)];
    const std::int64_t k = blocks_to_freeze(trainable, config_.percentile, config_.min_trainable);
    if (k > 0) {
      log_info(
          "autofreeze: freezing " +
          join(std::vector<std::string>(top_blocks_.begin() + frozen_, top_blocks_.begin() + frozen_ + k),
               ", ") +
          detail::str_cat(" (gradient-norm change rate below the ", config_.percentile,
                          "th percentile of the trainable blocks')"));
      hold(frozen_ + k);
    }
  }
  norm_prev_ = mean;
  norm_sum_.assign(norm_sum_.size(), 0.0);
  interval_steps_ = 0;
}

std::string SharedTop::level_path(std::int64_t level) const {
  return join_path(level_dir_, datasets::level_file_name(top_blocks_[static_cast<std::size_t>(level)]));
}

// What a level's rows depend on: the cache, and the weights of the top's blocks up to it
// (frozen since before it was written).
std::string SharedTop::level_fingerprint(std::int64_t level) const {
  std::string bytes = cache_fingerprint_ + "|" + top_blocks_[static_cast<std::size_t>(level)];
  // Computed under autocast, a level holds other values (float32 levels keep their key).
  const std::string& precision = trunk_.config().top_precision;
  if (precision != "float32") bytes += "|top_precision=" + precision;
  for (std::int64_t b = 0; b <= level; ++b) {
    for (const auto& p : block_params_[static_cast<std::size_t>(b)]) {
      const at::Tensor c = p.detach().contiguous();
      bytes.append(static_cast<const char*>(c.const_data_ptr()), c.numel() * c.element_size());
    }
  }
  return sha256_hex(bytes);
}

void SharedTop::load_level(std::int64_t level) {
  std::string problem;
  try {
    auto file = datasets::read_level(level_path(level));
    if (file.fingerprint == level_fingerprint(level) && file.rows.size(0) == train_rows_) {
      level_rows_ = file.rows;
      level_shape_ = level_shape(level);
      return;
    }
    problem = detail::str_cat("cache level '", level_path(level),
                              "' was not made by this run's frozen blocks over this cache (fingerprint ",
                              file.fingerprint.substr(0, 12), ", expected ",
                              level_fingerprint(level).substr(0, 12), ")");
  } catch (const Error& e) {
    problem = e.what();
  }
  CANOPY_CHECK(train_rows_in_memory_.defined(), DataError, problem, "; train again without --resume");
  rebuild_level(level, problem);
}

// A level is what the frozen blocks up to it compute from the cache, and the checkpoint holds
// their weights: computed again from the training rows, in order, as the epoch that stored it
// did (held blocks in eval mode, no autograd), and written anew.
void SharedTop::rebuild_level(std::int64_t level, const std::string& why) {
  const std::string& block = top_blocks_[static_cast<std::size_t>(level)];
  log_info(why + ": computing it again from the cache's " + std::to_string(train_rows_) +
           " training rows with the checkpoint's frozen blocks up to " + block);
  CANOPY_CHECK(train_rows_in_memory_.size(0) == train_rows_, Error, "the training rows in memory (",
               train_rows_in_memory_.size(0), ") are not the ", train_rows_, " the top was made for");
  torch::jit::GraphOptimizerEnabledGuard plain(false);
  trunk_.train(true);
  c10::NoGradGuard no_grad;
  const std::vector<std::int64_t> shape = block_shape(level);
  at::Tensor rows = at::empty({train_rows_, c10::multiply_integers(shape)}, at::kFloat);
  constexpr std::int64_t kBatch = 256;
  for (std::int64_t i = 0; i < train_rows_; i += kBatch) {
    const std::int64_t end = std::min(train_rows_, i + kBatch);
    std::int64_t len = -1;
    auto parts = unpack(train_rows_in_memory_.slice(0, i, end), &len);
    at::Tensor out = trunk_.span(trunk_.split().boundary, block, parts).to(c10::kCPU, at::kFloat);
    rows.slice(0, i, end).copy_(as_stored(out, len).flatten(1));
  }
  level_rows_ = rows;
  level_shape_ = shape;
  if (mpi::rank() == 0)
    datasets::write_level(level_path(level), {level_rows_, block, level_fingerprint(level)});
}

// One row's shape of a level (texts: padded to the cache's length), from a pass on one row.
std::vector<std::int64_t> SharedTop::level_shape(std::int64_t level) {
  const auto shape = block_shape(level);
  CANOPY_CHECK(level_rows_.size(1) == c10::multiply_integers(shape), DataError, "cache level '",
               level_path(level), "' holds ", level_rows_.size(1), " values per row, the block's output ",
               shape);
  return shape;
}

std::vector<std::int64_t> SharedTop::block_shape(std::int64_t level) {
  std::int64_t width = 0;
  for (const auto& p : parts_) width += p.numel();
  std::int64_t len = -1;
  const auto parts = unpack(at::zeros({1, width}, at::kFloat), &len);
  c10::NoGradGuard no_grad;
  const at::Tensor out =
      trunk_.span(trunk_.split().boundary, top_blocks_[static_cast<std::size_t>(level)], parts);
  std::vector<std::int64_t> shape(out.sizes().begin() + 1, out.sizes().end());
  if (len >= 0) shape[0] = parts_[1].shape[0];
  return shape;
}

// Data parallel: each rank stored the rows of its slices of the epoch's batches, and every
// training row is in one slice of one batch. The rows a rank did not store are zeros there,
// so the element-wise sum over the ranks is every rank's rows, exactly (x + 0 is x).
void SharedTop::gather_pending() {
  double stored = pending_rows_.defined() ? 1.0 : 0.0;
  mpi::all_reduce_sum(&stored, 1);
  if (stored == 0) return;         // no rank stepped in this epoch
  if (!pending_rows_.defined()) {  // this rank's slices were all empty
    pending_shape_ = block_shape(pending_);
    pending_rows_ = at::zeros({train_rows_, c10::multiply_integers(pending_shape_)}, at::kFloat);
  }
  mpi::all_reduce_sum(pending_rows_.data_ptr<float>(), pending_rows_.numel());
}

TopEpoch SharedTop::end_epoch() {
  if (pending_ >= 0 && level_writer_) {
    const std::string& block = top_blocks_[static_cast<std::size_t>(pending_)];
    std::string problem;
    if (level_writer_->written() != train_rows_) {
      problem = detail::str_cat("internal: the epoch stored ", level_writer_->written(), " rows of ", block,
                                "'s output, not the split's ", train_rows_, " training rows");
    } else {
      try {
        level_writer_->finish();
      } catch (const Error& e) {
        problem = e.what();
      }
    }
    const double bytes = static_cast<double>(level_writer_->bytes());
    level_writer_.reset();
    if (problem.empty() && open_level_reader(pending_)) {
      level_ = pending_;
      log_info("autofreeze: cache level " + level_path(level_) + " written on disk (" +
               std::to_string(train_rows_) + " rows, " + format_mib(bytes) + "); the blocks up to " + block +
               " are read from it instead of computed");
    } else if (!problem.empty()) {
      log_info("autofreeze: no cache level of " + block + " (" + problem +
               "); its blocks are computed in every step, and stored again from the next epoch");
    }
    pending_ = -1;
  }
  if (pending_ >= 0 && allreduce_bucket_bytes_ > 0) gather_pending();
  if (pending_ >= 0 && pending_rows_.defined()) {
    level_ = pending_;
    level_rows_ = pending_rows_;
    level_shape_ = pending_shape_;
    // Under mpirun every rank holds the level; rank 0 writes it, as it writes the checkpoint
    // that names it.
    if (mpi::rank() == 0) {
      datasets::write_level(level_path(level_), {level_rows_, top_blocks_[static_cast<std::size_t>(level_)],
                                                 level_fingerprint(level_)});
    }
    log_info("autofreeze: cache level " + level_path(level_) +
             (mpi::rank() == 0 ? " written (" : " held, rank 0 writes it (") + std::to_string(train_rows_) +
             " rows" + (allreduce_bucket_bytes_ > 0 ? ", every rank's slices" : "") + "); the blocks up to " +
             top_blocks_[static_cast<std::size_t>(level_)] + " are no longer computed");
  }
  pending_ = -1;
  pending_rows_ = at::Tensor();
  TopEpoch e;
  e.training.assign(top_blocks_.begin() + frozen_, top_blocks_.end());
  e.level = level_ >= 0 ? top_blocks_[static_cast<std::size_t>(level_)] : "";
  if (config_.schedule == FreezeSchedule::kAutofreeze) {
    for (std::size_t b = 0; b < top_blocks_.size(); ++b) e.rates.emplace_back(top_blocks_[b], rates_[b]);
  }
  e.steps = epoch_steps_;
  e.grad_norm = epoch_steps_ > 0 ? epoch_norm_sum_ / static_cast<double>(epoch_steps_)
                                 : std::numeric_limits<double>::quiet_NaN();
  e.clipped = epoch_clipped_;
  e.lr = last_lr_;
  return e;
}

void SharedTop::prune_levels() const {
  if (mpi::rank() != 0) return;  // rank 0 writes them
  for (std::int64_t b = 0; b < static_cast<std::int64_t>(top_blocks_.size()); ++b) {
    if (b != level_ && is_regular_file(level_path(b))) std::remove(level_path(b).c_str());
  }
}

std::string SharedTop::describe() const {
  std::int64_t n = 0;
  for (const auto& p : params_) n += p.second.numel();
  std::ostringstream o;
  o << join(blocks(), ", ") << " (" << n << " parameters; " << tasks::to_string(config_.optimizer) << " lr "
    << config_.lr << " for the top block";
  if (base_lrs_.size() > 1) o << ", / " << config_.lr_decay << " per block down";
  if (config_.lr_warmup_steps > 0) o << ", warmed up over " << config_.lr_warmup_steps << " steps";
  if (config_.max_grad_norm > 0) o << ", gradient norm clipped at " << config_.max_grad_norm;
  if (config_.schedule == FreezeSchedule::kGradual) {
    o << "; gradual: heads alone for " << config_.warmup_epochs << " epoch(s), then one more block every "
      << config_.unfreeze_every << " epoch(s) from the top";
  } else if (config_.schedule == FreezeSchedule::kAutofreeze) {
    o << "; autofreeze every " << interval_ << " steps below the " << config_.percentile << "th percentile, "
      << config_.min_trainable << " block(s) always training";
  }
  o << ")";
  return o.str();
}

void SharedTop::keep_best(std::int64_t epoch, double score) {
  best_.clear();
  for (const auto& [name, p] : params_) best_.push_back(p.detach().clone());
  best_epoch_ = epoch;
  best_score_ = score;
}

bool SharedTop::restore_best() {
  if (best_.empty()) return false;
  eval_level_ = EvalLevel{};  // the frozen blocks may have other weights at that epoch
  c10::NoGradGuard no_grad;
  for (std::size_t i = 0; i < params_.size(); ++i) params_[i].second.copy_(best_[i]);
  return true;
}

std::string SharedTop::checkpoint_bytes() const {
  torch::serialize::OutputArchive archive;
  for (const auto& [name, p] : params_) archive.write("param:" + name, p.detach());
  torch::serialize::OutputArchive opt;
  optimizer_->save(opt);
  archive.write("canopy.optimizer", opt);
  archive.write("canopy.schedule",
                at::tensor(std::vector<std::int64_t>{frozen_, level_, pending_, interval_steps_}));
  archive.write("canopy.norm_sum", at::tensor(norm_sum_, at::kDouble));
  archive.write("canopy.norm_prev",
                at::tensor(norm_prev_.empty() ? std::vector<double>{} : norm_prev_, at::kDouble));
  archive.write("canopy.rates", at::tensor(rates_, at::kDouble));
  archive.write("canopy.epoch_steps",
                at::tensor(std::vector<double>{epoch_norm_sum_, static_cast<double>(epoch_steps_),
                                               static_cast<double>(epoch_clipped_), last_lr_},
                           at::kDouble));
  if (weighting_) {
    for (const auto& [k, v] : weighting_->state()) archive.write("canopy.weighting." + k, v);
  }
  if (!best_.empty()) {
    archive.write(
        "canopy.best",
        at::tensor(std::vector<double>{static_cast<double>(best_epoch_), best_score_}, at::kDouble));
    for (std::size_t i = 0; i < best_.size(); ++i) archive.write("best:" + params_[i].first, best_[i]);
  }
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    archive.write("canopy.default_rng", gen.get_state());
  }
  std::ostringstream bytes;
  archive.save_to(bytes);
  return std::move(bytes).str();
}

void SharedTop::load_checkpoint(const std::string& path) {
  eval_level_ = EvalLevel{};
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
    c10::NoGradGuard no_grad;
    // A saved copy of each trainable parameter (`prefix` + its name), checked against its shape.
    const auto read_params = [&](const std::string& prefix) {
      std::vector<at::Tensor> out;
      for (const auto& [name, p] : params_) {
        at::Tensor saved;
        archive.read(prefix + name, saved);
        CANOPY_CHECK(saved.sizes() == p.sizes(), DataError, "checkpoint '", path, "': ", prefix, name,
                     " has shape ", saved.sizes(), ", the trunk's ", p.sizes());
        out.push_back(saved);
      }
      return out;
    };
    const auto saved = read_params("param:");
    for (std::size_t i = 0; i < params_.size(); ++i) params_[i].second.copy_(saved[i]);
    torch::serialize::InputArchive opt;
    archive.read("canopy.optimizer", opt);
    optimizer_->load(opt);
    at::Tensor sched, sum, prev, rates;
    archive.read("canopy.schedule", sched);
    archive.read("canopy.norm_sum", sum);
    archive.read("canopy.norm_prev", prev);
    archive.read("canopy.rates", rates);
    CANOPY_CHECK(sched.numel() == 4 && sum.numel() == static_cast<std::int64_t>(top_blocks_.size()),
                 DataError, "checkpoint '", path, "': the freezing schedule's state does not fit this top");
    const auto* st = sched.to(at::kLong).contiguous().data_ptr<std::int64_t>();
    hold(st[0]);
    level_ = st[1];
    pending_ = st[2];
    interval_steps_ = st[3];
    norm_sum_ = tensor_values(sum);
    norm_prev_ = tensor_values(prev);
    rates_ = tensor_values(rates);
    pending_rows_ = at::Tensor();
    at::Tensor stats;  // absent from checkpoints written before the statistics were kept
    if (archive.try_read("canopy.epoch_steps", stats) && stats.numel() == 4) {
      const auto v = tensor_values(stats);
      epoch_norm_sum_ = v[0];
      epoch_steps_ = static_cast<std::int64_t>(v[1]);
      epoch_clipped_ = static_cast<std::int64_t>(v[2]);
      last_lr_ = v[3];
    }
    level_reader_.reset();
    level_writer_.reset();
    if (!train_rows_in_memory_.defined() && !disk_levels() && (level_ >= 0 || pending_ >= 0)) {
      // Saved over the split in memory, resumed over it streamed under mpirun: the frozen
      // blocks are computed from now on, the level is not read.
      log_info("autofreeze: the train split streams now, so the frozen blocks up to " +
               top_blocks_[static_cast<std::size_t>(frozen_ - 1)] +
               " are computed in every step instead of read from the checkpoint's cache level");
      level_ = pending_ = -1;
    } else {
      // A level on disk (a streamed split, or one too large for memory) is read from its
      // file, and a pending one written anew (the steps skipped on resume replay theirs). One
      // that cannot be (missing, corrupt, saved in memory, no room) is computed in every step
      // instead, and stored again from the next epoch. A level in memory is read whole, or
      // computed again from the training rows.
      if (level_ >= 0 && train_rows_in_memory_.defined() &&
          !level_goes_to_disk(level_, block_shape(level_))) {
        load_level(level_);
      } else if (level_ >= 0 && !open_level_reader(level_)) {
        level_ = -1;
      }
      if (pending_ >= 0 && !begin_level(pending_)) pending_ = -1;
    }
    at::Tensor best;  // absent without train.export = best, and before one was kept
    best_.clear();
    if (archive.try_read("canopy.best", best) && best.numel() == 2) {
      const auto v = tensor_values(best);
      best_epoch_ = static_cast<std::int64_t>(v[0]);
      best_score_ = v[1];
      best_ = read_params("best:");
    }
    if (weighting_) {
      std::map<std::string, at::Tensor> w;
      for (const char* k : {"params", "m", "v", "t", "prev_losses", "epoch_losses"}) {
        archive.read(std::string("canopy.weighting.") + k, w[k]);
      }
      weighting_->load_state(w);
    }
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
