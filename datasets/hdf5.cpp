#include "hdf5_raii.h"

#include <algorithm>
#include <atomic>
#include <cstdio>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/datasets/feature_cache.h"

namespace canopy::datasets {
std::string hdf5_version() {
  unsigned major = 0, minor = 0, release = 0;
  H5get_libversion(&major, &minor, &release);
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(release);
}

namespace {
std::atomic<bool> g_close_failed{false};
}

bool hdf5_close_failed() { return g_close_failed.load(); }

void close_hdf5() {
  // Only when something is still open: all canopy's files are closed by then, and after a
  // read of a corrupt file failed, HDF5 1.10 can keep an internal reference that makes
  // H5close loop and print "HDF5: infinite loop closing library" with nothing to close.
  // Never after a close failed: HDF5 before 1.14 frees a file whose close failed (a full disk
  // at its last write) but keeps its ID, and H5close then closes it again and crashes
  // (HDFFV-11052; Debian 12 has 1.10.8). Such a file is canopy's temporary, already removed.
  if (hdf5_close_failed()) return;
  if (H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL) > 0) H5close();
}
}  // namespace canopy::datasets

namespace canopy::datasets::h5 {

Handle& Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    reset();
    id_ = o.id_;
    closer_ = o.closer_;
    o.id_ = H5I_INVALID_HID;
  }
  return *this;
}

void Handle::reset() {
  QuietErrors quiet;
  if (id_ >= 0 && closer_ && closer_(id_) < 0) g_close_failed = true;
  id_ = H5I_INVALID_HID;
}

void Handle::close(const std::string& what) {
  if (id_ < 0 || !closer_) return;
  QuietErrors quiet;
  const herr_t rc = closer_(id_);
  id_ = H5I_INVALID_HID;
  if (rc < 0) {
    g_close_failed = true;
    throw IoError("HDF5: closing " + what + " failed");
  }
}

