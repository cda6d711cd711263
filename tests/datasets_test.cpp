#include <gtest/gtest.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <fstream>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <malloc.h>
#include <unistd.h>

#include "canopy/core/bitmasks.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/memory_fence.h"
#include "canopy/datasets/batch_source.h"
#include "canopy/datasets/feature_cache.h"
#include "canopy/datasets/holdout.h"
#include "canopy/datasets/level_file.h"
#include "canopy/datasets/mnist.h"
#include "canopy/datasets/preprocess.h"
#include "hdf5_raii.h"  // datasets/ (private to the module)
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
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { read_idx(dir.file("bad_magic")); }, {"bad_magic", "magic"}));
  std::string truncated = idx_bytes({10, 2}, std::vector<std::uint8_t>(20));
  truncated.resize(truncated.size() - 5);
  std::ofstream(dir.file("short"), std::ios::binary) << truncated;
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_idx(dir.file("short")); },
                                              {"short", "should hold 32 bytes", "holds 27"}));
  // A flipped bit in the header declaring 100 GB is a data error from the bytes there are
  // (LibTorch's allocator used to be asked for the 100 GB), and one declaring more than
  // 2^64 bytes is refused from the header alone.
  write_gz(dir.file("huge.gz"), idx_bytes({40u + (1u << 27), 28, 28}, std::vector<std::uint8_t>(40 * 784)));
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_idx(dir.file("huge.gz")); },
                                              {"huge.gz", "should hold 105226730128 bytes", "holds 31376"}));
  std::ofstream(dir.file("past64"), std::ios::binary)
      << idx_bytes({0xffffffffu, 0xffffffffu, 0xffffffffu}, std::vector<std::uint8_t>(8));
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_idx(dir.file("past64")); },
                                              {"past64", "more than 2^64 bytes"}));
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_idx(dir.file("absent")); },
                                              {"cannot open", "absent", "No such file or directory"}));
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
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { validate_preprocess_config(c); },
                                                {"preprocess.mean", "got 2"}));
  EXPECT_NE(describe(c).find("resize=8"), std::string::npos);
}

// torchvision's Resize(S) sizes and CenterCrop offsets, worked by hand (against torchvision
// itself in tests/python/test_images.py).
TEST(Preprocess, ShorterSideAndCenterCropAreTorchvisions) {
  using Size = std::pair<std::int64_t, std::int64_t>;
  EXPECT_EQ(shorter_side_size(480, 640, 256), Size(256, 341));  // int(256 x 640 / 480) = int(341.33)
  EXPECT_EQ(shorter_side_size(640, 480, 256), Size(341, 256));
  EXPECT_EQ(shorter_side_size(100, 100, 256), Size(256, 256));
  EXPECT_EQ(shorter_side_size(375, 500, 232), Size(232, 309));
  // int(round((have - crop) / 2)), half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 58.5 -> 58.
  for (const auto& [have, want] :
       std::vector<Size>{{224, 0}, {256, 16}, {225, 0}, {227, 2}, {229, 2}, {341, 58}})
    EXPECT_EQ(center_crop_offset(have, 224), want) << have;
  PreprocessConfig c;
  c.channels = 1;
  c.mean = {0};
  c.std = {1};
  c.center_crop = 4;
  // 5 x 7 values 0..34 (/255): rows from 0 (0.5 -> 0), columns from 2 (1.5 -> 2).
  const at::Tensor img = at::arange(35, at::kByte).reshape({1, 5, 7});
  at::Tensor x = preprocess_images(img, c).mul(255).round().to(at::kLong);
  ASSERT_EQ(x.sizes(), (std::vector<std::int64_t>{1, 1, 4, 4}));
  EXPECT_EQ(x[0][0][0][0].item<std::int64_t>(), 2);
  EXPECT_EQ(x[0][0][3][3].item<std::int64_t>(), 3 * 7 + 5);
  // Smaller than the crop: zeros around it, the odd one right and below (3 -> 6: 1 left, 2 right).
  c.center_crop = 6;
  x = preprocess_images(at::full({1, 3, 3}, 255, at::kByte), c);
  ASSERT_EQ(x.sizes(), (std::vector<std::int64_t>{1, 1, 6, 6}));
  EXPECT_EQ(x.sum().item<float>(), 9.0f);
  EXPECT_EQ(x[0][0][1][1].item<float>(), 1.0f);
  EXPECT_EQ(x[0][0][3][3].item<float>(), 1.0f);
  EXPECT_EQ(x[0][0][4][4].item<float>(), 0.0f);
  // The shorter side to 4, then the centre: 8 x 16 -> 4 x 8 -> 4 x 4.
  c.resize_shorter = 4;
  c.center_crop = 4;
  EXPECT_EQ(preprocess_images(at::zeros({1, 8, 16}, at::kByte), c).sizes(),
            (std::vector<std::int64_t>{1, 1, 4, 4}));
  EXPECT_NE(describe(c).find("resize_shorter=4;center_crop=4"), std::string::npos) << describe(c);
  c.resize = 8;
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { validate_preprocess_config(c); },
                                                {"preprocess.resize = 8", "resize_shorter = 4", "set one"}));
}

CacheMeta test_meta(std::int64_t dim, StorageDtype dtype = StorageDtype::kFloat32) {
  CacheMeta m;
  m.fingerprint = "f";
  m.description = "d";
  m.trunk_sha256 = "s";
  m.trunk_path = "t.pt";
  m.preprocessing = "p";
  m.pooling = "avg";
  m.torch_version = "2";
  m.dtype = dtype;
  m.feature_dim = dim;
  m.class_names = {"a", "b"};
  m.label_class_names = {{"class", {"a", "b"}}};
  m.label_bits = {{"tags", {"corn", "grain"}}};
  return m;
}

