#include "canopy/core/crc32c.h"

#include <array>
#include <cstdio>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace canopy {
namespace {

constexpr std::uint32_t kPoly = 0x82f63b78;  // reflected Castagnoli polynomial

std::array<std::uint32_t, 256> make_table() {
  std::array<std::uint32_t, 256> t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    t[i] = c;
  }
  return t;
}

std::uint32_t crc32c_soft(const std::uint8_t* p, std::size_t n, std::uint32_t crc) {
  static const auto table = make_table();
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

#if defined(__x86_64__)
// The CRC register after `n` zero bytes, as four byte-indexed tables (M. Adler's method for
// combining CRCs): by linearity, the register over A then B is zeros(register over A, |B|)
// XOR the register over B started from 0.
struct ZerosOperator {
  std::array<std::array<std::uint32_t, 256>, 4> table{};

  explicit ZerosOperator(std::size_t n) {  // n: a power of two
    std::array<std::uint32_t, 32> op{}, sq{};
    op[0] = kPoly;  // the operator for one zero bit
    for (int k = 1; k < 32; ++k) op[k] = 1u << (k - 1);
    // Each squaring doubles the zeros: twice gives 4 bits; then once per bit of n gives 1 byte,
    // 2, 4, ..., n bytes.
    for (int k = 0; k < 2; ++k, op = sq) square(sq, op);
    for (; n; n >>= 1, op = sq) square(sq, op);
    for (std::uint32_t b = 0; b < 256; ++b)
      for (int k = 0; k < 4; ++k) table[k][b] = times(op, b << (8 * k));
  }

  std::uint32_t operator()(std::uint32_t crc) const {
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^ table[2][(crc >> 16) & 0xff] ^
           table[3][crc >> 24];
  }

  static std::uint32_t times(const std::array<std::uint32_t, 32>& m, std::uint32_t v) {
    std::uint32_t sum = 0;
    for (int k = 0; v; ++k, v >>= 1)
      if (v & 1) sum ^= m[k];
    return sum;
  }
  static void square(std::array<std::uint32_t, 32>& out, const std::array<std::uint32_t, 32>& m) {
    for (int k = 0; k < 32; ++k) out[k] = times(m, m[k]);
  }
};

// The instruction has a latency of 3 cycles and a throughput of 1 per cycle, so one stream of
// 8-byte steps runs at a third of its peak: long buffers go as three interleaved streams over
// three adjacent blocks, combined with the zeros operator for a block's length.
template <std::size_t kBlock>
__attribute__((target("sse4.2"))) std::uint64_t crc32c_three_way(const std::uint8_t*& p, std::size_t& n,
                                                                 std::uint64_t c0) {
  static_assert(kBlock % 8 == 0 && (kBlock & (kBlock - 1)) == 0, "8-byte steps over a power of two");
  static const ZerosOperator shift(kBlock);
  while (n >= 3 * kBlock) {
    std::uint64_t c1 = 0, c2 = 0;
    for (std::size_t i = 0; i < kBlock; i += 8) {
      std::uint64_t a, b, d;
      std::memcpy(&a, p + i, 8);
      std::memcpy(&b, p + kBlock + i, 8);
      std::memcpy(&d, p + 2 * kBlock + i, 8);
      c0 = _mm_crc32_u64(c0, a);
      c1 = _mm_crc32_u64(c1, b);
      c2 = _mm_crc32_u64(c2, d);
    }
    c0 = shift(static_cast<std::uint32_t>(c0)) ^ c1;
    c0 = shift(static_cast<std::uint32_t>(c0)) ^ c2;
    p += 3 * kBlock;
    n -= 3 * kBlock;
  }
  return c0;
}

__attribute__((target("sse4.2"))) std::uint32_t crc32c_hw(const std::uint8_t* p, std::size_t n,
                                                          std::uint32_t crc) {
  std::uint64_t c = ~crc;
  c = crc32c_three_way<8192>(p, n, c);  // 24 KiB rounds: the bulk of a cache's 1 MiB checksum blocks
  c = crc32c_three_way<256>(p, n, c);
  while (n >= 8) {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  std::uint32_t c32 = static_cast<std::uint32_t>(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return ~c32;
}

bool has_sse42() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}
#endif

}  // namespace

std::uint32_t crc32c(const void* data, std::size_t size, std::uint32_t crc) {
  const auto* p = static_cast<const std::uint8_t*>(data);
#if defined(__x86_64__)
  if (has_sse42()) return crc32c_hw(p, size, crc);
#endif
  return crc32c_soft(p, size, crc);
}

std::string crc32c_hex(std::uint32_t crc) {
  char hex[9];
  std::snprintf(hex, sizeof hex, "%08x", crc);
  return hex;
}

}  // namespace canopy
