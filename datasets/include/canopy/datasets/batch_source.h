// Batches of cached features for training: every batch is read once and handed to every
// head. Two sources:
//   InMemorySource   the whole split in memory, rows shuffled per epoch;
//   StreamingSource  bounded memory: a reader thread reads whole shards (sequential reads,
//                    checksums verified) into a bounded queue in a shuffled shard order;
//                    rows are shuffled within a window of shards. Peak memory stays under
//                    the cap; the shuffle is coarser than InMemorySource's.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/datasets/feature_cache.h"

namespace canopy::datasets {

struct Batch {
  at::Tensor features;                       // float32 [B, D]
  std::map<std::string, at::Tensor> labels;  // int64 [B] per label source
  at::Tensor index;                          // int64 [B]: the rows' positions (in memory: in
                                             // the data served; streamed: in the cache's split)
};

class BatchSource {
 public:
  virtual ~BatchSource() = default;
  // Starts epoch `epoch` (0-based); the order depends only on (seed, epoch).
  virtual void start_epoch(std::int64_t epoch) = 0;
  // The next batch of the epoch; false at its end.
  virtual bool next(Batch& batch) = 0;
  virtual std::int64_t rows() const = 0;
  // Most bytes of feature/label data held at once so far.
  virtual std::uint64_t peak_bytes() const = 0;
  virtual std::string describe() const = 0;
};

// `views`: augmented copies of the rows' features (views 1.., each [N, D] in data's row
// order); each epoch every row is then served once, as one view drawn per (seed, epoch, row).
std::unique_ptr<BatchSource> make_in_memory_source(SplitData data, std::int64_t batch_size,
                                                   std::uint64_t seed, std::vector<at::Tensor> views = {});

// Streams `split` of `cache` within `memory_cap_bytes`; DataError when the cap cannot hold
// the minimum of three shards (one being read, one queued, one being served). `keep`
// (bool [rows of the split]), when given, names the rows served; the others are skipped.
// `views` > 1: the split has augmented views (view_split(split, v), v < views, sharded row
// for row); each epoch every shard is read as one of its views, drawn per (seed, epoch,
// shard), so a row is served once, as one view, for the bytes of one.
std::unique_ptr<BatchSource> make_streaming_source(const FeatureCache& cache, const std::string& split,
                                                   std::int64_t batch_size, std::uint64_t seed,
                                                   std::uint64_t memory_cap_bytes, ReadMethod method,
                                                   at::Tensor keep = {}, std::int64_t views = 1);

}  // namespace canopy::datasets
