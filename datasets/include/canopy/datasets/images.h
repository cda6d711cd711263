// Image files users actually have: PNG and JPEG decoding (libpng, libjpeg-turbo), and the
// two common ways to list a labelled image set — a CSV manifest and class folders.
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

// A CSV manifest: a header `path,<label>,<label>,...` then one row per image. Paths are
// relative to the CSV's directory unless absolute. A label column whose values are all
// integers holds class indices; one whose values are all numbers but not all integers is
// real-valued (regression); any other column holds class names, numbered in sorted order
// of the names found in `name_source` (the training CSV, so train and test agree; a test
// row with a name the training CSV lacks is a DataError). The file is read as
// canopy/datasets/csv.h says: quoted fields may hold commas and line breaks.
ImageList read_image_csv(const std::string& csv, const std::string& name_source = "");

// Class folders: `dir/<class>/<image>`, every class a sub-directory, files with the
// extensions .png, .jpg, .jpeg (any case) in sorted order. Classes are numbered in sorted
// order of the folder names in `class_dir` (the training folder, so train and test agree).
// One label source, "class".
ImageList read_image_folders(const std::string& dir, const std::string& class_dir = "");

}  // namespace canopy::datasets
