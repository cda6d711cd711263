#include "canopy/datasets/mnist.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "gz_file.h"

namespace canopy::datasets {

namespace {
std::uint32_t be32(const std::string& s, std::size_t at) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data() + at);
  return (std::uint32_t(p[0]) << 24) | (std::uint32_t(p[1]) << 16) | (std::uint32_t(p[2]) << 8) | p[3];
}

std::string find_file(const std::string& dir, const std::string& stem) {
  for (const std::string& name : {stem + ".gz", stem}) {
    const std::string p = join_path(dir, name);
    if (is_regular_file(p)) return p;
  }
  throw DataError(detail::str_cat("no '", stem, "' or '", stem, ".gz' in '", dir,
                                  "' (Fashion-MNIST comes from the Debian package dataset-fashion-mnist)"));
}
}  // namespace

at::Tensor read_idx(const std::string& path, std::int64_t limit) {
  GzFile f(path);
  std::string head(4, '\0');
  CANOPY_CHECK(f.read(head.data(), 4) == 4, DataError, "'", path, "' is too short to be an idx file");
  const auto* magic = reinterpret_cast<const unsigned char*>(head.data());
  CANOPY_CHECK(magic[0] == 0 && magic[1] == 0 && magic[2] == 0x08, DataError, "'", path,
               "' is not an unsigned-byte idx file (magic bytes ", int(magic[0]), ",", int(magic[1]), ",",
               int(magic[2]), ", expected 0,0,8)");
  const int ndim = magic[3];
  CANOPY_CHECK(ndim >= 1 && ndim <= 4, DataError, "'", path, "' has ", ndim, " dimensions; expected 1 to 4");
  head.resize(4 + 4 * static_cast<std::size_t>(ndim));
  CANOPY_CHECK(f.read(head.data() + 4, head.size() - 4) == head.size() - 4, DataError, "'", path,
               "' is truncated in its header");
  std::vector<std::int64_t> dims;
  for (int i = 0; i < ndim; ++i) dims.push_back(be32(head, 4 + 4 * static_cast<std::size_t>(i)));
  const std::vector<std::int64_t> full = dims;
  // The bytes the header declares, without overflow (4 dimensions of up to 2^32 - 1 each).
  std::uint64_t item = 1, declared = 0;
  bool huge = false;
  for (int i = 1; i < ndim; ++i)
    huge |= __builtin_mul_overflow(item, static_cast<std::uint64_t>(dims[i]), &item);
  huge |= __builtin_mul_overflow(item, static_cast<std::uint64_t>(full[0]), &declared);
  CANOPY_CHECK(!huge, DataError, "'", path, "' declares dimensions ", at::IntArrayRef(full),
               ", more than 2^64 bytes: its header is corrupt");
  if (limit > 0 && limit < dims[0]) dims[0] = limit;
  const std::uint64_t count = item * static_cast<std::uint64_t>(dims[0]);  // <= declared
  at::Tensor out;
  std::uint64_t got = 0;
  if (count <= (std::uint64_t{1} << 30)) {
    // Straight into the tensor: memory the read does not reach is never touched.
    out = at::empty(dims, at::kByte);
    got = f.read(static_cast<char*>(out.data_ptr()), static_cast<std::size_t>(count));
  } else {
    // A header declaring more than 1 GiB (a flipped bit can declare 100 GB, which the allocator
    // refuses): the bytes are read first, in pieces, and the tensor made only if they are all there.
    std::string bytes;
    constexpr std::size_t kPiece = std::size_t{64} << 20;
    while (bytes.size() < count) {
      const std::size_t want =
          static_cast<std::size_t>(std::min<std::uint64_t>(count - bytes.size(), kPiece));
      const std::size_t before = bytes.size();
      bytes.resize(before + want);
      const std::size_t n = f.read(bytes.data() + before, want);
      bytes.resize(before + n);
      if (n < want) break;
    }
    got = bytes.size();
    if (got == count) {
      out = at::empty(dims, at::kByte);
      std::memcpy(out.data_ptr(), bytes.data(), bytes.size());
    }
  }
  CANOPY_CHECK(got == count, DataError, "'", path, "' should hold ", head.size() + declared,
               " bytes for dimensions ", at::IntArrayRef(full), " but holds ", head.size() + got,
               " (truncated, or its header is corrupt)");
  if (dims[0] == full[0]) {
    CANOPY_CHECK(f.at_end(), DataError, "'", path, "' has bytes after its ", at::IntArrayRef(full), " items");
  }
  return out;
}

ImageSplit read_mnist_split(const std::string& dir, const std::string& split, std::int64_t limit) {
  CANOPY_CHECK(split == "train" || split == "test", ConfigError, "MNIST split must be train or test, got '",
               split, "'");
  const std::string prefix = split == "train" ? "train" : "t10k";
  const std::string images_path = find_file(dir, prefix + "-images-idx3-ubyte");
  const std::string labels_path = find_file(dir, prefix + "-labels-idx1-ubyte");
  at::Tensor images = read_idx(images_path, limit);
  at::Tensor labels = read_idx(labels_path, limit);
  CANOPY_CHECK(images.dim() == 3, DataError, "'", images_path, "' should be [N, H, W], is ", images.sizes());
  CANOPY_CHECK(labels.dim() == 1 && labels.size(0) == images.size(0), DataError, "'", labels_path, "' has ",
               labels.numel(), " labels for ", images.size(0), " images");
  const std::int64_t n = images.size(0);
  ImageSplit out;
  out.images = images.slice(0, 0, n).contiguous();
  out.labels = labels.slice(0, 0, n).to(at::kLong);
  out.ids = at::arange(n, at::kLong);
  return out;
}

const std::vector<std::string>& fashion_mnist_class_names() {
  static const std::vector<std::string> names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                 "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return names;
}

}  // namespace canopy::datasets
