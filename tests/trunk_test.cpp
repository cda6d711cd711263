#include <gtest/gtest.h>

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/tensor.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/passes/freeze_module.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/optim/sgd.h>

#include <cstdlib>
#include <functional>
#include <map>
#include <regex>
#include <set>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/sha256.h"
#include "canopy/trunk/autocast.h"
#include "canopy/trunk/conv_fusion.h"
#include "canopy/trunk/grouped_conv.h"
#include "canopy/trunk/trunk.h"
#include "support/test_support.h"

namespace canopy::trunk {
namespace {

TrunkConfig tiny(const std::string& path) {
  TrunkConfig c;
  c.path = path;
  c.device = "cpu";
  c.allow_unpinned = true;
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
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        Trunk::load(c).encode(at::randn({2, 3, 16, 16}));
      },
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
    for (int i = 0; i < 5; ++i)
      t.encode(at::randn({16, 3, 20, 20}) * 3 + 1);  // would move BN stats in train mode
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
  EXPECT_TRUE(testing::throws_with<DataError>([&] { Trunk::load(c); },
                                              {"refusing", std::string(64, '0'), sha256_file(c.path)}));
  c.sha256 = sha256_file(c.path);
  c.allow_unpinned = false;
  EXPECT_NO_THROW(Trunk::load(c));
  // Unpinned: refused unless allowed, naming the hash to pin.
  c.sha256.clear();
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { Trunk::load(c); }, {"not pinned", "sha256 = " + sha256_file(c.path), "allow_unpinned"}));
  c.allow_unpinned = true;
  EXPECT_NO_THROW(Trunk::load(c));
  c.sha256 = "abc";
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Trunk::load(c); }, {"64 hex digits", "'abc'"}));
}

TEST(Trunk, MissingOrBadFiles) {
  testing::TempDir dir;
  EXPECT_TRUE(testing::throws_with<DataError>([&] { Trunk::load(tiny(dir.file("nope.pt"))); },
                                              {"nope.pt", "does not exist"}));
  std::FILE* f = std::fopen(dir.file("junk.pt").c_str(), "w");
  std::fputs("not a zip archive", f);
  std::fclose(f);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { Trunk::load(tiny(dir.file("junk.pt"))); },
                                              {"junk.pt", "TorchScript"}));
  if (!at::hasCUDA()) {
    auto c = tiny(testing::write_tiny_trunk(dir.file("t.pt")));
    c.device = "cuda:7";
    EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Trunk::load(c); }, {"'cuda:7'", "no CUDA GPU"}));
  }
}

// An input the trunk cannot take fails inside the TorchScript interpreter, which throws a
// std::runtime_error (not a c10::Error) with the script's traceback: it is a DataError giving
// the shape and the interpreter's last line, not an "unexpected error".
TEST(Trunk, AnInputTheTrunkCannotTakeIsADataErrorWithItsShapeAndCause) {
  testing::TempDir dir;
  Trunk t = Trunk::load(tiny(testing::write_tiny_trunk(dir.file("t.pt"))));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        t.encode(at::randn({2, 4, 28, 28}));
      },
      {"t.pt' failed on input of shape [2, 4, 28, 28]: RuntimeError: mat1 and mat2 shapes cannot be "
       "multiplied"}));
}

// A trunk that returns a tuple (as a traced Hugging Face model does) is refused, saying what it
// returns and what to do, not with LibTorch's "Expected Tensor but got Tuple".
TEST(Trunk, AnOutputThatIsNotOneTensorIsRefusedSayingWhatItIs) {
  testing::TempDir dir;
  torch::jit::Module m("Pair");
  m.register_attribute("training", c10::BoolType::get(), false);
  m.define("def forward(self, x):\n    return (x * 2.0, x.sum(1))\n");
  m.save(dir.file("pair.pt"));
  Trunk t = Trunk::load(tiny(dir.file("pair.pt")));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        t.encode(at::randn({2, 3, 4, 4}));
      },
      {"pair.pt': the trunk's output is a Tuple ((Tensor, Tensor)), not one "
       "tensor to pool",
       "output[0]"}));
}

