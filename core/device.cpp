#include "canopy/core/device.h"

#include <algorithm>
#include <thread>

#include <torch/cuda.h>

#include "canopy/core/error.h"

namespace canopy {

bool cuda_available() { return torch::cuda::is_available(); }

std::int64_t machine_cores() {
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(std::thread::hardware_concurrency()));
}

c10::Device choose_device(const std::string& spec) {
  if (spec == "auto") return cuda_available() ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  if (spec == "cpu") return c10::Device(c10::kCPU);
  if (spec.rfind("cuda", 0) == 0) {
    CANOPY_CHECK(cuda_available(), ConfigError, "device '", spec,
                 "' was asked for but no CUDA GPU is available; use device = auto or cpu");
    c10::Device d(c10::kCPU);
    try {
      d = c10::Device(spec);
    } catch (const std::exception&) {
      throw ConfigError(detail::str_cat("device: expected auto, cpu, cuda or cuda:N, got '", spec, "'"));
    }
    CANOPY_CHECK(d.index() < static_cast<int>(torch::cuda::device_count()), ConfigError, "device '", spec,
                 "': only ", torch::cuda::device_count(), " GPU(s) present");
    return d;
  }
  throw ConfigError(detail::str_cat("device: expected auto, cpu, cuda or cuda:N, got '", spec, "'"));
}

}  // namespace canopy
