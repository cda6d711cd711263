#include "canopy/core/sha256.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include <openssl/evp.h>

#include "canopy/core/error.h"

namespace canopy {

struct Sha256::Context {
  struct Free {
    void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
  };
  std::unique_ptr<EVP_MD_CTX, Free> ctx{EVP_MD_CTX_new()};
  void init() {
    CANOPY_CHECK(ctx && EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) == 1, Error,
                 "OpenSSL: cannot start a SHA-256 digest");
  }
};

Sha256::Sha256() : ctx_(std::make_unique<Context>()) { ctx_->init(); }

Sha256::~Sha256() = default;

void Sha256::update(const void* data, std::size_t size) {
  CANOPY_CHECK(EVP_DigestUpdate(ctx_->ctx.get(), data, size) == 1, Error, "OpenSSL: SHA-256 update failed");
}

std::string Sha256::hex_digest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  CANOPY_CHECK(EVP_DigestFinal_ex(ctx_->ctx.get(), digest, &length) == 1 && length == 32, Error,
               "OpenSSL: SHA-256 final failed");
  static const char* kHex = "0123456789abcdef";
  std::string out(64, '0');
  for (unsigned i = 0; i < 32; ++i) {
    out[2 * i] = kHex[digest[i] >> 4];
    out[2 * i + 1] = kHex[digest[i] & 0xf];
  }
  ctx_->init();
  return out;
}

std::string sha256_hex(std::string_view text) {
  Sha256 h;
  h.update(text);
  return h.hex_digest();
}

std::string sha256_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  CANOPY_CHECK(fd >= 0, IoError, "cannot open '", path, "' to hash it: ", std::strerror(errno));
  Sha256 h;
  std::vector<char> buf(1 << 20);
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int saved = errno;
      ::close(fd);
      CANOPY_CHECK(n == 0, IoError, "error reading '", path, "' while hashing it: ", std::strerror(saved));
      break;
    }
    h.update(buf.data(), static_cast<std::size_t>(n));
  }
  return h.hex_digest();
}

}  // namespace canopy
