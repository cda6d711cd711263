#include <gtest/gtest.h>

#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/randn.h>

#include "canopy/core/error.h"
#include "canopy/core/sha256.h"
#include "canopy/trunk/trunk.h"
#include "support/test_support.h"

namespace canopy::trunk {
namespace {

TrunkConfig tiny(const std::string& path) {
  TrunkConfig c;
  c.path = path;
  c.device = "cpu";
  return c;
}

TEST(Trunk, LoadsFrozenAndEncodes) {
  testing::TempDir dir;
  const auto path = testing::write_tiny_trunk(dir.file("t.pt"));
  Trunk t = Trunk::load(tiny(path));
  const auto [total, trainable] = t.parameter_counts();
  EXPECT_EQ(total, 128 * 147 + 2 * 128);
  EXPECT_EQ(trainable, 0) << "every trunk parameter must have requires_grad = false";
  EXPECT_EQ(t.sha256(), sha256_file(path));
  const at::Tensor f = t.encode(at::randn({5, 3, 28, 28}));
  EXPECT_EQ(f.sizes(), (std::vector<std::int64_t>{5, 32}));  // [5, 32, 2, 2] average-pooled
  EXPECT_FALSE(f.requires_grad());
}

TEST(Trunk, PoolingChoices) {
  testing::TempDir dir;
  const auto path = testing::write_tiny_trunk(dir.file("t.pt"));
  auto c = tiny(path);
  c.pooling = "flatten";
  EXPECT_EQ(Trunk::load(c).encode(at::randn({2, 3, 16, 16})).sizes(), (std::vector<std::int64_t>{2, 128}));
  c.pooling = "none";
  EXPECT_TRUE(testing::throws_with<DataError>([&] { Trunk::load(c).encode(at::randn({2, 3, 16, 16})); },
                                              {"pooling = none", "[2, 32, 2, 2]"}));
  c.pooling = "max";
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Trunk::load(c); }, {"trunk.pooling", "'max'"}));
}

TEST(Trunk, EncodeInEvalModeLeavesStateBitwiseUnchanged) {
  testing::TempDir dir;
  for (bool optimize : {false, true}) {
    auto c = tiny(testing::write_tiny_trunk(dir.file("t.pt")));
    c.optimize = optimize;
    Trunk t = Trunk::load(c);
    const auto before = t.state_snapshot();
    const at::Tensor probe = at::randn({4, 3, 20, 20});
    const at::Tensor out_before = t.encode(probe);
    for (int i = 0; i < 5; ++i) t.encode(at::randn({16, 3, 20, 20}) * 3 + 1);  // would move BN stats in train mode
    const auto after = t.state_snapshot();
    ASSERT_EQ(before.size(), after.size());
    for (std::size_t i = 0; i < before.size(); ++i) {
      EXPECT_TRUE(testing::bitwise_equal(before[i].second, after[i].second)) << before[i].first;
    }
    EXPECT_TRUE(testing::bitwise_equal(out_before, t.encode(probe)));
  }
}

TEST(Trunk, PinnedHashMismatchIsRefusedBeforeLoading) {
  testing::TempDir dir;
  auto c = tiny(testing::write_tiny_trunk(dir.file("t.pt")));
  c.sha256 = std::string(64, '0');
  EXPECT_TRUE(testing::throws_with<DataError>([&] { Trunk::load(c); }, {"refusing", std::string(64, '0'), sha256_file(c.path)}));
  c.sha256 = sha256_file(c.path);
  EXPECT_NO_THROW(Trunk::load(c));
  c.sha256 = "abc";
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Trunk::load(c); }, {"64 hex digits", "'abc'"}));
}

TEST(Trunk, MissingOrBadFiles) {
  testing::TempDir dir;
  EXPECT_TRUE(testing::throws_with<DataError>([&] { Trunk::load(tiny(dir.file("nope.pt"))); }, {"nope.pt", "does not exist"}));
  std::FILE* f = std::fopen(dir.file("junk.pt").c_str(), "w");
  std::fputs("not a zip archive", f);
  std::fclose(f);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { Trunk::load(tiny(dir.file("junk.pt"))); }, {"junk.pt", "TorchScript"}));
  if (!at::hasCUDA()) {
    auto c = tiny(testing::write_tiny_trunk(dir.file("t.pt")));
    c.device = "cuda:7";
    EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Trunk::load(c); }, {"'cuda:7'", "no CUDA GPU"}));
  }
}

// Runs only where a GPU exists: the trunk runs there and features come back to the CPU.
TEST(Trunk, EncodesOnGpu_CUDA) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA GPU on this machine";
  testing::TempDir dir;
  auto c = tiny(testing::write_tiny_trunk(dir.file("t.pt")));
  c.device = "cuda";
  Trunk gpu = Trunk::load(c);
  EXPECT_TRUE(gpu.device().is_cuda());
  const at::Tensor x = at::randn({8, 3, 28, 28});
  const at::Tensor f = gpu.encode(x);
  EXPECT_TRUE(f.device().is_cpu());
  c.device = "cpu";
  EXPECT_TRUE(at::allclose(f, Trunk::load(c).encode(x), 1e-4, 1e-4));
}

}  // namespace
}  // namespace canopy::trunk
