// Device choice: "auto" picks CUDA when a GPU is present, else CPU.
#pragma once

#include <string>

#include <c10/core/Device.h>

namespace canopy {

// Parses "auto", "cpu", "cuda", "cuda:N". "cuda" without a GPU is a ConfigError.
c10::Device choose_device(const std::string& spec);
bool cuda_available();

}  // namespace canopy