// Writes a cache of `train` rows (shards of 4) and 3 test rows, in batches of 2.
void write_cache(const std::string& dir, const at::Tensor& train, const at::Tensor& test,
                 StorageDtype dtype = StorageDtype::kFloat32) {
  FeatureCacheWriter w(dir, test_meta(train.size(1), dtype),
                       {{"train", train.size(0)}, {"test", test.size(0)}}, 4, false);
  for (std::int64_t i = 0; i < train.size(0); i += 2) {
    const std::int64_t e = std::min(train.size(0), i + 2);
    w.append("train", train.slice(0, i, e), {{"class", at::arange(i, e, at::kLong) % 2}},
             at::arange(i, e, at::kLong));
  }
  w.append("test", test, {{"class", at::arange(test.size(0), at::kLong)}},
           at::arange(test.size(0), at::kLong));
  w.finish();
}

// canopy turns HDF5's error printing off only around its own calls: a program that links
// it keeps the handler it installed, before and after canopy reads, writes or fails.
TEST(Hdf5, ErrorPrintingStaysAsTheProgramSetIt) {
  H5E_auto2_t before = nullptr;
  void* before_data = nullptr;
  ASSERT_GE(H5Eget_auto2(H5E_DEFAULT, &before, &before_data), 0);
  ASSERT_NE(before, nullptr) << "HDF5 prints errors by default";
  testing::TempDir dir;
  write_cache(dir.path(), at::randn({10, 6}), at::randn({3, 6}));
  FeatureCache::open(dir.path()).load_split("train", ReadMethod::kHdf5);
  write_file_atomic(dir.file("not.h5"), "plain text");
  EXPECT_THROW(h5::open_file(dir.file("not.h5"), false), DataError);
  H5E_auto2_t after = nullptr;
  void* after_data = nullptr;
  ASSERT_GE(H5Eget_auto2(H5E_DEFAULT, &after, &after_data), 0);
  EXPECT_EQ(after, before);
  EXPECT_EQ(after_data, before_data);
}

// What write_file_durably writes (shards, the view, cache levels) is there whole or not at
// all: a write that throws, HDF5's error or any other, leaves the file before it as it was and
// no temporary beside it; an HDF5 error on a filesystem short of the space asked for says the
// disk is full.
TEST(Hdf5, ADurableWriteThatFailsKeepsTheFileBeforeItAndNoTemporary) {
  testing::TempDir dir;
  const std::string path = dir.file("x.h5");
  const auto writing = [](const std::string& value, bool fail, auto error) {
    return [=](hid_t file) {
      h5::write_attr(file, "value", value);
      if (fail) throw decltype(error)("failed writing '" + value + "'");
    };
  };
  const auto value_in = [&] {
    h5::Handle file = h5::open_file(path, false);
    return h5::read_string_attr(file.get(), "value", path);
  };
  h5::write_file_durably(path, "x", 0, "", writing("first", false, IoError("")));
  EXPECT_EQ(value_in(), "first");
  const std::vector<std::string> only_the_file = {"x.h5"};
  EXPECT_THROW(h5::write_file_durably(path, "x", 0, "", writing("second", true, DataError(""))), DataError);
  EXPECT_EQ(list_dir(dir.path()), only_the_file);
  EXPECT_THROW(h5::write_file_durably(path, "x", 0, "", writing("second", true, IoError(""))), IoError);
  EXPECT_EQ(list_dir(dir.path()), only_the_file);
  try {
    h5::write_file_durably(path, "the file '" + path + "'", std::uint64_t{1} << 62, "; free space",
                           writing("second", true, IoError("")));
    ADD_FAILURE() << "no error";
  } catch (const IoError& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.rfind("writing the file '" + path + "' failed: the disk is full (ENOSPC", 0), 0u) << what;
    EXPECT_EQ(what.substr(what.size() - 12), "; free space") << what;
  }
  EXPECT_EQ(value_in(), "first");
  EXPECT_EQ(list_dir(dir.path()), only_the_file);
  h5::write_file_durably(path, "x", 0, "", writing("second", false, IoError("")));
  EXPECT_EQ(value_in(), "second");
  EXPECT_EQ(list_dir(dir.path()), only_the_file);
}

// A task on a label source without class_names of its own is named by its source's classes,
// never by another source's (before, every source took the first one's names).
TEST(FeatureCache, NamesEachLabelSourcesOwnClasses) {
  CacheMeta m;
  m.label_sources = {"kind", "level", "all_labels"};
  m.class_names = {"cat", "dog"};
  m.label_class_names = {{"kind", {"cat", "dog"}}};
  EXPECT_EQ(m.names_of("kind"), (std::vector<std::string>{"cat", "dog"}));
  EXPECT_TRUE(m.names_of("level").empty());
  EXPECT_TRUE(m.names_of("all_labels").empty());
  // A manifest from before the names per source: class_names are the first source's.
  m.label_class_names.clear();
  EXPECT_EQ(m.names_of("kind"), (std::vector<std::string>{"cat", "dog"}));
  EXPECT_TRUE(m.names_of("level").empty());
}

TEST(FeatureCache, RoundTripsShardsAndMetadata) {
  testing::TempDir dir;
  const at::Tensor f1 = at::randn({10, 6}), f2 = at::randn({3, 6});
  write_cache(dir.path(), f1, f2);
  const FeatureCache c = FeatureCache::open(dir.path());
  EXPECT_EQ(c.splits(), (std::vector<std::string>{"test", "train"}));
  EXPECT_EQ(c.rows("train"), 10);
  EXPECT_EQ(c.shards("train").size(), 3u) << "10 rows in shards of 4";
  EXPECT_EQ(c.meta().class_names, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(c.meta().label_class_names, test_meta(6).label_class_names);
  EXPECT_EQ(c.meta().label_bits, test_meta(6).label_bits);
  for (auto method : {ReadMethod::kPread, ReadMethod::kHdf5}) {
    const SplitData train = c.load_split("train", method);
    EXPECT_TRUE(testing::bitwise_equal(train.features, f1));
    EXPECT_EQ(train.labels.at("class")[5].item<std::int64_t>(), 1);
    EXPECT_EQ(train.ids[9].item<std::int64_t>(), 9);
  }
  EXPECT_NO_THROW(c.verify());
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { c.load_split("valid"); }, {"no split 'valid'", "test, train"}));
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { c.rows("tset"); }, {"no split 'tset' (did you mean 'test'?)"}));
}

