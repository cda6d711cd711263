#include "canopy/datasets/mnist.h"

#include <zlib.h>

#include <cstring>

#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"

namespace canopy::datasets {

namespace {
std::string read_gz_or_raw(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");  // reads plain files unchanged too
  CANOPY_CHECK(f != nullptr, DataError, "cannot open '", path, "'");
  std::string data;
  char buf[1 << 16];
  int n = 0;
  while ((n = gzread(f, buf, sizeof buf)) > 0) data.append(buf, static_cast<std::size_t>(n));
  int err = 0;
  const char* msg = gzerror(f, &err);
  const std::string message = msg ? msg : "";
  gzclose(f);
  CANOPY_CHECK(n == 0 && err == Z_OK, DataError, "error reading '", path, "': ", message);
  return data;
}

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

at::Tensor read_idx(const std::string& path) {
  const std::string data = read_gz_or_raw(path);
  CANOPY_CHECK(data.size() >= 4, DataError, "'", path, "' is too short to be an idx file (",
               data.size(), " bytes)");
  const auto* magic = reinterpret_cast<const unsigned char*>(data.data());
  CANOPY_CHECK(magic[0] == 0 && magic[1] == 0 && magic[2] == 0x08, DataError, "'", path,
               "' is not an unsigned-byte idx file (magic bytes ", int(magic[0]), ",", int(magic[1]),
               ",", int(magic[2]), ", expected 0,0,8)");
  const int ndim = magic[3];
  CANOPY_CHECK(ndim >= 1 && ndim <= 4, DataError, "'", path, "' has ", ndim,
               " dimensions; expected 1 to 4");
  const std::size_t header = 4 + 4 * static_cast<std::size_t>(ndim);
  CANOPY_CHECK(data.size() >= header, DataError, "'", path, "' is truncated in its header");
  std::vector<std::int64_t> dims;
  std::size_t count = 1;
  for (int i = 0; i < ndim; ++i) {
    dims.push_back(be32(data, 4 + 4 * static_cast<std::size_t>(i)));
    count *= static_cast<std::size_t>(dims.back());
  }
  CANOPY_CHECK(data.size() == header + count, DataError, "'", path, "' should hold ",
               header + count, " bytes for dimensions ", at::IntArrayRef(dims), " but holds ",
               data.size());
  at::Tensor out = at::empty(dims, at::kByte);
  std::memcpy(out.data_ptr<std::uint8_t>(), data.data() + header, count);
  return out;
}

ImageSplit read_mnist_split(const std::string& dir, const std::string& split, std::int64_t limit) {
  CANOPY_CHECK(split == "train" || split == "test", ConfigError,
               "MNIST split must be train or test, got '", split, "'");
  const std::string prefix = split == "train" ? "train" : "t10k";
  const std::string images_path = find_file(dir, prefix + "-images-idx3-ubyte");
  const std::string labels_path = find_file(dir, prefix + "-labels-idx1-ubyte");
  at::Tensor images = read_idx(images_path);
  at::Tensor labels = read_idx(labels_path);
  CANOPY_CHECK(images.dim() == 3, DataError, "'", images_path, "' should be [N, H, W], is ",
               images.sizes());
  CANOPY_CHECK(labels.dim() == 1 && labels.size(0) == images.size(0), DataError, "'", labels_path,
               "' has ", labels.numel(), " labels for ", images.size(0), " images");
  const std::int64_t n = limit > 0 ? std::min<std::int64_t>(limit, images.size(0)) : images.size(0);
  ImageSplit out;
  out.images = images.slice(0, 0, n).contiguous();
  out.labels = labels.slice(0, 0, n).to(at::kLong);
  out.ids = at::arange(n, at::kLong);
  return out;
}

const std::vector<std::string>& fashion_mnist_class_names() {
  static const std::vector<std::string> names = {"T-shirt/top", "Trouser", "Pullover", "Dress",
                                                 "Coat",        "Sandal",  "Shirt",    "Sneaker",
                                                 "Bag",         "Ankle boot"};
  return names;
}

}  // namespace canopy::datasets
