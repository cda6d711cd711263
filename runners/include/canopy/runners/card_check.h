// The checksums an exported head carries (docs/reliability.md): its card's CRC-32C of itself
// (`card_crc32c`) and its weights' SHA-256 (`weights_sha256`). Each check returns how it
// fails, as a sentence naming the files, or "" when it passes or when the card, from before
// the checksums, records none. canopy predict refuses a head that fails one; canopy inspect
// --verify lists them.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace canopy::runners {

// Takes card_crc32c off `card` (as parsed from `card_path`) and checks the rest against it.
std::string card_checksum_problem(nlohmann::ordered_json& card, const std::string& card_path);
// The file `weights_path` against the weights_sha256 of `card` (read from `card_path`).
std::string weights_problem(const nlohmann::ordered_json& card, const std::string& card_path,
                            const std::string& weights_path);

}  // namespace canopy::runners
