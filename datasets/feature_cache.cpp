#include "canopy/datasets/feature_cache.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include <ATen/ops/empty.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/hdf5.h"

namespace canopy::datasets {

// ---------------------------------------------------------------- writer
struct FeatureCacheWriter::Impl {
  std::string path;
  std::string tmp_path;
  std::vector<std::string> label_sources;
  h5::Handle file;
  h5::Handle split_group;
  h5::Handle features;
  h5::Handle ids;
  std::map<std::string, h5::Handle> labels;
  std::string split;
  std::int64_t dim = 0;
  std::int64_t rows = 0;
  bool committed = false;
};

FeatureCacheWriter::FeatureCacheWriter(std::string path, const CacheMeta& meta)
    : impl_(std::make_unique<Impl>()) {
  impl_->path = std::move(path);
  impl_->tmp_path = temp_path_for(impl_->path);
  impl_->label_sources = meta.label_sources;
  impl_->file = h5::create_file(impl_->tmp_path);
  const hid_t root = impl_->file.get();
  h5::write_attr(root, "canopy_schema", kCacheSchemaVersion);
  h5::write_attr(root, "fingerprint", meta.fingerprint);
  h5::write_attr(root, "description", meta.description);
  h5::write_attr(root, "trunk_sha256", meta.trunk_sha256);
  h5::write_attr(root, "trunk_path", meta.trunk_path);
  h5::write_attr(root, "preprocessing", meta.preprocessing);
  h5::write_attr(root, "pooling", meta.pooling);
  h5::write_attr(root, "torch_version", meta.torch_version);
  h5::write_attr(root, "label_sources", join(meta.label_sources, ","));
  h5::write_attr(root, "class_names", join(meta.class_names, ","));
}

FeatureCacheWriter::~FeatureCacheWriter() {
  if (!impl_->committed) {
    impl_->features.reset();
    impl_->ids.reset();
    impl_->labels.clear();
    impl_->split_group.reset();
    impl_->file.reset();
    std::remove(impl_->tmp_path.c_str());
  }
}

void FeatureCacheWriter::begin_split(const std::string& split, std::int64_t feature_dim) {
  CANOPY_CHECK(impl_->split.empty(), Error, "begin_split('", split, "') while split '",
               impl_->split, "' is still open");
  CANOPY_CHECK(feature_dim > 0, DataError, "feature dimension must be > 0, got ", feature_dim);
  impl_->split = split;
  impl_->dim = feature_dim;
  impl_->rows = 0;
  impl_->split_group = h5::create_group(impl_->file.get(), split);
  // Chunks of about 4 MiB of rows: large sequential reads, aligned with typical batches.
  const std::int64_t chunk_rows =
      std::clamp<std::int64_t>((4 << 20) / (4 * feature_dim), 64, 4096);
  impl_->features = h5::create_growable(impl_->split_group.get(), "features", H5T_IEEE_F32LE,
                                        feature_dim, chunk_rows);
  impl_->ids = h5::create_growable(impl_->split_group.get(), "ids", H5T_STD_I64LE, 0, 4096);
  h5::Handle labels_group = h5::create_group(impl_->split_group.get(), "labels");
  for (const auto& src : impl_->label_sources) {
    impl_->labels[src] = h5::create_growable(labels_group.get(), src, H5T_STD_I64LE, 0, 4096);
  }
}

void FeatureCacheWriter::append(const at::Tensor& features,
                                const std::map<std::string, at::Tensor>& labels,
                                const at::Tensor& ids) {
  CANOPY_CHECK(!impl_->split.empty(), Error, "append() before begin_split()");
  CANOPY_CHECK(features.dim() == 2 && features.size(1) == impl_->dim, DataError, "split '",
               impl_->split, "': features must be [B, ", impl_->dim, "], got ", features.sizes());
  const std::int64_t b = features.size(0);
  const at::Tensor f = features.to(at::kFloat).contiguous();
  h5::append_rows(impl_->features.get(), H5T_NATIVE_FLOAT, f.data_ptr<float>(), b, impl_->dim);
  const at::Tensor id = ids.to(at::kLong).contiguous();
  CANOPY_CHECK(id.numel() == b, DataError, "split '", impl_->split, "': ", id.numel(), " ids for ",
               b, " feature rows");
  h5::append_rows(impl_->ids.get(), H5T_NATIVE_INT64, id.data_ptr<std::int64_t>(), b, 0);
  for (auto& [src, handle] : impl_->labels) {
    const auto it = labels.find(src);
    CANOPY_CHECK(it != labels.end(), DataError, "split '", impl_->split, "': no labels for source '",
                 src, "'");
    const at::Tensor l = it->second.to(at::kLong).contiguous();
    CANOPY_CHECK(l.numel() == b, DataError, "split '", impl_->split, "': ", l.numel(),
                 " labels of '", src, "' for ", b, " feature rows");
    h5::append_rows(handle.get(), H5T_NATIVE_INT64, l.data_ptr<std::int64_t>(), b, 0);
  }
  impl_->rows += b;
}

void FeatureCacheWriter::end_split() {
  CANOPY_CHECK(!impl_->split.empty(), Error, "end_split() without begin_split()");
  h5::write_attr(impl_->split_group.get(), "rows", impl_->rows);
  impl_->features.reset();
  impl_->ids.reset();
  impl_->labels.clear();
  impl_->split_group.reset();
  impl_->split.clear();
}

void FeatureCacheWriter::commit() {
  CANOPY_CHECK(impl_->split.empty(), Error, "commit() while split '", impl_->split, "' is open");
  CANOPY_CHECK(H5Fflush(impl_->file.get(), H5F_SCOPE_GLOBAL) >= 0, IoError, "HDF5: flushing '",
               impl_->tmp_path, "' failed");
  impl_->file.reset();
  fsync_path(impl_->tmp_path);
  rename_durable(impl_->tmp_path, impl_->path);
  impl_->committed = true;
}

// ---------------------------------------------------------------- reader
struct FeatureCache::Impl {
  std::string path;
  h5::Handle file;
  CacheMeta meta;
};

FeatureCache::FeatureCache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FeatureCache::FeatureCache(FeatureCache&&) noexcept = default;
FeatureCache& FeatureCache::operator=(FeatureCache&&) noexcept = default;
FeatureCache::~FeatureCache() = default;

FeatureCache FeatureCache::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  CANOPY_CHECK(::access(path.c_str(), R_OK) == 0, DataError, "feature cache '", path,
               "' does not exist; run `canopy cache --config ...` first");
  impl->file = h5::open_file(path, false);
  const hid_t root = impl->file.get();
  const std::string where = "feature cache '" + path + "'";
  CANOPY_CHECK(h5::has_attr(root, "canopy_schema"), DataError, where,
               " has no canopy_schema attribute: not a canopy cache");
  const std::int64_t schema = h5::read_attr_int(root, "canopy_schema", where);
  CANOPY_CHECK(schema == kCacheSchemaVersion, DataError, where, " has schema version ", schema,
               ", this canopy reads version ", kCacheSchemaVersion, "; rebuild it");
  CacheMeta& m = impl->meta;
  m.fingerprint = h5::read_attr_string(root, "fingerprint", where);
  m.description = h5::read_attr_string(root, "description", where);
  m.trunk_sha256 = h5::read_attr_string(root, "trunk_sha256", where);
  m.trunk_path = h5::read_attr_string(root, "trunk_path", where);
  m.preprocessing = h5::read_attr_string(root, "preprocessing", where);
  m.pooling = h5::read_attr_string(root, "pooling", where);
  m.torch_version = h5::read_attr_string(root, "torch_version", where);
  m.label_sources = split(h5::read_attr_string(root, "label_sources", where), ',');
  m.class_names = split(h5::read_attr_string(root, "class_names", where), ',');
  return FeatureCache(std::move(impl));
}

