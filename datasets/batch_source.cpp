#include "canopy/datasets/batch_source.h"

#include <malloc.h>

#include <algorithm>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randperm.h>
#include <ATen/ops/zeros.h>

#include "canopy/core/bounded_queue.h"
#include "canopy/core/error.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/holdout.h"

namespace canopy::datasets {

namespace {

at::Tensor epoch_permutation(std::int64_t n, std::uint64_t seed, std::int64_t epoch, std::uint64_t salt) {
  auto gen =
      at::detail::createCPUGenerator(seed * 1000003ULL + static_cast<std::uint64_t>(epoch) * 7919ULL + salt);
  return at::randperm(n, gen, at::TensorOptions().dtype(at::kLong));
}

std::uint64_t bytes_of(const SplitData& d) {
  std::uint64_t b = (d.features.defined() ? d.features.nbytes() : 0) +
                    (d.ids.defined() ? d.ids.numel() * 8 : 0) +
                    (d.positions.defined() ? d.positions.numel() * 8 : 0);
  for (const auto& [src, t] : d.labels) b += t.numel() * 8;
  return b;
}

class InMemorySource : public BatchSource {
 public:
  InMemorySource(SplitData data, std::int64_t batch_size, std::uint64_t seed, std::vector<at::Tensor> views)
      : data_(std::move(data)), batch_size_(batch_size), seed_(seed), views_(1 + views.size()) {
    if (!views.empty()) {  // every view's rows in one tensor: view v of row r is row v * N + r
      views.insert(views.begin(), data_.features);
      for (const auto& v : views) {
        CANOPY_CHECK(v.sizes() == data_.features.sizes(), DataError, "view of ", v.size(0), " rows for ",
                     data_.features.size(0));
      }
      all_views_ = at::cat(views);
      data_.features = all_views_.narrow(0, 0, data_.features.size(0));
    }
    bytes_ = bytes_of(data_) + (all_views_.defined() ? (views_ - 1) * data_.features.nbytes() : 0);
  }
  void start_epoch(std::int64_t epoch) override {
    order_ = epoch_permutation(rows(), seed_, epoch, 0);
    if (views_ > 1) {  // the view each row is served as this epoch
      auto gen = at::detail::createCPUGenerator(seed_ * 1000003ULL +
                                                static_cast<std::uint64_t>(epoch) * 7919ULL + 0x71e3ULL);
      view_ = at::randint(views_, {rows()}, gen, at::TensorOptions().dtype(at::kLong));
    }
    pos_ = 0;
  }
  bool next(Batch& b) override {
    if (pos_ >= rows()) return false;
    const at::Tensor idx = order_.slice(0, pos_, std::min(rows(), pos_ + batch_size_));
    pos_ += batch_size_;
    b.features = views_ > 1
                     ? all_views_.index_select(0, idx + view_.index_select(0, idx) * rows()).to(at::kFloat)
                     : data_.features.index_select(0, idx).to(at::kFloat);
    b.index = idx;
    b.labels.clear();
    for (const auto& [src, t] : data_.labels) b.labels[src] = t.index_select(0, idx);
    return true;
  }
  std::int64_t rows() const override { return data_.features.size(0); }
  std::uint64_t peak_bytes() const override { return bytes_; }
  std::string describe() const override {
    return views_ > 1 ? "in memory, one of " + std::to_string(views_) + " views per row each epoch"
                      : "in memory";
  }

