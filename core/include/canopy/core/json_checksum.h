// JSON files that carry a CRC-32C of themselves (the cache manifest, a checkpoint's
// state.json, an exported head's card): one field holds the checksum of the document's
// one-space dump without that field. A flipped bit anywhere else is then found when the file
// is read, instead of reading as other data (a renamed split, another epoch, a class name).
// Header-only over nlohmann's json types (json or ordered_json: the dump keeps the type's key
// order, so a document is checked as the type it was written with).
#pragma once

#include <optional>
#include <string>
#include <utility>

#include "canopy/core/crc32c.h"

namespace canopy {

template <class Json>
std::string json_crc32c(const Json& j) {
  const std::string body = j.dump(1);
  return crc32c_hex(crc32c(body.data(), body.size()));
}

// Sets `field` (added last) to the checksum of `j` without it.
template <class Json>
void seal_json(Json& j, const std::string& field) {
  j.erase(field);
  const std::string crc = json_crc32c(j);
  j[field] = crc;
}

// Takes `field` out of `j`; returns {recorded, computed} to compare (a recorded value that is
// not a string comes back as its JSON text, which never matches), or nothing when the document
// has no such field (written before it existed).
template <class Json>
std::optional<std::pair<std::string, std::string>> unseal_json(Json& j, const std::string& field) {
  const auto it = j.find(field);
  if (it == j.end()) return std::nullopt;
  std::string recorded = it->is_string() ? it->template get<std::string>() : it->dump();
  j.erase(it);
  return std::make_pair(std::move(recorded), json_crc32c(j));
}

}  // namespace canopy