// Images smaller than a convolution's window: the error says so and names the key that sizes
// them, whichever convolution (LibTorch's, or canopy's cropped one) finds it.
TEST(Trunk, ImagesTooSmallForItsConvolutionsAreSaidSo) {
  testing::TempDir dir;
  torch::jit::Module m("m");
  m.register_attribute("training", c10::BoolType::get(), false);
  m.register_parameter("w", at::randn({4, 3, 5, 5}), false);
  m.define(R"(def forward(self, x):
    return torch.conv2d(torch.pad(x, [1, 2, 1, 2], 'constant', 0.0), self.w, None, [2, 2], [0, 0], [1, 1], 1)
)");
  m.save(dir.file("small.pt"));
  for (const bool optimize : {true, false}) {
    SCOPED_TRACE(optimize);
    TrunkConfig c = tiny(dir.file("small.pt"));
    c.optimize = optimize;
    Trunk t = Trunk::load(c);
    EXPECT_EQ(t.encode(at::randn({2, 3, 8, 8})).size(1), 4);
    EXPECT_TRUE(testing::throws_with<DataError>(
        [&] {
          t.encode(at::randn({2, 3, 1, 1}));
        },
        {"failed on input of shape [2, 3, 1, 1]", "the images are too small for this trunk's convolutions",
         "preprocess.resize"}));
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

// --- freeze policies, BatchNorm pinning, taps (convnet.pt from make_trunk_fixtures.py) ---

// The scripted CNN: stem (Conv2d, BatchNorm2d, ReLU), blocks.0..2 (conv, bn). Made at test
// time by tests/python/make_trunk_fixtures.py (ctest fixture trunk_fixtures).
std::string convnet_path() {
  const char* dir = std::getenv("CANOPY_TEST_FIXTURES");
  return dir && *dir ? std::string(dir) + "/convnet.pt" : "";
}

// Under CI (CI=true) a missing fixture is a failure, not a skip: the tests that guard
// freezing and BatchNorm pinning must run there.
bool in_ci() {
  const char* ci = std::getenv("CI");
  return ci && (std::string(ci) == "true" || std::string(ci) == "1");
}

#define REQUIRE_CONVNET()                                                                    \
  if (!is_regular_file(convnet_path())) {                                                    \
    if (in_ci())                                                                             \
      FAIL() << "convnet.pt fixture missing under CI=true (ctest's make_trunk_fixtures "     \
                "makes it; it needs CANOPY_PYTHON)";                                         \
    GTEST_SKIP() << "convnet.pt fixture missing (set CANOPY_TEST_FIXTURES; ctest makes it)"; \
  }

TrunkConfig convnet(const std::string& freeze, const std::string& train_only = "") {
  TrunkConfig c = tiny(convnet_path());
  c.freeze.freeze = freeze;
  c.freeze.train_only = train_only;
  return c;
}

TEST(Freeze, EveryPolicyFreezesExactlyWhatItNames) {
  REQUIRE_CONVNET();
  struct Case {
    std::string freeze, train_only;
    std::function<bool(const std::string&)> trainable;  // by parameter name
  };
  auto starts = [](const std::string& s, const char* p) { return s.rfind(p, 0) == 0; };
  const std::vector<Case> cases = {
      {"all", "", [](const std::string&) { return false; }},
      {"none", "", [](const std::string&) { return true; }},
      {"first:2", "", [&](const std::string& n) { return !starts(n, "stem.") && !starts(n, "blocks.0."); }},
      {"match:^blocks\\.[12]\\.conv$", "",
       [&](const std::string& n) { return !std::regex_search(n, std::regex("^blocks\\.[12]\\.conv\\.")); }},
      {"modules:stem blocks.2", "",
       [&](const std::string& n) { return !starts(n, "stem.") && !starts(n, "blocks.2."); }},
      {"all", "modules:blocks.2", [&](const std::string& n) { return starts(n, "blocks.2."); }},
      {"all", "first:1", [&](const std::string& n) { return starts(n, "stem."); }},
      {"all", "match:bn$", [&](const std::string& n) { return n.find(".bn.") != std::string::npos; }},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE("freeze=" + c.freeze + " train_only=" + c.train_only);
    Trunk t = Trunk::load(convnet(c.freeze, c.train_only));
    std::int64_t expected_trainable = 0, total = 0;
    for (const auto& [name, value] : t.state_snapshot()) {
      if (name.rfind("param:", 0) != 0) continue;
      const std::string pname = name.substr(6);
      total += value.numel();
      if (c.trainable(pname)) expected_trainable += value.numel();
    }
    EXPECT_EQ(t.parameter_counts(), std::make_pair(total, expected_trainable));
    std::int64_t listed = 0;
    for (const auto& p : t.trainable_parameters()) listed += p.numel();
    EXPECT_EQ(listed, expected_trainable);
    for (const auto& m : t.modules()) {
      if (m.name.empty() || m.parameters == 0) continue;
      bool all = true, none = true;
      for (const auto& [name, value] : t.state_snapshot()) {
        if (name.rfind("param:" + m.name + ".", 0) != 0) continue;
        (c.trainable(name.substr(6)) ? none : all) = false;
      }
      if (all) {
        EXPECT_EQ(m.trainable, m.parameters) << m.name;
      }
      if (none) {
        EXPECT_EQ(m.trainable, 0) << m.name;
      }
    }
  }
  // The decision is reported.
  const std::string shown = Trunk::load(convnet("first:2")).show(3);
  EXPECT_EQ(shown.find("traced"), std::string::npos) << "convnet.pt is scripted";
  for (const char* want :
       {"freeze      first:2", "blocks.0.bn", "BatchNorm pinned", "2 pinned in frozen regions",
        "stem, blocks.0, blocks.1, blocks.2", "[block, tap]"}) {
    EXPECT_NE(shown.find(want), std::string::npos) << want << " not in\n" << shown;
  }
}

TEST(Freeze, BadPoliciesAreClearErrors) {
  REQUIRE_CONVNET();
  using testing::throws_with;
  EXPECT_TRUE(throws_with<ConfigError>([&] { Trunk::load(convnet("first:9")); },
                                       {"first:9", "has 4 blocks", "blocks.2"}));
  EXPECT_TRUE(throws_with<ConfigError>([&] { Trunk::load(convnet("match:zzz")); }, {"matches no module"}));
  EXPECT_TRUE(
      throws_with<ConfigError>([&] { Trunk::load(convnet("match:(")); }, {"not a regular expression"}));
  EXPECT_TRUE(throws_with<ConfigError>([&] { Trunk::load(convnet("modules:stem nope")); },
                                       {"'nope' is not a module"}));
  EXPECT_TRUE(throws_with<ConfigError>([&] { Trunk::load(convnet("first:1", "modules:stem")); },
                                       {"give one of them"}));
  EXPECT_TRUE(throws_with<ConfigError>([&] { Trunk::load(convnet("some")); },
                                       {"expected all, none, first:N", "'some'"}));
  EXPECT_TRUE(
      throws_with<ConfigError>([&] { Trunk::load(convnet("all", "none")); }, {"train_only", "'none'"}));
}

// Trains the trunk's trainable parameters for a few SGD steps in training mode, with inputs
// whose statistics differ from the stored ones (BatchNorm in train mode would move).
void train_a_little(Trunk& t) {
  t.train(true);
  torch::optim::SGD opt(t.trainable_parameters(), torch::optim::SGDOptions(0.05));
  for (int step = 0; step < 5; ++step) {
    t.train(true);  // repeated, as user code and frameworks do: must not unpin anything
    const at::Tensor x = at::randn({8, 3, 12, 12}) * 3 + 1;
    const at::Tensor loss = t.features({x}).pow(2).mean();
    opt.zero_grad();
    loss.backward();
    opt.step();
  }
  t.train(false);
}

TEST(BatchNorm, FrozenBuffersStayBitwiseUnchangedWhileTheRestTrains) {
  REQUIRE_CONVNET();
  Trunk t = Trunk::load(convnet("first:2"));  // stem and blocks.0 frozen, blocks.1-2 train
  const auto before = t.state_snapshot();
  train_a_little(t);
  const auto after = t.state_snapshot();
  ASSERT_EQ(before.size(), after.size());
  int frozen_checked = 0, moved = 0;
  for (std::size_t i = 0; i < before.size(); ++i) {
    const std::string& name = before[i].first;
    const bool in_frozen =
        name.find(":stem.") != std::string::npos || name.find(":blocks.0.") != std::string::npos;
    const bool same = testing::bitwise_equal(before[i].second, after[i].second);
    if (in_frozen) {
      EXPECT_TRUE(same) << name << " changed inside the frozen region";
      ++frozen_checked;
    } else if (!same) {
      ++moved;
    }
  }
  // stem: conv weight and bias, bn weight and bias, 3 bn buffers; blocks.0: conv weight,
  // bn weight and bias, 3 bn buffers.
  EXPECT_EQ(frozen_checked, 7 + 6);
  // The same training moves the unfrozen blocks' weights, so the check above could fail:
  // blocks.1/2 conv, bn weight and bias. Their BatchNorm statistics stay fixed too (every
  // BatchNorm stays in eval mode, the trainable top's included).
  EXPECT_EQ(moved, 2 * 3);
  for (const auto& [name, value] : after) {
    if (name == "buffer:blocks.1.bn.num_batches_tracked") {
      EXPECT_EQ(value.item<std::int64_t>(), 0);
    }
    if (name == "buffer:blocks.0.bn.num_batches_tracked") {
      EXPECT_EQ(value.item<std::int64_t>(), 0);
    }
  }
}

// A trunk that trains holds its convolution weights channels-last (trunk.optimize), computes
// what the trunk as saved computes, and its top records a graph only where grad mode is on:
// an evaluation under NoGradGuard keeps no activations for a backward that never comes.
TEST(Top, ChannelsLastWeightsSameValuesAndNoGraphWithoutGradMode) {
  REQUIRE_CONVNET();
  Trunk fast = Trunk::load(convnet("first:2"));
  TrunkConfig plain_config = convnet("first:2");
  plain_config.optimize = false;
  Trunk plain = Trunk::load(plain_config);
  int conv_weights = 0;
  for (const auto& p : fast.trainable_parameters()) {
    if (p.dim() != 4) continue;
    ++conv_weights;
    EXPECT_TRUE(p.is_contiguous(at::MemoryFormat::ChannelsLast)) << "weight of shape " << p.sizes();
  }
  EXPECT_GT(conv_weights, 0);
  for (const auto& p : plain.trainable_parameters()) {
    if (p.dim() == 4) {
      EXPECT_TRUE(p.is_contiguous()) << "trunk.optimize = false keeps the saved layout";
    }
  }
  const at::Tensor x = at::randn({4, 3, 12, 12});
  auto parts = fast.encode_prefix({x});
  for (auto& p : parts) p = p.clone();  // inference tensors, as the cache's rows are not
  const at::Tensor with_graph = fast.top_features(parts);
  EXPECT_TRUE(with_graph.requires_grad());
  at::Tensor without;
  {
    c10::NoGradGuard no_grad;
    without = fast.top_features(parts);
  }
  EXPECT_FALSE(without.requires_grad());
  EXPECT_FALSE(without.grad_fn());
  EXPECT_TRUE(at::allclose(without, with_graph.detach(), 1e-5, 1e-6));
  auto plain_parts = plain.encode_prefix({x});
  for (auto& p : plain_parts) p = p.clone();
  EXPECT_TRUE(at::allclose(without, plain.top_features(plain_parts).detach(), 1e-5, 1e-6));
}

// --- grouped convolutions in a top that trains (grouped_conv.h) ---

// The weight gradient oneDNN computes, for reference.
at::Tensor reference_weight_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                 std::vector<std::int64_t> stride, std::vector<std::int64_t> padding,
                                 std::vector<std::int64_t> dilation) {
  return std::get<1>(at::convolution_backward(g, x, w, std::nullopt, stride, padding, dilation, false, {0, 0},
                                              x.size(1), {false, true, false}));
}

// Close as two float32 sums of the same products in different orders are: 1e-5 of the
// largest value.
bool close_to(const at::Tensor& a, const at::Tensor& b) {
  const double scale = b.abs().max().item<double>();
  return a.sizes() == b.sizes() && (a - b).abs().max().item<double>() <= 1e-5 * scale + 1e-12;
}

TEST(DepthwiseWeightGrad, EqualsConvolutionBackwardForKernelsStridesPaddingsAndLayouts) {
  struct Case {
    std::int64_t n, c, h, w, k, stride, pad, dilation;
  };
  // The demo's top-2 (5x5 over a 2x2 input: most taps in the padding; samples in chunks),
  // strides, dilation, channel counts that are not a multiple of 16 (a last stretch of 1-15),
  // one sample, no padding, a wide kernel, kernel widths the blocked loop has no variant for.
  const std::vector<Case> cases = {{16, 1152, 2, 2, 5, 1, 2, 1}, {3, 20, 7, 9, 3, 1, 1, 1},
                                   {2, 33, 8, 8, 5, 2, 2, 1},    {1, 8, 9, 9, 3, 1, 2, 2},
                                   {4, 17, 6, 5, 3, 1, 0, 1},    {2, 24, 11, 11, 7, 3, 3, 1},
                                   {2, 20, 6, 6, 4, 1, 1, 1},    {3, 40, 5, 5, 1, 1, 0, 1}};
  for (const auto& t : cases) {
    for (bool channels_last : {true, false}) {
      SCOPED_TRACE(::testing::Message() << "N " << t.n << " C " << t.c << " " << t.h << "x" << t.w << " k "
                                        << t.k << " stride " << t.stride << " pad " << t.pad << " dilation "
                                        << t.dilation << (channels_last ? " channels-last" : " contiguous"));
      const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
      const at::Tensor x = at::randn({t.n, t.c, t.h, t.w}).contiguous(fmt);
      const at::Tensor w = at::randn({t.c, 1, t.k, t.k}).contiguous(fmt);
      const std::int64_t oh = (t.h + 2 * t.pad - t.dilation * (t.k - 1) - 1) / t.stride + 1;
      const std::int64_t ow = (t.w + 2 * t.pad - t.dilation * (t.k - 1) - 1) / t.stride + 1;
      const at::Tensor g = at::randn({t.n, t.c, oh, ow}).contiguous(fmt);
      ASSERT_TRUE(depthwise_kernel_serves(x, w, t.c));
      const at::Tensor ours =
          depthwise_weight_grad(g, x, w, {t.stride, t.stride}, {t.pad, t.pad}, {t.dilation, t.dilation});
      const at::Tensor want =
          reference_weight_grad(g, x, w, {t.stride, t.stride}, {t.pad, t.pad}, {t.dilation, t.dilation});
      EXPECT_TRUE(close_to(ours, want)) << "largest difference " << (ours - want).abs().max().item<double>()
                                        << " of " << want.abs().max().item<double>();
      EXPECT_TRUE(ours.is_contiguous(w.suggest_memory_format())) << "the gradient in the weight's layout";
    }
  }
  // Not served: grouped but not depthwise, double, a weight for another channel count.
  EXPECT_FALSE(depthwise_kernel_serves(at::randn({2, 8, 4, 4}), at::randn({8, 2, 3, 3}), 4));
  EXPECT_FALSE(
      depthwise_kernel_serves(at::randn({2, 8, 4, 4}, at::kDouble), at::randn({8, 1, 3, 3}, at::kDouble), 8));
  EXPECT_FALSE(depthwise_kernel_serves(at::randn({2, 8, 4, 4}), at::randn({16, 1, 3, 3}), 8));
}

// Threads take channel ranges, each channel summed in one order: the same bits on 1 thread
// as on 2 (a resumed run on another thread count computes what the first did).
TEST(DepthwiseWeightGrad, SameBitsOnOneThreadAsOnTwo) {
  const at::Tensor x = at::randn({8, 72, 5, 5}).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = at::randn({72, 1, 3, 3}).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor g = at::randn({8, 72, 5, 5}).contiguous(at::MemoryFormat::ChannelsLast);
  const int before = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor one = depthwise_weight_grad(g, x, w, {1, 1}, {1, 1}, {1, 1});
  at::set_num_threads(2);
  const at::Tensor two = depthwise_weight_grad(g, x, w, {1, 1}, {1, 1}, {1, 1});
  at::set_num_threads(before);
  EXPECT_TRUE(testing::bitwise_equal(one, two));
}

// The kinds of node in a graph, counted.
std::map<std::string, int> node_kinds(const std::shared_ptr<torch::jit::Graph>& g) {
  std::map<std::string, int> kinds;
  for (const torch::jit::Node* n : g->nodes()) ++kinds[n->kind().toQualString()];
  return kinds;
}

// A frozen graph's convolutions become oneDNN's with their activations and zero pads fused
// (conv_fusion.h): the same outputs for every input size, the pads and activations gone from
// the graph; a symmetric pad as plain padding, an asymmetric one (TensorFlow's "same" at stride
// 2, one larger on the left, one at dilation 2) as a larger padding and a crop, whose output
// the next convolution reads as it is.
TEST(ConvFusion, FoldsPadsAndActivationsWithTheSameOutputsAtEverySize) {
  if (!at::hasMKLDNN()) GTEST_SKIP() << "LibTorch without oneDNN";
  at::manual_seed(0);
  struct Case {
    std::string pad, conv,
        act;  // the first convolution's pad (if any), arguments after (x, w, b), activation
    std::int64_t groups, kernel;
    bool cropped;
  };
  const std::vector<Case> cases = {
      {"[1, 1, 1, 1]", "[1, 1], [0, 0], [1, 1]", "torch.hardtanh(y, 0.0, 6.0)", 8, 3, false},
      {"[0, 1, 0, 1]", "[2, 2], [0, 0], [1, 1]", "torch.hardtanh_(y, 0.0, 6.0)", 8, 3, true},
      {"[1, 2, 1, 2]", "[2, 2], [0, 0], [1, 1]", "torch.silu(y)", 8, 5, true},
      {"[2, 0, 1, 3]", "[2, 1], [0, 0], [1, 1]", "torch.relu_(y)", 1, 3, true},
      {"[1, 2, 2, 1]", "[1, 2], [0, 0], [2, 1]", "torch.gelu(y, approximate='tanh')", 2, 3, true},
      {"", "[1, 1], [1, 1], [1, 1]", "torch.leaky_relu(y, 0.1)", 4, 3, false},  // its own padding
      {"[1, 1, 1, 1]", "[1, 1], [0, 0], [1, 1]", "torch.hardswish(y)", 8, 3, false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.pad + " then (" + c.conv + "), " + c.act);
    torch::jit::Module m("m");
    m.register_parameter("w", at::randn({8, 8 / c.groups, c.kernel, c.kernel}), false);
    m.register_parameter("b", at::randn({8}), false);
    m.register_parameter("w2", at::randn({6, 8, 1, 1}), false);
    m.define(
        "def forward(self, x):\n"
        "    y = " +
        (c.pad.empty() ? "x" : "torch.pad(x, " + c.pad + ", 'constant', 0.0)") +
        "\n"
        "    y = torch.conv2d(y, self.w, self.b, " +
        c.conv + ", " + std::to_string(c.groups) +
        ")\n"
        "    y = " +
        c.act +
        "\n"
        "    return torch.sigmoid(torch.conv2d(y, self.w2, None, [1, 1], [0, 0], [1, 1], 1))\n");
    m.eval();
    torch::jit::Module reference = torch::jit::freeze(m.clone());
    torch::jit::Module fused = torch::jit::freeze(m.clone());
    const auto graph = fused.get_method("forward").graph();
    const FusedConvolutions done = fuse_cpu_convolutions(graph);
    EXPECT_EQ(done.convolutions, 2);
    EXPECT_EQ(done.activations, 2);
    EXPECT_EQ(done.pads, c.pad.empty() ? 0 : 1);
    EXPECT_EQ(done.crops, c.cropped ? 1 : 0);
    auto kinds = node_kinds(graph);
    EXPECT_EQ(kinds.count("aten::pad") + kinds.count("aten::conv2d"), 0u) << *graph;
    EXPECT_EQ(kinds["mkldnn::_convolution_pointwise"], 2) << *graph;
    EXPECT_EQ(kinds["canopy::crop_padded"], c.cropped ? 1 : 0) << *graph;
    EXPECT_EQ(kinds.count("aten::sigmoid"), 0u) << "the second convolution's activation is fused too";
    for (const auto& [h, w] : std::vector<std::pair<int, int>>{{16, 16}, {17, 17}, {9, 14}, {32, 23}}) {
      for (const bool channels_last : {false, true}) {
        at::Tensor x = at::randn({3, 8, h, w});
        if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
        const at::Tensor want = reference.forward({x}).toTensor();
        const at::Tensor got = fused.forward({x}).toTensor();
        EXPECT_TRUE(close_to(got, want)) << h << "x" << w << (channels_last ? " channels-last" : "") << ": "
                                         << got.sizes() << " against " << want.sizes();
      }
    }
    // In bfloat16, as under autocast (trunk.precision = bfloat16): bfloat16 weights and
    // outputs, as far from the float32 pass as autocast's bfloat16 pass is, up to bfloat16's
    // rounding (8 bits, 0.4 % a step: autocast rounds a convolution's output before its
    // activation, the fused op after, and another padding may change oneDNN's kernel).
    torch::jit::Module bf16 = torch::jit::freeze(m.clone());
    EXPECT_EQ(fuse_cpu_convolutions(bf16.get_method("forward").graph(), at::kBFloat16).convolutions, 2);
    const at::Tensor x = at::randn({3, 8, 17, 16}).contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor want32 = reference.forward({x}).toTensor();
    at::Tensor autocast_pass, got;
    {
      Autocast autocast(c10::DeviceType::CPU, at::kBFloat16);
      autocast_pass = reference.forward({x}).toTensor();
      got = bf16.forward({x}).toTensor();
    }
    EXPECT_EQ(got.scalar_type(), at::kBFloat16);
    const double scale = want32.abs().max().item<double>();
    const double off = (got.to(at::kFloat) - want32).abs().max().item<double>();
    const double autocast_off = (autocast_pass.to(at::kFloat) - want32).abs().max().item<double>();
    EXPECT_LE(off, 2 * autocast_off + 8e-3 * scale)
        << "fused bfloat16 " << off << ", autocast " << autocast_off;
    EXPECT_GT(off, 1e-5 * scale) << "the pass really ran in bfloat16";
  }
}

// The passes canopy runs instead of forward (the cached prefix of a fine-tuned trunk, taps)
// are optimised as forward is: their BatchNorms folded into the convolutions, so that each
// convolution runs with its activation as one oneDNN primitive (LibTorch's freeze optimises
// forward alone), with the features of the unoptimised module.
TEST(Freeze, ThePrefixAndTapsPassesAreFoldedAndFusedAsForwardIs) {
  REQUIRE_CONVNET();
  if (!at::hasMKLDNN()) GTEST_SKIP() << "LibTorch without oneDNN";
  struct Case {
    std::string freeze;
    std::vector<std::string> taps;
    std::string said;
  };
  const std::vector<Case> cases = {
      {"first:2", {}, "the cached prefix runs 2 convolutions as single oneDNN primitives (float32): 2 with"},
      {"all",
       {"blocks.0", "blocks.2"},
       "caching runs 4 convolutions as single oneDNN primitives (float32): 4 with"},
  };
  const at::Tensor x = at::randn({3, 3, 12, 12});
  for (const Case& c : cases) {
    SCOPED_TRACE(c.freeze);
    TrunkConfig config = convnet(c.freeze);
    config.taps = c.taps;
    Trunk optimised = Trunk::load(config);
    const std::string shown = optimised.show(1);
    EXPECT_NE(shown.find(c.said), std::string::npos) << shown;
    config.optimize = false;
    Trunk plain = Trunk::load(config);
    const at::Tensor got = c.taps.empty() ? optimised.encode_prefix({x})[0] : optimised.encode(x);
    const at::Tensor want = c.taps.empty() ? plain.encode_prefix({x})[0] : plain.encode(x);
    EXPECT_TRUE(close_to(got, want)) << "largest difference " << (got - want).abs().max().item<double>();
  }
}

// What the rewrite leaves: a pad something else reads too, an activation whose input is read
// again, a transposed convolution; and an input too small for a cropped convolution is an
// error naming the sizes, as the convolution's own would be.
TEST(ConvFusion, LeavesWhatItCannotFuseAndRefusesTooSmallInputs) {
  if (!at::hasMKLDNN()) GTEST_SKIP() << "LibTorch without oneDNN";
  torch::jit::Module m("m");
  m.register_parameter("w", at::randn({4, 4, 3, 3}), false);
  m.register_parameter("t", at::randn({4, 4, 2, 2}), false);
  m.define(R"(def forward(self, x):
    p = torch.pad(x, [1, 1, 1, 1], 'constant', 0.0)
    y = torch.conv2d(p, self.w, None, [1, 1], [0, 0], [1, 1], 1)
    r = torch.relu(y)
    z = torch.conv_transpose2d(r + y, self.t, None, [2, 2], [0, 0], [0, 0], 1, [1, 1])
    return z + p.sum()
)");
  m.eval();
  torch::jit::Module reference = torch::jit::freeze(m.clone());
  torch::jit::Module fused = torch::jit::freeze(m.clone());
  const auto graph = fused.get_method("forward").graph();
  const FusedConvolutions done = fuse_cpu_convolutions(graph);
  EXPECT_EQ(done.convolutions, 1);
  EXPECT_EQ(done.activations + done.pads, 0);
  auto kinds = node_kinds(graph);
  EXPECT_EQ(kinds["aten::pad"], 1) << *graph;
  EXPECT_EQ(kinds["aten::relu"], 1) << *graph;
  EXPECT_EQ(kinds["aten::conv_transpose2d"], 1) << *graph;
  const at::Tensor x = at::randn({2, 4, 10, 7});
  EXPECT_TRUE(close_to(fused.forward({x}).toTensor(), reference.forward({x}).toTensor()));

  torch::jit::Module small("s");
  small.register_parameter("w", at::randn({4, 4, 5, 5}), false);
  small.define(R"(def forward(self, x):
    return torch.conv2d(torch.pad(x, [0, 1, 0, 1], 'constant', 0.0), self.w, None, [2, 2], [0, 0], [1, 1], 1)
)");
  small.eval();
  torch::jit::Module frozen = torch::jit::freeze(small.clone());
  EXPECT_EQ(fuse_cpu_convolutions(frozen.get_method("forward").graph()).crops, 1);
  EXPECT_TRUE(testing::throws_with<std::runtime_error>(
      [&] {
        frozen.forward({at::randn({1, 4, 3, 9})});
      },
      {"padded input size 4", "smaller than the kernel's extent 5"}));
}

std::string fixture(const char* name) {
  const char* dir = std::getenv("CANOPY_TEST_FIXTURES");
  return dir && *dir ? std::string(dir) + "/" + name : "";
}

// The autograd nodes behind `out` whose name contains `what`.
int count_backward_nodes(const at::Tensor& out, const std::string& what) {
  std::set<torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> todo{out.grad_fn().get()};
  int found = 0;
  while (!todo.empty()) {
    torch::autograd::Node* node = todo.back();
    todo.pop_back();
    if (!node || !seen.insert(node).second) continue;
    found += node->name().find(what) != std::string::npos;
    for (const auto& edge : node->next_edges()) todo.push_back(edge.function.get());
  }
  return found;
}

// A trunk whose top trains on the CPU runs its grouped convolutions as canopy::grouped_conv2d
// (scripted trunks call aten::conv2d, traced ones aten::_convolution): the same features and
// the same gradients, for every parameter of the top, as the trunk run as saved.
TEST(Top, GroupedConvolutionsTrainThroughCanopysOperatorWithTheSameGradients) {
  for (const char* name : {"dwnet.pt", "dwnet_traced.pt"}) {
    SCOPED_TRACE(name);
    if (!is_regular_file(fixture(name))) {
      if (in_ci()) FAIL() << name << " fixture missing under CI=true";
      GTEST_SKIP() << name << " fixture missing (set CANOPY_TEST_FIXTURES; ctest makes it)";
    }
    TrunkConfig c = tiny(fixture(name));
    c.freeze.freeze = "first:1";  // the stem cached, the three blocks train
    Trunk fast = Trunk::load(c);
    c.optimize = false;
    Trunk plain = Trunk::load(c);
    const at::Tensor x = at::randn({6, 3, 12, 12});
    std::vector<std::vector<at::Tensor>> grads;
    for (Trunk* t : {&fast, &plain}) {
      t->train(true);
      auto parts = t->encode_prefix({x});
      for (auto& p : parts) p = p.clone();
      const at::Tensor f = t->top_features(parts);
      // Five grouped convolutions, four of them depthwise: all through the operator. Two pad
      // with an nn.ZeroPad2d first: in the traced trunk the symmetric pad becomes the
      // convolution's own padding (a scripted ZeroPad2d calls F.pad's TorchScript body, left).
      EXPECT_EQ(count_backward_nodes(f, "GroupedConv2d"), t == &fast ? 5 : 0);
      const bool folds = t == &fast && std::string(name) == "dwnet_traced.pt";
      EXPECT_EQ(count_backward_nodes(f, "ConstantPadNdBackward"), folds ? 1 : 2);
      f.pow(2).mean().backward();
      std::vector<at::Tensor> g;
      for (const auto& p : t->trainable_parameters()) g.push_back(p.grad().clone());
      grads.push_back(g);
      t->train(false);
    }
    ASSERT_EQ(grads[0].size(), grads[1].size());
    ASSERT_GE(grads[0].size(), 9u);
    for (std::size_t i = 0; i < grads[0].size(); ++i) {
      EXPECT_TRUE(close_to(grads[0][i], grads[1][i]))
          << "parameter " << i << " of shape " << grads[1][i].sizes() << ": largest difference "
          << (grads[0][i] - grads[1][i]).abs().max().item<double>() << " of "
          << grads[1][i].abs().max().item<double>();
    }
  }
}

TEST(BatchNorm, AffineTrainableVariantLearnsWeightAndBiasWithStatisticsFixed) {
  REQUIRE_CONVNET();
  TrunkConfig c = convnet("all");
  c.freeze.batchnorm_affine_trainable = true;
  Trunk t = Trunk::load(c);
  EXPECT_EQ(t.parameter_counts().second, 4 * 16) << "only the 4 BatchNorm layers' weight and bias";
  const auto before = t.state_snapshot();
  train_a_little(t);
  const auto after = t.state_snapshot();
  int weights_moved = 0;
  for (std::size_t i = 0; i < before.size(); ++i) {
    const std::string& name = before[i].first;
    const bool same = testing::bitwise_equal(before[i].second, after[i].second);
    const bool bn_affine =
        std::regex_search(name, std::regex("bn\\.(weight|bias)$|stem\\.1\\.(weight|bias)$"));
    if (bn_affine) {
      weights_moved += !same;
    } else {
      EXPECT_TRUE(same) << name << " changed; only BatchNorm weight and bias may";
    }
  }
  EXPECT_GE(weights_moved, 4);
}

TEST(Taps, OneOrSeveralBlockOutputsFromOnePass) {
  REQUIRE_CONVNET();
  Trunk t = Trunk::load(convnet("all"));
  EXPECT_EQ(t.tap_points(), (std::vector<std::string>{"stem", "blocks.0", "blocks.1", "blocks.2"}));
  EXPECT_EQ(t.blocks(), t.tap_points());
  // Reference: the submodules run one by one in eval mode.
  torch::jit::Module m = torch::jit::load(convnet_path());
  m.eval();
  const at::Tensor x = at::randn({4, 3, 10, 10});
  at::Tensor h = m.attr("stem").toModule().forward({x}).toTensor();
  std::vector<at::Tensor> pooled{h.mean({2, 3})};
  for (const char* b : {"0", "1", "2"}) {
    h = m.attr("blocks").toModule().attr(b).toModule().forward({h}).toTensor();
    pooled.push_back(h.mean({2, 3}));
  }
  for (bool optimize : {false, true}) {
    SCOPED_TRACE(optimize ? "optimized" : "as loaded");
    TrunkConfig c = convnet("all");
    c.optimize = optimize;
    EXPECT_TRUE(at::allclose(Trunk::load(c).encode(x), pooled[3], 1e-5, 1e-5)) << "no taps: the output";
    c.taps = {"blocks.0"};
    EXPECT_TRUE(at::allclose(Trunk::load(c).encode(x), pooled[1], 1e-5, 1e-5));
    c.taps = {"stem", "blocks.1"};
    const at::Tensor two = Trunk::load(c).encode(x);
    EXPECT_EQ(two.sizes(), (std::vector<std::int64_t>{4, 16}));
    EXPECT_TRUE(at::allclose(two, at::cat({pooled[0], pooled[2]}, 1), 1e-5, 1e-5));
    c.pooling = "flatten";
    c.taps = {"blocks.2"};
    EXPECT_TRUE(at::allclose(Trunk::load(c).encode(x), h.flatten(1), 1e-5, 1e-5));
  }
  TrunkConfig bad = convnet("all");
  bad.taps = {"blocks.7"};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Trunk::load(bad); },
                                                {"'blocks.7' is not a tap point", "blocks.2"}));
}