 private:
  SplitData data_;
  std::int64_t batch_size_;
  std::uint64_t seed_;
  std::int64_t views_;
  at::Tensor all_views_;  // [views x N, D] when views_ > 1
  at::Tensor view_;       // int64 [N]: this epoch's view of each row
  std::uint64_t bytes_ = 0;
  at::Tensor order_;
  std::int64_t pos_ = 0;
};

class StreamingSource : public BatchSource {
 public:
  StreamingSource(const FeatureCache& cache, std::string split, std::int64_t batch_size, std::uint64_t seed,
                  std::uint64_t cap, ReadMethod method, at::Tensor keep, std::int64_t views)
      : cache_(cache),
        split_(std::move(split)),
        shards_(cache.shards(split_)),
        batch_size_(batch_size),
        seed_(seed),
        cap_(cap),
        method_(method),
        keep_(std::move(keep)) {
    rows_ = keep_.defined() ? keep_.sum().item<std::int64_t>() : cache_.rows(split_);
    // Augmented views: their splits hold the same rows in the same shards, row for row.
    view_shards_.push_back(shards_);
    for (std::int64_t v = 1; v < views; ++v) {
      const std::string name = view_split(split_, v);
      auto shards = cache.shards(name);
      bool same = shards.size() == shards_.size();
      for (std::size_t k = 0; same && k < shards.size(); ++k)
        same = shards[k].first_row == shards_[k].first_row && shards[k].rows == shards_[k].rows;
      CANOPY_CHECK(same, DataError, "the cache's view split '", name, "' is not sharded as '", split_, "' (",
                   shards.size(), " shards against ", shards_.size(),
                   ", row for row); run `canopy cache` to rebuild it");
      view_shards_.push_back(std::move(shards));
    }
    for (const auto& s : shards_) {
      shard_bytes_ = std::max(shard_bytes_, bytes_of_shard(s));
      shard_rows_ = std::max(shard_rows_, s.rows);
    }
    // Memory, in shards: the window being served, the rows carried over from the previous
    // window (less than one batch), one shard queued and one being read.
    const std::uint64_t carry = static_cast<std::uint64_t>((batch_size + shard_rows_ - 1) / shard_rows_);
    const std::uint64_t fit = shard_bytes_ ? cap / shard_bytes_ : 0;
    CANOPY_CHECK(fit >= 3 + carry, DataError, "streaming '", split_, "' needs room for ", 3 + carry,
                 " shards of ", shard_bytes_, " bytes, cache.memory_cap_mb allows ", cap,
                 " bytes; raise the cap or rebuild with a smaller cache.shard_rows");
    window_ = fit - 2 - carry;
  }
  ~StreamingSource() override { stop(); }

  void start_epoch(std::int64_t epoch) override {
    stop();
    epoch_ = epoch;
    const auto n = static_cast<std::int64_t>(shards_.size());
    const at::Tensor order = epoch_permutation(n, seed_, epoch, 1);
    // With views, each shard is read as one of its views this epoch, drawn per (seed, epoch,
    // shard): a row is served as one view, reading no more than without views.
    at::Tensor view = at::zeros({n}, at::TensorOptions().dtype(at::kLong));
    if (view_shards_.size() > 1) {
      auto gen = at::detail::createCPUGenerator(seed_ * 1000003ULL +
                                                static_cast<std::uint64_t>(epoch) * 7919ULL + 0x71e4ULL);
      view = at::randint(static_cast<std::int64_t>(view_shards_.size()), {n}, gen,
                         at::TensorOptions().dtype(at::kLong));
    }
    std::vector<ShardInfo> ordered;
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t k = order[i].item<std::int64_t>();
      ordered.push_back(
          view_shards_[static_cast<std::size_t>(view[k].item<std::int64_t>())][static_cast<std::size_t>(k)]);
    }
    release_window(true);
    queue_ = std::make_unique<BoundedQueue<SplitData>>(1);
    error_ = nullptr;
    window_count_ = 0;
    reader_ = std::thread([this, ordered] {
      try {
        for (const auto& s : ordered) {
          const std::uint64_t bytes = bytes_of_shard(s);
          // A window's released shard, refilled in place: its pages are already mapped (a
          // new buffer page-faults every 4 KiB of it in again, on the cores that train).
          SplitData spare = take_spare();
          if (!spare.features.defined() || spare.features.size(0) != s.rows) {
            held_ -= bytes_of(spare);
            spare = SplitData();
            add_held(bytes);  // counted from allocation on
          }
          SplitData d = cache_.read_shard(s, method_, std::move(spare));
          d.positions = at::arange(s.first_row, s.first_row + s.rows, at::TensorOptions().dtype(at::kLong));
          if (keep_.defined()) {  // rows held out (a validation split) never train
            const at::Tensor local = keep_.slice(0, s.first_row, s.first_row + s.rows).nonzero().flatten();
            if (local.numel() < s.rows) {
              d = select_rows(d, local);
              held_ -= bytes - bytes_of(d);
            }
          }
          const std::uint64_t kept = bytes_of(d);
          if (!queue_->push(std::move(d))) {
            held_ -= kept;
            return;
          }
        }
      } catch (...) {
        error_ = std::current_exception();
      }
      queue_->close();
    });
  }

