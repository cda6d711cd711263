// The frozen trunk: a pretrained encoder loaded from TorchScript, run in inference mode.
//
// Loading verifies the file's SHA-256 against the pinned value (when one is given) before
// the file is opened by TorchScript: a trunk file is executable code. Every parameter is
// set requires_grad=false and the module is put in eval mode, so BatchNorm uses its stored
// statistics and nothing in the trunk can change while canopy runs it.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace canopy::trunk {

// How the trunk's output becomes one feature vector per sample.
//   avg      mean over every dimension after the first two ([N, C, ...] -> [N, C])
//   flatten  [N, ...] -> [N, prod(...)]
//   none     the output must already be [N, D]
struct TrunkConfig {
  std::string path;
  std::string sha256;     // pinned hash of the file; empty: not pinned (the hash is logged)
  std::string device = "auto";
  std::string pooling = "avg";
  bool optimize = true;   // torch::jit::freeze + optimize_for_inference for the forward pass
};

void validate_trunk_config(const TrunkConfig& config);

// The SHA-256 of the trunk file, refusing (DataError) a file that does not match the pinned
// trunk.sha256. Reads the file without loading it.
std::string verified_trunk_sha256(const TrunkConfig& config);

class Trunk {
 public:
  static Trunk load(const TrunkConfig& config);
  Trunk(Trunk&&) noexcept;
  Trunk& operator=(Trunk&&) noexcept;
  ~Trunk();

  // Runs the trunk on a batch (any device, float) and returns pooled features on the CPU,
  // float32, contiguous, [N, D]. Thread-compatible, not thread-safe.
  at::Tensor encode(const at::Tensor& batch);

  const std::string& sha256() const;
  const TrunkConfig& config() const;
  c10::Device device() const;
  // Copies of every parameter and buffer of the loaded module, by qualified name.
  std::vector<std::pair<std::string, at::Tensor>> state_snapshot() const;
  // Number of parameters, and how many of them require grad (0 for a frozen trunk).
  std::pair<std::int64_t, std::int64_t> parameter_counts() const;

 private:
  struct Impl;
  explicit Trunk(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace canopy::trunk
