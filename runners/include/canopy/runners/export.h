// Writing trained heads where users read them: safetensors (Hugging Face's format, read by
// the `safetensors` Python package) plus a JSON card describing the head.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace canopy::runners {

// Writes tensors (float32/float16/bfloat16/int64/int32/uint8/bool, any device) in the
// safetensors format, atomically. `metadata` goes into the header's __metadata__.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Reads a safetensors file (the dtypes above); DataError naming the file when malformed.
std::map<std::string, at::Tensor> load_safetensors(const std::string& path);

}  // namespace canopy::runners
