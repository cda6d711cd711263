#include "canopy/runners/export.h"

#include <cstring>
#include <utility>

#include <ATen/ops/empty.h>
#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"

namespace canopy::runners {

namespace {
// The dtypes canopy reads and writes, with the names the safetensors header gives them.
constexpr std::pair<at::ScalarType, const char*> kSafetensorsDtypes[] = {
    {at::kFloat, "F32"}, {at::kHalf, "F16"}, {at::kBFloat16, "BF16"}, {at::kDouble, "F64"},
    {at::kLong, "I64"},  {at::kInt, "I32"},  {at::kByte, "U8"},       {at::kBool, "BOOL"}};

const char* safetensors_dtype(at::ScalarType t) {
  for (const auto& [type, name] : kSafetensorsDtypes) {
    if (type == t) return name;
  }
  return nullptr;
}
at::ScalarType from_safetensors_dtype(const std::string& d, const std::string& path) {
  for (const auto& [type, name] : kSafetensorsDtypes) {
    if (d == name) return type;
  }
  throw DataError(detail::str_cat("safetensors '", path, "': unsupported dtype '", d, "'"));
}
}  // namespace

std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  const std::string bytes = read_file(path);
  CANOPY_CHECK(bytes.size() >= 8, DataError, "safetensors '", path, "' is too short (", bytes.size(),
               " bytes)");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  CANOPY_CHECK(8 + n <= bytes.size(), DataError, "safetensors '", path, "': header of ", n,
               " bytes in a file of ", bytes.size());
  std::map<std::string, at::Tensor> out;
  try {
    const auto header = nlohmann::json::parse(bytes.substr(8, n));
    const std::size_t base = 8 + n;
    for (const auto& [name, info] : header.items()) {
      if (name == "__metadata__") continue;
      std::vector<std::int64_t> shape = info.at("shape").get<std::vector<std::int64_t>>();
      const auto offsets = info.at("data_offsets").get<std::vector<std::uint64_t>>();
      const at::ScalarType dtype = from_safetensors_dtype(info.at("dtype"), path);
      at::Tensor t = at::empty(shape, dtype);
      const std::uint64_t len = offsets.at(1) - offsets.at(0);
      CANOPY_CHECK(offsets.at(1) >= offsets.at(0) && base + offsets.at(1) <= bytes.size() &&
                       len == static_cast<std::uint64_t>(t.numel()) * t.element_size(),
                   DataError, "safetensors '", path, "': tensor '", name, "' has bad offsets");
      std::memcpy(t.data_ptr(), bytes.data() + base + offsets.at(0), len);
      out[name] = t;
    }
  } catch (const nlohmann::json::exception& e) {
    throw DataError(detail::str_cat("safetensors '", path, "': malformed header: ", e.what()));
  }
  return out;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> data;
  std::size_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    const char* dtype = safetensors_dtype(tensor.scalar_type());
    CANOPY_CHECK(dtype != nullptr, DataError, "safetensors: tensor '", name, "' has unsupported dtype ",
                 tensor.scalar_type());
    CANOPY_CHECK(name != "__metadata__" && !header.contains(name), DataError, "safetensors '", path,
                 "': tensor name '", name, "' is reserved or repeated");
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const std::size_t bytes = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(t);
  }
  std::string h = header.dump();
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
