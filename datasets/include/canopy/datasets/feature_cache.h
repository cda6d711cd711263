// The feature cache: the trunk's features and the labels, written once, read every epoch.
//
// On-disk format, schema version 2. `cache.path` is a directory:
//
//   <dir>/manifest.json        the index, replaced atomically after every finished shard:
//       schema                 2
//       complete               true once every split is written
//       meta                   fingerprint, description (the parts the fingerprint hashes),
//                              trunk_sha256, trunk_path, preprocessing, pooling, torch_version,
//                              dtype, feature_dim, label_sources, class_names; for a cache of
//                              a frozen prefix also boundary (the last frozen block) and
//                              row_parts [{name, shape}] (how a row of /features splits)
//       splits                 {split: total rows}
//       shards                 [{split, index, first_row, rows, file, bytes, data regions:
//                              features_offset, features_crc32c (one CRC-32C per MiB of the
//                              features region), ids_offset, ids_crc32c,
//                              labels: {source: [offset, crc32c]}}]
//       manifest_crc32c        CRC-32C of this manifest as dumped (one-space indent, sorted
//                              keys) without this field; a reader checks it when present, and
//                              that the shards tile their splits (all rows when complete)
//   <dir>/shards/<split>-<index>.h5   one HDF5 file per shard (default 4096 rows):
//       /features              [rows, D] contiguous, float32 | float16 | uint16 (bfloat16 bits)
//       /features              attribute dtype = "float32" | "float16" | "bfloat16"
//       /ids                   int64 [rows], the sample's index in the input data set
//       /labels/<source>       int64 [rows] (float64 for meta.float_labels), one per source;
//                              a multi-hot source (label_lists.h: a list of more than 62
//                              labels) int64 [rows, K] of 0 and 1, its labels meta.label_bits
//   <dir>/cache.h5             one view over all shards, for users: per split, HDF5 virtual
//                              datasets /<split>/features [N, D], /<split>/ids,
//                              /<split>/labels/<source>; the meta fields as root attributes
//                              (canopy_schema, fingerprint, description, ...). Open it with
//                              h5py or `h5ls -r` from any working directory.
//
// Crash safety: each shard is written under a temporary name, fsynced and renamed; only
// then is it added to the manifest (itself written to a temporary file, fsynced, renamed).
// A run killed at any moment leaves a manifest listing only complete shards, and a rerun
// computes only the shards no manifest lists. Under mpirun the other ranks list theirs in
// <dir>/manifest.rank<R>.json, adopted into manifest.json when the cache is finished.
// Every data region is checksummed (CRC-32C) in the manifest and the file size recorded: a
// flipped byte or a truncated shard is reported, never used.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/core/progress.h"