const CacheMeta& FeatureCache::meta() const { return impl_->meta; }
const std::string& FeatureCache::path() const { return impl_->path; }

std::vector<std::string> FeatureCache::splits() const { return h5::list(impl_->file.get()); }

std::int64_t FeatureCache::rows(const std::string& split) const {
  const std::string where = "feature cache '" + impl_->path + "'";
  h5::Handle g = h5::open_group(impl_->file.get(), split, where);
  return h5::read_attr_int(g.get(), "rows", where + " split '" + split + "' (incomplete?)");
}

std::int64_t FeatureCache::feature_dim(const std::string& split) const {
  const std::string where = "feature cache '" + impl_->path + "'";
  h5::Handle d = h5::open_dataset(impl_->file.get(), split + "/features", where);
  return h5::shape(d.get()).at(1);
}

SplitData FeatureCache::load_split(const std::string& split) const {
  const std::string where = "feature cache '" + impl_->path + "' split '" + split + "'";
  CANOPY_CHECK(h5::exists(impl_->file.get(), split), DataError, "feature cache '", impl_->path,
               "' has no split '", split, "' (it has: ", join(splits(), ", "), ")");
  const std::int64_t n = rows(split);
  SplitData out;
  h5::Handle f = h5::open_dataset(impl_->file.get(), split + "/features", where);
  const auto fshape = h5::shape(f.get());
  CANOPY_CHECK(fshape.size() == 2 && fshape[0] == n, DataError, where, ": features have shape [",
               join({std::to_string(fshape.at(0)), std::to_string(fshape.size() > 1 ? fshape[1] : 0)}, ", "),
               "], expected ", n, " rows");
  out.features = at::empty({n, fshape[1]}, at::kFloat);
  h5::read_rows(f.get(), H5T_NATIVE_FLOAT, 0, n, out.features.data_ptr<float>());
  h5::Handle ids = h5::open_dataset(impl_->file.get(), split + "/ids", where);
  out.ids = at::empty({n}, at::kLong);
  h5::read_rows(ids.get(), H5T_NATIVE_INT64, 0, n, out.ids.data_ptr<std::int64_t>());
  for (const auto& src : impl_->meta.label_sources) {
    h5::Handle l = h5::open_dataset(impl_->file.get(), split + "/labels/" + src, where);
    at::Tensor t = at::empty({n}, at::kLong);
    h5::read_rows(l.get(), H5T_NATIVE_INT64, 0, n, t.data_ptr<std::int64_t>());
    out.labels[src] = t;
  }
  return out;
}

}  // namespace canopy::datasets
