// A thin RAII layer over the HDF5 C API: every hid_t is owned by an H5Handle whose
// destructor closes it with the right H5?close. Errors become canopy::IoError/DataError
// with the file and object named. Private to datasets/: not installed, and no public
// header includes it, so HDF5 stays a private dependency of canopy.
//
// HDF5 serialises every call behind one global lock (thread-safe builds): call it from one
// thread and hand data to workers, never read it from many TBB tasks at once.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace canopy::datasets::h5 {

class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle(Handle&& o) noexcept : id_(o.id_), closer_(o.closer_) { o.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& o) noexcept;
  ~Handle() { reset(); }
  hid_t get() const { return id_; }
  explicit operator bool() const { return id_ >= 0; }
  // Closes, ignoring a failure (the destructor's way: for what was only read, or a file being
  // given up).
  void reset();
  // Closes and throws IoError naming `what` when HDF5 fails: a file being written, whose
  // close writes what HDF5 still holds (a full disk fails here). Objects in the file must be
  // closed first.
  void close(const std::string& what);

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// Turns HDF5's own error printing off (canopy reports errors itself) for its lifetime, on
// this thread, and puts back what was there before: a program that links canopy keeps its
// own HDF5 error settings. Every function below holds one while it calls HDF5.
class QuietErrors {
 public:
  QuietErrors();
  ~QuietErrors();
  QuietErrors(const QuietErrors&) = delete;
  QuietErrors& operator=(const QuietErrors&) = delete;

 private:
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
  bool saved_ = false;
};

// Writes the HDF5 file `path` so that a crash or a full disk never leaves a part of it there:
// creates a temporary file beside `path` (every object `alignment`-byte aligned when it is not
// 0), lets `write(file)` fill it, flushes and closes it with both checked (a close that fails
// leaves a file HDF5 may not have finished), then fsyncs it and renames it over `path`. When
// anything throws, the temporary goes. HDF5 does not say why a write failed; when the
// filesystem has fewer than `need` bytes free, the likely reason and the one a user can act
// on, an IoError becomes "writing <what> failed: the disk is full (...)<advice>". Objects
// `write` opens in the file must be closed when it returns.
void write_file_durably(const std::string& path, const std::string& what, std::uint64_t need,
                        const std::string& advice, const std::function<void(hid_t file)>& write,
                        std::uint64_t alignment = 0);

// Truncates; every object `alignment`-byte aligned when it is not 0.
Handle create_file(const std::string& path, std::uint64_t alignment = 0);
Handle open_file(const std::string& path, bool writable);  // DataError if not HDF5
Handle create_group(hid_t parent, const std::string& name);
bool exists(hid_t parent, const std::string& path);

// Creates a contiguous (unchunked) dataset of `dims` and writes `data` (of `mem_type`); with
// `data` null its space is allocated in the file and left unwritten, for the caller to write
// at data_offset.
Handle write_contiguous(hid_t parent, const std::string& name, hid_t file_type, hid_t mem_type,
                        const void* data, const std::vector<std::int64_t>& dims);
// Byte offset of a contiguous dataset's data in its file.
std::uint64_t data_offset(hid_t dataset);

// One source of a virtual dataset: rows [0, rows) of `dataset` in `file` (relative to the
// virtual file's directory) map to rows [first_row, first_row + rows) of the view.
struct VirtualSource {
  std::string file;
  std::string dataset;
  std::int64_t first_row = 0;
  std::int64_t rows = 0;
};
Handle create_virtual(hid_t parent, const std::string& name, hid_t type,
                      const std::vector<std::int64_t>& dims, const std::vector<VirtualSource>& sources);

Handle open_dataset(hid_t parent, const std::string& name, const std::string& where);
std::vector<std::int64_t> shape(hid_t dataset);
// The largest shape the dataset may grow to, as its header records it (its shape, for the
// fixed-size datasets canopy writes).
std::vector<std::int64_t> max_shape(hid_t dataset);
// The bytes of file space the dataset's data takes.
std::uint64_t storage_size(hid_t dataset);
// Whether the dataset's stored type is `type` (H5Tequal).
bool has_type(hid_t dataset, hid_t type);
// The path of every link under `group`, recursively ("train", "train/features", ...), sorted;
// reading them parses every group's index, where a corrupt byte would otherwise wait.
std::vector<std::string> all_links(hid_t group);
// Reads rows [begin, end) of a 1-D or 2-D dataset into `out`, converting to `mem_type`.
void read_rows(hid_t dataset, hid_t mem_type, std::int64_t begin, std::int64_t end, void* out);

void write_attr(hid_t obj, const std::string& name, const std::string& value);
void write_attr(hid_t obj, const std::string& name, std::int64_t value);
// The value of an attribute as write_attr wrote it (a fixed-length string, or a 64-bit integer);
// DataError naming `where` and the attribute when it is missing or of another type.
std::string read_string_attr(hid_t obj, const std::string& name, const std::string& where);
std::int64_t read_int_attr(hid_t obj, const std::string& name, const std::string& where);

}  // namespace canopy::datasets::h5