void write_file_durably(const std::string& path, const std::string& what, std::uint64_t need,
                        const std::string& advice, const std::function<void(hid_t file)>& write,
                        std::uint64_t alignment) {
  const std::string tmp = temp_path_for(path);
  try {
    Handle file = create_file(tmp, alignment);
    write(file.get());
    QuietErrors quiet;
    CANOPY_CHECK(H5Fflush(file.get(), H5F_SCOPE_GLOBAL) >= 0, IoError, "HDF5: flushing '", tmp, "' failed");
    file.close("'" + tmp + "'");
  } catch (const IoError&) {
    std::remove(tmp.c_str());
    const std::string full = lack_of_space(parent_path(path), need);
    if (!full.empty()) throw IoError(detail::str_cat("writing ", what, " failed: ", full, advice));
    throw;
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  fsync_path(tmp);
  rename_durable(tmp, path);
}

QuietErrors::QuietErrors() {
  saved_ = H5Eget_auto2(H5E_DEFAULT, &func_, &data_) >= 0;
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

QuietErrors::~QuietErrors() {
  if (saved_) H5Eset_auto2(H5E_DEFAULT, func_, data_);
}

namespace {
Handle checked(hid_t id, Handle::Closer closer, const std::string& what) {
  CANOPY_CHECK(id >= 0, IoError, "HDF5: ", what, " failed");
  return Handle(id, closer);
}
void check(herr_t rc, const std::string& what) { CANOPY_CHECK(rc >= 0, IoError, "HDF5: ", what, " failed"); }
}  // namespace

Handle create_file(const std::string& path, std::uint64_t alignment) {
  QuietErrors quiet;
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  CANOPY_CHECK(fapl, IoError, "HDF5: creating file access properties failed");
  if (alignment > 0) {
    CANOPY_CHECK(H5Pset_alignment(fapl.get(), 0, alignment) >= 0, IoError, "HDF5: set_alignment failed");
  }
  return checked(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose,
                 "creating file '" + path + "'");
}

Handle open_file(const std::string& path, bool writable) {
  QuietErrors quiet;
  const htri_t is_h5 = H5Fis_hdf5(path.c_str());
  CANOPY_CHECK(is_h5 > 0, DataError, "'", path, "' ",
               is_h5 == 0 ? "is not an HDF5 file" : "cannot be opened (missing or unreadable)");
  const hid_t id = H5Fopen(path.c_str(), writable ? H5F_ACC_RDWR : H5F_ACC_RDONLY, H5P_DEFAULT);
  CANOPY_CHECK(id >= 0, DataError, "cannot open HDF5 file '", path, "' (truncated or corrupt?)");
  return Handle(id, H5Fclose);
}

Handle create_group(hid_t parent, const std::string& name) {
  QuietErrors quiet;
  return checked(H5Gcreate2(parent, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose,
                 "creating group '" + name + "'");
}

bool exists(hid_t parent, const std::string& path) {
  QuietErrors quiet;
  // Check each component so that a missing intermediate group is not an error.
  std::string prefix;
  std::size_t start = 0;
  while (start <= path.size()) {
    const auto slash = path.find('/', start);
    prefix = path.substr(0, slash);
    if (H5Lexists(parent, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return true;
}

Handle write_contiguous(hid_t parent, const std::string& name, hid_t file_type, hid_t mem_type,
                        const void* data, const std::vector<std::int64_t>& dims) {
  QuietErrors quiet;
  std::vector<hsize_t> d(dims.begin(), dims.end());
  Handle space = checked(H5Screate_simple(static_cast<int>(d.size()), d.data(), nullptr), H5Sclose,
                         "creating a dataspace");
  Handle plist = checked(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, "creating a property list");
  check(H5Pset_layout(plist.get(), H5D_CONTIGUOUS), "setting contiguous layout");
  check(H5Pset_alloc_time(plist.get(), H5D_ALLOC_TIME_EARLY), "setting early allocation");
  if (!data) check(H5Pset_fill_time(plist.get(), H5D_FILL_TIME_NEVER), "setting no fill");
  Handle ds =
      checked(H5Dcreate2(parent, name.c_str(), file_type, space.get(), H5P_DEFAULT, plist.get(), H5P_DEFAULT),
              H5Dclose, "creating dataset '" + name + "'");
  if (data) {
    check(H5Dwrite(ds.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
          "writing dataset '" + name + "'");
  }
  return ds;
}

std::uint64_t data_offset(hid_t dataset) {
  QuietErrors quiet;
  const haddr_t off = H5Dget_offset(dataset);
  CANOPY_CHECK(off != HADDR_UNDEF, IoError, "HDF5: dataset has no contiguous data offset");
  return static_cast<std::uint64_t>(off);
}

Handle create_virtual(hid_t parent, const std::string& name, hid_t type,
                      const std::vector<std::int64_t>& dims, const std::vector<VirtualSource>& sources) {
  QuietErrors quiet;
  const int rank = static_cast<int>(dims.size());
  std::vector<hsize_t> d(dims.begin(), dims.end());
  Handle vspace = checked(H5Screate_simple(rank, d.data(), nullptr), H5Sclose, "creating a dataspace");
  Handle plist = checked(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, "creating a property list");
  for (const auto& s : sources) {
    std::vector<hsize_t> sd = d;
    sd[0] = static_cast<hsize_t>(s.rows);
    Handle sspace = checked(H5Screate_simple(rank, sd.data(), nullptr), H5Sclose, "creating a dataspace");
    std::vector<hsize_t> start(rank, 0);
    start[0] = static_cast<hsize_t>(s.first_row);
    check(H5Sselect_hyperslab(vspace.get(), H5S_SELECT_SET, start.data(), nullptr, sd.data(), nullptr),
          "selecting view rows");
    check(H5Pset_virtual(plist.get(), vspace.get(), s.file.c_str(), s.dataset.c_str(), sspace.get()),
          "mapping '" + s.file + "' into virtual dataset '" + name + "'");
  }
  H5Sselect_all(vspace.get());
  return checked(H5Dcreate2(parent, name.c_str(), type, vspace.get(), H5P_DEFAULT, plist.get(), H5P_DEFAULT),
                 H5Dclose, "creating virtual dataset '" + name + "'");
}

namespace {
// The dataset's current shape, or the largest it may grow to (-1: unlimited).
std::vector<std::int64_t> extent(hid_t dataset, bool largest) {
  QuietErrors quiet;
  Handle space = checked(H5Dget_space(dataset), H5Sclose, "getting a dataspace");
  const int rank = H5Sget_simple_extent_ndims(space.get());
  CANOPY_CHECK(rank >= 0 && rank <= 8, IoError, "HDF5: unexpected rank ", rank);
  hsize_t dims[8], max[8];
  H5Sget_simple_extent_dims(space.get(), dims, max);
  std::vector<std::int64_t> out;
  for (int i = 0; i < rank; ++i) {
    const hsize_t d = largest ? max[i] : dims[i];
    out.push_back(d == H5S_UNLIMITED ? -1 : static_cast<std::int64_t>(d));
  }
  return out;
}
}  // namespace

std::vector<std::int64_t> shape(hid_t dataset) { return extent(dataset, false); }
std::vector<std::int64_t> max_shape(hid_t dataset) { return extent(dataset, true); }

std::uint64_t storage_size(hid_t dataset) {
  QuietErrors quiet;
  return H5Dget_storage_size(dataset);
}

bool has_type(hid_t dataset, hid_t type) {
  QuietErrors quiet;
  Handle stored = checked(H5Dget_type(dataset), H5Tclose, "getting a dataset's type");
  return H5Tequal(stored.get(), type) > 0;
}

std::vector<std::string> all_links(hid_t group) {
  QuietErrors quiet;
  std::vector<std::string> names;
  const H5L_iterate_t collect = [](hid_t, const char* name, const H5L_info_t*, void* data) -> herr_t {
    static_cast<std::vector<std::string>*>(data)->push_back(name);
    return 0;
  };
  check(H5Lvisit(group, H5_INDEX_NAME, H5_ITER_NATIVE, collect, &names), "listing the file's objects");
  std::sort(names.begin(), names.end());
  return names;
}

Handle open_dataset(hid_t parent, const std::string& name, const std::string& where) {
  QuietErrors quiet;
  CANOPY_CHECK(exists(parent, name), DataError, where, ": no dataset '", name, "'");
  return checked(H5Dopen2(parent, name.c_str(), H5P_DEFAULT), H5Dclose,
                 where + ": opening dataset '" + name + "'");
}

void read_rows(hid_t dataset, hid_t mem_type, std::int64_t begin, std::int64_t end, void* out) {
  QuietErrors quiet;
  const auto dims = shape(dataset);
  CANOPY_CHECK(begin >= 0 && begin <= end && end <= dims.at(0), DataError, "HDF5: rows [", begin, ", ", end,
               ") out of range for a dataset of ", dims.at(0), " rows");
  if (begin == end) return;
  const int rank = static_cast<int>(dims.size());
  Handle file_space = checked(H5Dget_space(dataset), H5Sclose, "getting a dataspace");
  hsize_t start[2] = {static_cast<hsize_t>(begin), 0};
  hsize_t count[2] = {static_cast<hsize_t>(end - begin), rank > 1 ? static_cast<hsize_t>(dims[1]) : 1};
  check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr),
        "selecting rows");
  Handle mem_space = checked(H5Screate_simple(rank, count, nullptr), H5Sclose, "creating a dataspace");
  CANOPY_CHECK(H5Dread(dataset, mem_type, mem_space.get(), file_space.get(), H5P_DEFAULT, out) >= 0,
               DataError, "HDF5: reading rows [", begin, ", ", end, ") failed (corrupt file?)");
}

void write_attr(hid_t obj, const std::string& name, const std::string& value) {
  QuietErrors quiet;
  Handle type = checked(H5Tcopy(H5T_C_S1), H5Tclose, "copying a string type");
  check(H5Tset_size(type.get(), std::max<std::size_t>(1, value.size())), "sizing a string type");
  check(H5Tset_cset(type.get(), H5T_CSET_UTF8), "setting a string's character set");
  Handle space = checked(H5Screate(H5S_SCALAR), H5Sclose, "creating a scalar dataspace");
  if (H5Aexists(obj, name.c_str()) > 0) H5Adelete(obj, name.c_str());
  Handle attr = checked(H5Acreate2(obj, name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                        H5Aclose, "creating attribute '" + name + "'");
  const char* data = value.empty() ? "" : value.c_str();
  check(H5Awrite(attr.get(), type.get(), data), "writing attribute '" + name + "'");
}

void write_attr(hid_t obj, const std::string& name, std::int64_t value) {
  QuietErrors quiet;
  Handle space = checked(H5Screate(H5S_SCALAR), H5Sclose, "creating a scalar dataspace");
  if (H5Aexists(obj, name.c_str()) > 0) H5Adelete(obj, name.c_str());
  Handle attr = checked(H5Acreate2(obj, name.c_str(), H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                        H5Aclose, "creating attribute '" + name + "'");
  check(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value), "writing attribute '" + name + "'");
}

namespace {
Handle open_attr(hid_t obj, const std::string& name, const std::string& where) {
  CANOPY_CHECK(H5Aexists(obj, name.c_str()) > 0, DataError, where, ": no attribute '", name, "'");
  return checked(H5Aopen(obj, name.c_str(), H5P_DEFAULT), H5Aclose,
                 where + ": opening attribute '" + name + "'");
}
}  // namespace

std::string read_string_attr(hid_t obj, const std::string& name, const std::string& where) {
  QuietErrors quiet;
  Handle attr = open_attr(obj, name, where);
  Handle type = checked(H5Aget_type(attr.get()), H5Tclose, where + ": the type of attribute '" + name + "'");
  CANOPY_CHECK(H5Tget_class(type.get()) == H5T_STRING && H5Tis_variable_str(type.get()) == 0, DataError,
               where, ": attribute '", name, "' is not a fixed-length string");
  const std::size_t size = H5Tget_size(type.get());
  std::string value(size, '\0');
  check(H5Aread(attr.get(), type.get(), value.data()), where + ": reading attribute '" + name + "'");
  value.resize(std::min(value.find('\0'), value.size()));
  return value;
}

std::int64_t read_int_attr(hid_t obj, const std::string& name, const std::string& where) {
  QuietErrors quiet;
  Handle attr = open_attr(obj, name, where);
  Handle type = checked(H5Aget_type(attr.get()), H5Tclose, where + ": the type of attribute '" + name + "'");
  CANOPY_CHECK(H5Tget_class(type.get()) == H5T_INTEGER, DataError, where, ": attribute '", name,
               "' is not an integer");
  std::int64_t value = 0;
  check(H5Aread(attr.get(), H5T_NATIVE_INT64, &value), where + ": reading attribute '" + name + "'");
  return value;
}

}  // namespace canopy::datasets::h5
