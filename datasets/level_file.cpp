#include "canopy/datasets/level_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <vector>

#include <ATen/ops/empty.h>

#include "canopy/core/crc32c.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/sha256.h"
#include "canopy/core/strings.h"
#include "hdf5_raii.h"

namespace canopy::datasets {

namespace {

std::string rows_sha256(const at::Tensor& rows) {
  return sha256_hex(std::string_view(static_cast<const char*>(rows.const_data_ptr()),
                                     static_cast<std::size_t>(rows.numel()) * sizeof(float)));
}

std::string read_string_attr(hid_t obj, const std::string& name, const std::string& where) {
  h5::QuietErrors quiet;
  CANOPY_CHECK(H5Aexists(obj, name.c_str()) > 0, DataError, where, ": no attribute '", name, "'");
  h5::Handle attr(H5Aopen(obj, name.c_str(), H5P_DEFAULT), H5Aclose);
  CANOPY_CHECK(attr, DataError, where, ": cannot open attribute '", name, "'");
  h5::Handle type(H5Aget_type(attr.get()), H5Tclose);
  CANOPY_CHECK(type && H5Tget_class(type.get()) == H5T_STRING && H5Tis_variable_str(type.get()) == 0,
               DataError, where, ": attribute '", name, "' is not a fixed-length string");
  std::string value(H5Tget_size(type.get()), '\0');
  CANOPY_CHECK(H5Aread(attr.get(), type.get(), value.data()) >= 0, DataError, where, ": reading attribute '",
               name, "' failed");
  while (!value.empty() && value.back() == '\0') value.pop_back();
  return value;
}

constexpr const char* kRowCrcs = "row_crc32c";

// A level's row CRCs (`kRowCrcs`, one per row of `rows`); empty when the file has none (a
// level written over a split in memory).
std::vector<std::uint32_t> read_row_crcs(hid_t file, std::int64_t rows, const std::string& where) {
  if (!h5::exists(file, kRowCrcs)) return {};
  h5::Handle c = h5::open_dataset(file, kRowCrcs, where);
  CANOPY_CHECK(h5::shape(c.get()) == std::vector<std::int64_t>{rows}, DataError, where, ": ", kRowCrcs,
               " does not hold one CRC per row");
  std::vector<std::uint32_t> crcs(static_cast<std::size_t>(rows));
  h5::read_rows(c.get(), H5T_NATIVE_UINT32, 0, rows, crcs.data());
  return crcs;
}

// Rows per piece when a level is read whole in pieces: about 4 MiB.
std::int64_t piece_rows(std::int64_t values) {
  return std::max<std::int64_t>(1, (4 << 20) / std::max<std::int64_t>(1, values * 4));
}

}  // namespace

void write_level(const std::string& path, const LevelFile& level) {
  const at::Tensor rows = level.rows.to(at::kFloat).contiguous();
  CANOPY_CHECK(rows.dim() == 2, Error, "a cache level holds rows [N, D], got ", rows.sizes());
  make_dirs(parent_path(path));
  const auto need = static_cast<std::uint64_t>(rows.numel()) * sizeof(float) + 1024 * 1024;
  h5::write_file_durably(path, "cache level '" + path + "'", need, "", [&](hid_t file) {
    h5::Handle data = h5::write_contiguous(file, "rows", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT,
                                           rows.const_data_ptr(), {rows.size(0), rows.size(1)});
    h5::write_attr(data.get(), "block", level.block);
    h5::write_attr(data.get(), "fingerprint", level.fingerprint);
    h5::write_attr(data.get(), "sha256", rows_sha256(rows));
  });
}

std::string level_file_name(const std::string& block) { return block + ".h5"; }

LevelFile read_level(const std::string& path) {
  CANOPY_CHECK(is_regular_file(path), DataError, "cache level '", path, "' is missing");
  h5::Handle file = h5::open_file(path, false);
  h5::Handle data = h5::open_dataset(file.get(), "rows", "cache level '" + path + "'");
  const auto dims = h5::shape(data.get());
  CANOPY_CHECK(dims.size() == 2, DataError, "cache level '", path, "': rows has ", dims.size(),
               " dimensions, expected 2");
  LevelFile level;
  level.rows = at::empty({dims[0], dims[1]}, at::kFloat);
  h5::read_rows(data.get(), H5T_NATIVE_FLOAT, 0, dims[0], level.rows.data_ptr());
  level.block = read_string_attr(data.get(), "block", path);
  level.fingerprint = read_string_attr(data.get(), "fingerprint", path);
  const std::string sha = read_string_attr(data.get(), "sha256", path);
  CANOPY_CHECK(sha == rows_sha256(level.rows), DataError, "cache level '", path,
               "': its rows do not match their recorded SHA-256 (the file is corrupt)");
  return level;
}

void verify_level(const std::string& path) {
  CANOPY_CHECK(is_regular_file(path), DataError, "cache level '", path, "' is missing");
  h5::Handle file = h5::open_file(path, false);
  const std::string where = "cache level '" + path + "'";
  h5::Handle data = h5::open_dataset(file.get(), "rows", where);
  const auto dims = h5::shape(data.get());
  CANOPY_CHECK(dims.size() == 2, DataError, where, ": rows has ", dims.size(), " dimensions, expected 2");
  const std::vector<std::uint32_t> crcs = read_row_crcs(file.get(), dims[0], where);
  const std::int64_t step = piece_rows(dims[1]);
  at::Tensor piece = at::empty({std::min(step, dims[0]), dims[1]}, at::kFloat);
  Sha256 sha;
  const std::size_t row_bytes = static_cast<std::size_t>(dims[1]) * sizeof(float);
  for (std::int64_t i = 0; i < dims[0]; i += step) {
    const std::int64_t n = std::min(step, dims[0] - i);
    h5::read_rows(data.get(), H5T_NATIVE_FLOAT, i, i + n, piece.data_ptr());
    const char* bytes = static_cast<const char*>(piece.const_data_ptr());
    sha.update(bytes, static_cast<std::size_t>(n) * row_bytes);
    for (std::int64_t r = 0; r < n && !crcs.empty(); ++r) {
      CANOPY_CHECK(crc32c(bytes + r * row_bytes, row_bytes) == crcs[static_cast<std::size_t>(i + r)],
                   DataError, where, ": row ", i + r, " does not match its CRC-32C (the file is corrupt)");
    }
  }
  CANOPY_CHECK(sha.hex_digest() == read_string_attr(data.get(), "sha256", path), DataError, where,
               ": its rows do not match their recorded SHA-256 (the file is corrupt)");
}

namespace {

std::int64_t checked_position(const std::int64_t* index, std::int64_t i, std::int64_t rows,
                              const std::string& path) {
  const std::int64_t at = index[i];
  CANOPY_CHECK(at >= 0 && at < rows, Error, "internal: row ", at, " of cache level '", path,
               "', which holds ", rows);
  return at;
}

}  // namespace

LevelWriter::LevelWriter(std::string path, std::int64_t rows, std::int64_t values, std::string block,
                         std::string fingerprint)
    : path_(std::move(path)),
      tmp_(temp_path_for(path_)),
      what_("cache level '" + tmp_ + "'"),
      block_(std::move(block)),
      fingerprint_(std::move(fingerprint)),
      rows_(rows),
      values_(values) {
  make_dirs(parent_path(path_));
  try {
    {
      h5::Handle file = h5::create_file(tmp_);
      h5::Handle data = h5::write_contiguous(file.get(), "rows", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, nullptr,
                                             {rows_, values_});
      offset_ = h5::data_offset(data.get());
      data.reset();
      file.close("cache level '" + tmp_ + "'");
    }
    fd_ = ::open(tmp_.c_str(), O_RDWR | O_CLOEXEC);
    CANOPY_CHECK(fd_ >= 0, IoError, "opening cache level '", tmp_, "' failed: ", describe_errno(errno));
    const int err = ::posix_fallocate(fd_, static_cast<off_t>(offset_), static_cast<off_t>(bytes()));
    CANOPY_CHECK(err == 0, IoError, "reserving ", format_mib(static_cast<double>(bytes())),
                 " for cache level '", path_, "' failed: ", describe_errno(err));
  } catch (...) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    std::remove(tmp_.c_str());
    throw;
  }
  crc_.assign(static_cast<std::size_t>(rows_), 0);
  have_.assign(static_cast<std::size_t>(rows_), 0);
}

