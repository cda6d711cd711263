#include "canopy/datasets/feature_cache.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>
#include <sstream>
#include <tuple>

#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <oneapi/tbb/parallel_for.h>
#include <nlohmann/json.hpp>

#include "canopy/core/child.h"
#include "canopy/core/crc32c.h"
#include "canopy/core/error.h"
#include "canopy/core/fork_join.h"
#include "canopy/core/fs.h"
#include "canopy/core/json_checksum.h"
#include "canopy/core/label_lists.h"
#include "canopy/core/strings.h"
#include "hdf5_raii.h"

namespace canopy::datasets {

using nlohmann::json;

// ---------------------------------------------------------------- dtypes
const char* storage_dtype_name(StorageDtype d) {
  switch (d) {
    case StorageDtype::kFloat32:
      return "float32";
    case StorageDtype::kFloat16:
      return "float16";
    case StorageDtype::kBFloat16:
      return "bfloat16";
  }
  return "?";
}

StorageDtype parse_storage_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return StorageDtype::kFloat32;
  if (name == "float16" || name == "fp16") return StorageDtype::kFloat16;
  if (name == "bfloat16" || name == "bf16") return StorageDtype::kBFloat16;
  throw ConfigError("cache.dtype: expected float32, float16 or bfloat16, got '" + name + "'");
}

ReadMethod parse_read_method(const std::string& name) {
  if (name == "pread") return ReadMethod::kPread;
  if (name == "hdf5") return ReadMethod::kHdf5;
  throw ConfigError("cache.read_method: expected pread or hdf5, got '" + name + "'");
}

at::ScalarType scalar_type(StorageDtype d) {
  switch (d) {
    case StorageDtype::kFloat32:
      return at::kFloat;
    case StorageDtype::kFloat16:
      return at::kHalf;
    case StorageDtype::kBFloat16:
      return at::kBFloat16;
  }
  return at::kFloat;
}

namespace {
std::uint64_t element_size(StorageDtype d) { return d == StorageDtype::kFloat32 ? 4 : 2; }
}  // namespace

std::int64_t schema_of(const CacheMeta& m) {
  for (const auto& src : m.label_sources)
    if (m.label_width(src) > 1) return kCacheSchemaVersionMultiHot;
  return m.views > 1 ? kCacheSchemaVersionViews : kCacheSchemaVersion;
}

std::uint64_t bytes_per_row(const CacheMeta& meta) {
  std::uint64_t values = 1;  // the id
  for (const auto& src : meta.label_sources) values += static_cast<std::uint64_t>(meta.label_width(src));
  return static_cast<std::uint64_t>(meta.feature_dim) * element_size(meta.dtype) + 8 * values;
}

