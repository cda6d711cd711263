// Image files users actually have: PNG, JPEG, WebP, BMP, GIF, TIFF and Netpbm decoding
// (libpng, libjpeg-turbo, libwebp, giflib, libtiff; BMP and Netpbm canopy's own) to the pixels
// PIL gives, and the common ways to list a labelled image set — a CSV or JSON manifest and class folders.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/datasets/csv.h"
#include "canopy/datasets/image_limits.h"

namespace canopy::datasets {

// Decodes a PNG, JPEG, WebP, BMP, GIF, TIFF or Netpbm file (told apart by its first bytes, not
// its name) into uint8 [C, H, W] with C = 1 (grey) or 3 (RGB), the values PIL's
// Image.open(path).convert("RGB") gives: palettes expanded, alpha dropped (colours kept as
// stored), a PNG's gamma not applied, 16-bit samples reduced to their high byte (PIL clips
// 16-bit grey at 255 instead), CMYK converted as PIL converts it, an animated GIF's or WebP's
// first frame, a TIFF's first page turned as its Orientation tag says. Another format (HEIC,
// AVIF, ... is named as such) or a truncated or corrupt file is a DataError naming it. So is an
// image of more than `max_pixels` pixels (width x height; 0: no limit), checked from its header
// before any memory is taken for it: a few kilobytes of PNG can declare gigabytes of pixels.
// The default is PIL's decompression-bomb limit.
at::Tensor decode_image(const std::string& path, std::int64_t max_pixels = kDefaultMaxImagePixels);

// An image's pixels as stored (decode_image's) and the orientation its EXIF data records: 1
// (upright, or no EXIF) to 8, from a JPEG's APP1, a PNG's eXIf chunk or a WebP's EXIF chunk,
// as PIL's Image.getexif() reads it.
struct DecodedImage {
  at::Tensor pixels;
  int orientation = 1;
};
DecodedImage read_image(const std::string& path, std::int64_t max_pixels = kDefaultMaxImagePixels);
// [C, H, W] pixels turned as the EXIF orientation says a viewer shows them, as PIL's
// ImageOps.exif_transpose turns them (6: rotated 90 degrees clockwise); 1 or an unknown value:
// as they are.
at::Tensor apply_exif_orientation(const at::Tensor& chw, int orientation);

// Whether a directory entry is hidden (its name starts with a dot): not data. A notebook's
// .ipynb_checkpoints folder would be a class, macOS's ._name.jpg resource forks are not JPEGs.
bool is_hidden_entry(const std::string& name);

// A file's extension, lower-case and without its dot ("jpg" for "a/b.JPG"); "" when its name
// has none (or is a hidden file's: ".bashrc").
std::string file_extension(const std::string& path);

// The files under a folder and its sub-folders (symbolic links followed; hidden entries left
// out), in torchvision's ImageFolder order: folders in sorted order of their paths
// (sorted(os.walk(dir))), each one's files sorted by name.
struct ImageFiles {
  std::vector<std::string>
      paths;  // ImageFolder's: .png .jpg .jpeg .webp .bmp .tif .tiff .ppm .pgm (any case)
  std::map<std::string, std::int64_t> left_out_images;  // other images (.gif, .heic, ...), per extension
  std::string first_left_out;                           // the first of them, in that order
  std::map<std::string, std::int64_t> not_images;       // other files, per extension (".txt"; "": none)
};
// A symbolic link leading back to a folder above it is a DataError, as is `dir` not a folder.
ImageFiles find_image_files(const std::string& dir);
// A line for the log naming the images a folder holds that ImageFolder leaves out (GIF, HEIC,
// ...), how many of each and the first; "" when there are none. canopy leaves them out too, so
// that a cache's row i stays the data set's sample i in Python.
std::string describe_left_out_images(const std::map<std::string, std::int64_t>& counts,
                                     const std::string& first);
// The extensions a class folder's images have, as messages name them: ".png, .jpg, ... .ppm
// and .pgm" with `last_joiner` "and".
std::string folder_image_extensions(const std::string& last_joiner);
// "1 without extension, 2 .txt": counts per extension (from ImageFiles), for messages.
std::string describe_counts(const std::map<std::string, std::int64_t>& counts);

// A labelled list of image files.
struct ImageList : LabelColumns {
  std::vector<std::string> paths;                       // absolute or relative to the cwd
  std::map<std::string, std::int64_t> not_images;       // class folders: other files left out, per extension
  std::map<std::string, std::int64_t> left_out_images;  // class folders: images ImageFolder leaves out
  std::string first_left_out;
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

// Class folders: `dir/<class>/.../<image>`, every class a sub-directory, its images those
// find_image_files finds under it (its sub-folders too, as torchvision's ImageFolder reads
// them), in that order. Classes are numbered in sorted order of the folder names in
// `class_dir` (the training folder, so train and test agree). One label source, "class".
// Images of kinds ImageFolder leaves out are left out (and counted); a training class folder
// without images is refused (a test split may lack a class).
ImageList read_image_folders(const std::string& dir, const std::string& class_dir = "");

}  // namespace canopy::datasets
