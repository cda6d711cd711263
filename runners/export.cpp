#include "canopy/runners/export.h"

#include <cstring>
#include <sstream>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"

namespace canopy::runners {

namespace {
const char* safetensors_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "F32";
    case at::kHalf: return "F16";
    case at::kBFloat16: return "BF16";
    case at::kDouble: return "F64";
    case at::kLong: return "I64";
    case at::kInt: return "I32";
    case at::kByte: return "U8";
    case at::kBool: return "BOOL";
    default: return nullptr;
  }
}
}  // namespace

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::ostringstream header;
  header << "{";
  bool first = true;
  if (!metadata.empty()) {
    header << "\"__metadata__\":{";
    for (const auto& [k, v] : metadata) {
      header << (first ? "" : ",") << "\"" << json_escape(k) << "\":\"" << json_escape(v) << "\"";
      first = false;
    }
    header << "}";
  }
  std::vector<at::Tensor> data;
  std::size_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    const char* dtype = safetensors_dtype(tensor.scalar_type());
    CANOPY_CHECK(dtype != nullptr, DataError, "safetensors: tensor '", name, "' has unsupported dtype ",
                 tensor.scalar_type());
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const std::size_t bytes = t.numel() * t.element_size();
    header << (metadata.empty() && data.empty() ? "" : ",") << "\"" << json_escape(name)
           << "\":{\"dtype\":\"" << dtype << "\",\"shape\":[";
    for (int64_t d = 0; d < t.dim(); ++d) header << (d ? "," : "") << t.size(d);
    header << "],\"data_offsets\":[" << offset << "," << offset + bytes << "]}";
    offset += bytes;
    data.push_back(t);
  }
  header << "}";
  std::string h = header.str();
  while (h.size() % 8 != 0) h.push_back(' ');  // align the data section to 8 bytes
  std::string out;
  out.reserve(8 + h.size() + offset);
  const std::uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));  // little endian
  out += h;
  for (const auto& t : data) {
    out.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  }
  write_file_atomic(path, out);
}

}  // namespace canopy::runners