#define REQUIRE_FIXTURE(name)                                                              \
  if (!is_regular_file(fixture(name))) {                                                   \
    if (in_ci()) FAIL() << name << " fixture missing under CI=true";                       \
    GTEST_SKIP() << name << " fixture missing (set CANOPY_TEST_FIXTURES; ctest makes it)"; \
  }

// A model as torchvision writes it (tvnet.pt): forward hands its work to self._forward_impl,
// and the blocks are items of a Sequential, `features`, with a classifier after the pooling.
// Scripted and traced, the same blocks and tap points; trunk.expand makes the Sequential's
// items blocks; taps and a top cut inside it compute what its items compute one by one; the
// classifier after the last tap is kept frozen and out of the top.
TEST(Expand, ATorchvisionStyleModelIsTappedAndCutInsideItsFeatures) {
  for (const char* name : {"tvnet.pt", "tvnet_traced.pt"}) {
    SCOPED_TRACE(name);
    REQUIRE_FIXTURE(name);
    TrunkConfig c = tiny(fixture(name));
    const std::vector<std::string> children{"features", "avgpool", "classifier"};
    EXPECT_EQ(Trunk::load(c).tap_points(), children) << "the calls _forward_impl makes are forward's";
    EXPECT_EQ(Trunk::load(c).blocks(), children);
    c.expand = {"features"};
    const std::vector<std::string> expanded{"features.0", "features.1", "features.2",
                                            "features.3", "avgpool",    "classifier"};
    EXPECT_EQ(Trunk::load(c).blocks(), expanded);
    EXPECT_EQ(Trunk::load(c).tap_points(), expanded);
    // Reference: the items of features run one by one in eval mode.
    torch::jit::Module m = torch::jit::load(fixture(name));
    m.eval();
    const torch::jit::Module features = m.attr("features").toModule();
    const at::Tensor x = at::randn({4, 3, 10, 10});
    std::vector<at::Tensor> outs{x};
    for (const char* b : {"0", "1", "2", "3"})
      outs.push_back(features.attr(b).toModule().forward({outs.back()}).toTensor());
    for (const bool optimize : {false, true}) {
      SCOPED_TRACE(optimize ? "optimized" : "as loaded");
      c.optimize = optimize;
      c.taps = {"features.1", "features.3"};
      const at::Tensor got = Trunk::load(c).encode(x);
      EXPECT_TRUE(at::allclose(got, at::cat({outs[2].mean({2, 3}), outs[4].mean({2, 3})}, 1), 1e-5, 1e-5));
    }
    // features.2 and .3 train over the cached output of features.1; avgpool and the
    // classifier come after the tap.
    c.taps = {"features.3"};
    c.freeze.freeze = "first:2";
    Trunk top = Trunk::load(c);
    EXPECT_EQ(top.split().boundary, "features.1");
    EXPECT_EQ(top.split().top_blocks, (std::vector<std::string>{"features.2", "features.3"}));
    EXPECT_EQ(top.split().unrun, (std::vector<std::string>{"avgpool", "classifier"}));
    std::int64_t in_top = 0;
    for (const char* b : {"2", "3"})
      for (const auto& p : features.attr(b).toModule().parameters()) in_top += p.numel();
    std::int64_t trained = 0;
    for (const auto& p : top.trainable_parameters()) trained += p.numel();
    EXPECT_EQ(trained, in_top) << "features.2 and .3 train, the classifier does not";
    EXPECT_EQ(top.parameter_counts().second, in_top);
    const auto parts = top.encode_prefix({x});
    EXPECT_TRUE(at::allclose(parts[0], outs[2], 1e-5, 1e-5)) << "the cache holds features.1's output";
    EXPECT_TRUE(at::allclose(top.top_features(parts).detach(), outs[4].mean({2, 3}), 1e-5, 1e-5));
    EXPECT_NE(top.show(1).find("avgpool, classifier: never run (after the last tap), kept frozen"),
              std::string::npos)
        << top.show(1);
    // A module inside an expanded one, listed after it: the stem's three layers are blocks.
    c.freeze.freeze = "all";
    c.expand = {"features", "features.0"};
    EXPECT_EQ(Trunk::load(c).blocks(),
              (std::vector<std::string>{"features.0.0", "features.0.1", "features.0.2", "features.1",
                                        "features.2", "features.3", "avgpool", "classifier"}));
  }
}

