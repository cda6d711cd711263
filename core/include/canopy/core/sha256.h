// SHA-256 (FIPS 180-4), for trunk pins, fingerprints and cache keys. Computed by OpenSSL's
// libcrypto (the EVP interface), which uses the CPU's SHA extensions where there are some.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

namespace canopy {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, std::size_t size);
  void update(std::string_view text) { update(text.data(), text.size()); }
  // Finishes the hash and returns it as 64 lowercase hex digits; the object is reset.
  std::string hex_digest();

 private:
  struct Context;
  std::unique_ptr<Context> ctx_;
};

std::string sha256_hex(std::string_view text);
// Hashes a whole file; throws IoError when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace canopy
