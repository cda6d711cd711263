#include "test_support.h"

#include <cstdlib>
#include <cstring>

#include <ATen/ops/ones.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/utils.h>

#include "canopy/core/fs.h"

namespace canopy::testing {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/canopy-test-XXXXXX";
  char* made = ::mkdtemp(tmpl.data());
  if (!made) throw std::runtime_error("mkdtemp failed for " + tmpl);
  path_ = made;
}

TempDir::~TempDir() {
  try {
    remove_tree(path_);
  } catch (const std::exception&) {
    // best effort: a leftover temp dir must not fail a test
  }
}

bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor x = a.contiguous().cpu(), y = b.contiguous().cpu();
  return std::memcmp(x.data_ptr(), y.data_ptr(), x.numel() * x.element_size()) == 0;
}

std::string write_tiny_trunk(const std::string& path, std::uint64_t seed) {
  torch::manual_seed(seed);
  torch::jit::Module m("TinyTrunk");
  m.register_attribute("training", c10::BoolType::get(), true);
  m.register_parameter("proj", at::randn({128, 3 * 7 * 7}) * 0.2, false);
  m.register_parameter("bn_weight", at::ones({128}), false);
  m.register_parameter("bn_bias", at::zeros({128}), false);
  m.register_buffer("bn_mean", at::zeros({128}));
  m.register_buffer("bn_var", at::ones({128}));
  m.define(R"JIT(
def forward(self, x):
    x = torch.adaptive_avg_pool2d(x, [7, 7])
    x = torch.flatten(x, 1)
    x = torch.matmul(x, self.proj.t())
    x = torch.batch_norm(x, self.bn_weight, self.bn_bias, self.bn_mean, self.bn_var,
                         self.training, 0.1, 1e-5, False)
    x = torch.relu(x)
    return x.reshape([x.size(0), 32, 2, 2])
)JIT");
  m.save(path);
  return path;
}

std::string fashion_mnist_dir() {
  const char* dir = std::getenv("CANOPY_FASHION_MNIST_DIR");
  return dir && *dir ? dir : "/usr/share/datasets/fashion-mnist";
}

}  // namespace canopy::testing