// A text trunk laid out as Hugging Face's BERT (bertnet_traced.pt): expand = encoder makes the
// items of its ModuleList `layer` blocks; a tap among them and a top cut between them compute
// what the layers compute one by one; the pooler, which forward never calls, is kept frozen.
TEST(Expand, ABertsEncoderLayersAreBlocksAndCuts) {
  REQUIRE_FIXTURE("bertnet_traced.pt");
  TrunkConfig c = tiny(fixture("bertnet_traced.pt"));
  c.pooling = "masked_mean";
  EXPECT_EQ(Trunk::load(c).blocks(), (std::vector<std::string>{"embeddings", "encoder", "pooler"}));
  c.expand = {"encoder"};
  EXPECT_EQ(Trunk::load(c).blocks(),
            (std::vector<std::string>{"embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2",
                                      "encoder.layer.3", "pooler"}));
  torch::jit::Module m = torch::jit::load(fixture("bertnet_traced.pt"));
  m.eval();
  const at::Tensor ids = at::randint(0, 100, {3, 6}, at::kLong);
  const at::Tensor mask =
      at::tensor({1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0}, at::kLong).view({3, 6});
  const at::Tensor bias = (1.0 - mask.unsqueeze(-1).to(at::kFloat)) * -0.5;
  const torch::jit::Module layers = m.attr("encoder").toModule().attr("layer").toModule();
  std::vector<at::Tensor> outs{m.attr("embeddings").toModule().forward({ids}).toTensor() *
                               m.attr("scale").toTensor()};
  for (const char* l : {"0", "1", "2", "3"})
    outs.push_back(layers.attr(l).toModule().forward({outs.back(), bias}).toTensor());
  const at::Tensor weights = mask.unsqueeze(2).to(at::kFloat);
  const auto masked_mean = [&](const at::Tensor& h) { return (h * weights).sum(1) / weights.sum(1); };
  c.taps = {"encoder.layer.2"};
  EXPECT_TRUE(at::allclose(Trunk::load(c).encode({ids, mask}), masked_mean(outs[3]), 1e-5, 1e-5));
  c.taps = {};
  c.freeze.freeze = "first:3";
  Trunk top = Trunk::load(c);
  EXPECT_EQ(top.split().top_blocks, (std::vector<std::string>{"encoder.layer.2", "encoder.layer.3"}));
  EXPECT_EQ(top.split().unrun, (std::vector<std::string>{"pooler"}));
  EXPECT_EQ(top.split().below_cut, (std::vector<std::string>{"scale"})) << "read below the cut only: frozen";
  std::int64_t in_top = 0;
  for (const char* l : {"2", "3"})
    for (const auto& p : layers.attr(l).toModule().parameters()) in_top += p.numel();
  EXPECT_EQ(top.parameter_counts().second, in_top);
  EXPECT_NE(top.show(1).find("pooler: never run (not needed for the output), kept frozen"), std::string::npos)
      << top.show(1);
  auto parts = top.encode_prefix({ids, mask});
  ASSERT_EQ(parts.size(), 2U) << "the cut's output and the attention mask, which the top reads";
  for (auto& p : parts) p = p.clone();  // as read from a cache, not inference tensors
  EXPECT_TRUE(at::allclose(parts[0], outs[2], 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(top.top_features(parts).detach(), masked_mean(outs[4]), 1e-5, 1e-5));

  // The same model returning a tuple, as a traced Hugging Face model does, in a wrapper that
  // returns its first output (docs/trunk.md): expanded through the wrapper, the same blocks.
  REQUIRE_FIXTURE("bertwrap_traced.pt");
  TrunkConfig w = tiny(fixture("bertwrap_traced.pt"));
  w.pooling = "masked_mean";
  w.expand = {"model", "model.encoder"};
  w.freeze.freeze = "first:3";
  Trunk wrapped = Trunk::load(w);
  EXPECT_EQ(wrapped.blocks(),
            (std::vector<std::string>{"model.embeddings", "model.encoder.layer.0", "model.encoder.layer.1",
                                      "model.encoder.layer.2", "model.encoder.layer.3", "model.pooler"}));
  EXPECT_EQ(wrapped.split().top_blocks,
            (std::vector<std::string>{"model.encoder.layer.2", "model.encoder.layer.3"}));
  EXPECT_EQ(wrapped.split().unrun, (std::vector<std::string>{"model.pooler"})) << "its output is dropped";
  EXPECT_EQ(wrapped.split().below_cut, (std::vector<std::string>{"model.scale"}));
}

// A model laid out as torchvision's GoogLeNet (auxnet.pt, scripted; auxnet_traced.pt): an
// auxiliary classifier runs in training mode only, on b1's output. Traced in eval mode it never
// ran and has no forward, yet the trunk is shown; scripted, its branch reads below a cut at b2,
// but the top's output does not need it, so the cut leaves it out with its call. A tap below
// the cut makes the split impossible, naming the block the top reads.
TEST(Top, ABranchTheCutsOutputDoesNotNeedIsLeftOutWithItsCalls) {
  for (const char* name : {"auxnet.pt", "auxnet_traced.pt"}) {
    SCOPED_TRACE(name);
    REQUIRE_FIXTURE(name);
    TrunkConfig c = tiny(fixture(name));
    c.taps = {"b3"};
    const bool traced = std::string(name) == "auxnet_traced.pt";
    EXPECT_EQ(Trunk::load(c).blocks(), (std::vector<std::string>{"stem", "b1", "aux", "b2", "drop", "b3"}));
    // Traced, drop (an Identity) is called with nothing and returns None: no tap point.
    const std::vector<std::string> points = traced
                                                ? std::vector<std::string>{"stem", "b1", "b2", "b3"}
                                                : std::vector<std::string>{"stem", "b1", "b2", "drop", "b3"};
    EXPECT_EQ(Trunk::load(c).tap_points(), points);
    EXPECT_NE(Trunk::load(c).show(1).find("aux "), std::string::npos) << "shown, forward or not";
    torch::jit::Module m = torch::jit::load(fixture(name));
    m.eval();
    const at::Tensor x = at::randn({4, 3, 10, 10});
    std::vector<at::Tensor> outs{x};
    for (const char* b : {"stem", "b1", "b2", "b3"})
      outs.push_back(m.attr(b).toModule().forward({outs.back()}).toTensor());
    c.freeze.freeze = "first:5";
    Trunk top = Trunk::load(c);
    EXPECT_EQ(top.split().boundary, traced ? "b2" : "drop");
    EXPECT_EQ(top.split().top_blocks, (std::vector<std::string>{"b3"}));
    std::int64_t in_top = 0;
    for (const auto& p : m.attr("b3").toModule().parameters()) in_top += p.numel();
    EXPECT_EQ(top.parameter_counts().second, in_top);
    auto parts = top.encode_prefix({x});
    for (auto& p : parts) p = p.clone();  // as read from a cache, not inference tensors
    EXPECT_TRUE(at::allclose(parts[0], outs[3], 1e-5, 1e-5)) << "the cache holds b2's output";
    EXPECT_TRUE(at::allclose(top.top_features(parts).detach(), outs[4].mean({2, 3}), 1e-5, 1e-5));
    c.taps = {"b1", "b3"};
    const std::string problem = Trunk::load(c).split().problem;
    EXPECT_NE(problem.find("the top still reads the output of block b1 "), std::string::npos) << problem;
  }
}

// A model laid out as timm's ViT (masknet.pt): forward(x, attn_mask=None, is_causal=False) runs
// its blocks behind a branch on those arguments. canopy gives one input, so they take their
// defaults, the branch folds, and `blocks` expands into tap points and cuts; its exported form
// (script_module) takes one input too.
TEST(Expand, ArgumentsCanopyDoesNotGiveTakeTheirDefaultsAndTheirBranchesFold) {
  REQUIRE_FIXTURE("masknet.pt");
  TrunkConfig c = tiny(fixture("masknet.pt"));
  c.inputs = 1;
  c.expand = {"blocks"};
  c.taps = {"blocks.1"};
  EXPECT_EQ(Trunk::load(c).tap_points(),
            (std::vector<std::string>{"stem", "blocks.0", "blocks.1", "blocks.2"}));
  torch::jit::Module m = torch::jit::load(fixture("masknet.pt"));
  m.eval();
  const at::Tensor x = at::randn({4, 3, 10, 10});
  std::vector<at::Tensor> outs{m.attr("stem").toModule().forward({x}).toTensor()};
  for (const char* b : {"0", "1", "2"})
    outs.push_back(m.attr("blocks").toModule().attr(b).toModule().forward({outs.back()}).toTensor());
  EXPECT_TRUE(at::allclose(Trunk::load(c).encode(x), outs[2].mean({2, 3}), 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(
      Trunk::load(c).script_module().run_method("canopy_taps", x).toTuple()->elements()[0].toTensor(),
      outs[2], 1e-5, 1e-5))
      << "the exported form's taps take the one input";
  c.taps = {};
  c.freeze.freeze = "first:2";
  Trunk top = Trunk::load(c);
  EXPECT_EQ(top.split().top_blocks, (std::vector<std::string>{"blocks.1", "blocks.2"}));
  auto parts = top.encode_prefix({x});
  for (auto& p : parts) p = p.clone();
  EXPECT_TRUE(at::allclose(top.top_features(parts).detach(), outs[3].mean({2, 3}), 1e-5, 1e-5));
  // A file alone (inputs = 0): the arguments without a default are what it is given.
  TrunkConfig alone = tiny(fixture("masknet.pt"));
  alone.expand = {"blocks"};
  EXPECT_EQ(Trunk::load(alone).blocks(),
            (std::vector<std::string>{"stem", "blocks.0", "blocks.1", "blocks.2"}));
  // Given two inputs (a text job), attn_mask is one of them: the branch stays, and expand says so.
  alone.inputs = 2;
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Trunk::load(alone); },
                                                {"trunk.expand: blocks not called by the trunk's forward"}));
}