namespace canopy::datasets {

// The HDF5 library canopy runs with, e.g. "1.10.8".
std::string hdf5_version();
// Flushes and closes every HDF5 object still open and shuts the library down (H5close), as
// its exit handler does, when any is still open; for a process about to end without running
// exit handlers.
void close_hdf5();
// Whether closing an HDF5 object has failed in this process (a full disk at a file's last
// write). HDF5 1.10's state is then unsafe to shut down: close_hdf5() does nothing, and a
// process should end without exit handlers (HDF5's own calls H5close).
bool hdf5_close_failed();

constexpr std::int64_t kCacheSchemaVersion = 2;
// A cache with augmented views (meta.views > 1): split `train` holds view 0, splits
// `train.view1` ... hold the others, row for row. Readers before it refuse it by this number.
constexpr std::int64_t kCacheSchemaVersionViews = 3;
// A cache with a multi-hot label source ([rows, K], label_lists.h), with or without views:
// readers before it would take its labels for one value per row, and refuse it by this number.
constexpr std::int64_t kCacheSchemaVersionMultiHot = 4;
// The split that holds view `v` (> 0) of `split`.
std::string view_split(const std::string& split, std::int64_t v);
constexpr std::uint64_t kChecksumBlockBytes = 1 << 20;

enum class StorageDtype { kFloat32, kFloat16, kBFloat16 };
const char* storage_dtype_name(StorageDtype dtype);
StorageDtype parse_storage_dtype(const std::string& name);  // ConfigError naming the value
at::ScalarType scalar_type(StorageDtype dtype);

// One part of a cached row when the cache holds a frozen prefix's output (its boundary)
// rather than pooled features: the row is the parts flattened and concatenated, in order.
struct RowPart {
  std::string name;                 // "boundary", or the trunk input the top also reads ("input 1")
  std::vector<std::int64_t> shape;  // per sample, e.g. {192, 2, 2} or {256, 384}
  std::int64_t numel() const;
};

struct CacheMeta {
  std::string fingerprint;
  std::string description;
  std::string trunk_sha256;
  std::string trunk_path;
  std::string preprocessing;
  std::string pooling;
  std::string torch_version;
  StorageDtype dtype = StorageDtype::kFloat32;
  std::int64_t feature_dim = 0;
  std::int64_t views = 1;  // views per training sample (cache.views); view 0 is the plain one
  std::vector<std::string> label_sources{"class"};
  std::vector<std::string> float_labels;  // the label sources stored as float64 (regression
                                          // targets); the others are int64 classes
  std::vector<std::string> class_names;   // of the first label source, when it has names
  // The class names of every label source that has them (class folders, a CSV's named column,
  // an ARFF file's nominal values, Fashion-MNIST's class): a task on a source without
  // class_names of its own is named by its source's. Empty in a cache from before they were
  // recorded (names_of falls back to class_names for the first source).
  std::map<std::string, std::vector<std::string>> label_class_names;
  // The number of classes each integer label source declares (ARFF nominal values, class
  // folders, the idx data sets' 10, 2^k for all_labels): a task's class count comes from
  // here, never from which values a split happens to hold. Absent: not declared.
  std::map<std::string, std::int64_t> label_classes;
  // The label of each bit of a bitmask label source (all_labels; a JSON table's list of labels):
  // bit j is label_bits[source][j]. Absent: not recorded (caches from before 2026-12-06).
  std::map<std::string, std::vector<std::string>> label_bits;
  // A cache of a frozen prefix: the last frozen block, and the layout of each row. Empty for
  // a cache of pooled features.
  std::string boundary;
  std::vector<RowPart> row_parts;
  // Heads trained with the trunk's top: the top's autocast dtype (trunk.top_precision), for
  // their cards. Not part of a cache.
  std::string top_precision;
  // Mean and standard deviation over the train split of each float label source (what a
  // regression head standardises its targets with).
  std::map<std::string, std::pair<double, double>> label_stats;
  bool is_float_label(const std::string& source) const;
  // The class names of label source `source` (none when it has none).
  std::vector<std::string> names_of(const std::string& source) const;
  at::ScalarType label_dtype(const std::string& source) const;  // kDouble or kLong
  // The values a row holds of `source`: 1, or K for a multi-hot source (label_bits past
  // kMaxBits labels); and the shape of `rows` rows of it, {rows} or {rows, K}.
  std::int64_t label_width(const std::string& source) const;
  std::vector<std::int64_t> label_shape(const std::string& source, std::int64_t rows) const;
};

struct ShardInfo {
  std::string split;
  std::int64_t index = 0;
  std::int64_t first_row = 0;
  std::int64_t rows = 0;
  std::string file;  // relative to the cache directory
  std::uint64_t bytes = 0;
  std::uint64_t features_offset = 0;
  std::vector<std::uint32_t> features_crc32c;  // per kChecksumBlockBytes of the region
  std::uint64_t ids_offset = 0;
  std::uint32_t ids_crc32c = 0;
  std::map<std::string, std::pair<std::uint64_t, std::uint32_t>> labels;  // offset, crc
};

struct Manifest {
  CacheMeta meta;
  std::map<std::string, std::int64_t> split_rows;
  std::vector<ShardInfo> shards;
  bool complete = false;
};

std::string manifest_path(const std::string& dir);

// The schema version of a cache of this meta: 4 with a multi-hot label source, else 3 with
// views, else 2.
std::int64_t schema_of(const CacheMeta& meta);
// The bytes one row takes in a shard's data regions: its features in the storage dtype, its
// id and its labels (8 bytes a value: one per source, K for a multi-hot one). The files' own
// headers come on top.
std::uint64_t bytes_per_row(const CacheMeta& meta);
std::string view_path(const std::string& dir);
// What a cheap look at the cache in `dir` finds wrong against its manifest, without reading
// data: shards missing or of another size than recorded, a missing view. Empty when nothing.
std::vector<std::string> files_out_of_step(const std::string& dir, const Manifest& manifest);
// A complete cache built beside the one in `dir` (in `staged`, a subdirectory of it) takes
// its place: the old manifest goes first (from then until the new one is in place, a crash
// leaves no manifest and the next run builds again), then the shards, the view and last the
// manifest move in; `staged` is removed.
void replace_cache(const std::string& dir, const std::string& staged);
// Reads <dir>/manifest.json; DataError when missing or malformed.
Manifest read_manifest(const std::string& dir);
void write_manifest(const std::string& dir, const Manifest& manifest);

struct SplitData {
  at::Tensor features;                       // [N, D] in the storage dtype
  std::map<std::string, at::Tensor> labels;  // [N] per label source, int64 or float64
  at::Tensor ids;                            // int64 [N]
  at::Tensor positions;                      // int64 [N]: the rows' places in the split, where
                                             // a streamed read keeps them (else undefined)
};

// A shard not yet written: rows [first_row, first_row + rows) of `split`.
struct ShardSlot {
  std::string split;
  std::int64_t first_row = 0;
  std::int64_t rows = 0;
};

// The manifest in which helper rank `rank` of an MPI job lists the shards it wrote.
std::string helper_manifest_path(const std::string& dir, int rank);

// Writes a cache shard by shard. Alone (or as rank 0 of an MPI job, the owner) it cleans up,
// resumes and finishes the cache; helper ranks (helper_rank >= 0) write the shards they are
// given beside it, each listing them in its own manifest.rank<R>.json, which the owner adopts.
class FeatureCacheWriter {
 public:
  // Writes the cache in `dir`. With `resume`, an unfinished cache of the same fingerprint
  // keeps every shard that verifies (size and checksums) wherever it sits in its split, as
  // listed by manifest.json or a helper's manifest; anything else is cleared. `note` (if
  // given) says what was kept. A helper starts from the manifest.json the owner wrote.
  FeatureCacheWriter(std::string dir, CacheMeta meta, std::map<std::string, std::int64_t> split_rows,
                     std::int64_t shard_rows, bool resume, std::string* note = nullptr, int helper_rank = -1);
  FeatureCacheWriter(const FeatureCacheWriter&) = delete;
  FeatureCacheWriter& operator=(const FeatureCacheWriter&) = delete;
  FeatureCacheWriter(FeatureCacheWriter&&) noexcept;
  FeatureCacheWriter& operator=(FeatureCacheWriter&&) noexcept;
  ~FeatureCacheWriter();