  bool next(Batch& b) override {
    // Top the window up until it holds a full batch or the epoch's shards are all in.
    while (total_ - pos_ < batch_size_ && refill()) {
    }
    if (error_) std::rethrow_exception(error_);
    if (pos_ >= total_) return false;
    const std::int64_t take = std::min(total_ - pos_, batch_size_);
    SplitData rows = gather(order_.slice(0, pos_, pos_ + take));
    pos_ += take;
    b.features = rows.features.to(at::kFloat);
    b.labels = std::move(rows.labels);
    b.index = std::move(rows.positions);
    return true;
  }

  std::int64_t rows() const override { return rows_; }
  std::uint64_t peak_bytes() const override { return peak_.load(); }
  std::string describe() const override {
    return "streaming (window of " + std::to_string(window_) + " shard(s), cap " +
           format_mib(static_cast<double>(cap_)) +
           (view_shards_.size() > 1
                ? ", each shard as one of " + std::to_string(view_shards_.size()) + " views each epoch"
                : std::string()) +
           ")";
  }

 private:
  std::uint64_t bytes_of_shard(const ShardInfo& s) const {
    return static_cast<std::uint64_t>(s.rows) * (bytes_per_row(cache_.meta()) + 8);  // and positions
  }

  void add_held(std::uint64_t b) {
    const std::uint64_t now = held_.fetch_add(b) + b;
    std::uint64_t p = peak_.load();
    while (now > p && !peak_.compare_exchange_weak(p, now)) {
    }
  }

  void release_window(bool trim) {
    const bool had = !parts_.empty();
    {
      const std::lock_guard<std::mutex> lock(spare_mutex_);
      for (std::size_t k = 0; k < parts_.size(); ++k) {
        // Shards as read (not a carry) wait for the reader to refill them, still counted as
        // held: at most a window's worth, which the old window's count held already. Whole
        // shards only (a short last shard fits no other); read_shard checks the rest.
        if (k >= first_shard_part_ && parts_[k].features.size(0) == shard_rows_ && spares_.size() < window_) {
          spares_.push_back(std::move(parts_[k]));
        } else {
          held_ -= bytes_of(parts_[k]);
        }
      }
    }
    parts_.clear();
    // glibc keeps freed blocks below its (self-raising) mmap threshold on the heap; give
    // them back so the process's memory, not only canopy's count, stays under the cap.
    // Once an epoch: the shards are refilled in place, and trimming at every window made
    // each batch's buffers page-fault in again (about 5% of a streamed run's time).
    if (had && trim) ::malloc_trim(0);
    offsets_ = {0};
    total_ = pos_ = 0;
  }

  // The rows `idx` (window positions) gathered from the parts of the window.
  SplitData gather(const at::Tensor& idx) const {
    if (parts_.size() == 1) return select_rows(parts_[0], idx);
    std::vector<std::pair<std::size_t, at::Tensor>> local;  // (part, its rows), in part order
    for (std::size_t p = 0; p < parts_.size(); ++p) {
      const at::Tensor in = idx.masked_select(idx.ge(offsets_[p]).logical_and(idx.lt(offsets_[p + 1])));
      if (in.numel() > 0) local.emplace_back(p, in - offsets_[p]);
    }
    if (local.size() == 1) return select_rows(parts_[local[0].first], local[0].second);
    // Each part's rows copied once, straight to their place in the batch.
    const SplitData& like = parts_[local[0].first];
    const std::int64_t n = idx.numel();
    SplitData out;
    out.features = at::empty({n, like.features.size(1)}, like.features.options());
    out.ids = at::empty({n}, like.ids.options());
    out.positions = at::empty({n}, like.positions.options());
    for (const auto& [src, t] : like.labels) {
      std::vector<std::int64_t> shape = t.sizes().vec();  // [rows] or [rows, K] (multi-hot)
      shape[0] = n;
      out.labels[src] = at::empty(shape, t.options());
    }
    std::int64_t first = 0;
    for (const auto& [p, rows] : local) {
      auto into = [&, &rows = rows](const at::Tensor& dst, const at::Tensor& src) {
        at::Tensor slice = dst.narrow(0, first, rows.numel());
        at::index_select_out(slice, src, 0, rows);
      };
      into(out.features, parts_[p].features);
      into(out.ids, parts_[p].ids);
      into(out.positions, parts_[p].positions);
      for (const auto& [src, t] : parts_[p].labels) into(out.labels.at(src), t);
      first += rows.numel();
    }
    return out;
  }

