// Readers for the MNIST "idx" format (MNIST, Fashion-MNIST), plain or gzip-compressed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace canopy::datasets {

// Reads one idx file (".gz" or raw) into a uint8 tensor with the file's dimensions; with
// `limit` > 0 only the first `limit` items along the first dimension are read (and
// decompressed). Throws DataError naming the file for a bad magic number, size mismatch or
// short read.
at::Tensor read_idx(const std::string& path, std::int64_t limit = 0);

struct ImageSplit {
  at::Tensor images;  // uint8 [N, H, W]
  at::Tensor labels;  // int64 [N]
  at::Tensor ids;     // int64 [N]: row index in the source file
};

// The directory holds train-images-idx3-ubyte[.gz] etc. `split` is "train" or "test";
// `limit` > 0 keeps the first `limit` samples.
ImageSplit read_mnist_split(const std::string& dir, const std::string& split, std::int64_t limit);

// The ten Fashion-MNIST class names, in label order.
const std::vector<std::string>& fashion_mnist_class_names();

}  // namespace canopy::datasets
