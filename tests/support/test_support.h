// Shared test helpers: temporary directories, error-message checks, tensor comparison,
// and small real fixtures made at test time (a TorchScript trunk with BatchNorm).
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>

namespace canopy::testing {

// A fresh directory under $TMPDIR, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// An environment variable set for a scope, then put back as it was (unset if it was unset), so
// that a test run in one process with the others leaves them the environment ctest gives.
class ScopedEnv {
 public:
  ScopedEnv(std::string name, const std::string& value) : name_(std::move(name)) {
    if (const char* was = std::getenv(name_.c_str())) was_ = was;
    ::setenv(name_.c_str(), value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (was_) {
      ::setenv(name_.c_str(), was_->c_str(), 1);
    } else {
      ::unsetenv(name_.c_str());
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> was_;
};

// Runs `fn`, expects an exception of type E whose message contains every fragment.
template <typename E>
::testing::AssertionResult throws_with(const std::function<void()>& fn,
                                       std::initializer_list<std::string> fragments) {
  try {
    fn();
  } catch (const E& e) {
    const std::string what = e.what();
    for (const auto& f : fragments) {
      if (what.find(f) == std::string::npos) {
        return ::testing::AssertionFailure() << "message '" << what << "' lacks '" << f << "'";
      }
    }
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a different exception type: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// Same dtype, shape and bytes.
bool bitwise_equal(const at::Tensor& a, const at::Tensor& b);

// Writes a small TorchScript trunk: input [N, 3, H, W] -> adaptive avg pool to 7x7 ->
// linear to 128 -> BatchNorm1d (running statistics as buffers) -> ReLU -> [N, 32, 2, 2].
// In train mode its BatchNorm would update its statistics: tests use it to show that
// canopy never does. Returns the file's path.
std::string write_tiny_trunk(const std::string& path, std::uint64_t seed = 1);

// Where the Debian package dataset-fashion-mnist puts Fashion-MNIST.
std::string fashion_mnist_dir();

}  // namespace canopy::testing