  // Keeps the window's unserved rows (less than a batch) and adds up to `window_` shards;
  // false when no shard was left to add.
  bool refill() {
    SplitData carry;
    const bool has_carry = pos_ < total_;
    if (has_carry) {
      carry = gather(order_.slice(0, pos_));
      add_held(bytes_of(carry));
    }
    release_window(false);
    if (has_carry) parts_.push_back(std::move(carry));
    first_shard_part_ = parts_.size();
    bool added = false;
    for (std::uint64_t k = 0; k < window_; ++k) {
      auto d = queue_->pop();
      if (!d) break;
      parts_.push_back(std::move(*d));
      added = true;
    }
    for (const auto& p : parts_) offsets_.push_back(offsets_.back() + p.features.size(0));
    total_ = offsets_.back();
    pos_ = 0;
    order_ = epoch_permutation(total_, seed_, epoch_, 2 + window_count_++);
    return added;
  }

  SplitData take_spare() {
    const std::lock_guard<std::mutex> lock(spare_mutex_);
    if (spares_.empty()) return {};
    SplitData d = std::move(spares_.back());
    spares_.pop_back();
    return d;
  }

  void stop() {
    if (queue_) queue_->close();
    if (reader_.joinable()) reader_.join();
    // Shards the reader counted but nobody will take.
    if (queue_) {
      while (auto d = queue_->pop()) held_ -= bytes_of(*d);
    }
  }

  const FeatureCache& cache_;
  std::string split_;
  std::vector<ShardInfo> shards_;
  std::vector<std::vector<ShardInfo>> view_shards_;  // [view][shard]; [0] is shards_
  std::int64_t batch_size_;
  std::uint64_t seed_;
  std::uint64_t cap_;
  ReadMethod method_;
  at::Tensor keep_;  // bool [split rows]: the rows served; undefined: all
  std::int64_t rows_ = 0;
  std::uint64_t shard_bytes_ = 0;
  std::int64_t shard_rows_ = 1;  // the largest shard's
  std::uint64_t window_ = 1;
  std::int64_t epoch_ = 0;
  std::unique_ptr<BoundedQueue<SplitData>> queue_;
  std::thread reader_;
  std::exception_ptr error_;
  std::vector<SplitData> parts_;
  std::mutex spare_mutex_;
  std::vector<SplitData> spares_;     // released shards, for the reader to refill
  std::size_t first_shard_part_ = 0;  // parts_ before it: the carry
  std::vector<std::int64_t> offsets_{0};
  at::Tensor order_;
  std::int64_t total_ = 0;
  std::int64_t pos_ = 0;
  std::uint64_t window_count_ = 0;
  std::atomic<std::uint64_t> held_{0};
  std::atomic<std::uint64_t> peak_{0};
};

}  // namespace

std::unique_ptr<BatchSource> make_in_memory_source(SplitData data, std::int64_t batch_size,
                                                   std::uint64_t seed, std::vector<at::Tensor> views) {
  return std::make_unique<InMemorySource>(std::move(data), batch_size, seed, std::move(views));
}

std::unique_ptr<BatchSource> make_streaming_source(const FeatureCache& cache, const std::string& split,
                                                   std::int64_t batch_size, std::uint64_t seed,
                                                   std::uint64_t memory_cap_bytes, ReadMethod method,
                                                   at::Tensor keep, std::int64_t views) {
  return std::make_unique<StreamingSource>(cache, split, batch_size, seed, memory_cap_bytes, method,
                                           std::move(keep), views);
}

}  // namespace canopy::datasets