TEST(FeatureCache, StorageDtypesRoundTrip) {
  testing::TempDir dir;
  const at::Tensor f = at::randn({9, 5});
  for (auto dtype : {StorageDtype::kFloat16, StorageDtype::kBFloat16}) {
    const std::string sub = dir.file(storage_dtype_name(dtype));
    write_cache(sub, f, f.slice(0, 0, 3), dtype);
    const FeatureCache c = FeatureCache::open(sub);
    for (auto method : {ReadMethod::kPread, ReadMethod::kHdf5}) {
      const at::Tensor got = c.load_split("train", method).features;
      EXPECT_EQ(got.scalar_type(), scalar_type(dtype));
      // Exactly the rounding of the 16-bit type, nothing more.
      EXPECT_TRUE(testing::bitwise_equal(got, f.to(scalar_type(dtype)))) << storage_dtype_name(dtype);
    }
  }
  EXPECT_TRUE(
      testing::throws_with<ConfigError>([] { parse_storage_dtype("int8"); }, {"cache.dtype", "'int8'"}));
}

TEST(FeatureCache, UnfinishedCacheIsRefusedAndResumed) {
  testing::TempDir dir;
  const at::Tensor f = at::randn({10, 4});
  {
    FeatureCacheWriter w(dir.path(), test_meta(4), {{"train", 10}, {"test", 2}}, 4, false);
    w.append("train", f.slice(0, 0, 6), {{"class", at::zeros({6}, at::kLong)}}, at::arange(6, at::kLong));
    // dropped here, as when a run is killed: one shard of 4 finished, 2 rows were pending
  }
  EXPECT_TRUE(testing::throws_with<DataError>([&] { FeatureCache::open(dir.path()); },
                                              {"unfinished", "4 of 12 rows"}));
  std::string note;
  FeatureCacheWriter w(dir.path(), test_meta(4), {{"train", 10}, {"test", 2}}, 4, true, &note);
  EXPECT_EQ(w.rows_done("train"), 4);
  EXPECT_NE(note.find("1 finished shard"), std::string::npos) << note;
  w.append("train", f.slice(0, 4, 10), {{"class", at::zeros({6}, at::kLong)}}, at::arange(4, 10, at::kLong));
  w.append("test", f.slice(0, 0, 2), {{"class", at::zeros({2}, at::kLong)}}, at::arange(2, at::kLong));
  w.finish();
  EXPECT_TRUE(testing::bitwise_equal(FeatureCache::open(dir.path()).load_split("train").features, f));
}

// The writer holds one shard's rows: copied into the shard's buffer as they come and written
// from there. Under a real memory fence (RLIMIT_DATA, 64 MiB: room for one 32 MiB shard, a
// 4 MiB batch and what HDF5 takes to write, about 52 MiB in all, but not for two shards), 3
// shards are written in batches of 256 rows. Keeping the batches and concatenating them, as
// the writer once did, was refused there.
TEST(FeatureCache, TheWriterHoldsOneShardsRows) {
  constexpr std::int64_t kMiB = 1 << 20, kDim = 4096, kShard = 2048, kBatch = 256;  // 16 KiB rows
  // Blocks of 1 MiB and more mapped and unmapped whole, so that what the data segment holds
  // is what is alive (glibc otherwise moves its threshold up and keeps freed batches).
  mallopt(M_MMAP_THRESHOLD, static_cast<int>(kMiB));
  testing::TempDir dir;
  FeatureCacheWriter w(dir.path(), test_meta(kDim), {{"train", 3 * kShard}, {"test", kBatch}}, kShard, false);
  {
    MemoryFence fence(MemoryRoom{64 * kMiB, "a room of 64 MiB"});
    if (!fence.active())
      GTEST_SKIP() << "no fence here (a sanitizer's allocator, free swap, or RLIMIT_DATA below it)";
    for (std::int64_t i = 0; i < 3 * kShard; i += kBatch) {
      w.append("train", at::full({kBatch, kDim}, static_cast<float>(i)),
               {{"class", at::zeros({kBatch}, at::kLong)}}, at::arange(i, i + kBatch, at::kLong));
    }
    w.append("test", at::ones({kBatch, kDim}), {{"class", at::zeros({kBatch}, at::kLong)}},
             at::arange(kBatch, at::kLong));
    EXPECT_FALSE(fence.refusal()) << "the fence refused " << fence.refusal()->asked << " bytes";
  }
  w.finish();
  const FeatureCache c = FeatureCache::open(dir.path());
  EXPECT_EQ(c.shards("train").size(), 3u);
  const at::Tensor last = c.load_split("train").features.slice(0, 3 * kShard - kBatch);
  EXPECT_TRUE(last.eq(static_cast<float>(3 * kShard - kBatch)).all().item<bool>());
}