// trunk show --size: every tap point's output shape for a batch of two, its width under the
// pooling, and the output's; the trunk itself is left as it was (a copy runs, in eval mode).
TEST(Expand, ShowOutputsGivesEachTapPointsShapeAndWidth) {
  REQUIRE_FIXTURE("tvnet.pt");
  TrunkConfig c = tiny(fixture("tvnet.pt"));
  c.expand = {"features"};
  c.freeze.freeze = "first:2";
  c.taps = {"features.3"};
  Trunk t = Trunk::load(c);
  t.train(true);
  const auto before = t.state_snapshot();
  const std::string shown = t.show_outputs(10, 3);
  EXPECT_NE(shown.find("outputs     at 10x10 (a batch of zero images [2, 3, 10, 10]), pooling avg:\n"
                       "    features.0  [N, 8, 10, 10]        8 per sample\n"),
            std::string::npos)
      << shown;
  for (const char* line : {"    avgpool     [N, 8, 1, 1]          8 per sample\n",
                           "    classifier  [N, 5]                5 per sample\n",
                           "    (output)    [N, 5]                5 per sample\n"})
    EXPECT_NE(shown.find(line), std::string::npos) << line << shown;
  const auto after = t.state_snapshot();
  ASSERT_EQ(before.size(), after.size());
  for (std::size_t i = 0; i < before.size(); ++i)
    EXPECT_TRUE(testing::bitwise_equal(before[i].second, after[i].second)) << before[i].first;
  c.pooling = "avg_channels_last";
  c.freeze.freeze = "all";
  const std::string last = Trunk::load(c).show_outputs(12, 3);
  EXPECT_NE(
      last.find("    features.1  [N, 8, 12, 12]        12 per sample (looks channels-first [N, C, H, W]: avg "
                "gives 8)\n"),
      std::string::npos)
      << last;
}

