// The feature cache: one HDF5 file holding, per split, the trunk's features and the labels.
//
// Format, schema version 1 (read it with h5py or h5ls as it is):
//   /                      attributes:
//       canopy_schema      int64, 1
//       fingerprint        SHA-256 (hex) of the canonical description below
//       description        the canonical description: every input that changes features
//       trunk_sha256       SHA-256 of the trunk file
//       trunk_path         the trunk file as given in the config
//       preprocessing      e.g. "scale=1/255;resize=64;interp=bilinear;channels=3;mean=0.5;std=0.5"
//       pooling            avg | flatten | none
//       torch_version      the LibTorch version that computed the features
//       label_sources      comma-separated names of the label columns, e.g. "class"
//       class_names        comma-separated names of the "class" labels (when known)
//   /<split>/features      float32 [N, D], chunked by rows, uncompressed
//   /<split>/labels/<src>  int64 [N], one dataset per label source
//   /<split>/ids           int64 [N], the sample's index in the input data set
//   /<split>               attribute rows (int64): N, written when the split is complete
//
// The file is written under a temporary name, fsynced and renamed into place: a run killed
// mid-write never leaves a file at the final path that looks complete.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace canopy::datasets {

constexpr std::int64_t kCacheSchemaVersion = 1;

struct CacheMeta {
  std::string fingerprint;
  std::string description;
  std::string trunk_sha256;
  std::string trunk_path;
  std::string preprocessing;
  std::string pooling;
  std::string torch_version;
  std::vector<std::string> label_sources{"class"};
  std::vector<std::string> class_names;
};

class FeatureCacheWriter {
 public:
  // Starts writing `path` (under a temporary name until commit()).
  FeatureCacheWriter(std::string path, const CacheMeta& meta);
  FeatureCacheWriter(const FeatureCacheWriter&) = delete;
  FeatureCacheWriter& operator=(const FeatureCacheWriter&) = delete;
  ~FeatureCacheWriter();  // without commit(): removes the temporary file

  void begin_split(const std::string& split, std::int64_t feature_dim);
  // features: float32 [B, D]; labels: int64 [B] per label source; ids: int64 [B].
  void append(const at::Tensor& features, const std::map<std::string, at::Tensor>& labels,
              const at::Tensor& ids);
  void end_split();
  // Closes, fsyncs and renames the file into place.
  void commit();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct SplitData {
  at::Tensor features;                        // float32 [N, D]
  std::map<std::string, at::Tensor> labels;   // int64 [N] per label source
  at::Tensor ids;                             // int64 [N]
};

class FeatureCache {
 public:
  // Opens an existing cache; DataError for a missing, non-HDF5 or unknown-schema file.
  static FeatureCache open(const std::string& path);
  FeatureCache(FeatureCache&&) noexcept;
  FeatureCache& operator=(FeatureCache&&) noexcept;
  ~FeatureCache();

  const CacheMeta& meta() const;
  const std::string& path() const;
  std::vector<std::string> splits() const;
  std::int64_t rows(const std::string& split) const;
  std::int64_t feature_dim(const std::string& split) const;
  // Reads a whole split into memory.
  SplitData load_split(const std::string& split) const;

 private:
  struct Impl;
  explicit FeatureCache(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace canopy::datasets