// Two writers of one cache, as two MPI ranks: the owner and a helper write different shards,
// in any order; a killed run keeps what either listed, and the owner adopts the helper's.
TEST(FeatureCache, ShardsOfTwoWritersAreKeptOnResumeAndAdopted) {
  testing::TempDir dir;
  const at::Tensor f = at::randn({12, 4});
  const std::map<std::string, std::int64_t> rows{{"train", 12}, {"test", 2}};
  auto append = [&](FeatureCacheWriter& w, std::int64_t a, std::int64_t b) {
    w.seek("train", a);
    w.append("train", f.slice(0, a, b), {{"class", at::zeros({b - a}, at::kLong)}},
             at::arange(a, b, at::kLong));
  };
  {
    FeatureCacheWriter owner(dir.path(), test_meta(4), rows, 4, false);
    FeatureCacheWriter helper(dir.path(), test_meta(4), rows, 4, true, nullptr, 1);
    append(helper, 8, 12);  // the last shard first, by the helper
    EXPECT_TRUE(is_regular_file(helper_manifest_path(dir.path(), 1)));
    // killed here: the owner listed nothing, the helper one shard
  }
  std::string note;
  FeatureCacheWriter owner(dir.path(), test_meta(4), rows, 4, true, &note);
  EXPECT_NE(note.find("1 finished shard"), std::string::npos) << note;
  EXPECT_FALSE(is_regular_file(helper_manifest_path(dir.path(), 1)));  // now in manifest.json
  const auto missing = owner.missing_shards();
  ASSERT_EQ(missing.size(), 3U);
  EXPECT_EQ(missing[0].split, "train");
  EXPECT_EQ(missing[0].first_row, 0);
  EXPECT_EQ(missing[1].first_row, 4);
  EXPECT_EQ(missing[2].split, "test");
  {
    FeatureCacheWriter helper(dir.path(), test_meta(4), rows, 4, true, nullptr, 2);
    append(helper, 4, 8);
  }
  append(owner, 0, 4);
  owner.seek("test", 0);
  owner.append("test", f.slice(0, 0, 2), {{"class", at::zeros({2}, at::kLong)}}, at::arange(2, at::kLong));
  EXPECT_TRUE(testing::throws_with<Error>([&] { owner.finish(); }, {"'train' has 8 of 12 rows"}));
  owner.adopt_helper_shards();
  owner.finish();
  const auto cache = FeatureCache::open(dir.path());
  EXPECT_TRUE(testing::bitwise_equal(cache.load_split("train").features, f));
  const auto shards = cache.shards("train");
  ASSERT_EQ(shards.size(), 3U);
  for (std::size_t k = 0; k < shards.size(); ++k)
    EXPECT_EQ(shards[k].first_row, 4 * static_cast<std::int64_t>(k));
  cache.verify();
}

void flip_byte(const std::string& path, std::uint64_t offset) {
  std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
  io.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  io.read(&c, 1);
  c ^= 0x10;
  io.seekp(static_cast<std::streamoff>(offset));
  io.write(&c, 1);
}

TEST(FeatureCache, CorruptionAndTruncationAreDetected) {
  testing::TempDir dir;
  write_cache(dir.path(), at::randn({10, 6}), at::randn({3, 6}));
  const FeatureCache c = FeatureCache::open(dir.path());
  const ShardInfo s = c.shards("train").at(1);
  const std::string file = join_path(dir.path(), s.file);
  flip_byte(file, s.features_offset + 30);
  for (auto method : {ReadMethod::kPread, ReadMethod::kHdf5}) {
    EXPECT_TRUE(testing::throws_with<DataError>([&] { c.load_split("train", method); },
                                                {s.file, "checksum mismatch", "features"}));
  }
  EXPECT_TRUE(testing::throws_with<DataError>([&] { c.verify(); }, {s.file, "checksum"}));
  flip_byte(file, s.features_offset + 30);  // repaired
  EXPECT_NO_THROW(c.load_split("train"));
  flip_byte(file, s.labels.at("class").first + 3);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { c.load_split("train"); }, {"labels/class"}));
  flip_byte(file, s.labels.at("class").first + 3);
  ASSERT_EQ(::truncate(file.c_str(), static_cast<off_t>(s.bytes - 10)), 0);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { c.load_split("train"); }, {s.file, "truncated"}));
}