TEST(Expand, WhatCannotBeExpandedOrTrainedIsAClearError) {
  REQUIRE_FIXTURE("tvnet.pt");
  REQUIRE_CONVNET();
  const auto refused = [](const std::string& path, std::vector<std::string> expand, const std::string& freeze,
                          std::vector<std::string> taps, std::initializer_list<std::string> said) {
    TrunkConfig c = tiny(path);
    c.expand = std::move(expand);
    c.freeze.freeze = freeze;
    c.taps = std::move(taps);
    EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Trunk::load(c); }, said));
  };
  const std::string tv = fixture("tvnet.pt");
  refused(tv, {"body"}, "all", {}, {"trunk.expand: 'body' is not a module of", "trunk show"});
  refused(tv, {"features.0"}, "all", {},
          {"trunk.expand: features.0 not called by the trunk's forward",
           "it calls: features, avgpool, classifier"});
  refused(tv, {"features", "features"}, "all", {}, {"'features' is empty or listed twice"});
  refused(convnet_path(), {"blocks"}, "all", {},
          {"'blocks' is a ModuleList, whose items are blocks already"});
  refused(
      tv, {"features"}, "first:4", {"features.3"},
      {"the freeze policy (first:4) leaves only avgpool, classifier trainable, which the features never run",
       "the last tap is features.3"});
}

