#include "canopy/runners/cache_job.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <optional>
#include <sstream>
#include <thread>

#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <torch/version.h>

#include "canopy/core/bounded_queue.h"
#include "canopy/core/dir_lock.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/heap.h"
#include "canopy/core/memory.h"
#include "canopy/core/memory_fence.h"
#include "canopy/core/mpi.h"
#include "canopy/core/sha256.h"
#include "canopy/core/stop.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/feature_cache.h"
#include "canopy/runners/input_data.h"
#include "canopy/runners/train_job.h"
#include "canopy/trunk/trunk.h"

namespace canopy::runners {

namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

std::string cache_description(const JobConfig& c, const std::string& trunk_sha256) {
  std::ostringstream out;
  const bool views = c.cache.views > 1;
  out << "schema=" << (views ? datasets::kCacheSchemaVersionViews : datasets::kCacheSchemaVersion) << "\n"
      << "trunk_sha256=" << trunk_sha256 << "\n"
      << "tap=" << trunk::describe_taps(c.trunk) << "\n"
      << "pooling=" << c.trunk.pooling << "\n";
  // Which modules are expanded decides what the tap names and first:N name; caches of trunks
  // not expanded keep the key they always had.
  if (!c.trunk.expand.empty()) out << "expand=" << join(c.trunk.expand, ",") << "\n";
  // A policy that leaves a top makes a cache of the frozen prefix's output: which prefix is
  // part of what the cache holds. (A frozen trunk's caches keep the key they always had.)
  const auto& f = c.trunk.freeze;
  if (f.freeze != "all" || !f.train_only.empty() || !f.unfreeze_to.empty()) {
    out << "freeze=" << trunk::describe(f) << "\n";
  }
  // Passes under autocast change the features; float32 caches keep the key they always had.
  if (c.trunk.precision != "float32") out << "precision=" << c.trunk.precision << "\n";
  if (views) out << "views=" << c.cache.views << "\naugment=" << datasets::describe(c.augment) << "\n";
  out << describe_inputs(c)
      << "dtype=" << datasets::storage_dtype_name(datasets::parse_storage_dtype(c.cache.dtype)) << "\n"
      << "torch=" << TORCH_VERSION << "\n";
  return out.str();
}

std::string expected_cache_description(const JobConfig& c) {
  if (!c.trunk.sha256.empty()) {
    // The file at trunk.path must still be the pinned one (a replaced file is refused here,
    // not at predict time); without it, the cache is used on the strength of the pin.
    if (is_regular_file(c.trunk.path)) {
      trunk::verified_trunk_sha256(c.trunk);
    } else {
      log_info("trunk file '" + c.trunk.path +
               "' is absent: the cache is checked against the pinned SHA-256 " +
               "alone (training needs only the cache when the trunk is frozen whole)");
    }
    return cache_description(c, c.trunk.sha256);
  }
  CANOPY_CHECK(path_exists(c.trunk.path), DataError, "cannot check the cache's fingerprint: trunk file '",
               c.trunk.path, "' is missing; pin trunk.sha256 or set train.check_fingerprint = false");
  return cache_description(c, sha256_file(c.trunk.path));
}

std::map<std::string, std::string> parse_description(const std::string& d) {
  std::map<std::string, std::string> out;
  std::istringstream in(d);
  std::string line;
  while (std::getline(in, line)) {
    const auto eq = line.find('=');
    if (eq != std::string::npos) out[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return out;
}
std::vector<std::string> describe_changes(const std::string& old_description,
                                          const std::string& new_description) {
  return map_changes(parse_description(old_description), parse_description(new_description));
}

std::string inspect_cache(const std::string& dir, const JobConfig* config, bool verify, bool* ok,
                          ProgressStyle style) {
  const datasets::Manifest m = datasets::read_manifest(dir);
  std::ostringstream o;
  bool good = m.complete;
  std::int64_t done = 0, total = 0;
  for (const auto& sh : m.shards) done += sh.rows;
  for (const auto& [split, n] : m.split_rows) total += n;
  std::uint64_t bytes = 0;
  for (const auto& sh : m.shards) bytes += sh.bytes;
  if (is_regular_file(datasets::view_path(dir))) bytes += file_size(datasets::view_path(dir));
  char size[64];
  std::snprintf(size, sizeof size, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  o << "cache " << dir << " (schema " << datasets::schema_of(m.meta) << ", "
    << (m.complete ? "complete"
                   : "UNFINISHED: " + std::to_string(done) + " of " + std::to_string(total) + " rows")
    << ")\n"
    << "  view          " << datasets::view_path(dir) << (m.complete ? "" : " (written when complete)")
    << "\n"
    << "  size on disk  " << size << " in " << m.shards.size() << " shard(s)\n"
    << "  features      " << m.meta.feature_dim << " x " << datasets::storage_dtype_name(m.meta.dtype)
    << "\n";
  for (const auto& [split, n] : m.split_rows) {
    std::int64_t shards = 0, rows = 0;
    for (const auto& sh : m.shards) {
      if (sh.split == split) {
        ++shards;
        rows += sh.rows;
      }
    }
    o << "  split " << split << ": " << n << " rows in " << shards << " shard(s)"
      << (rows == n ? "" : " (" + std::to_string(rows) + " written)") << "\n";
  }
  // Each source with its class names (the first ten of more), its bits' labels, or its values'
  // type.
  std::vector<std::string> sources;
  for (const auto& src : m.meta.label_sources) {
    const std::vector<std::string> names = m.meta.names_of(src);
    const auto bits = m.meta.label_bits.find(src);
    if (bits != m.meta.label_bits.end()) {
      sources.push_back(src + (m.meta.label_width(src) > 1 ? " (multi-hot: " : " (bits: ") +
                        join_first(bits->second, "labels") + ")");
    } else if (m.meta.is_float_label(src)) {
      sources.push_back(src + " (float64)");
    } else if (names.empty()) {
      sources.push_back(src);
    } else {
      sources.push_back(src + " (" + join_first(names, "classes") + ")");
    }
  }
  o << "  labels        " << join(sources, "; ");
  o << "\n  fingerprint   " << m.meta.fingerprint << ", over:\n";
  std::istringstream parts(m.meta.description);
  for (std::string line; std::getline(parts, line);) o << "      " << line << "\n";
  if (config) {
    const auto changes = describe_changes(m.meta.description, expected_cache_description(*config));
    o << "  matches " << config->source << ": "
      << (changes.empty() ? "yes" : "NO, changed " + join(changes, "; ")) << "\n";
    good = good && changes.empty();
  }
  if (verify) {
    const auto t0 = Clock::now();
    try {
      datasets::FeatureCache::open(dir).verify(style);
      o << "  verified      " << m.shards.size()
        << " shard(s): sizes, checksums and HDF5 headers; the view read through HDF5; in "
        << format_duration(std::chrono::duration<double>(Clock::now() - t0).count()) << "\n";
    } catch (const DataError& e) {
      o << "  VERIFY FAILED " << printable(e.what()) << "\n";
      good = false;
    }
  }
  if (ok) *ok = good;
  return o.str();
}

namespace {

// What an existing cache at config.cache.path means for this run.
enum class CacheState { kUpToDate, kResume, kBuild };

// *replaces is set when a complete cache is there to be replaced (built beside it).
CacheState existing_cache(const JobConfig& config, const std::string& description, bool force,
                          CacheReport& report, bool* replaces) {
  *replaces = false;
  if (!is_regular_file(datasets::manifest_path(config.cache.path))) {
    report.reason = "building (no cache yet)";
    return CacheState::kBuild;
  }
  try {
    const datasets::Manifest old = datasets::read_manifest(config.cache.path);
    *replaces = old.complete && datasets::files_out_of_step(config.cache.path, old).empty();
    if (old.meta.fingerprint != report.fingerprint) {
      report.reason =
          "rebuilding: changed " + join(describe_changes(old.meta.description, description), "; ");
      return CacheState::kBuild;
    }
    if (force) {
      report.reason = "rebuilding (forced)";
      return CacheState::kBuild;
    }
    if (!old.complete) return CacheState::kResume;
    // A complete cache whose files are not what its manifest records is repaired: the shards
    // that verify are kept, the others recomputed, the view written again.
    if (const auto problems = datasets::files_out_of_step(config.cache.path, old); !problems.empty()) {
      report.reason = "repairing: " + join(problems, "; ");
      return CacheState::kResume;
    }
    report.reason = "up to date (fingerprint " + report.fingerprint.substr(0, 12) + ")";
    report.rows = old.split_rows;
    report.feature_dim = old.meta.feature_dim;
    return CacheState::kUpToDate;
  } catch (const DataError& e) {
    report.reason = std::string("rebuilding: existing cache unusable (") + e.what() + ")";
    return CacheState::kBuild;
  }
}

datasets::CacheMeta base_meta(const JobConfig& config, const CacheReport& report,
                              const std::string& description, const std::string& trunk_sha,
                              const InputData& data, std::int64_t dim) {
  datasets::CacheMeta meta;
  meta.fingerprint = report.fingerprint;
  meta.description = description;
  meta.trunk_sha256 = trunk_sha;
  meta.trunk_path = config.trunk.path;
  meta.preprocessing = describe_preprocessing(config);
  meta.pooling = config.trunk.pooling;
  meta.torch_version = TORCH_VERSION;
  meta.dtype = datasets::parse_storage_dtype(config.cache.dtype);
  meta.feature_dim = dim;
  meta.label_sources = data.label_sources;
  meta.float_labels = data.float_labels;
  meta.label_stats = data.label_stats;
  meta.class_names = data.class_names;
  meta.label_class_names = data.label_class_names;
  meta.label_classes = data.label_classes;
  meta.label_bits = data.label_bits;
  meta.views = config.cache.views;
  return meta;
}

// Double buffering: the caller preprocesses and runs the trunk while this thread stores the
// previous batch (HDF5 is only ever called from this one thread).
class WriteBehind {
 public:
  struct Item {
    std::string split;
    at::Tensor features, ids;
    std::map<std::string, at::Tensor> labels;
    std::int64_t seek = -1;  // >= 0: the first batch of the shard that starts at this row
  };
  explicit WriteBehind(datasets::FeatureCacheWriter& writer)
      : queue_(2), thread_([this, &writer] {
          try {
            while (auto item = queue_.pop()) {
              if (item->seek >= 0) writer.seek(item->split, item->seek);
              writer.append(item->split, item->features, item->labels, item->ids);
            }
          } catch (...) {
            error_ = std::current_exception();
            queue_.close();
          }
        }) {}
  ~WriteBehind() { stop(); }
  // False when the writer failed (finish() rethrows its error).
  bool push(Item item) { return queue_.push(std::move(item)); }
  // Waits for every queued batch to be written; rethrows the writer's error.
  void finish() {
    stop();
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void stop() {
    queue_.close();
    if (thread_.joinable()) thread_.join();
  }
  BoundedQueue<Item> queue_;
  std::exception_ptr error_;
  std::thread thread_;
};

// What the cache stores per row: the trunk's pooled features, or, when the freeze policy
// leaves a trainable top, the frozen prefix's output and the inputs the top reads, each
// flattened (a text's token dimension padded to text.max_length first) and concatenated.
class RowEncoder {
 public:
  RowEncoder(trunk::Trunk& trunk, std::int64_t pad_tokens_to)
      : trunk_(trunk), prefix_(trunk.split().tunes), pad_to_(pad_tokens_to) {
    trunk.check_cacheable();
  }
  bool prefix() const { return prefix_; }
  bool on_cpu() const { return trunk_.device().is_cpu(); }

  at::Tensor operator()(const std::vector<at::Tensor>& inputs) const {
    if (!prefix_) return trunk_.encode(inputs);
    std::vector<at::Tensor> flat;
    for (const auto& p : parts(inputs)) flat.push_back(p.flatten(1));
    return at::cat(flat, 1);
  }

  // The layout of a row, from one sample's parts.
  std::vector<datasets::RowPart> layout(const std::vector<at::Tensor>& sample) const {
    std::vector<datasets::RowPart> out;
    const auto ps = parts(sample);
    const auto& split = trunk_.split();
    for (std::size_t k = 0; k < ps.size(); ++k) {
      const auto sizes = ps[k].sizes();
      out.push_back({k == 0 ? "boundary" : "input " + std::to_string(split.top_inputs[k - 1]),
                     std::vector<std::int64_t>(sizes.begin() + 1, sizes.end())});
    }
    return out;
  }

 private:
  std::vector<at::Tensor> parts(const std::vector<at::Tensor>& inputs) const {
    auto ps = trunk_.encode_prefix(inputs);
    const auto& split = trunk_.split();
    for (std::size_t k = 0; k < ps.size(); ++k) {
      if (k > 0) {
        const std::int64_t i = split.top_inputs[k - 1];
        const bool binary = ps[k].eq(0).logical_or(ps[k].eq(1)).all().item<bool>();
        CANOPY_CHECK(binary || at::isFloatingType(inputs[static_cast<std::size_t>(i)].scalar_type()),
                     ConfigError, "the trunk's top reads input ", i,
                     ", which holds integers beyond 0 and 1 (token ids?) that "
                     "the cache cannot store exactly; cut the trunk above the block that reads it");
      }
      if (pad_to_ > 0 && ps[k].dim() >= 2 && ps[k].size(1) < pad_to_) {
        std::vector<std::int64_t> pad(2 * static_cast<std::size_t>(ps[k].dim() - 1), 0);
        pad.back() = pad_to_ - ps[k].size(1);  // (last dim first) ... dim 1: after
        ps[k] = at::constant_pad_nd(ps[k], pad, 0.0);
      }
    }
    return ps;
  }

  trunk::Trunk& trunk_;
  bool prefix_;
  std::int64_t pad_to_;
};

// What the cache's manifest says of it; one sample tells the feature dimension (the writer
// needs it before the first shard), and a cache of a frozen prefix records its row layout.
datasets::CacheMeta cache_meta(const JobConfig& config, const CacheReport& report,
                               const std::string& description, const std::string& trunk_sha,
                               const InputData& data, const RowEncoder& encoder, const trunk::Trunk& trunk) {
  const auto sample = data.splits.at("train").inputs({0});
  const auto parts = encoder.prefix() ? encoder.layout(sample) : std::vector<datasets::RowPart>{};
  std::int64_t dim = parts.empty() ? encoder(sample).size(1) : 0;
  for (const auto& p : parts) dim += p.numel();
  auto meta = base_meta(config, report, description, trunk_sha, data, dim);
  if (encoder.prefix()) {
    meta.boundary = trunk.split().boundary;
    meta.row_parts = parts;
    log_info("cache holds the output of the frozen prefix (blocks up to " + meta.boundary +
             ") for the trainable top: " + std::to_string(dim) + " values per row");
  }
  return meta;
}

// Features of rows [w, wend) of `in`, in row order. Texts (`window` > batch) run in trunk
// batches of sorted lengths, scattered back to row order.
at::Tensor encode_window(const RowEncoder& trunk, const InputSplit& in, std::int64_t w, std::int64_t wend,
                         std::int64_t bs, std::int64_t window, std::int64_t dim) {
  std::vector<std::int64_t> order = row_range(w, wend);
  if (window == bs) return trunk(in.inputs(order));
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return in.lengths[a] < in.lengths[b]; });
  at::Tensor features = at::empty({wend - w, dim}, at::kFloat);
  for (std::size_t c = 0; c < order.size(); c += static_cast<std::size_t>(bs)) {
    const std::vector<std::int64_t> rows(order.begin() + c, order.begin() + std::min(order.size(), c + bs));
    features.index_copy_(0, at::tensor(rows, at::kLong) - w, trunk(in.inputs(rows)));
  }
  return features;
}

// Rows whose features are not all finite, counted while caching.
struct NonFinite {
  std::int64_t rows = 0;
  std::vector<std::string> first;  // "split id", at most 8

  void count(const std::string& split, const at::Tensor& features, const at::Tensor& ids) {
    const at::Tensor bad = features.isfinite().all(1).logical_not();
    if (!bad.any().item<bool>()) return;
    const at::Tensor where = bad.nonzero().flatten();
    rows += where.numel();
    for (std::int64_t k = 0; k < where.numel() && first.size() < 8; ++k) {
      first.push_back(split + " " + std::to_string(ids[where[k].item<std::int64_t>()].item<std::int64_t>()));
    }
  }
};

// Where a stop asked for (StopOnSignal) ended the trunk pass: the signal, 0 if it did not.
struct PassStop {
  int signal = 0;
  std::string split;
  std::int64_t row = 0;  // the first row of the shard it was in
};

// A stop for the trunk pass: this process's own, which under mpirun it tells the other ranks
// (they do not go in step: each through its own shards), or one another rank was sent.
int pass_stop_signal(const std::string& split, std::int64_t row) {
  if (const int own = stop_signal()) {
    mpi::tell_others(own);
    return own;
  }
  const int other = mpi::told();
  if (other != 0) {
    log_info(detail::str_cat("another rank was sent ", signal_name(other), ": this rank stops too, before ",
                             split, " row ", row));
  }
  return other;
}

// Runs the trunk over the rows of `slots` (shards not yet in the cache) and hands the batches
// to `out`, until a stop is asked for. Trunk batches never cross a shard's start, so a shard's
// contents are the same whichever process computes it and whatever ran before.
PassStop encode_shards(const JobConfig& config, const RowEncoder& trunk, const InputData& data,
                       const std::vector<datasets::ShardSlot>& slots, std::int64_t dim, WriteBehind& out,
                       Progress& progress, CacheReport& report, NonFinite& nonfinite) {
  for (const auto& slot : slots) {
    const InputSplit& in = data.splits.at(slot.split);
    // Texts run in trunk batches of similar length, chosen within a window of 8 batches
    // (a whole number of windows per shard, so a resumed run forms the same batches).
    const std::int64_t bs = config.cache.batch_size;
    const std::int64_t window = !in.lengths.empty() && config.cache.shard_rows % (8 * bs) == 0 ? 8 * bs : bs;
    const std::int64_t slot_end = slot.first_row + slot.rows;
    for (std::int64_t w = slot.first_row; w < slot_end; w += window) {
      // What is queued still gets written (WriteBehind drains it), so every shard it completes
      // is kept.
      if (const int signal = pass_stop_signal(slot.split, w)) return {signal, slot.split, slot.first_row};
      const std::int64_t wend = std::min(slot_end, w + window);
      const auto t0 = Clock::now();
      const at::Tensor features = encode_window(trunk, in, w, wend, bs, window, dim);
      report.trunk_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
      nonfinite.count(slot.split, features, in.ids.slice(0, w, wend));
      for (std::int64_t i = w; i < wend; i += bs) {
        const std::int64_t end = std::min(wend, i + bs);
        std::map<std::string, at::Tensor> labels;
        for (const auto& [name, column] : in.labels) labels[name] = column.slice(0, i, end);
        const auto t1 = Clock::now();
        if (!out.push({slot.split, features.slice(0, i - w, end - w), in.ids.slice(0, i, end),
                       std::move(labels), i == slot.first_row ? slot.first_row : -1})) {
          return {};  // the writer failed: WriteBehind::finish rethrows its error
        }
        report.write_wait_seconds += std::chrono::duration<double>(Clock::now() - t1).count();
        report.rows_computed += end - i;
        progress.advance(end - i, slot.split);
      }
    }
  }
  return {};
}

// Under mpirun, this rank's share of the shards still to write: each shard, the largest first,
// goes to the rank with the fewest rows so far (every rank computes the same deal); a rank
// writes its shards in cache order.
std::vector<datasets::ShardSlot> my_share(const std::vector<datasets::ShardSlot>& missing) {
  std::vector<std::size_t> order(missing.size());
  for (std::size_t k = 0; k < order.size(); ++k) order[k] = k;
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return missing[a].rows > missing[b].rows; });
  std::vector<std::int64_t> rows(static_cast<std::size_t>(mpi::size()), 0);
  std::vector<bool> mine(missing.size(), false);
  for (std::size_t k : order) {
    const auto r = static_cast<std::size_t>(std::min_element(rows.begin(), rows.end()) - rows.begin());
    rows[r] += missing[k].rows;
    mine[k] = static_cast<int>(r) == mpi::rank();
  }
  std::vector<datasets::ShardSlot> out;
  for (std::size_t k = 0; k < missing.size(); ++k) {
    if (mine[k]) out.push_back(missing[k]);
  }
  return out;
}

// What rank 0 found of an existing cache, on every rank (the others must not read a manifest
// rank 0 may be rewriting).
CacheState shared_state(CacheState state, bool& replaces, CacheReport& report) {
  if (!mpi::distributed()) return state;
  const std::string told =
      mpi::broadcast(std::to_string(static_cast<int>(state)) + (replaces ? "1" : "0") + report.reason);
  replaces = told.at(1) == '1';
  report.reason = told.substr(2);
  return static_cast<CacheState>(told.at(0) - '0');
}

// The augmented views of train (cache.views > 1): splits train.view1 ..., the same rows, ids
// and labels, each view's images drawn by datasets::augment_view.
void add_view_splits(const JobConfig& config, InputData& data) {
  for (std::int64_t v = 1; v < config.cache.views; ++v) {
    InputSplit view = data.splits.at("train");
    view.inputs = [base = view.inputs, ids = view.ids, v, aug = config.augment,
                   pre = config.preprocess](const std::vector<std::int64_t>& rows) {
      auto in = base(rows);
      in.at(0) = datasets::augment_view(in[0], ids.index_select(0, at::tensor(rows, at::kLong)), v, aug, pre);
      return in;
    };
    data.splits[datasets::view_split("train", v)] = std::move(view);
  }
}

// The cache's writer on this rank. Rank 0 (the owner) keeps what verifies and writes
// manifest.json; only then do the other ranks start, from that manifest, each listing its
// shards in its own manifest.rank<R>.json. `note` (rank 0) says what was kept.
datasets::FeatureCacheWriter open_writer(const std::string& target, const datasets::CacheMeta& meta,
                                         const std::map<std::string, std::int64_t>& split_rows,
                                         std::int64_t shard_rows, bool resume, std::string& note) {
  if (mpi::rank() == 0) {
    datasets::FeatureCacheWriter owner(target, meta, split_rows, shard_rows, resume, &note);
    mpi::barrier();
    return owner;
  }
  mpi::barrier();
  return datasets::FeatureCacheWriter(target, meta, split_rows, shard_rows, true, nullptr, mpi::rank());
}

// Never a finished cache that passes --verify and fails every head: any rank's non-finite
// rows fail the run on every rank, and rank 0 removes the manifest.
void refuse_non_finite(const NonFinite& nonfinite, const std::string& path, const std::string& target) {
  double bad_rows = static_cast<double>(nonfinite.rows);
  mpi::all_reduce_sum(&bad_rows, 1);
  if (bad_rows == 0) return;
  if (mpi::rank() == 0) std::remove(datasets::manifest_path(target).c_str());
  throw DataError(detail::str_cat(
      "the trunk gave non-finite features (NaN or Inf) for ", static_cast<std::int64_t>(bad_rows),
      " rows (first", mpi::distributed() ? " on " + mpi::describe_rank() : "", ": ",
      nonfinite.first.empty() ? "none" : join(nonfinite.first, ", "), "); the cache at '", path,
      "' was not finished. Check the trunk and the preprocessing "
      "(preprocess.mean, preprocess.std) for these inputs"));
}

// Refused before any trunk pass: rows left whose data alone (features, ids, labels; the files'
// headers come on top) is more than the free space where they go. Only a shortfall that is
// certain: a run that would fail hours later at the last shards fails now, with the numbers.
void refuse_what_cannot_fit(const std::vector<datasets::ShardSlot>& missing, const datasets::CacheMeta& meta,
                            const std::string& target) {
  const std::string dtype = datasets::storage_dtype_name(meta.dtype);
  std::int64_t rows = 0;
  for (const auto& slot : missing) rows += slot.rows;
  const double need = static_cast<double>(rows) * static_cast<double>(datasets::bytes_per_row(meta));
  const auto free = free_space(target);
  if (!free || need <= static_cast<double>(*free)) return;
  throw IoError(detail::str_cat(
      "not enough disk space for the cache: its ", rows, " rows still to compute need at least ",
      format_mib(need), " in shards (", meta.feature_dim, " features each in ", dtype,
      ", with ids and labels), and '", target, "' has ", format_mib(static_cast<double>(*free)),
      " free. Free space, or build it elsewhere (cache.path)",
      dtype == "float32" ? "; cache.dtype = float16 halves the features" : ""));
}

// After the memory fence refused a batch: the largest batch that passes
// (largest_batch_that_passes) on the split holding the longest text (any for images), beside
// `writer_bytes` held as the writer holds them; 0 when even those do not fit.
std::int64_t batch_that_fits(const RowEncoder& encoder, const InputData& data, std::int64_t bs,
                             std::uint64_t writer_bytes) {
  const InputSplit* in = nullptr;
  std::int64_t longest = -1;
  for (const auto& [name, split] : data.splits) {
    const std::int64_t most =
        split.lengths.empty() ? 0 : *std::max_element(split.lengths.begin(), split.lengths.end());
    if (split.rows > 0 && (most > longest || (most == longest && split.rows > in->rows))) {
      longest = most;
      in = &split;
    }
  }
  if (!in) return 0;
  release_freed_memory();
  // Counted by the fence (the data segment) though never touched.
  const std::unique_ptr<char[]> writer(new (std::nothrow) char[writer_bytes]);
  if (!writer) return 0;
  return largest_batch_that_passes(*in, bs,
                                   [&](const std::vector<std::int64_t>& rows) { encoder(in->inputs(rows)); });
}

// A trunk pass that met the memory fence: why, and a batch size that fits (advised_batch_size
// of the largest that passes beside the writer, which holds one shard's rows: its buffer,
// filled as the batches come and written from there).
[[noreturn]] void out_of_memory(const JobConfig& config, const datasets::CacheMeta& meta,
                                const RowEncoder& encoder, const InputData& data, const MemoryFence& fence,
                                std::int64_t rows_computed) {
  const std::int64_t bs = config.cache.batch_size;
  const auto refused = fence.refusal();
  const std::uint64_t row_bytes = datasets::bytes_per_row(meta);
  std::int64_t shard_rows = 0;  // the most a shard holds: cache.shard_rows, or a smaller split
  for (const auto& [name, split] : data.splits) shard_rows = std::max(shard_rows, split.rows);
  shard_rows = std::min(shard_rows, config.cache.shard_rows);
  const std::uint64_t writer_bytes = static_cast<std::uint64_t>(shard_rows) * row_bytes;
  const std::int64_t passes = batch_that_fits(encoder, data, bs, writer_bytes);
  const std::int64_t fits = advised_batch_size(passes, config.cache.shard_rows);
  // The writer's part is worth naming when it is a tenth of the room or more.
  const bool writer_counts = writer_bytes * 10 >= fence.room().bytes;
  const std::string writer =
      writer_counts ? detail::str_cat(
                          ", of which the writer holds up to ", format_mib(static_cast<double>(writer_bytes)),
                          " (a shard's rows, cache.shard_rows = ", config.cache.shard_rows, " of ",
                          row_bytes >= 1024 ? std::to_string(row_bytes / 1024) + " KiB"
                                            : std::to_string(row_bytes) + " bytes",
                          ")")
                    : std::string();
  const std::string shard_advice =
      writer_counts ? " (a smaller cache.shard_rows leaves the batches more)" : "";
  throw DataError(detail::str_cat(
      "the trunk passes over batches of ", bs,
      " rows (cache.batch_size) need more memory than this process may take",
      refused ? " (" + format_mib(static_cast<double>(refused->asked)) + " more was asked for with " +
                    format_mib(static_cast<double>(refused->grown)) + " in use by them)"
              : "",
      ": ", fence.room().said, " leaves ", format_mib(static_cast<double>(fence.room().bytes)), writer, ". ",
      passes > 0
          ? detail::str_cat("A pass over ", passes,
                            " rows fits beside it (tried after, halving the batch): set cache.batch_size = ",
                            fits, " or less", shard_advice, ", or run where there is more memory")
          : detail::str_cat("Not even a pass over one row fits", writer_counts ? " beside the writer" : "",
                            ": ", writer_counts ? "set cache.shard_rows lower, or " : "",
                            "run where there is more memory"),
      rows_computed > 0 ? detail::str_cat("; the shards finished (of the ", rows_computed,
                                          " rows computed) are kept, and the same command goes on from them")
                        : std::string("; no rows were computed")));
}

// A stop asked for during the pass, once what it computed is written: Stopped. Under mpirun
// every rank comes here once its share is done or it stopped (at its own signal, or one told
// by another rank), and all of them stop if any did.
void stop_after_pass(const PassStop& at, const CacheReport& report) {
  mpi::settle_told();
  const int signal = agree_on_stop(at.signal);  // a signal after the pass's last batch: it is done
  if (signal == 0) return;
  double rows = static_cast<double>(report.rows_computed);
  mpi::all_reduce_sum(&rows, 1);  // every rank's
  const bool ranks = mpi::distributed();
  throw Stopped(
      signal, detail::str_cat("stopped by ", signal_name(signal), " after ", static_cast<std::int64_t>(rows),
                              " rows", ranks ? " over " + std::to_string(mpi::size()) + " ranks" : "",
                              ": the finished shards are kept; run the same command again",
                              ranks ? " (with any number of ranks)" : "", " to compute the rest",
                              ranks ? "" : detail::str_cat(" (from ", at.split, " row ", at.row, ")")));
}

// This rank's shards through the trunk and to the writer, with progress, within the memory
// this process may take: past it an allocation fails and says so (out_of_memory), instead of
// the kernel's OOM kill. A trunk on a GPU keeps its activations there: no fence on the host.
void compute_shards(const JobConfig& config, const datasets::CacheMeta& meta, const RowEncoder& encoder,
                    const InputData& data, const std::vector<datasets::ShardSlot>& mine, std::int64_t todo,
                    datasets::FeatureCacheWriter& writer, ProgressStyle style, CacheReport& report,
                    NonFinite& nonfinite) {
  Progress progress("cache", todo, data.unit, style);
  WriteBehind out(writer);
  const KeepFreedMemory reuse_activations;  // no page faults for every batch's buffers
  const MemoryFence fence(encoder.on_cpu() ? memory_room(mpi::local_size(), PageCache::kFree) : std::nullopt);
  PassStop stopped;
  try {
    stopped = encode_shards(config, encoder, data, mine, meta.feature_dim, out, progress, report, nonfinite);
  } catch (const std::exception& e) {
    if (!fence.caused(e)) throw;
    out.finish();  // what was computed is written
    out_of_memory(config, meta, encoder, data, fence, report.rows_computed);
  }
  out.finish();
  if (stopped.signal == 0) progress.finish();
  stop_after_pass(stopped, report);
}

// One writer at a time: one job (its rank 0 holds the lock; under mpirun the other ranks
// write only the shards rank 0 hands them). What a killed or failed run left half-written
// goes (no manifest lists it). A cache that cannot be written (a read-only mount, another
// user's) is only checked, under a reader's lock: it may be up to date. Returns why it cannot
// be written, or "".
std::string lock_cache(const std::string& path, std::optional<DirLock>& lock) {
  std::string unwritable = why_not_writable(path);
  lock.emplace(path, unwritable.empty() ? DirLock::Mode::kWrite : DirLock::Mode::kRead, "canopy cache");
  if (unwritable.empty()) {
    for (const char* sub : {"", "/shards", "/rebuild", "/rebuild/shards"}) remove_temporaries(path + sub);
  }
  return unwritable;
}

}  // namespace

namespace {
// What training would refuse of the config's tasks, against what the cache of `data` will
// hold, before the trunk pass spends its time: refused, or said (see run_cache).
void check_tasks_before_pass(const JobConfig& config, const tasks::HeadRegistry& registry,
                             const InputData& data, const datasets::CacheMeta& meta, std::int64_t width,
                             bool refuse) {
  try {
    const auto split = data.splits.find(config.train.eval_split);
    if (split == data.splits.end()) {
      std::vector<std::string> names;
      for (const auto& [name, rows] : data.splits) names.push_back(name);
      throw ConfigError(detail::str_cat("train.eval_split = ", config.train.eval_split,
                                        ": the data has no such split (it has: ", join(names, ", "), ")"));
    }
    datasets::SplitData eval;
    eval.labels = split->second.labels;
    check_tasks(config, registry, meta, eval, width, "the data");
  } catch (const Error& e) {
    if (refuse) throw;
    if (mpi::rank() == 0)
      log_info(std::string("cache: ") + e.what() + " (canopy train of this config will refuse it)");
  }
}
}  // namespace

CacheReport run_cache(const JobConfig& config, bool force, trunk::Trunk* trunk, ProgressStyle style,
                      const tasks::HeadRegistry* registry, bool refuse_tasks) {
  const auto start = Clock::now();
  CacheReport report;
  report.path = config.cache.path;
  validate_job_config(config);
  std::optional<DirLock> lock;
  std::string unwritable;
  if (mpi::rank() == 0) unwritable = lock_cache(config.cache.path, lock);
  // Hash the trunk file first: the description (and so the fingerprint) depends on it,
  // and a pinned hash must be checked before anything loads the file.
  const std::string trunk_sha = trunk ? trunk->sha256() : trunk::verified_trunk_sha256(config.trunk);
  const std::string description = cache_description(config, trunk_sha);
  report.fingerprint = sha256_hex(description);
  bool replaces = false;
  CacheState state =
      mpi::rank() == 0 ? existing_cache(config, description, force, report, &replaces) : CacheState::kBuild;
  CANOPY_CHECK(state == CacheState::kUpToDate || unwritable.empty(), IoError, "the cache '",
               config.cache.path, "' cannot be written (", unwritable,
               ") and is not up to date: ", report.reason,
               ". Build it where it can be written (cache.path), or make that directory writable");
  state = shared_state(state, replaces, report);
  // Under mpirun the ranks go on to read the cache (`canopy run`): rank 0 gives its lock back
  // first, and the others wait for that (and for the cache to be complete).
  const auto unlock_then_meet = [&] {
    lock.reset();
    if (mpi::distributed()) mpi::barrier();
  };
  if (state == CacheState::kUpToDate) {
    unlock_then_meet();
    report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    return report;
  }
  std::optional<trunk::Trunk> owned;
  if (!trunk) trunk = &owned.emplace(trunk::Trunk::load(config.trunk));
  if (!trunk->split().tunes)
    refuse_schedule_without_top(config.top.schedule, trunk::describe(config.trunk.freeze));
  InputData data = load_input_data(config);
  const RowEncoder encoder(*trunk, data.splits.at("train").lengths.empty() ? 0 : config.text.max_length);
  add_view_splits(config, data);
  std::map<std::string, std::int64_t> split_rows;
  for (const auto& [split, d] : data.splits) split_rows[split] = d.rows;
  const auto meta = cache_meta(config, report, description, trunk_sha, data, encoder, *trunk);
  const std::int64_t dim = meta.feature_dim;
  if (registry) {
    // The heads' width: the cached features', or over a trained top its output's (one row
    // through the whole trunk).
    const std::int64_t width =
        encoder.prefix() ? trunk->encode(data.splits.at("train").inputs({0})).size(1) : meta.feature_dim;
    check_tasks_before_pass(config, *registry, data, meta, width, refuse_tasks);
  }
  // A complete cache being replaced (other inputs, or --force) is rebuilt beside it, in
  // <path>/rebuild, and swapped in only when complete: a failed rebuild leaves it usable. A
  // rebuild killed earlier resumes there when its fingerprint matches.
  const bool beside = state == CacheState::kBuild && replaces;
  const std::string target = beside ? join_path(config.cache.path, "rebuild") : config.cache.path;
  const bool resume = state == CacheState::kResume || beside;
  std::string note;
  datasets::FeatureCacheWriter writer =
      open_writer(target, meta, split_rows, config.cache.shard_rows, resume, note);
  if (beside) note = "built beside the old cache, which stays usable until this one is complete; " + note;
  if (resume && !note.empty()) report.reason = report.reason.empty() ? note : report.reason + "; " + note;
  const auto missing = writer.missing_shards();
  refuse_what_cannot_fit(missing, meta, target);
  const auto mine = my_share(missing);
  std::int64_t todo = 0;
  for (const auto& slot : mine) todo += slot.rows;
  if (mpi::distributed()) {
    log_info("cache '" + config.cache.path + "': " + std::to_string(mine.size()) + " of the " +
             std::to_string(missing.size()) + " shards to write are this rank's (" + std::to_string(todo) +
             " rows)");
  }
  if (mpi::rank() == 0) {
    log_info("cache '" + config.cache.path + "': " + report.reason + "; trunk on " + trunk->device().str() +
             ", sha256 " + trunk_sha.substr(0, 12) + "...");
  }
  NonFinite nonfinite;
  compute_shards(config, meta, encoder, data, mine, todo, writer, style, report, nonfinite);
  refuse_non_finite(nonfinite, config.cache.path, target);
  mpi::barrier();  // every rank's shards are written and listed
  report.rows = split_rows;
  report.feature_dim = dim;
  report.rebuilt = true;
  if (mpi::rank() == 0) {
    writer.adopt_helper_shards();
    writer.finish();
    if (beside) datasets::replace_cache(config.cache.path, target);
  }
  unlock_then_meet();
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return report;
}

}  // namespace canopy::runners