LevelWriter::~LevelWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_) std::remove(tmp_.c_str());
}

std::uint64_t LevelWriter::bytes() const {
  return static_cast<std::uint64_t>(rows_) * static_cast<std::uint64_t>(values_) * sizeof(float);
}

void LevelWriter::write(const at::Tensor& index, const at::Tensor& rows) {
  const at::Tensor idx = index.to(at::kLong).contiguous();
  const at::Tensor r = rows.to(at::kFloat).contiguous();
  CANOPY_CHECK(r.dim() == 2 && r.size(0) == idx.numel() && r.size(1) == values_, Error,
               "internal: ", r.sizes(), " rows for ", idx.numel(), " positions of a cache level of ", values_,
               " values");
  const std::size_t row_bytes = static_cast<std::size_t>(values_) * sizeof(float);
  const auto* positions = idx.const_data_ptr<std::int64_t>();
  const char* src = static_cast<const char*>(r.const_data_ptr());
  for (std::int64_t i = 0; i < idx.numel(); ++i) {
    const auto pos = checked_position(positions, i, rows_, path_);
    const char* row = src + i * row_bytes;
    pwrite_exact(fd_, row, row_bytes, offset_ + static_cast<std::uint64_t>(pos) * row_bytes, what_);
    crc_[static_cast<std::size_t>(pos)] = crc32c(row, row_bytes);
    if (!have_[static_cast<std::size_t>(pos)]) {
      have_[static_cast<std::size_t>(pos)] = 1;
      ++written_;
    }
  }
}