// A token model defined in TorchScript: (ids [N, T], mask [N, T]) -> embeddings [N, T, 4].
std::string write_token_trunk(const std::string& path) {
  torch::jit::Module m("TokenTrunk");
  m.register_attribute("training", c10::BoolType::get(), false);
  m.register_parameter("emb", at::randn({50, 4}), false);
  m.define(R"JIT(
def forward(self, ids, mask):
    return torch.embedding(self.emb, ids)
)JIT");
  m.save(path);
  return path;
}

TEST(Pooling, FirstTokenAndMaskedMeanOverTokens) {
  testing::TempDir dir;
  TrunkConfig c = tiny(write_token_trunk(dir.file("tok.pt")));
  const at::Tensor ids = at::randint(0, 50, {3, 5}, at::kLong);
  const at::Tensor mask = at::tensor({1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0}, at::kLong).view({3, 5});
  const at::Tensor emb = torch::jit::load(c.path).attr("emb").toTensor();
  c.pooling = "first_token";
  EXPECT_TRUE(at::allclose(Trunk::load(c).encode({ids, mask}), emb.index_select(0, ids.select(1, 0))));
  c.pooling = "masked_mean";
  const at::Tensor got = Trunk::load(c).encode({ids, mask});
  for (std::int64_t i = 0; i < 3; ++i) {
    const std::int64_t n = mask[i].sum().item<std::int64_t>();
    const at::Tensor want = emb.index_select(0, ids[i].slice(0, 0, n)).mean(0);
    EXPECT_TRUE(at::allclose(got[i], want, 1e-6, 1e-6)) << "row " << i << " (" << n << " real tokens)";
  }
  // Changing only padded positions changes nothing.
  at::Tensor other = ids.clone();
  other.index_put_({0, 4}, (ids.index({0, 4}) + 1) % 50);
  EXPECT_TRUE(testing::bitwise_equal(Trunk::load(c).encode({other, mask})[0], got[0]));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        Trunk::load(c).encode({ids, mask.slice(1, 0, 4)});
      },
      {"masked_mean needs the attention mask"}));
  // avg_channels_last: the mean over every position, padded or not; avg, over the last
  // dimension, which for tokens [N, T, D] is said at the first batch.
  c.pooling = "avg_channels_last";
  EXPECT_TRUE(at::allclose(Trunk::load(c).encode({ids, mask}), emb.index({ids}).mean(1), 1e-6, 1e-6));
  c.pooling = "avg";
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(Trunk::load(c).encode({ids, mask}).sizes(), (std::vector<std::int64_t>{3, 5}));
  const std::string said = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(
      said.find("features = avg of the output [N, 5, 4]: 5 per sample; avg averaged the output over its "
                "last dimension: if it is tokens [N, T, D]"),
      std::string::npos)
      << said;
  c.pooling = "mean_tokens";
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { Trunk::load(c); },
                                                {"first_token or masked_mean", "'mean_tokens'"}));
}

