#include "canopy/datasets/level_file.h"

#include <cstdio>
#include <vector>

#include <ATen/ops/empty.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/sha256.h"
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

}  // namespace canopy::datasets