void LevelWriter::finish() {
  CANOPY_CHECK(::fsync(fd_) == 0, IoError, "syncing cache level '", tmp_,
               "' failed: ", describe_errno(errno));
  const std::size_t row_bytes = static_cast<std::size_t>(values_) * sizeof(float);
  const std::vector<char> zeros(row_bytes, 0);
  const std::uint32_t zero_crc = crc32c(zeros.data(), row_bytes);
  for (std::size_t r = 0; r < crc_.size(); ++r) {
    if (!have_[r]) crc_[r] = zero_crc;  // reserved by posix_fallocate: zeros
  }
  Sha256 sha;
  const std::int64_t step = piece_rows(values_);
  std::vector<char> piece(static_cast<std::size_t>(std::min(step, rows_)) * row_bytes);
  for (std::int64_t i = 0; i < rows_; i += step) {
    const std::int64_t n = std::min(step, rows_ - i);
    pread_exact(fd_, piece.data(), static_cast<std::uint64_t>(n) * row_bytes,
                offset_ + static_cast<std::uint64_t>(i) * row_bytes, what_);
    sha.update(piece.data(), static_cast<std::size_t>(n) * row_bytes);
  }
  ::close(fd_);
  fd_ = -1;
  try {
    h5::Handle file = h5::open_file(tmp_, true);
    const std::string what = "cache level '" + tmp_ + "'";
    {
      h5::Handle data = h5::open_dataset(file.get(), "rows", what);
      h5::write_attr(data.get(), "block", block_);
      h5::write_attr(data.get(), "fingerprint", fingerprint_);
      h5::write_attr(data.get(), "sha256", sha.hex_digest());
      h5::Handle crcs =
          h5::write_contiguous(file.get(), kRowCrcs, H5T_STD_U32LE, H5T_NATIVE_UINT32, crc_.data(), {rows_});
    }
    h5::QuietErrors quiet;
    CANOPY_CHECK(H5Fflush(file.get(), H5F_SCOPE_GLOBAL) >= 0, IoError, "HDF5: flushing ", what, " failed");
    file.close(what);
  } catch (const IoError&) {
    const std::string full = lack_of_space(parent_path(path_), 1 << 20);
    if (!full.empty()) throw IoError("writing cache level '" + path_ + "' failed: " + full);
    throw;
  }
  fsync_path(tmp_);
  rename_durable(tmp_, path_);
  finished_ = true;
}

LevelReader::LevelReader(std::string path) : path_(std::move(path)), where_("cache level '" + path_ + "'") {
  CANOPY_CHECK(is_regular_file(path_), DataError, where_, " is missing");
  {
    h5::Handle file = h5::open_file(path_, false);
    h5::Handle data = h5::open_dataset(file.get(), "rows", where_);
    const auto dims = h5::shape(data.get());
    CANOPY_CHECK(dims.size() == 2 && h5::has_type(data.get(), H5T_IEEE_F32LE), DataError, where_,
                 ": rows is not float32 [N, values]");
    rows_ = dims[0];
    values_ = dims[1];
    block_ = read_string_attr(data.get(), "block", path_);
    fingerprint_ = read_string_attr(data.get(), "fingerprint", path_);
    CANOPY_CHECK(h5::exists(file.get(), kRowCrcs), DataError, where_,
                 " has no row CRCs (it was written over a train split in memory)");
    crc_ = read_row_crcs(file.get(), rows_, where_);
    offset_ = h5::data_offset(data.get());
  }
  CANOPY_CHECK(file_size(path_) >= offset_ + static_cast<std::uint64_t>(rows_ * values_) * sizeof(float),
               DataError, where_, " is shorter than its rows (truncated)");
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  CANOPY_CHECK(fd_ >= 0, DataError, "opening ", where_, " failed: ", describe_errno(errno));
}

LevelReader::~LevelReader() {
  if (fd_ >= 0) ::close(fd_);
}

at::Tensor LevelReader::read(const at::Tensor& index) const {
  const at::Tensor idx = index.to(at::kLong).contiguous();
  at::Tensor out = at::empty({idx.numel(), values_}, at::kFloat);
  const std::size_t row_bytes = static_cast<std::size_t>(values_) * sizeof(float);
  const auto* positions = idx.const_data_ptr<std::int64_t>();
  char* dst = static_cast<char*>(out.data_ptr());
  for (std::int64_t i = 0; i < idx.numel(); ++i) {
    const auto pos = checked_position(positions, i, rows_, path_);
    char* row = dst + i * row_bytes;
    pread_exact(fd_, row, row_bytes, offset_ + static_cast<std::uint64_t>(pos) * row_bytes, where_);
    CANOPY_CHECK(crc32c(row, row_bytes) == crc_[static_cast<std::size_t>(pos)], DataError, where_, ": row ",
                 pos, " does not match its CRC-32C (the file is corrupt)");
  }
  return out;
}

}  // namespace canopy::datasets