// A list of more than 62 labels is a multi-hot source, int64 [rows, K]: written, read back by
// pread and through HDF5 (the view, as h5py reads it), checksummed, streamed with its rows, and
// the cache says schema 4 so that a reader of one label per row refuses it.
TEST(FeatureCache, MultiHotSourcesRoundTripAsRowsOfLabels) {
  testing::TempDir dir;
  const std::int64_t n = 11, k = 70;
  CacheMeta meta = test_meta(3);
  meta.label_sources = {"class", "words"};
  for (std::int64_t j = 0; j < k; ++j) meta.label_bits["words"].push_back("w" + std::to_string(j));
  ASSERT_EQ(meta.label_width("words"), k);
  ASSERT_EQ(meta.label_width("tags"), 1) << "2 labels: a bitmask";
  // Row r has labels r, r + 1 and 69: no two rows alike, so a row given another's labels shows.
  const at::Tensor words = at::zeros({n, k}, at::kLong);
  for (std::int64_t r = 0; r < n; ++r) {
    words[r][r] = 1;
    words[r][r + 1] = 1;
    words[r][k - 1] = 1;
  }
  const at::Tensor f = at::arange(n * 3, at::kFloat).view({n, 3});
  {
    FeatureCacheWriter w(dir.path(), meta, {{"train", n}}, 4, false);
    for (std::int64_t i = 0; i < n; i += 3) {
      const std::int64_t e = std::min(n, i + 3);
      w.append("train", f.slice(0, i, e),
               {{"class", at::arange(i, e, at::kLong) % 2}, {"words", words.slice(0, i, e)}},
               at::arange(i, e, at::kLong));
    }
    EXPECT_TRUE(testing::throws_with<DataError>(
        [&] {
          FeatureCacheWriter bad(dir.file("bad"), meta, {{"train", 2}}, 4, false);
          bad.append("train", f.slice(0, 0, 2),
                     {{"class", at::zeros({2}, at::kLong)}, {"words", at::zeros({2}, at::kLong)}},
                     at::arange(2, at::kLong));
        },
        {"labels of 'words' of shape [2]", "expected [2, 70]"}));
    w.finish();
  }
  const FeatureCache c = FeatureCache::open(dir.path());
  EXPECT_EQ(read_manifest(dir.path()).meta.label_bits.at("words").size(), std::size_t(k));
  EXPECT_NE(read_file(manifest_path(dir.path())).find("\"schema\": 4"), std::string::npos);
  EXPECT_EQ(bytes_per_row(c.meta()), std::uint64_t(3 * 4 + 8 * (1 + 1 + k)));
  for (auto method : {ReadMethod::kPread, ReadMethod::kHdf5}) {
    const SplitData d = c.load_split("train", method);
    EXPECT_TRUE(testing::bitwise_equal(d.labels.at("words"), words)) << static_cast<int>(method);
    EXPECT_TRUE(testing::bitwise_equal(d.labels.at("class"), at::arange(n, at::kLong) % 2));
  }
  EXPECT_TRUE(testing::bitwise_equal(c.load_labels("train", "words"), words));
  {  // The view, as HDF5 readers see it: [N, K], its columns named.
    h5::Handle view = h5::open_file(view_path(dir.path()), false);
    h5::Handle ds = h5::open_dataset(view.get(), "train/labels/words", "view");
    EXPECT_EQ(h5::shape(ds.get()), (std::vector<std::int64_t>{n, k}));
    std::string names = "[";
    for (std::int64_t j = 0; j < k; ++j) names += (j ? ",\"w" : "\"w") + std::to_string(j) + "\"";
    EXPECT_EQ(h5::read_string_attr(ds.get(), "labels", "view"), names + "]");
    EXPECT_EQ(h5::read_int_attr(view.get(), "canopy_schema", "view"), kCacheSchemaVersionMultiHot);
  }
  EXPECT_NO_THROW(c.verify());
  auto src = make_streaming_source(c, "train", 5, 7, 1 << 20, ReadMethod::kPread);
  src->start_epoch(0);
  Batch b;
  std::int64_t served = 0;
  while (src->next(b)) {
    for (std::int64_t r = 0; r < b.features.size(0); ++r, ++served) {
      const auto row = static_cast<std::int64_t>(b.features[r][0].item<float>()) / 3;
      EXPECT_TRUE(at::equal(b.labels.at("words")[r], words[row]))
          << "row " << row << "'s labels travel with it";
    }
  }
  EXPECT_EQ(served, n);
  // A flipped byte in the labels region (past the first row's) is caught by its checksum.
  const ShardInfo s = c.shards("train").at(1);
  flip_byte(join_path(dir.path(), s.file), s.labels.at("words").first + 8 * k * 2 + 3);
  for (auto method : {ReadMethod::kPread, ReadMethod::kHdf5}) {
    EXPECT_TRUE(testing::throws_with<DataError>([&] { c.load_split("train", method); },
                                                {s.file, "checksum mismatch", "labels/words"}));
  }
}

TEST(FeatureCache, RefusesWhatIsNotACache) {
  testing::TempDir dir;
  EXPECT_TRUE(testing::throws_with<DataError>([&] { FeatureCache::open(dir.file("none")); },
                                              {"does not exist", "canopy cache"}));
  make_dirs(dir.file("bad"));
  write_file_atomic(dir.file("bad/manifest.json"), "{\"schema\": 2}");
  EXPECT_TRUE(testing::throws_with<DataError>([&] { FeatureCache::open(dir.file("bad")); }, {"malformed"}));
  write_file_atomic(dir.file("bad/manifest.json"), "{\"schema\": 1}");
  EXPECT_TRUE(testing::throws_with<DataError>([&] { FeatureCache::open(dir.file("bad")); },
                                              {"schema version 1", "rebuild"}));
  FeatureCacheWriter w(dir.file("wrong"), test_meta(4), {{"train", 2}}, 4, false);
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        w.append("train", at::randn({2, 5}), {{"class", at::arange(2, at::kLong)}}, at::arange(2, at::kLong));
      },
      {"[B, 4]", "[2, 5]"}));
}

TEST(BatchSource, StreamingServesEveryRowOncePerEpochUnderItsCap) {
  testing::TempDir dir;
  const std::int64_t n = 37;
  const at::Tensor f = at::arange(n * 3, at::kFloat).view({n, 3});
  write_cache(dir.path(), f, f.slice(0, 0, 3));
  const FeatureCache c = FeatureCache::open(dir.path());
  const std::uint64_t shard_bytes = 4 * (3 * 4 + 24);  // features, then id, position and label
  // Batches of 5 over shards of 4: the carry may take 2 shards, so 5 shards is the least.
  auto src = make_streaming_source(c, "train", 5, 7, 5 * shard_bytes, ReadMethod::kPread);
  for (std::int64_t epoch = 0; epoch < 2; ++epoch) {
    src->start_epoch(epoch);
    std::vector<int> seen(n, 0);
    Batch b;
    std::int64_t batches = 0;
    while (src->next(b)) {
      ++batches;
      for (std::int64_t r = 0; r < b.features.size(0); ++r) {
        const auto row = static_cast<std::int64_t>(b.features[r][0].item<float>()) / 3;
        ++seen[row];
        EXPECT_EQ(b.labels.at("class")[r].item<std::int64_t>(), row % 2) << "labels travel with their rows";
        EXPECT_EQ(b.index[r].item<std::int64_t>(), row) << "and so do their positions in the split";
      }
    }
    EXPECT_EQ(batches, (n + 4) / 5);
    for (std::int64_t r = 0; r < n; ++r) EXPECT_EQ(seen[r], 1) << "row " << r << " epoch " << epoch;
  }
  EXPECT_GT(src->peak_bytes(), 0u);
  EXPECT_LE(src->peak_bytes(), 5 * shard_bytes);
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { make_streaming_source(c, "train", 5, 7, 4 * shard_bytes, ReadMethod::kPread); },
      {"5 shards", "memory_cap_mb"}));
}

