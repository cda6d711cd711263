// A cache level: the output of one trunk block for every row of a split, written by a
// freezing schedule once the blocks below it stopped training (see docs/fine-tuning.md).
// One HDF5 file, `rows` float32 [N, D], with attributes `block`, `fingerprint` (what made
// it: the cache, the cut and the frozen blocks' weights) and `sha256` (of the rows' bytes,
// checked on read, so flipped bytes are found). Written under a temporary name, fsynced
// and renamed: a killed run leaves the old file or the new one, never half of one.
#pragma once

#include <string>

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

}  // namespace canopy::datasets