// A trunk whose output is channels-last, [N, H, W, C], as Swin's stages are:
// avg_channels_last averages over H and W, as avg does over a channels-first output; avg on
// it is said to look wrong at the first batch, and avg_channels_last on a channels-first one.
TEST(Pooling, AvgChannelsLastAveragesWhatLiesBetweenTheBatchAndTheChannels) {
  testing::TempDir dir;
  torch::jit::Module m("ChannelsLast");
  m.register_attribute("training", c10::BoolType::get(), false);
  m.register_parameter("w", at::randn({6, 3, 3, 3}), false);
  m.define(R"JIT(
def forward(self, x):
    return torch.conv2d(x, self.w, None, [1, 1], [1, 1]).permute(0, 2, 3, 1)
)JIT");
  m.save(dir.file("nhwc.pt"));
  TrunkConfig c = tiny(dir.file("nhwc.pt"));
  const at::Tensor x = at::randn({2, 3, 8, 8});
  const at::Tensor nchw = at::conv2d(x, m.attr("w").toTensor(), {}, 1, 1);
  const auto encoded = [&](const std::string& pooling, std::string& said) {
    c.pooling = pooling;
    ::testing::internal::CaptureStderr();
    const at::Tensor f = Trunk::load(c).encode(x);
    said = ::testing::internal::GetCapturedStderr();
    return f;
  };
  std::string said;
  EXPECT_TRUE(at::allclose(encoded("avg_channels_last", said), nchw.mean({2, 3}), 1e-5, 1e-5));
  EXPECT_NE(said.find("features = avg_channels_last of the output [N, 8, 8, 6]: 6 per sample\n"),
            std::string::npos)
      << said;
  EXPECT_EQ(encoded("avg", said).sizes(), (std::vector<std::int64_t>{2, 8})) << "H numbers, not C";
  EXPECT_NE(said.find("the output looks channels-last [N, H, W, C], as Swin's stages are"), std::string::npos)
      << said;
  // The same convolution channels-first, averaged as if its channels were last: said too.
  torch::jit::Module first("ChannelsFirst");
  first.register_attribute("training", c10::BoolType::get(), false);
  first.register_parameter("w", m.attr("w").toTensor(), false);
  first.define(R"JIT(
def forward(self, x):
    return torch.conv2d(x, self.w, None, [1, 1], [1, 1])
)JIT");
  first.save(dir.file("nchw.pt"));
  c.path = dir.file("nchw.pt");
  EXPECT_EQ(encoded("avg_channels_last", said).sizes(), (std::vector<std::int64_t>{2, 8}));
  EXPECT_NE(said.find("the output looks channels-first [N, C, H, W]"), std::string::npos) << said;
  EXPECT_TRUE(at::allclose(encoded("avg", said), nchw.mean({2, 3}), 1e-5, 1e-5));
  EXPECT_EQ(said.find("looks"), std::string::npos) << said;
}

}  // namespace
}  // namespace canopy::trunk