// A level on disk: rows written by position in any order, read back by position, each row
// checked against its CRC-32C; rows never written are zeros; the file is also a level
// read_level and verify_level take whole; a flipped byte is named by its row.
TEST(LevelFile, OnDiskRowsByPositionEachChecked) {
  testing::TempDir dir;
  const std::string path = dir.file("levels/blocks.1.h5");
  const std::int64_t n = 10, d = 6;
  const at::Tensor rows = at::randn({n, d});
  {
    LevelWriter w(path, n, d, "blocks.1", "abc");
    const at::Tensor first = at::tensor(std::vector<std::int64_t>{7, 2, 9});
    const at::Tensor second = at::tensor(std::vector<std::int64_t>{0, 3, 1, 8, 2});  // 2 again: counted once
    w.write(first, rows.index_select(0, first));
    w.write(second, rows.index_select(0, second));
    EXPECT_EQ(w.written(), 7);
    EXPECT_FALSE(path_exists(path)) << "nothing under the level's name before finish";
    w.finish();
  }
  {
    LevelWriter dropped(dir.file("levels/blocks.2.h5"), n, d, "blocks.2", "abc");
    dropped.write(at::tensor(std::vector<std::int64_t>{1}), rows.slice(0, 0, 1));
  }
  EXPECT_EQ(list_dir(dir.file("levels")), std::vector<std::string>{"blocks.1.h5"})
      << "a level not finished leaves no file";
  const LevelReader r(path);
  EXPECT_EQ(r.rows(), n);
  EXPECT_EQ(r.values(), d);
  EXPECT_EQ(r.block(), "blocks.1");
  EXPECT_EQ(r.fingerprint(), "abc");
  const at::Tensor idx = at::tensor(std::vector<std::int64_t>{9, 0, 3, 7});
  EXPECT_TRUE(r.read(idx).equal(rows.index_select(0, idx)));
  EXPECT_TRUE(r.read(at::tensor(std::vector<std::int64_t>{4, 5})).equal(at::zeros({2, d})))
      << "rows never written are zeros";
  const LevelFile whole = read_level(path);
  at::Tensor want = rows.clone();
  want.index_fill_(0, at::tensor(std::vector<std::int64_t>{4, 5, 6}), 0.0);
  EXPECT_TRUE(whole.rows.equal(want));
  EXPECT_NO_THROW(verify_level(path));
  std::uint64_t offset = 0;
  {
    h5::Handle file = h5::open_file(path, false);
    offset = h5::data_offset(h5::open_dataset(file.get(), "rows", path).get());
  }
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);  // a flipped byte in row 3
    const auto at = static_cast<std::streamoff>(offset + 3 * d * 4 + 1);
    char c = 0;
    f.seekg(at);
    f.get(c);
    f.seekp(at);
    f.put(static_cast<char>(c ^ 0x40));
  }
  EXPECT_TRUE(testing::throws_with<DataError>([&] { r.read(idx); }, {"row 3", "CRC-32C", path}));
  EXPECT_TRUE(
      r.read(at::tensor(std::vector<std::int64_t>{9, 0})).equal(rows.index_select(0, idx.slice(0, 0, 2))))
      << "the other rows still read";
  EXPECT_TRUE(testing::throws_with<DataError>([&] { verify_level(path); }, {"row 3", "CRC-32C"}));
  // A level written over a split in memory has no row CRCs: not one to read by row.
  write_level(dir.file("memory.h5"), {rows, "blocks.1", "abc"});
  EXPECT_NO_THROW(verify_level(dir.file("memory.h5")));
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { LevelReader m(dir.file("memory.h5")); }, {"no row CRCs"}));
  EXPECT_TRUE(testing::throws_with<DataError>([&] { LevelReader m(dir.file("none.h5")); }, {"missing"}));
}

// The validation split: stratified (each class gives round(fraction x its rows)), disjoint
// from the rows that train, together all of them, and fixed by the seed alone.
TEST(Holdout, StratifiedDisjointAndSeeded) {
  const std::int64_t n = 1000;
  // Classes of unequal size: 0 has 600 rows, 1 has 300, 2 has 100.
  const at::Tensor classes = at::arange(n, at::kLong).lt(600).logical_not().to(at::kLong) +
                             at::arange(n, at::kLong).ge(900).to(at::kLong);
  const Holdout h = stratified_holdout(classes, n, 0.1, 3);
  ASSERT_EQ(h.validation_rows.numel(), 100);
  for (std::int64_t k = 0; k < 3; ++k) {
    const auto held = classes.index_select(0, h.validation_rows).eq(k).sum().item<std::int64_t>();
    const std::int64_t want[] = {60, 30, 10};
    EXPECT_EQ(held, want[k]) << "class " << k;
  }
  EXPECT_EQ(h.train_rows.numel() + h.validation_rows.numel(), n);
  const at::Tensor all = at::cat({h.train_rows, h.validation_rows});
  EXPECT_TRUE(std::get<0>(all.sort()).equal(at::arange(n, at::kLong)))
      << "disjoint, and every row on one side";
  EXPECT_TRUE(stratified_holdout(classes, n, 0.1, 3).validation_rows.equal(h.validation_rows));
  EXPECT_FALSE(stratified_holdout(classes, n, 0.1, 4).validation_rows.equal(h.validation_rows));
  EXPECT_EQ(stratified_holdout(at::Tensor(), n, 0.25, 3).validation_rows.numel(), 250) << "unstratified";
  EXPECT_TRUE(testing::throws_with<DataError>([&] { stratified_holdout(classes.slice(0, 0, 3), 3, 0.1, 0); },
                                              {"holds out none", "0.1"}));
}