  // Rows already stored for `split`.
  std::int64_t rows_done(const std::string& split) const;
  // The shards still to write: train's, test's, then the other splits' (by name), by row.
  std::vector<ShardSlot> missing_shards() const;
  // The next append to `split` starts at `row` (a shard's first row; nothing pending).
  void seek(const std::string& split, std::int64_t row);
  // Appends rows, in order, to `split` at its position (row 0 unless seek() moved it); a
  // shard is written whenever shard_rows are buffered or the split's end is reached.
  // features: [B, D] float; labels [B] per source (converted to the source's dtype); ids int64 [B].
  void append(const std::string& split, const at::Tensor& features,
              const std::map<std::string, at::Tensor>& labels, const at::Tensor& ids);
  // The owner: adds the shards the helper ranks listed (once they have all finished).
  void adopt_helper_shards();
  // The owner: writes the view file and marks the manifest complete. Every split must be complete.
  void finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// How shards are read: pread of the recorded data regions (no HDF5 call, parallel over
// blocks), or H5Dread through the HDF5 library (one thread).
enum class ReadMethod { kPread, kHdf5 };
ReadMethod parse_read_method(const std::string& name);

class FeatureCache {
 public:
  // Opens a complete cache; DataError for a missing, unfinished or unknown-schema cache.
  static FeatureCache open(const std::string& dir);
  FeatureCache(FeatureCache&&) noexcept;
  FeatureCache& operator=(FeatureCache&&) noexcept;
  ~FeatureCache();

  const CacheMeta& meta() const;
  const std::string& path() const;
  std::vector<std::string> splits() const;
  std::int64_t rows(const std::string& split) const;
  std::int64_t feature_dim() const;
  std::vector<ShardInfo> shards(const std::string& split) const;
  // Bytes the features of a split take in memory.
  std::uint64_t feature_bytes(const std::string& split) const;

  // Reads one shard, verifying its size and checksums. `reuse`, when it holds tensors of the
  // shard's shapes and dtypes that nothing else refers to, is filled in place instead of
  // allocating (a reader streaming shards after one another keeps its pages).
  SplitData read_shard(const ShardInfo& shard, ReadMethod method = ReadMethod::kPread,
                       SplitData reuse = {}) const;
  // Reads a whole split into memory (checksums verified). `reuse`, when it already holds
  // tensors of the split's shapes and dtypes, is filled in place instead of allocating.
  SplitData load_split(const std::string& split, ReadMethod method = ReadMethod::kPread,
                       SplitData* reuse = nullptr) const;
  // The rows `rows` (int64, ascending positions in the split) of a split, read shard by
  // shard (checksums verified), so memory holds one shard beside the result.
  SplitData load_rows(const std::string& split, const at::Tensor& rows,
                      ReadMethod method = ReadMethod::kPread) const;
  // One label source of a whole split, read without its features (checksums verified).
  at::Tensor load_labels(const std::string& split, const std::string& source) const;
  // Checks every shard's size and checksums, and the view users open: cache.h5's root
  // attributes equal the manifest's meta, every dataset has the manifest's shape, and every
  // row read through it (HDF5's virtual datasets, so through each shard's HDF5 header)
  // matches the manifest's checksums. Throws DataError naming the first bad part. Shows its
  // progress, rows read, in two parts (the shards, then the view) as `style` says.
  void verify(ProgressStyle style = ProgressStyle::kQuiet) const;

 private:
  struct Impl;
  explicit FeatureCache(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace canopy::datasets
