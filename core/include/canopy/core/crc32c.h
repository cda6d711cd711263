// CRC-32C (Castagnoli), the checksum of cache shards: hardware-accelerated with SSE4.2
// where the CPU has it (checked at run time, no host-dependent build flags), else a
// table-driven fallback giving the same values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace canopy {

// Extends `crc` (0 to start) over `size` bytes.
std::uint32_t crc32c(const void* data, std::size_t size, std::uint32_t crc = 0);
// A CRC as canopy's JSON files write it (the cache manifest, a checkpoint's state.json):
// 8 lowercase hex digits.
std::string crc32c_hex(std::uint32_t crc);

}  // namespace canopy