// Lists of labels: each label gives about fraction x its rows, far closer than a plain draw
// of as many rows; rows of no label share it too; seeded; bitmasks hold out as their rows do.
TEST(Holdout, ListsOfLabelsAreHeldOutLabelByLabel) {
  const std::int64_t n = 2000, k = 40;
  // Label j on a row with chance 0.4 / (1 + j / 2) (about 800 rows to 40), the last 300 rows
  // no label, and labels 36 to 39 on 2, 4, 7 and 12 rows alone.
  auto gen = at::detail::createCPUGenerator(7);
  const at::Tensor chance = 0.4 / (1 + at::arange(k, at::kDouble) / 2);
  at::Tensor y = at::rand({n, k}, gen, at::kDouble).lt(chance).to(at::kLong);
  y.slice(0, 1700).zero_();
  const std::int64_t rare[] = {2, 4, 7, 12};
  for (std::int64_t i = 0; i < 4; ++i) {
    y.select(1, 36 + i).zero_();
    y.select(1, 36 + i).slice(0, 100 * i, 100 * i + rare[i]).fill_(1);
  }
  const Holdout h = multilabel_holdout(y, 0.1, 3);
  const std::int64_t v = h.validation_rows.numel();
  EXPECT_EQ(v, 200) << "fraction x rows";
  EXPECT_TRUE(std::get<0>(at::cat({h.train_rows, h.validation_rows}).sort()).equal(at::arange(n, at::kLong)))
      << "disjoint, and every row on one side";
  const at::Tensor per_label = y.sum(0), held = y.index_select(0, h.validation_rows).sum(0);
  // A plain draw of as many rows, for comparison.
  const at::Tensor drawn =
      y.index_select(0, stratified_holdout(at::Tensor(), n, static_cast<double>(v) / n, 3).validation_rows)
          .sum(0);
  double off = 0, off_drawn = 0;
  std::vector<std::int64_t> unheld;
  for (std::int64_t j = 0; j < k; ++j) {
    const auto rows = per_label[j].item<std::int64_t>(), got = held[j].item<std::int64_t>();
    if (rows > 0 && got == 0) unheld.push_back(j);
    if (rows < 10) continue;
    EXPECT_GE(got, 1) << "label " << j << " of " << rows << " rows";
    EXPECT_LE(std::abs(static_cast<double>(got) - 0.1 * static_cast<double>(rows)), 1.5)
        << "label " << j << " of " << rows << " rows: " << got << " held out";
    off += std::abs(static_cast<double>(got) - 0.1 * static_cast<double>(rows));
    off_drawn += std::abs(drawn[j].item<double>() - 0.1 * static_cast<double>(rows));
  }
  EXPECT_LT(off * 3, off_drawn) << "label by label against a plain draw: " << off << " vs " << off_drawn;
  EXPECT_EQ(h.unheld_labels, unheld);
  EXPECT_TRUE(std::find(unheld.begin(), unheld.end(), 36) != unheld.end()) << "the label of 2 rows";
  const auto no_label = h.validation_rows.ge(1700).sum().item<std::int64_t>();
  // Rows of no label go last, to make up the total: about a tenth of them too.
  EXPECT_NEAR(no_label, 30, 9) << "rows of no label";
  EXPECT_TRUE(multilabel_holdout(y, 0.1, 3).validation_rows.equal(h.validation_rows));
  EXPECT_FALSE(multilabel_holdout(y, 0.1, 4).validation_rows.equal(h.validation_rows));
  // The same labels as bitmasks.
  const at::Tensor masks = (y * at::ones({k}, at::kLong).bitwise_left_shift(at::arange(k, at::kLong))).sum(1);
  ASSERT_TRUE(multi_hot_of_bitmasks(masks, k).equal(y));
  // Every row a label of its own: each label wants its row on the training side, which takes
  // 18 of 20 and leaves the validation side the last 2.
  const Holdout own = multilabel_holdout(at::eye(20, at::kLong), 0.1, 0);
  EXPECT_EQ(own.validation_rows.numel(), 2);
  EXPECT_EQ(own.unheld_labels.size(), 18U);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { multilabel_holdout(at::eye(5, at::kLong), 0.1, 0); },
                                              {"holds out none", "label by label"}));
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { multilabel_holdout(masks, 0.1, 0); }, {"[rows, labels]"}));
}

// A streamed split skips the held-out rows, and load_rows reads exactly those.
TEST(Holdout, StreamingServesOnlyTheKeptRowsAndLoadRowsTheOthers) {
  testing::TempDir dir;
  const std::int64_t n = 37;
  const at::Tensor f = at::arange(n * 3, at::kFloat).view({n, 3});
  write_cache(dir.path(), f, f.slice(0, 0, 3));
  const FeatureCache c = FeatureCache::open(dir.path());
  const Holdout h = stratified_holdout(c.load_labels("train", "class"), n, 0.3, 1);
  EXPECT_TRUE(c.load_labels("train", "class").equal(at::arange(n, at::kLong) % 2));
  at::Tensor keep = at::zeros({n}, at::kBool);
  keep.index_fill_(0, h.train_rows, true);
  auto src = make_streaming_source(c, "train", 5, 7, 1 << 20, ReadMethod::kPread, keep);
  EXPECT_EQ(src->rows(), h.train_rows.numel());
  src->start_epoch(0);
  std::vector<int> seen(n, 0);
  Batch b;
  while (src->next(b)) {
    for (std::int64_t r = 0; r < b.features.size(0); ++r) {
      ++seen[b.features[r][0].item<float>() / 3];
      EXPECT_EQ(b.index[r].item<std::int64_t>(), b.features[r][0].item<float>() / 3)
          << "the split's position";
    }
  }
  for (std::int64_t r = 0; r < n; ++r) EXPECT_EQ(seen[r], keep[r].item<bool>() ? 1 : 0) << "row " << r;
  const SplitData v = c.load_rows("train", h.validation_rows);
  EXPECT_TRUE(v.ids.equal(h.validation_rows));
  EXPECT_TRUE(v.features.equal(f.index_select(0, h.validation_rows)));
  EXPECT_TRUE(v.labels.at("class").equal(h.validation_rows % 2));
}

