// Image files users actually have: PNG and JPEG decoding (libpng, libjpeg-turbo), and the
// common ways to list a labelled image set — a CSV or JSON manifest and class folders.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/datasets/csv.h"
#include "canopy/datasets/image_limits.h"

namespace canopy::datasets {

// Decodes a PNG or JPEG file (told apart by its first bytes, not its name) into uint8
// [C, H, W] with C = 1 (grey) or 3 (RGB): palettes are expanded, 16-bit samples reduced to
// 8, alpha dropped, CMYK JPEGs refused. A file that is neither, or is truncated or corrupt,
// is a DataError naming it. So is an image of more than `max_pixels` pixels (width x height;
// 0: no limit), checked from its header before any memory is taken for it: a few kilobytes of
// PNG can declare gigabytes of pixels. The default is PIL's decompression-bomb limit.
at::Tensor decode_image(const std::string& path, std::int64_t max_pixels = kDefaultMaxImagePixels);

// Whether a file name ends in .png, .jpg or .jpeg (any case).
bool is_image_file_name(const std::string& name);
// Whether a directory entry is hidden (its name starts with a dot): not data. A notebook's
// .ipynb_checkpoints folder would be a class, macOS's ._name.jpg resource forks are not JPEGs.
bool is_hidden_entry(const std::string& name);

// A labelled list of image files.
struct ImageList : LabelColumns {
  std::vector<std::string> paths;  // absolute or relative to the cwd
};

// A manifest: a CSV or JSON table (csv.h) with a column `path` (else `file_name`, as Hugging
// Face's imagefolder metadata.csv / metadata.jsonl name it), in any position, and one row
// per image. Paths are relative to the manifest's directory unless absolute. Every other
// column is a label read as read_label_columns says (a column of integers: class indices;
// of numbers: real values; else class names, numbered in sorted order of the names found in
// `names`, the training manifest, so train and test agree; a JSON list: a multi-label
// bitmask); `names` empty or `file`: this one. A manifest with no label column is refused.
ImageList read_image_table(const TableFile& file, const TableFile& names = {});
inline ImageList read_image_csv(const std::string& csv, const std::string& name_source = "") {
  return read_image_table({csv, TableFormat::csv}, {name_source, TableFormat::csv});
}
// Only a manifest's paths (predict): a table of one column `path` (or `file_name`) will do.
std::vector<std::string> read_image_table_paths(const TableFile& file);

// Class folders: `dir/<class>/<image>`, every class a sub-directory, files with the
// extensions .png, .jpg, .jpeg (any case) in sorted order. Classes are numbered in sorted
// order of the folder names in `class_dir` (the training folder, so train and test agree).
// One label source, "class".
ImageList read_image_folders(const std::string& dir, const std::string& class_dir = "");

}  // namespace canopy::datasets
