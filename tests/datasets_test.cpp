#include <gtest/gtest.h>
#include <zlib.h>

#include <fstream>

#include <ATen/ops/allclose.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randn.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/datasets/feature_cache.h"
#include "canopy/datasets/mnist.h"
#include "canopy/datasets/preprocess.h"
#include "support/test_support.h"

namespace canopy::datasets {
namespace {

std::string idx_bytes(const std::vector<std::uint32_t>& dims, const std::vector<std::uint8_t>& data) {
  std::string s = {0, 0, 8, static_cast<char>(dims.size())};
  for (auto d : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) s.push_back(static_cast<char>((d >> shift) & 0xff));
  }
  s.append(data.begin(), data.end());
  return s;
}

void write_gz(const std::string& path, const std::string& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}

TEST(Idx, ReadsPlainAndGzip) {
  testing::TempDir dir;
  std::vector<std::uint8_t> data(2 * 3 * 4);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::uint8_t>(i * 7);
  const std::string bytes = idx_bytes({2, 3, 4}, data);
  std::ofstream(dir.file("a.idx"), std::ios::binary) << bytes;
  write_gz(dir.file("a.idx.gz"), bytes);
  for (const auto* name : {"a.idx", "a.idx.gz"}) {
    const at::Tensor t = read_idx(dir.file(name));
    ASSERT_EQ(t.sizes(), (std::vector<std::int64_t>{2, 3, 4}));
    EXPECT_EQ(t[1][2][3].item<int>(), data[23]);
  }
}

TEST(Idx, BadFilesGiveClearErrors) {
  testing::TempDir dir;
  std::ofstream(dir.file("bad_magic"), std::ios::binary) << std::string("\x01\x02\x03\x04", 4);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_idx(dir.file("bad_magic")); }, {"bad_magic", "magic"}));
  std::string truncated = idx_bytes({10, 2}, std::vector<std::uint8_t>(20));
  truncated.resize(truncated.size() - 5);
  std::ofstream(dir.file("short"), std::ios::binary) << truncated;
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_idx(dir.file("short")); }, {"short", "should hold 32 bytes", "holds 27"}));
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_mnist_split(dir.path(), "train", 0); },
                                              {"train-images-idx3-ubyte", "dataset-fashion-mnist"}));
}

TEST(Mnist, ReadsRealFashionMnistWithLimit) {
  const ImageSplit s = read_mnist_split(testing::fashion_mnist_dir(), "test", 500);
  ASSERT_EQ(s.images.sizes(), (std::vector<std::int64_t>{500, 28, 28}));
  ASSERT_EQ(s.labels.numel(), 500);
  EXPECT_EQ(s.labels.min().item<std::int64_t>(), 0);
  EXPECT_EQ(s.labels.max().item<std::int64_t>(), 9);
  EXPECT_EQ(s.ids[499].item<std::int64_t>(), 499);
  EXPECT_GT(s.images.to(at::kFloat).mean().item<float>(), 20.0f) << "real images are not blank";
}

TEST(Preprocess, ResizesReplicatesAndNormalises) {
  PreprocessConfig c;
  c.resize = 8;
  c.channels = 3;
  c.mean = {0.5};
  c.std = {0.25};
  const at::Tensor img = at::full({2, 4, 4}, 255, at::kByte);
  const at::Tensor x = preprocess_images(img, c);
  ASSERT_EQ(x.sizes(), (std::vector<std::int64_t>{2, 3, 8, 8}));
  EXPECT_TRUE(at::allclose(x, at::full({2, 3, 8, 8}, 2.0f)));  // (1 - 0.5) / 0.25
  c.mean = {0.1, 0.2};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { validate_preprocess_config(c); }, {"preprocess.mean", "got 2"}));
  EXPECT_NE(describe(c).find("resize=8"), std::string::npos);
}

CacheMeta test_meta() {
  CacheMeta m;
  m.fingerprint = "f";
  m.description = "d";
  m.trunk_sha256 = "s";
  m.trunk_path = "t.pt";
  m.preprocessing = "p";
  m.pooling = "avg";
  m.torch_version = "2";
  m.class_names = {"a", "b"};
  return m;
}

TEST(FeatureCache, RoundTripsSplitsAndMetadata) {
  testing::TempDir dir;
  const std::string path = dir.file("c.h5");
  const at::Tensor f1 = at::randn({5, 6}), f2 = at::randn({3, 6});
  {
    FeatureCacheWriter w(path, test_meta());
    w.begin_split("train", 6);
    w.append(f1.slice(0, 0, 2), {{"class", at::arange(2, at::kLong)}}, at::arange(2, at::kLong));
    w.append(f1.slice(0, 2, 5), {{"class", at::arange(3, at::kLong)}}, at::arange(2, 5, at::kLong));
    w.end_split();
    w.begin_split("test", 6);
    w.append(f2, {{"class", at::arange(3, at::kLong)}}, at::arange(3, at::kLong));
    w.end_split();
    EXPECT_FALSE(path_exists(path)) << "nothing at the final path before commit";
    w.commit();
  }
  const FeatureCache c = FeatureCache::open(path);
  EXPECT_EQ(c.splits(), (std::vector<std::string>{"test", "train"}));
  EXPECT_EQ(c.rows("train"), 5);
  EXPECT_EQ(c.meta().class_names, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(c.meta().pooling, "avg");
  const SplitData train = c.load_split("train");
  EXPECT_TRUE(testing::bitwise_equal(train.features, f1));
  EXPECT_EQ(train.labels.at("class")[4].item<std::int64_t>(), 2);
  EXPECT_EQ(train.ids[4].item<std::int64_t>(), 4);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { c.load_split("valid"); }, {"no split 'valid'", "test, train"}));
}

TEST(FeatureCache, UncommittedWriteLeavesNothing) {
  testing::TempDir dir;
  const std::string path = dir.file("c.h5");
  {
    FeatureCacheWriter w(path, test_meta());
    w.begin_split("train", 4);
    w.append(at::randn({2, 4}), {{"class", at::arange(2, at::kLong)}}, at::arange(2, at::kLong));
    // destroyed without commit(), as when a run fails midway
  }
  EXPECT_TRUE(list_dir(dir.path()).empty());
}

TEST(FeatureCache, RefusesWhatIsNotACache) {
  testing::TempDir dir;
  std::ofstream(dir.file("x.h5")) << "not hdf5";
  EXPECT_TRUE(testing::throws_with<DataError>([&] { FeatureCache::open(dir.file("x.h5")); }, {"x.h5", "not an HDF5 file"}));
  EXPECT_TRUE(testing::throws_with<DataError>([&] { FeatureCache::open(dir.file("none.h5")); }, {"does not exist", "canopy cache"}));
  FeatureCacheWriter w(dir.file("wrong.h5"), test_meta());
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        w.begin_split("train", 4);
        w.append(at::randn({2, 5}), {{"class", at::arange(2, at::kLong)}}, at::arange(2, at::kLong));
      },
      {"[B, 4]", "[2, 5]"}));
}

}  // namespace
}  // namespace canopy::datasets