// One epoch of `src` over rows whose feature is row + 1000 x view: each of the `n` rows'
// view (-1: not served), checking that no row comes twice and that labels (row % `classes`)
// travel with their rows.
std::vector<std::int64_t> views_served(BatchSource& src, std::int64_t epoch, std::int64_t n,
                                       std::int64_t classes) {
  src.start_epoch(epoch);
  std::vector<std::int64_t> view_of(n, -1);
  Batch b;
  while (src.next(b)) {
    for (std::int64_t r = 0; r < b.features.size(0); ++r) {
      const auto value = static_cast<std::int64_t>(b.features[r][0].item<float>());
      const std::int64_t row = value % 1000;
      EXPECT_EQ(view_of[row], -1) << "row " << row << " served twice";
      view_of[row] = value / 1000;
      EXPECT_EQ(b.labels.at("class")[r].item<std::int64_t>(), row % classes)
          << "labels travel with their rows";
    }
  }
  return view_of;
}

// With views, every row is served once per epoch, as one of its views, drawn per (seed,
// epoch, row): reproducible, and every view in use.
TEST(BatchSource, InMemoryViewsServeEachRowOnceAsOneOfItsViews) {
  const std::int64_t n = 300, views = 4;
  SplitData d;
  d.features = at::arange(n, at::kFloat).view({n, 1});
  d.ids = at::arange(n, at::kLong);
  d.labels["class"] = at::arange(n, at::kLong) % 3;
  std::vector<at::Tensor> extra;
  for (std::int64_t v = 1; v < views; ++v) extra.push_back(d.features + 1000.0 * static_cast<double>(v));
  auto draw = [&](std::int64_t epoch) {
    auto src = make_in_memory_source(d, 64, 5, extra);
    return views_served(*src, epoch, n, 3);
  };
  const auto e0 = draw(0);
  std::vector<std::int64_t> count(views, 0);
  for (auto v : e0) {
    ASSERT_GE(v, 0);
    ++count[static_cast<std::size_t>(v)];
  }
  for (std::int64_t v = 0; v < views; ++v) EXPECT_GT(count[v], n / views / 2) << "view " << v;
  EXPECT_EQ(draw(0), e0) << "the draw depends on (seed, epoch) alone";
  EXPECT_NE(draw(1), e0) << "each epoch draws anew";
}

// Streamed with views: each shard is read as one of its views per epoch (drawn per seed,
// epoch and shard), so every row is served once, as one of its views, with its labels; the
// draw is reproducible, every view in use over epochs, the cap kept, and a held-out row is
// skipped in every view.
TEST(BatchSource, StreamedViewsServeEachRowOnceAsItsShardsView) {
  testing::TempDir dir;
  const std::int64_t n = 37, views = 3;
  CacheMeta meta = test_meta(1);
  meta.views = views;
  std::map<std::string, std::int64_t> splits{{"train", n}, {"test", 3}};
  for (std::int64_t v = 1; v < views; ++v) splits[view_split("train", v)] = n;
  {
    FeatureCacheWriter w(dir.path(), meta, splits, 4, false);
    const at::Tensor rows = at::arange(n, at::kLong);
    for (std::int64_t v = 0; v < views; ++v) {
      w.append(v == 0 ? "train" : view_split("train", v), (rows + 1000 * v).to(at::kFloat).view({n, 1}),
               {{"class", rows % 2}}, rows);
    }
    w.append("test", at::zeros({3, 1}), {{"class", at::arange(3, at::kLong) % 2}}, at::arange(3, at::kLong));
    w.finish();
  }
  const FeatureCache c = FeatureCache::open(dir.path());
  const std::uint64_t shard_bytes = 4 * (4 + 24);
  at::Tensor keep = at::ones({n}, at::kBool);
  keep[5].fill_(false);
  auto src = make_streaming_source(c, "train", 5, 7, 5 * shard_bytes, ReadMethod::kPread, keep, views);
  EXPECT_NE(src->describe().find("one of 3 views"), std::string::npos) << src->describe();
  auto draw = [&](std::int64_t epoch) { return views_served(*src, epoch, n, 2); };
  std::vector<std::int64_t> count(views, 0);
  for (std::int64_t epoch = 0; epoch < 6; ++epoch) {
    const auto seen = draw(epoch);
    for (std::int64_t r = 0; r < n; ++r) {
      if (r == 5) {
        EXPECT_EQ(seen[r], -1) << "a held-out row is served in no view";
        continue;
      }
      ASSERT_GE(seen[r], 0) << "row " << r << " epoch " << epoch;
      EXPECT_EQ(seen[r], seen[r / 4 * 4]) << "a shard's rows (4 per shard) share its view";
      ++count[static_cast<std::size_t>(seen[r])];
    }
    EXPECT_EQ(draw(epoch), seen) << "the draw depends on (seed, epoch) alone";
  }
  for (std::int64_t v = 0; v < views; ++v) EXPECT_GT(count[v], 0) << "view " << v << " never served";
  EXPECT_LE(src->peak_bytes(), 5 * shard_bytes);
}

}  // namespace
}  // namespace canopy::datasets
