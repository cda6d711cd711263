// A cache level: the output of one trunk block for every row of a split, written by a
// freezing schedule once the blocks below it stopped training (see docs/fine-tuning.md).
// One HDF5 file, `rows` float32 [N, D], with attributes `block`, `fingerprint` (what made
// it: the cache, the cut and the frozen blocks' weights) and `sha256` (of the rows' bytes,
// checked on read, so flipped bytes are found). Written under a temporary name, fsynced
// and renamed: a killed run leaves the old file or the new one, never half of one.
//
// Over a train split that streams, or when too large to hold in memory, a level stays on
// disk (LevelWriter, LevelReader): the same file, its rows written by position in whatever order an epoch
// serves them and read back by position, with `row_crc32c` (uint32 [N], each row's CRC-32C) checked on every
// read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace canopy::datasets {

// A run's levels are kept in <out_dir>/levels, one file per block: levels/<block>.h5.
inline constexpr const char* kLevelDir = "levels";
std::string level_file_name(const std::string& block);  // "<block>.h5"

struct LevelFile {
  at::Tensor rows;  // float32 [N, D], contiguous
  std::string block;
  std::string fingerprint;
};

void write_level(const std::string& path, const LevelFile& level);
// DataError when the file is missing, not a level, or its rows do not match their hash.
LevelFile read_level(const std::string& path);
// Checks a level's rows against their SHA-256 (and, on disk levels, every row against its
// CRC-32C), reading them a few MiB at a time; DataError saying what does not match.
void verify_level(const std::string& path);

// A level on disk being written: rows of float32 [`rows`, `values`] by position.
class LevelWriter {
 public:
  // Creates the level's temporary file with the rows' room reserved (posix_fallocate):
  // IoError when the disk lacks it, before anything was written.
  LevelWriter(std::string path, std::int64_t rows, std::int64_t values, std::string block,
              std::string fingerprint);
  ~LevelWriter();  // a level not finished leaves no file
  LevelWriter(const LevelWriter&) = delete;
  LevelWriter& operator=(const LevelWriter&) = delete;
  // Writes `rows` (float32 [B, values]) at the positions `index` (int64 [B]); IoError on failure.
  void write(const at::Tensor& index, const at::Tensor& rows);
  std::int64_t written() const { return written_; }  // distinct positions written
  std::uint64_t bytes() const;                       // the rows' room
  // Syncs the rows, hashes them, adds the attributes and the rows' CRCs (rows never written
  // are zeros) and renames the file into place, synced.
  void finish();

 private:
  std::string path_, tmp_, what_, block_, fingerprint_;  // what_: the temporary, for messages
  std::int64_t rows_ = 0, values_ = 0, written_ = 0;
  std::uint64_t offset_ = 0;
  int fd_ = -1;
  std::vector<std::uint32_t> crc_;
  std::vector<std::uint8_t> have_;
  bool finished_ = false;
};

// A finished level on disk, read by position.
class LevelReader {
 public:
  // DataError when the file is missing or not a level on disk (a level written over a split
  // in memory has no row CRCs).
  explicit LevelReader(std::string path);
  ~LevelReader();
  LevelReader(const LevelReader&) = delete;
  LevelReader& operator=(const LevelReader&) = delete;
  // The rows at positions `index` (int64 [B]), float32 [B, values]; DataError naming the row
  // and the file when one does not match its CRC-32C or the file ends first, IoError when a
  // read fails.
  at::Tensor read(const at::Tensor& index) const;
  std::int64_t rows() const { return rows_; }
  std::int64_t values() const { return values_; }
  const std::string& block() const { return block_; }
  const std::string& fingerprint() const { return fingerprint_; }

 private:
  std::string path_, where_, block_, fingerprint_;  // where_: the file, for messages
  std::int64_t rows_ = 0, values_ = 0;
  std::uint64_t offset_ = 0;
  int fd_ = -1;
  std::vector<std::uint32_t> crc_;
};

}  // namespace canopy::datasets
