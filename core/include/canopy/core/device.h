// Device choice: "auto" picks CUDA when a GPU is present, else CPU.
#pragma once

#include <cstdint>
#include <string>

#include <c10/core/Device.h>

namespace canopy {

// Parses "auto", "cpu", "cuda", "cuda:N". "cuda" without a GPU is a ConfigError.
c10::Device choose_device(const std::string& spec);
bool cuda_available();
// The CPU cores this process may use (std::thread::hardware_concurrency, at least 1).
std::int64_t machine_cores();

}  // namespace canopy