namespace {

// The HDF5 file type for a storage dtype. float16 is the IEEE half type h5py reads as
// numpy float16; bfloat16 has no HDF5 or numpy type and is stored as its 16-bit words.
h5::Handle file_type(StorageDtype d) {
  switch (d) {
    case StorageDtype::kFloat32:
      return h5::Handle(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
    case StorageDtype::kBFloat16:
      return h5::Handle(H5Tcopy(H5T_STD_U16LE), H5Tclose);
    case StorageDtype::kFloat16: {
      h5::Handle t(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
      CANOPY_CHECK(H5Tset_fields(t.get(), 15, 10, 5, 0, 10) >= 0 && H5Tset_size(t.get(), 2) >= 0 &&
                       H5Tset_ebias(t.get(), 15) >= 0,
                   IoError, "HDF5: cannot make the float16 type");
      return t;
    }
  }
  throw Error("unreachable");
}

// Features are read into memory as float32 when stored so, else as stored (bits kept).
hid_t feature_mem_type(StorageDtype d, const h5::Handle& file_type) {
  return d == StorageDtype::kFloat32 ? H5T_NATIVE_FLOAT : file_type.get();
}
// A label column's types in the file and in memory: float64 for real-valued labels, int64 for
// class labels.
hid_t label_file_type(const CacheMeta& meta, const std::string& source) {
  return meta.is_float_label(source) ? H5T_IEEE_F64LE : H5T_STD_I64LE;
}
hid_t label_mem_type(const CacheMeta& meta, const std::string& source) {
  return meta.is_float_label(source) ? H5T_NATIVE_DOUBLE : H5T_NATIVE_INT64;
}

std::uint32_t parse_hex32(const std::string& s) {
  return static_cast<std::uint32_t>(std::stoul(s, nullptr, 16));
}

std::vector<std::uint32_t> block_crcs(const std::uint8_t* p, std::uint64_t n) {
  std::vector<std::uint32_t> out((n + kChecksumBlockBytes - 1) / kChecksumBlockBytes);
  ForkJoin edges;
  tbb::parallel_for(std::size_t(0), out.size(), [&](std::size_t b) {
    [[maybe_unused]] const auto in = edges.body();
    const std::uint64_t begin = b * kChecksumBlockBytes;
    out[b] = crc32c(p + begin, std::min(kChecksumBlockBytes, n - begin));
  });
  edges.join();
  return out;
}

json meta_to_json(const CacheMeta& m) {
  json j{{"fingerprint", m.fingerprint},     {"description", m.description},
         {"trunk_sha256", m.trunk_sha256},   {"trunk_path", m.trunk_path},
         {"preprocessing", m.preprocessing}, {"pooling", m.pooling},
         {"torch_version", m.torch_version}, {"dtype", storage_dtype_name(m.dtype)},
         {"feature_dim", m.feature_dim},     {"label_sources", m.label_sources},
         {"class_names", m.class_names},     {"float_labels", m.float_labels},
         {"label_stats", m.label_stats}};
  if (!m.label_classes.empty()) j["label_classes"] = m.label_classes;
  if (!m.label_class_names.empty()) j["label_class_names"] = m.label_class_names;
  if (!m.label_bits.empty()) j["label_bits"] = m.label_bits;
  if (m.views > 1) j["views"] = m.views;
  if (!m.row_parts.empty()) {
    j["boundary"] = m.boundary;
    json parts = json::array();
    for (const auto& p : m.row_parts) parts.push_back({{"name", p.name}, {"shape", p.shape}});
    j["row_parts"] = parts;
  }
  return j;
}

CacheMeta meta_from_json(const json& j) {
  CacheMeta m;
  m.fingerprint = j.at("fingerprint");
  m.description = j.at("description");
  m.trunk_sha256 = j.at("trunk_sha256");
  m.trunk_path = j.at("trunk_path");
  m.preprocessing = j.at("preprocessing");
  m.pooling = j.at("pooling");
  m.torch_version = j.at("torch_version");
  m.dtype = parse_storage_dtype(j.at("dtype"));
  m.feature_dim = j.at("feature_dim");
  m.label_sources = j.at("label_sources").get<std::vector<std::string>>();
  m.class_names = j.at("class_names").get<std::vector<std::string>>();
  if (j.contains("float_labels")) m.float_labels = j.at("float_labels").get<std::vector<std::string>>();
  if (j.contains("label_classes"))
    m.label_classes = j.at("label_classes").get<std::map<std::string, std::int64_t>>();
  if (j.contains("label_class_names"))
    m.label_class_names = j.at("label_class_names").get<std::map<std::string, std::vector<std::string>>>();
  if (j.contains("label_bits"))
    m.label_bits = j.at("label_bits").get<std::map<std::string, std::vector<std::string>>>();
  if (j.contains("label_stats"))
    m.label_stats = j.at("label_stats").get<std::map<std::string, std::pair<double, double>>>();
  if (j.contains("views")) m.views = j.at("views");
  CANOPY_CHECK(m.views >= 1, DataError, "manifest: views = ", m.views);
  if (j.contains("row_parts")) {
    m.boundary = j.at("boundary");
    std::int64_t total = 0;
    for (const auto& p : j.at("row_parts")) {
      m.row_parts.push_back({p.at("name"), p.at("shape").get<std::vector<std::int64_t>>()});
      total += m.row_parts.back().numel();
    }
    CANOPY_CHECK(total == m.feature_dim, DataError, "manifest: row_parts hold ", total,
                 " values per row but feature_dim is ", m.feature_dim);
  }
  return m;
}

class Fd {
 public:
  explicit Fd(const std::string& path) : fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    CANOPY_CHECK(fd_ >= 0, DataError, "cannot open shard '", path, "': ", std::strerror(errno));
  }
  ~Fd() { ::close(fd_); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};
}  // namespace

bool CacheMeta::is_float_label(const std::string& source) const {
  return std::find(float_labels.begin(), float_labels.end(), source) != float_labels.end();
}

std::vector<std::string> CacheMeta::names_of(const std::string& source) const {
  if (const auto it = label_class_names.find(source); it != label_class_names.end()) return it->second;
  // A cache from before the names were recorded per source: class_names are the first source's.
  if (label_class_names.empty() && !label_sources.empty() && source == label_sources[0]) return class_names;
  return {};
}

std::int64_t RowPart::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

at::ScalarType CacheMeta::label_dtype(const std::string& source) const {
  return is_float_label(source) ? at::kDouble : at::kLong;
}

std::int64_t CacheMeta::label_width(const std::string& source) const {
  const auto bits = label_bits.find(source);
  return bits == label_bits.end() ? 1 : static_cast<std::int64_t>(list_width(bits->second.size()));
}

std::vector<std::int64_t> CacheMeta::label_shape(const std::string& source, std::int64_t rows) const {
  const std::int64_t k = label_width(source);
  return k > 1 ? std::vector<std::int64_t>{rows, k} : std::vector<std::int64_t>{rows};
}

namespace {
std::string join_ints(const std::vector<std::int64_t>& v) {
  std::string out = "[";
  for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}
}  // namespace

std::string manifest_path(const std::string& dir) { return join_path(dir, "manifest.json"); }
std::string view_path(const std::string& dir) { return join_path(dir, "cache.h5"); }

namespace {
Manifest read_manifest_file(const std::string& dir, const std::string& path);
void write_manifest_file(const std::string& path, const Manifest& m);

// Shards in the order a one-process run writes them: train, test, then the other splits by
// name; by row within a split. Every manifest is written in it, whatever wrote the shards.
void sort_shards(std::vector<ShardInfo>& shards) {
  auto rank = [](const std::string& split) { return split == "train" ? 0 : split == "test" ? 1 : 2; };
  std::stable_sort(shards.begin(), shards.end(), [&](const ShardInfo& a, const ShardInfo& b) {
    return std::make_tuple(rank(a.split), a.split, a.first_row) <
           std::make_tuple(rank(b.split), b.split, b.first_row);
  });
}
}  // namespace

std::string helper_manifest_path(const std::string& dir, int rank) {
  return join_path(dir, "manifest.rank" + std::to_string(rank) + ".json");
}

Manifest read_manifest(const std::string& dir) {
  const std::string path = manifest_path(dir);
  CANOPY_CHECK(is_regular_file(path), DataError, "feature cache '", dir,
               "' does not exist (no manifest.json); run `canopy cache --config ...` first");
  return read_manifest_file(dir, path);
}

void write_manifest(const std::string& dir, const Manifest& m) { write_manifest_file(manifest_path(dir), m); }

namespace {
// Every shard belongs to a split the manifest lists and lies inside it, no two overlap, and in
// a complete cache each split's shards cover all its rows (an unfinished one has gaps where
// shards are still to be written).
void check_shard_rows(const Manifest& m, const std::string& path) {
  std::map<std::string, std::vector<std::pair<std::int64_t, std::int64_t>>> spans;
  for (const auto& s : m.shards) {
    const auto it = m.split_rows.find(s.split);
    CANOPY_CHECK(it != m.split_rows.end(), DataError, "feature cache manifest '", path, "': shard '", s.file,
                 "' belongs to split '", s.split, "', which the manifest does not list");
    CANOPY_CHECK(s.rows > 0 && s.first_row >= 0 && s.first_row + s.rows <= it->second, DataError,
                 "feature cache manifest '", path, "': shard '", s.file, "' holds rows [", s.first_row, ", ",
                 s.first_row + s.rows, ") of split '", s.split, "', which has ", it->second);
    spans[s.split].emplace_back(s.first_row, s.first_row + s.rows);
  }
  for (const auto& [split, rows] : m.split_rows) {
    auto& v = spans[split];
    std::sort(v.begin(), v.end());
    std::int64_t covered = 0;
    for (std::size_t i = 0; i < v.size(); ++i) {
      CANOPY_CHECK(i == 0 || v[i].first >= v[i - 1].second, DataError, "feature cache manifest '", path,
                   "': two shards of split '", split, "' hold row ", v[i].first);
      covered += v[i].second - v[i].first;
    }
    CANOPY_CHECK(!m.complete || covered == rows, DataError, "feature cache manifest '", path,
                 "' says the cache is complete, but its shards hold ", covered, " of the ", rows,
                 " rows of split '", split, "'");
  }
}

Manifest read_manifest_file(const std::string& dir, const std::string& path) {
  try {
    json j = json::parse(read_file(path));
    // The manifest's own checksum (absent in manifests written before it): a flipped bit in a
    // shard's split, first row or file name would otherwise read as a smaller cache.
    if (const auto crc = unseal_json(j, "manifest_crc32c")) {
      const auto& [recorded, got] = *crc;
      CANOPY_CHECK(got == recorded, DataError, "feature cache manifest '", path,
                   "' does not match its checksum (CRC-32C ", got, ", recorded ", recorded,
                   "): it is corrupt; `canopy cache --force` rebuilds the cache");
    }
    const std::int64_t schema = j.at("schema");
    CANOPY_CHECK(schema >= kCacheSchemaVersion && schema <= kCacheSchemaVersionMultiHot, DataError,
                 "feature cache '", dir, "' has schema version ", schema, ", this canopy reads versions ",
                 kCacheSchemaVersion, " to ", kCacheSchemaVersionMultiHot, "; rebuild it");
    Manifest m;
    m.meta = meta_from_json(j.at("meta"));
    CANOPY_CHECK(schema == schema_of(m.meta), DataError, "feature cache '", dir, "': schema ", schema,
                 ", but its meta (", m.meta.views, " view(s), multi-hot label sources or none) is of schema ",
                 schema_of(m.meta));
    m.split_rows = j.at("splits").get<std::map<std::string, std::int64_t>>();
    m.complete = j.at("complete");
    for (const auto& s : j.at("shards")) {
      ShardInfo si;
      si.split = s.at("split");
      si.index = s.at("index");
      si.first_row = s.at("first_row");
      si.rows = s.at("rows");
      si.file = s.at("file");
      si.bytes = s.at("bytes");
      si.features_offset = s.at("features_offset");
      for (const auto& c : s.at("features_crc32c")) si.features_crc32c.push_back(parse_hex32(c));
      si.ids_offset = s.at("ids_offset");
      si.ids_crc32c = parse_hex32(s.at("ids_crc32c"));
      for (const auto& [src, v] : s.at("labels").items()) {
        si.labels[src] = {v.at(0).get<std::uint64_t>(), parse_hex32(v.at(1))};
      }
      m.shards.push_back(std::move(si));
    }
    check_shard_rows(m, path);
    return m;
  } catch (const json::exception& e) {
    throw DataError(detail::str_cat("feature cache manifest '", path, "' is malformed: ", e.what()));
  }
}

void write_manifest_file(const std::string& path, const Manifest& m) {
  json shards = json::array();
  for (const auto& s : m.shards) {
    json crcs = json::array();
    for (auto c : s.features_crc32c) crcs.push_back(crc32c_hex(c));
    json labels = json::object();
    for (const auto& [src, v] : s.labels) labels[src] = json::array({v.first, crc32c_hex(v.second)});
    shards.push_back(json{{"split", s.split},
                          {"index", s.index},
                          {"first_row", s.first_row},
                          {"rows", s.rows},
                          {"file", s.file},
                          {"bytes", s.bytes},
                          {"features_offset", s.features_offset},
                          {"features_crc32c", crcs},
                          {"ids_offset", s.ids_offset},
                          {"ids_crc32c", crc32c_hex(s.ids_crc32c)},
                          {"labels", labels}});
  }
  json j{{"schema", schema_of(m.meta)},
         {"complete", m.complete},
         {"meta", meta_to_json(m.meta)},
         {"splits", m.split_rows},
         {"shards", shards}};
  seal_json(j, "manifest_crc32c");
  write_file_atomic(path, j.dump(1) + "\n");
}
}  // namespace

// ---------------------------------------------------------------- shard reading
namespace {

// Reads one shard's data regions, checking the file's size and every checksum.
class RegionReader {
 public:
  RegionReader(const std::string& dir, const ShardInfo& s, const CacheMeta& meta)
      : file_(join_path(dir, s.file)), s_(s), meta_(meta), fd_(checked(file_, s)) {}

  const std::string& file() const { return file_; }

  // `file`, once its size is the manifest's.
  static const std::string& checked(const std::string& file, const ShardInfo& s) {
    const std::uint64_t size = file_size(file);
    CANOPY_CHECK(size == s.bytes, DataError, "shard '", file, "' has ", size, " bytes, the manifest says ",
                 s.bytes, " (truncated or replaced); rebuild with `canopy cache --force`");
    return file;
  }

  void check_crc(std::uint32_t got, std::uint32_t want, const std::string& region,
                 std::uint64_t offset) const {
    CANOPY_CHECK(got == want, DataError, "shard '", file_, "': checksum mismatch in ", region, " at byte ",
                 offset, " (CRC-32C ", crc32c_hex(got), ", manifest ", crc32c_hex(want),
                 "): the file is corrupt; rebuild with `canopy cache --force`");
  }

  // Checks the features already in `data` (rows x D in the storage dtype) block by block.
  void check_features(const void* data) const {
    const auto crcs = block_crcs(static_cast<const std::uint8_t*>(data), features_bytes());
    CANOPY_CHECK(crcs.size() == s_.features_crc32c.size(), DataError, "shard '", file_, "': manifest lists ",
                 s_.features_crc32c.size(), " feature checksums, expected ", crcs.size());
    for (std::size_t b = 0; b < crcs.size(); ++b) {
      check_crc(crcs[b], s_.features_crc32c[b], "features", s_.features_offset + b * kChecksumBlockBytes);
    }
  }

  // Reads the features region into `dst` with pread, in parallel over checksum blocks.
  void read_features(void* dst) {
    const std::uint64_t n = features_bytes();
    const std::size_t blocks = (n + kChecksumBlockBytes - 1) / kChecksumBlockBytes;
    CANOPY_CHECK(blocks == s_.features_crc32c.size(), DataError, "shard '", file_, "': manifest lists ",
                 s_.features_crc32c.size(), " feature checksums, expected ", blocks);
    auto* p = static_cast<std::uint8_t*>(dst);
    ForkJoin edges;
    tbb::parallel_for(std::size_t(0), blocks, [&](std::size_t b) {
      [[maybe_unused]] const auto in = edges.body();
      const std::uint64_t begin = b * kChecksumBlockBytes;
      const std::uint64_t len = std::min(kChecksumBlockBytes, n - begin);
      pread_exact(fd_.get(), p + begin, len, s_.features_offset + begin, "shard '" + file_ + "'");
      check_crc(crc32c(p + begin, len), s_.features_crc32c[b], "features", s_.features_offset + begin);
    });
    edges.join();
  }

  // Reads a region of 8-byte values (ids, a label column: `dst`'s rows) into `dst` and checks it.
  void read_column(at::Tensor dst, std::uint64_t offset, std::uint32_t crc, const std::string& region) {
    const auto bytes = static_cast<std::uint64_t>(dst.nbytes());
    pread_exact(fd_.get(), dst.data_ptr(), bytes, offset, "shard '" + file_ + "'");
    check_crc(crc32c(dst.data_ptr(), bytes), crc, region, offset);
  }

 private:
  std::uint64_t features_bytes() const {
    return static_cast<std::uint64_t>(s_.rows) * meta_.feature_dim * element_size(meta_.dtype);
  }
  std::string file_;
  const ShardInfo& s_;
  const CacheMeta& meta_;
  // Opened with the reader, before the blocks' threads share it: opened lazily by whichever
  // thread came first, two could each open it and one close the descriptor the other was
  // reading (`canopy train` failed with EBADF under strace, which slows the threads' start).
  Fd fd_;
};

// Reads one shard into the given destination tensors (rows [0, s.rows) of each).
void read_shard_into(const std::string& dir, const ShardInfo& s, const CacheMeta& meta, ReadMethod method,
                     at::Tensor features, std::map<std::string, at::Tensor>& labels, at::Tensor ids) {
  RegionReader r(dir, s, meta);
  if (method == ReadMethod::kPread) {
    r.read_features(features.data_ptr());
    r.read_column(ids, s.ids_offset, s.ids_crc32c, "ids");
    for (const auto& [src, v] : s.labels) r.read_column(labels.at(src), v.first, v.second, "labels/" + src);
    return;
  }
  // Through the HDF5 library (one thread), checksums verified on what it returns.
  h5::Handle file = h5::open_file(r.file(), false);
  const std::string where = "shard '" + r.file() + "'";
  auto read_ds = [&](const std::string& name, hid_t mem_type, at::Tensor dst) {
    h5::Handle d = h5::open_dataset(file.get(), name, where);
    h5::read_rows(d.get(), mem_type, 0, s.rows, dst.data_ptr());
  };
  h5::Handle ftype = file_type(meta.dtype);
  read_ds("features", feature_mem_type(meta.dtype, ftype), features);
  r.check_features(features.data_ptr());
  read_ds("ids", H5T_NATIVE_INT64, ids);
  r.check_crc(crc32c(ids.data_ptr(), s.rows * 8), s.ids_crc32c, "ids", s.ids_offset);
  for (const auto& [src, v] : s.labels) {
    read_ds("labels/" + src, label_mem_type(meta, src), labels.at(src));
    r.check_crc(crc32c(labels.at(src).data_ptr(), labels.at(src).nbytes()), v.second, "labels/" + src,
                v.first);
  }
}

SplitData allocate(std::int64_t rows, const CacheMeta& meta) {
  SplitData d;
  d.features = at::empty({rows, meta.feature_dim}, scalar_type(meta.dtype));
  d.ids = at::empty({rows}, at::kLong);
  for (const auto& src : meta.label_sources)
    d.labels[src] = at::empty(meta.label_shape(src, rows), meta.label_dtype(src));
  return d;
}

// Whether `d` holds contiguous tensors for `rows` rows of the cache's layout, to fill in place.
bool fits(const SplitData& d, std::int64_t rows, const CacheMeta& meta) {
  const at::Tensor& f = d.features;
  if (!f.defined() || f.dim() != 2 || f.size(0) != rows || f.size(1) != meta.feature_dim ||
      f.scalar_type() != scalar_type(meta.dtype) || !f.is_contiguous())
    return false;
  if (!d.ids.defined() || d.ids.numel() != rows || !d.ids.is_contiguous() ||
      d.labels.size() != meta.label_sources.size())
    return false;
  for (const auto& src : meta.label_sources) {
    const auto it = d.labels.find(src);
    if (it == d.labels.end() || it->second.sizes() != at::IntArrayRef(meta.label_shape(src, rows)) ||
        !it->second.is_contiguous() || it->second.scalar_type() != meta.label_dtype(src))
      return false;
  }
  return true;
}

SplitData read_shard_data(const std::string& dir, const ShardInfo& s, const CacheMeta& meta,
                          ReadMethod method) {
  SplitData d = allocate(s.rows, meta);
  read_shard_into(dir, s, meta, method, d.features, d.labels, d.ids);
  return d;
}

}  // namespace

namespace {
// The view's string attributes at its root, as users read them (h5py's attrs), besides
// canopy_schema: the meta fields of the manifest.
std::vector<std::pair<std::string, std::string>> view_attributes(const CacheMeta& meta) {
  std::vector<std::pair<std::string, std::string>> a = {{"fingerprint", meta.fingerprint},
                                                        {"description", meta.description},
                                                        {"trunk_sha256", meta.trunk_sha256},
                                                        {"trunk_path", meta.trunk_path},
                                                        {"preprocessing", meta.preprocessing},
                                                        {"pooling", meta.pooling},
                                                        {"torch_version", meta.torch_version},
                                                        {"dtype", storage_dtype_name(meta.dtype)},
                                                        {"label_sources", join(meta.label_sources, ",")},
                                                        {"float_labels", join(meta.float_labels, ",")},
                                                        {"class_names", join(meta.class_names, ",")}};
  if (!meta.row_parts.empty()) {
    std::vector<std::string> parts;
    for (const auto& p : meta.row_parts) parts.push_back(p.name + " " + join_ints(p.shape));
    a.emplace_back("boundary", meta.boundary);
    a.emplace_back("row_parts", join(parts, "; "));
  }
  return a;
}

// What mends a shard whose data verifies but whose HDF5 header does not, and a corrupt view:
// neither needs the whole cache rebuilt.
constexpr const char* kShardAdvice = "delete the shard and run `canopy cache`, which recomputes its rows";
constexpr const char* kViewAdvice = "delete it and run `canopy cache`, which writes it again from the shards";

// Checks that a shard's HDF5 header describes the regions the manifest checksums: each
// dataset's type, shape (and largest shape), file offset and size. A reader through HDF5
// (the view, h5py on the shard) finds the data by this header, not by the manifest.
void verify_shard_header(const std::string& dir, const ShardInfo& s, const CacheMeta& meta) {
  const std::string path = join_path(dir, s.file);
  const std::string where = "shard '" + path + "'";
  h5::Handle file = h5::open_file(path, false);
  h5::Handle ftype = file_type(meta.dtype);
  struct Expected {
    std::string name;
    hid_t type;
    std::vector<std::int64_t> dims;
    std::uint64_t offset;
  };
  std::vector<Expected> expected = {{"features", ftype.get(), {s.rows, meta.feature_dim}, s.features_offset},
                                    {"ids", H5T_STD_I64LE, {s.rows}, s.ids_offset}};
  for (const auto& [src, region] : s.labels)
    expected.push_back(
        {"labels/" + src, label_file_type(meta, src), meta.label_shape(src, s.rows), region.first});
  for (const auto& e : expected) {
    h5::Handle d = h5::open_dataset(file.get(), e.name, where);
    const auto dims = h5::shape(d.get()), max = h5::max_shape(d.get());
    std::uint64_t bytes = e.name == "features" ? element_size(meta.dtype) : 8;
    for (const auto n : e.dims) bytes *= static_cast<std::uint64_t>(n);
    const char* bad = !h5::has_type(d.get(), e.type)         ? "its type"
                      : dims != e.dims || max != e.dims      ? "its shape"
                      : h5::data_offset(d.get()) != e.offset ? "where its data starts"
                      : h5::storage_size(d.get()) != bytes   ? "its size"
                                                             : nullptr;
    if (bad) {
      throw DataError(detail::str_cat(where, ": the HDF5 header of dataset '", e.name, "' is corrupt (", bad,
                                      " differs from the manifest's: shape ", join_ints(dims), ", largest ",
                                      join_ints(max), ", expected ", join_ints(e.dims), "); ", kShardAdvice));
    }
  }
}

// Checks that the view cache.h5 gives HDF5 readers (h5py, h5ls, canopy's read_method = hdf5
// goes through the shards the same way) what the manifest describes: its root attributes, the
// shape of every dataset, and every row read through its virtual datasets against the
// manifest's checksums. The data regions are checked on their own by pread; what this adds
// is the HDF5 structure around them. A flipped byte in a shard's header can point a reader
// at other bytes, and one in the view's mapping makes HDF5 return its fill value (zeros) for
// the rows whose source it cannot open, in neither case with an error.
void verify_view(const std::string& dir, const Manifest& m, Progress& progress) {
  const CacheMeta& meta = m.meta;
  const std::string path = view_path(dir);
  CANOPY_CHECK(is_regular_file(path), DataError, "cache view '", path,
               "' is missing; `canopy cache` rebuilds it");
  const std::string where = "cache view '" + path + "'";
  const auto fail = [&](const auto&... what) {
    throw DataError(detail::str_cat(where, ": ", what..., "; ", kViewAdvice));
  };
  h5::Handle file = h5::open_file(path, false);
  const hid_t root = file.get();
  if (const auto schema = h5::read_int_attr(root, "canopy_schema", where); schema != schema_of(meta))
    fail("attribute canopy_schema is ", schema, ", the manifest's schema is ", schema_of(meta));
  for (const auto& [name, value] : view_attributes(meta)) {
    if (h5::read_string_attr(root, name, where) != value)
      fail("attribute ", name, " differs from the manifest's (", value.size(), " characters: '",
           value.substr(0, 60), value.size() > 60 ? "...'" : "'", ")");
  }
  std::vector<std::string> names;
  for (const auto& [split, rows] : m.split_rows) {
    for (const std::string n : {"", "/features", "/ids", "/labels"}) names.push_back(split + n);
    for (const auto& src : meta.label_sources) names.push_back(split + "/labels/" + src);
  }
  std::sort(names.begin(), names.end());
  if (h5::all_links(root) != names) fail("its objects are not the manifest's splits and fields");
  h5::Handle ftype = file_type(meta.dtype);
  const hid_t feature_mem = feature_mem_type(meta.dtype, ftype);
  for (const auto& [split, rows] : m.split_rows) {
    struct Column {
      std::string name;
      std::vector<std::int64_t> dims;
      hid_t type, mem_type;
      h5::Handle dataset;
    };
    std::vector<Column> columns;
    columns.push_back({split + "/features", {rows, meta.feature_dim}, ftype.get(), feature_mem, {}});
    columns.push_back({split + "/ids", {rows}, H5T_STD_I64LE, H5T_NATIVE_INT64, {}});
    for (const auto& src : meta.label_sources)
      columns.push_back({split + "/labels/" + src,
                         meta.label_shape(src, rows),
                         label_file_type(meta, src),
                         label_mem_type(meta, src),
                         {}});
    for (auto& c : columns) {
      c.dataset = h5::open_dataset(root, c.name, where);
      if (!h5::has_type(c.dataset.get(), c.type)) fail(c.name, " is not of the type canopy wrote");
      const auto got = h5::shape(c.dataset.get()), max = h5::max_shape(c.dataset.get());
      if (got != c.dims || max != c.dims)
        fail(c.name, " has shape ", join_ints(got), " (largest ", join_ints(max), "), the manifest says ",
             join_ints(c.dims));
    }
    for (const auto& s : m.shards) {
      if (s.split != split) continue;
      const SplitData d = allocate(s.rows, meta);
      const auto read = [&](const Column& c, const at::Tensor& dst) {
        try {
          h5::read_rows(c.dataset.get(), c.mem_type, s.first_row, s.first_row + s.rows, dst.data_ptr());
        } catch (const Error& e) {
          fail("reading rows [", s.first_row, ", ", s.first_row + s.rows, ") of ", c.name, " (shard '",
               s.file, "'): ", e.what());
        }
      };
      const auto differs = [&](const Column& c) {
        fail("rows [", s.first_row, ", ", s.first_row + s.rows, ") of ", c.name,
             " read through it differ from what shard '", s.file, "' holds (checksums verified)");
      };
      read(columns[0], d.features);
      const auto crcs = block_crcs(static_cast<const std::uint8_t*>(d.features.data_ptr()),
                                   static_cast<std::uint64_t>(d.features.nbytes()));
      if (crcs != s.features_crc32c) differs(columns[0]);
      read(columns[1], d.ids);
      if (crc32c(d.ids.data_ptr(), s.rows * 8) != s.ids_crc32c) differs(columns[1]);
      for (std::size_t i = 0; i < meta.label_sources.size(); ++i) {
        const std::string& src = meta.label_sources[i];
        const at::Tensor& t = d.labels.at(src);
        read(columns[2 + i], t);
        const auto it = s.labels.find(src);
        if (it == s.labels.end() || crc32c(t.data_ptr(), t.nbytes()) != it->second.second)
          differs(columns[2 + i]);
      }
      progress.advance(s.rows);
    }
  }
}
}  // namespace

// ---------------------------------------------------------------- writer
struct FeatureCacheWriter::Impl {
  std::string dir;
  std::string manifest_file;  // manifest.json, or a helper rank's manifest.rank<R>.json
  bool owner = true;
  Manifest manifest;
  std::int64_t shard_rows = 4096;
  // The shard being filled, per split: its rows are copied in as they come (stored dtype), so
  // the writer holds one shard's rows, written from there as they are. Allocated at the first
  // row of a shard, kept for the next one of the same size, released when the split is done.
  struct Pending {
    at::Tensor features, ids;  // [capacity, feature_dim], [capacity]
    std::map<std::string, at::Tensor> labels;
    std::int64_t rows = 0;  // filled
  };
  std::map<std::string, Pending> pending;
  std::map<std::string, std::int64_t> stored;  // rows in finished shards, per split
  std::map<std::string, std::int64_t> cursor;  // the row the next append starts at, per split

  bool has_shard(const std::string& split, std::int64_t first_row) const {
    for (const auto& s : manifest.shards) {
      if (s.split == split && s.first_row == first_row) return true;
    }
    return false;
  }
  // The buffer of the shard at `split`'s cursor, `rows` rows (a split's last shard may hold
  // fewer than shard_rows).
  void make_buffer(const std::string& split, std::int64_t rows);
  // Writes the pending rows of `split` as the shard at its cursor.
  void write_shard(const std::string& split);
  void write_view();
};

namespace {
// The manifests a run of the same fingerprint and splits left in `dir`: manifest.json and the
// helper ranks' manifest.rank<R>.json (read when present and readable; others are ignored).
std::vector<Manifest> earlier_manifests(const std::string& dir, const CacheMeta& meta,
                                        const std::map<std::string, std::int64_t>& split_rows) {
  std::vector<std::string> files;
  if (is_regular_file(manifest_path(dir))) files.push_back(manifest_path(dir));
  for (const auto& name : list_dir(dir)) {
    if (name.rfind("manifest.rank", 0) == 0 && name.size() > 5 &&
        name.compare(name.size() - 5, 5, ".json") == 0)
      files.push_back(join_path(dir, name));
  }
  std::vector<Manifest> out;
  for (const auto& f : files) {
    try {
      Manifest m = read_manifest_file(dir, f);
      if (m.meta.fingerprint == meta.fingerprint && m.split_rows == split_rows) out.push_back(std::move(m));
    } catch (const DataError&) {
      // unreadable: its shards are computed again
    }
  }
  return out;
}

void remove_helper_manifests(const std::string& dir) {
  for (const auto& name : list_dir(dir)) {
    if (name.rfind("manifest.rank", 0) == 0) std::remove(join_path(dir, name).c_str());
  }
}
}  // namespace

FeatureCacheWriter::FeatureCacheWriter(std::string dir, CacheMeta meta,
                                       std::map<std::string, std::int64_t> split_rows,
                                       std::int64_t shard_rows, bool resume, std::string* note,
                                       int helper_rank)
    : impl_(std::make_unique<Impl>()) {
  CANOPY_CHECK(shard_rows > 0, ConfigError, "cache.shard_rows must be > 0, got ", shard_rows);
  CANOPY_CHECK(meta.feature_dim > 0, DataError, "feature dimension must be > 0, got ", meta.feature_dim);
  impl_->dir = std::move(dir);
  impl_->shard_rows = shard_rows;
  impl_->owner = helper_rank < 0;
  impl_->manifest_file =
      impl_->owner ? manifest_path(impl_->dir) : helper_manifest_path(impl_->dir, helper_rank);
  Manifest kept;
  bool resumed = false;
  if (!impl_->owner) {
    // A helper rank starts from what the owner kept (it has cleaned up and written
    // manifest.json before any helper starts) and lists its own shards apart.
    kept = read_manifest(impl_->dir);
    CANOPY_CHECK(kept.meta.fingerprint == meta.fingerprint && kept.split_rows == split_rows, DataError,
                 "feature cache '", impl_->dir, "': rank 0's manifest is not of this cache");
  } else {
    make_dirs(join_path(impl_->dir, "shards"));
    if (resume) {
      // Keep every shard that verifies (size and checksums) and sits where this run would put
      // it: shards of shard_rows rows from row 0 (whichever process wrote them, in any order).
      std::set<std::string> seen;
      for (const Manifest& old : earlier_manifests(impl_->dir, meta, split_rows)) {
        resumed = true;
        for (const auto& s : old.shards) {
          const auto total = split_rows.find(s.split);
          if (total == split_rows.end() || s.first_row % shard_rows != 0 ||
              s.rows != std::min(shard_rows, total->second - s.first_row) ||
              !seen.insert(s.split + "/" + std::to_string(s.first_row)).second)
            continue;
          try {
            read_shard_data(impl_->dir, s, old.meta, ReadMethod::kPread);  // size and checksums
          } catch (const Error&) {
            seen.erase(s.split + "/" + std::to_string(s.first_row));  // another record may be good
            continue;
          }
          kept.shards.push_back(s);
        }
      }
    }
    // Remove every shard file the kept manifest does not list (old runs, temporaries).
    std::set<std::string> keep;
    for (const auto& s : kept.shards) keep.insert(s.file);
    for (const auto& name : list_dir(join_path(impl_->dir, "shards"))) {
      if (!keep.count("shards/" + name))
        std::remove(join_path(join_path(impl_->dir, "shards"), name).c_str());
    }
    std::remove(view_path(impl_->dir).c_str());
    sort_shards(kept.shards);
  }
  impl_->manifest.meta = std::move(meta);
  impl_->manifest.split_rows = std::move(split_rows);
  impl_->manifest.shards = kept.shards;
  impl_->manifest.complete = false;
  for (const auto& s : kept.shards) impl_->stored[s.split] += s.rows;
  for (const auto& [split, total] : impl_->manifest.split_rows) {  // appends continue after the leading run
    std::int64_t& at = impl_->cursor[split];
    while (at < total && impl_->has_shard(split, at)) at += shard_rows;
  }
  if (impl_->owner) {
    write_manifest(impl_->dir, impl_->manifest);
    remove_helper_manifests(impl_->dir);  // what they listed is in manifest.json now
  }
  if (note) {
    std::int64_t rows = 0;
    for (const auto& [split, n] : impl_->stored) rows += n;
    *note = resumed ? detail::str_cat("resuming: ", kept.shards.size(), " finished shard(s), ", rows,
                                      " rows kept")
                    : std::string("starting fresh");
  }
}

FeatureCacheWriter::FeatureCacheWriter(FeatureCacheWriter&&) noexcept = default;
FeatureCacheWriter& FeatureCacheWriter::operator=(FeatureCacheWriter&&) noexcept = default;
FeatureCacheWriter::~FeatureCacheWriter() = default;

std::int64_t FeatureCacheWriter::rows_done(const std::string& split) const {
  const auto it = impl_->stored.find(split);
  return it == impl_->stored.end() ? 0 : it->second;
}

std::vector<ShardSlot> FeatureCacheWriter::missing_shards() const {
  std::vector<ShardInfo> all;
  for (const auto& [split, total] : impl_->manifest.split_rows) {
    for (std::int64_t row = 0; row < total; row += impl_->shard_rows) {
      if (impl_->has_shard(split, row)) continue;
      ShardInfo s;
      s.split = split;
      s.first_row = row;
      s.rows = std::min(impl_->shard_rows, total - row);
      all.push_back(s);
    }
  }
  sort_shards(all);
  std::vector<ShardSlot> out;
  for (const auto& s : all) out.push_back({s.split, s.first_row, s.rows});
  return out;
}

void FeatureCacheWriter::seek(const std::string& split, std::int64_t row) {
  CANOPY_CHECK(impl_->pending[split].rows == 0, Error, "seek(", split, ", ", row,
               "): ", impl_->pending[split].rows, " rows are still pending");
  CANOPY_CHECK(row % impl_->shard_rows == 0, Error, "seek(", split, ", ", row, "): not at a shard start");
  impl_->cursor[split] = row;
  impl_->pending.erase(split);  // its buffer is made for the shard there
}

void FeatureCacheWriter::append(const std::string& split, const at::Tensor& features,
                                const std::map<std::string, at::Tensor>& labels, const at::Tensor& ids) {
  auto& m = impl_->manifest;
  const auto total_it = m.split_rows.find(split);
  CANOPY_CHECK(total_it != m.split_rows.end(), Error, "append to unknown split '", split, "'");
  CANOPY_CHECK(features.dim() == 2 && features.size(1) == m.meta.feature_dim, DataError, "split '", split,
               "': features must be [B, ", m.meta.feature_dim, "], got ", features.sizes());
  const std::int64_t b = features.size(0);
  CANOPY_CHECK(ids.numel() == b, DataError, "split '", split, "': ", ids.numel(), " ids for ", b, " rows");
  const std::int64_t at = impl_->cursor[split], filled = impl_->pending[split].rows;
  CANOPY_CHECK(at + filled + b <= total_it->second, DataError, "split '", split, "': ", at + filled + b,
               " rows appended, expected ", total_it->second);
  for (const auto& src : m.meta.label_sources) {
    const auto it = labels.find(src);
    CANOPY_CHECK(it != labels.end(), DataError, "split '", split, "': no labels for source '", src, "'");
    const auto shape = m.meta.label_shape(src, b);
    CANOPY_CHECK(
        it->second.sizes() == at::IntArrayRef(shape) || (shape.size() == 1 && it->second.numel() == b),
        DataError, "split '", split, "': labels of '", src, "' of shape ", it->second.sizes(), " for ", b,
        " rows (expected ", join_ints(shape), ")");
  }
  // Shards hold exactly shard_rows rows (the last of a split may hold fewer), whatever the
  // batch size: a resumed run then starts at the same row as the shard that follows.
  for (std::int64_t done = 0; done < b;) {
    auto& p = impl_->pending[split];  // (write_shard may drop it)
    if (!p.features.defined())
      impl_->make_buffer(split, std::min(impl_->shard_rows, total_it->second - impl_->cursor[split]));
    const std::int64_t take = std::min(b - done, p.features.size(0) - p.rows);
    p.features.slice(0, p.rows, p.rows + take).copy_(features.slice(0, done, done + take));
    p.ids.slice(0, p.rows, p.rows + take).copy_(ids.reshape({b}).slice(0, done, done + take));
    for (const auto& src : m.meta.label_sources)
      p.labels.at(src)
          .slice(0, p.rows, p.rows + take)
          .copy_(labels.at(src).reshape(m.meta.label_shape(src, b)).slice(0, done, done + take));
    p.rows += take;
    done += take;
    if (p.rows == p.features.size(0)) impl_->write_shard(split);
  }
}

void FeatureCacheWriter::Impl::make_buffer(const std::string& split, std::int64_t rows) {
  const CacheMeta& meta = manifest.meta;
  auto& p = pending[split];
  p.features = at::empty({rows, meta.feature_dim}, at::TensorOptions().dtype(scalar_type(meta.dtype)));
  p.ids = at::empty({rows}, at::kLong);
  for (const auto& src : meta.label_sources)
    p.labels[src] = at::empty(meta.label_shape(src, rows), at::TensorOptions().dtype(meta.label_dtype(src)));
}

void FeatureCacheWriter::Impl::write_shard(const std::string& split) {
  auto& pend = pending[split];
  const std::int64_t rows = pend.rows;
  const at::Tensor features = pend.features.slice(0, 0, rows);  // a prefix: contiguous
  const at::Tensor ids = pend.ids.slice(0, 0, rows);
  std::map<std::string, at::Tensor> labels;
  for (const auto& [src, l] : pend.labels) labels[src] = l.slice(0, 0, rows);
  const CacheMeta& meta = manifest.meta;
  const std::int64_t first_row = cursor[split];
  CANOPY_CHECK(!has_shard(split, first_row), Error, "split '", split, "': the shard at row ", first_row,
               " is already written");
  const std::int64_t index = first_row / shard_rows;
  char name[64];
  std::snprintf(name, sizeof name, "shards/%s-%05lld.h5", split.c_str(), static_cast<long long>(index));
  const std::string final_path = join_path(dir, name);
  ShardInfo info;
  info.split = split;
  info.index = index;
  info.first_row = first_row;
  info.rows = rows;
  info.file = name;
  const auto need = static_cast<std::uint64_t>(features.numel() * features.element_size()) + 1024 * 1024;
  h5::write_file_durably(
      final_path, "shard '" + final_path + "'", need,
      "; free space and run `canopy cache` again (the finished shards are kept)",
      [&](hid_t file) {
        h5::write_attr(file, "canopy_schema", schema_of(meta));
        h5::write_attr(file, "fingerprint", meta.fingerprint);
        h5::write_attr(file, "split", split);
        h5::write_attr(file, "first_row", info.first_row);
        h5::Handle ftype = file_type(meta.dtype);
        h5::Handle fd =
            h5::write_contiguous(file, "features", ftype.get(), feature_mem_type(meta.dtype, ftype),
                                 features.data_ptr(), {rows, meta.feature_dim});
        h5::write_attr(fd.get(), "dtype", std::string(storage_dtype_name(meta.dtype)));
        info.features_offset = h5::data_offset(fd.get());
        h5::Handle idd =
            h5::write_contiguous(file, "ids", H5T_STD_I64LE, H5T_NATIVE_INT64, ids.data_ptr(), {rows});
        info.ids_offset = h5::data_offset(idd.get());
        info.ids_crc32c = crc32c(ids.data_ptr(), rows * 8);
        h5::Handle lg = h5::create_group(file, "labels");
        for (const auto& src : meta.label_sources) {
          const at::Tensor& l = labels.at(src);
          h5::Handle ld =
              h5::write_contiguous(lg.get(), src, label_file_type(meta, src), label_mem_type(meta, src),
                                   l.data_ptr(), meta.label_shape(src, rows));
          info.labels[src] = {h5::data_offset(ld.get()), crc32c(l.data_ptr(), l.nbytes())};
        }
        info.features_crc32c = block_crcs(static_cast<const std::uint8_t*>(features.data_ptr()),
                                          features.numel() * features.element_size());
      },
      /*alignment=*/64);  // every object 64-byte aligned: data regions read straight into tensors
  info.bytes = file_size(final_path);
  manifest.shards.push_back(info);
  sort_shards(manifest.shards);
  write_manifest_file(manifest_file, manifest);  // the shard counts only from here on
  stored[split] += rows;
  cursor[split] += rows;
  // The next shard of the split fills the same buffer when it is as long; else a new one, or
  // none once the split is done.
  const std::int64_t next = std::min(shard_rows, manifest.split_rows.at(split) - cursor[split]);
  if (next == pend.features.size(0)) {
    pend.rows = 0;
  } else {
    pending.erase(split);
  }
}

void FeatureCacheWriter::adopt_helper_shards() {
  CANOPY_CHECK(impl_->owner, Error, "adopt_helper_shards(): only the owner (rank 0) adopts");
  for (const Manifest& m : earlier_manifests(impl_->dir, impl_->manifest.meta, impl_->manifest.split_rows)) {
    for (const auto& s : m.shards) {
      if (impl_->has_shard(s.split, s.first_row)) continue;
      CANOPY_CHECK(file_size(join_path(impl_->dir, s.file)) == s.bytes, DataError, "shard '", s.file,
                   "' listed by a helper rank has ", file_size(join_path(impl_->dir, s.file)),
                   " bytes, its manifest says ", s.bytes);
      impl_->manifest.shards.push_back(s);
      impl_->stored[s.split] += s.rows;
    }
  }
  sort_shards(impl_->manifest.shards);
  write_manifest(impl_->dir, impl_->manifest);
  remove_helper_manifests(impl_->dir);
}

void FeatureCacheWriter::finish() {
  CANOPY_CHECK(impl_->owner, Error, "finish(): only the owner (rank 0) finishes a cache");
  for (const auto& [split, total] : impl_->manifest.split_rows) {
    CANOPY_CHECK(rows_done(split) == total, Error, "finish(): split '", split, "' has ", rows_done(split),
                 " of ", total, " rows");
  }
  impl_->write_view();
  impl_->manifest.complete = true;
  write_manifest(impl_->dir, impl_->manifest);
}

namespace {
// The view's group of `split` (`total` rows): virtual datasets over its shards' rows; a
// multi-hot source's columns named for h5py users (its `labels` attribute, a JSON list).
void write_view_split(hid_t root, const Manifest& manifest, const std::string& split, std::int64_t total) {
  const CacheMeta& meta = manifest.meta;
  std::vector<h5::VirtualSource> fsrc, isrc;
  std::map<std::string, std::vector<h5::VirtualSource>> lsrc;
  for (const auto& s : manifest.shards) {
    if (s.split != split) continue;
    // Source paths relative to the view file: HDF5 looks there first.
    fsrc.push_back({s.file, "/features", s.first_row, s.rows});
    isrc.push_back({s.file, "/ids", s.first_row, s.rows});
    for (const auto& src : meta.label_sources)
      lsrc[src].push_back({s.file, "/labels/" + src, s.first_row, s.rows});
  }
  h5::Handle ftype = file_type(meta.dtype);
  h5::Handle g = h5::create_group(root, split);
  h5::write_attr(g.get(), "rows", total);
  h5::Handle f = h5::create_virtual(g.get(), "features", ftype.get(), {total, meta.feature_dim}, fsrc);
  h5::write_attr(f.get(), "dtype", std::string(storage_dtype_name(meta.dtype)));
  h5::create_virtual(g.get(), "ids", H5T_STD_I64LE, {total}, isrc);
  h5::Handle lg = h5::create_group(g.get(), "labels");
  for (const auto& src : meta.label_sources) {
    h5::Handle l = h5::create_virtual(lg.get(), src, label_file_type(meta, src), meta.label_shape(src, total),
                                      lsrc[src]);
    if (meta.label_width(src) > 1) h5::write_attr(l.get(), "labels", json(meta.label_bits.at(src)).dump());
  }
}
}  // namespace

void FeatureCacheWriter::Impl::write_view() {
  const CacheMeta& meta = manifest.meta;
  const std::string path = view_path(dir);
  h5::write_file_durably(path, "the view '" + path + "'", 1024 * 1024,
                         "; free space and run `canopy cache` again (the shards are kept)", [&](hid_t root) {
                           h5::write_attr(root, "canopy_schema", schema_of(meta));
                           for (const auto& [name, value] : view_attributes(meta))
                             h5::write_attr(root, name, value);
                           for (const auto& [split, total] : manifest.split_rows)
                             write_view_split(root, manifest, split, total);
                         });
}

// ---------------------------------------------------------------- reader
struct FeatureCache::Impl {
  std::string dir;
  Manifest manifest;
};

FeatureCache::FeatureCache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FeatureCache::FeatureCache(FeatureCache&&) noexcept = default;
FeatureCache& FeatureCache::operator=(FeatureCache&&) noexcept = default;
FeatureCache::~FeatureCache() = default;

FeatureCache FeatureCache::open(const std::string& dir) {
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->manifest = read_manifest(dir);
  if (!impl->manifest.complete) {
    std::int64_t done = 0, total = 0;
    for (const auto& s : impl->manifest.shards) done += s.rows;
    for (const auto& [split, n] : impl->manifest.split_rows) total += n;
    throw DataError(detail::str_cat("feature cache '", dir, "' is unfinished (", done, " of ", total,
                                    " rows written); run `canopy cache` again to resume it"));
  }
  return FeatureCache(std::move(impl));
}

const CacheMeta& FeatureCache::meta() const { return impl_->manifest.meta; }
const std::string& FeatureCache::path() const { return impl_->dir; }

std::vector<std::string> FeatureCache::splits() const {
  std::vector<std::string> out;
  for (const auto& kv : impl_->manifest.split_rows) out.push_back(kv.first);
  return out;
}

std::int64_t FeatureCache::rows(const std::string& split) const {
  const auto it = impl_->manifest.split_rows.find(split);
  CANOPY_CHECK(it != impl_->manifest.split_rows.end(), DataError, "feature cache '", impl_->dir,
               "' has no split '", split, "'", did_you_mean(split, splits()),
               " (it has: ", join(splits(), ", "), ")");
  return it->second;
}

std::int64_t FeatureCache::feature_dim() const { return impl_->manifest.meta.feature_dim; }

std::vector<ShardInfo> FeatureCache::shards(const std::string& split) const {
  rows(split);  // checks the split exists
  std::vector<ShardInfo> out;
  for (const auto& s : impl_->manifest.shards) {
    if (s.split == split) out.push_back(s);
  }
  std::sort(out.begin(), out.end(),
            [](const ShardInfo& a, const ShardInfo& b) { return a.first_row < b.first_row; });
  return out;
}

std::uint64_t FeatureCache::feature_bytes(const std::string& split) const {
  return static_cast<std::uint64_t>(rows(split)) * feature_dim() * element_size(meta().dtype);
}

SplitData FeatureCache::read_shard(const ShardInfo& shard, ReadMethod method, SplitData reuse) const {
  // Filled in place only when nothing else refers to any of its tensors.
  const auto alone = [](const at::Tensor& t) { return t.use_count() == 1 && t.storage().use_count() == 1; };
  bool own = reuse.features.defined() && reuse.ids.defined() && alone(reuse.features) && alone(reuse.ids);
  for (const auto& [src, t] : reuse.labels) own = own && t.defined() && alone(t);
  SplitData d = own && fits(reuse, shard.rows, meta()) ? std::move(reuse) : allocate(shard.rows, meta());
  read_shard_into(impl_->dir, shard, meta(), method, d.features, d.labels, d.ids);
  return d;
}

SplitData FeatureCache::load_split(const std::string& split, ReadMethod method, SplitData* reuse) const {
  SplitData d = reuse && fits(*reuse, rows(split), meta()) ? *reuse : allocate(rows(split), meta());
  for (const auto& s : shards(split)) {
    std::map<std::string, at::Tensor> labels;
    for (const auto& [src, t] : d.labels) labels[src] = t.narrow(0, s.first_row, s.rows);
    read_shard_into(impl_->dir, s, meta(), method, d.features.narrow(0, s.first_row, s.rows), labels,
                    d.ids.narrow(0, s.first_row, s.rows));
  }
  return d;
}

std::string view_split(const std::string& split, std::int64_t v) {
  return split + ".view" + std::to_string(v);
}

SplitData FeatureCache::load_rows(const std::string& split, const at::Tensor& rows, ReadMethod method) const {
  const std::int64_t n = this->rows(split);
  CANOPY_CHECK(
      rows.numel() == 0 || (rows.min().item<std::int64_t>() >= 0 && rows.max().item<std::int64_t>() < n),
      DataError, "rows of split '", split, "' must lie in [0, ", n, ")");
  std::vector<at::Tensor> f, ids;
  std::map<std::string, std::vector<at::Tensor>> l;
  for (const auto& s : shards(split)) {
    const at::Tensor in = rows.masked_select(rows.ge(s.first_row).logical_and(rows.lt(s.first_row + s.rows)));
    if (in.numel() == 0) continue;
    const SplitData d = read_shard_data(impl_->dir, s, meta(), method);
    const at::Tensor local = in - s.first_row;
    f.push_back(d.features.index_select(0, local));
    ids.push_back(d.ids.index_select(0, local));
    for (const auto& [src, t] : d.labels) l[src].push_back(t.index_select(0, local));
  }
  if (f.empty()) return allocate(0, meta());
  SplitData out;
  out.features = at::cat(f);
  out.ids = at::cat(ids);
  for (auto& [src, ts] : l) out.labels[src] = at::cat(ts);
  return out;
}

at::Tensor FeatureCache::load_labels(const std::string& split, const std::string& source) const {
  CANOPY_CHECK(std::find(meta().label_sources.begin(), meta().label_sources.end(), source) !=
                   meta().label_sources.end(),
               DataError, "feature cache '", impl_->dir, "' has no label source '", source,
               "' (it has: ", join(meta().label_sources, ", "), ")");
  at::Tensor out = at::empty(meta().label_shape(source, rows(split)), meta().label_dtype(source));
  for (const auto& s : shards(split)) {
    const auto it = s.labels.find(source);
    CANOPY_CHECK(it != s.labels.end(), DataError, "shard '", s.file, "' has no labels/", source);
    RegionReader r(impl_->dir, s, meta());
    r.read_column(out.narrow(0, s.first_row, s.rows), it->second.first, it->second.second,
                  "labels/" + source);
  }
  return out;
}

void FeatureCache::verify(ProgressStyle style) const {
  std::int64_t rows = 0;
  for (const auto& s : impl_->manifest.shards) rows += s.rows;
  {
    Progress progress("verify shards", rows, "rows", style);
    for (const auto& s : impl_->manifest.shards) {
      read_shard_data(impl_->dir, s, meta(), ReadMethod::kPread);
      progress.advance(s.rows);
    }
  }
  // HDF5 failing to read a header or an index (IoError) is the same finding as a field that
  // reads wrong: a corrupt file, and the same way to mend it.
  const auto advising = [](const char* advice, const auto& check) {
    try {
      check();
    } catch (const DataError&) {
      throw;
    } catch (const Error& e) {
      throw DataError(detail::str_cat(e.what(), "; ", advice));
    }
  };
  // In a child process: HDF5 1.10 crashes on some corrupt headers (core/child.h).
  run_in_child(
      "HDF5",
      [&](const ChildMark& mark) {
        for (const auto& s : impl_->manifest.shards) {
          mark("shard '" + join_path(impl_->dir, s.file) + "'");
          advising(kShardAdvice, [&] { verify_shard_header(impl_->dir, s, meta()); });
        }
        mark("the view '" + view_path(impl_->dir) + "'");
        Progress progress("verify view", rows, "rows", style);
        advising(kViewAdvice, [&] { verify_view(impl_->dir, impl_->manifest, progress); });
      },
      "delete that file and run `canopy cache`, which computes a shard's rows again or writes the view again "
      "from the shards");
}

void replace_cache(const std::string& dir, const std::string& staged) {
  CANOPY_CHECK(read_manifest(staged).complete, Error, "replace_cache: the cache in '", staged,
               "' is not complete");
  std::remove(manifest_path(dir).c_str());
  fsync_path(dir);
  remove_tree(join_path(dir, "shards"));
  rename_durable(join_path(staged, "shards"), join_path(dir, "shards"));
  rename_durable(view_path(staged), view_path(dir));
  rename_durable(manifest_path(staged), manifest_path(dir));
  remove_tree(staged);
}

std::vector<std::string> files_out_of_step(const std::string& dir, const Manifest& manifest) {
  std::vector<std::string> problems;
  for (const auto& s : manifest.shards) {
    const std::string path = join_path(dir, s.file);
    if (!is_regular_file(path)) {
      problems.push_back("shard '" + s.file + "' is missing");
    } else if (const auto size = file_size(path); size != s.bytes) {
      problems.push_back(detail::str_cat("shard '", s.file, "' has ", size, " bytes, not ", s.bytes));
    }
  }
  if (!is_regular_file(view_path(dir))) problems.push_back("the view cache.h5 is missing");
  return problems;
}

}  // namespace canopy::datasets
