#include "canopy/core/fs.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "canopy/core/error.h"

namespace canopy {
namespace fs = std::filesystem;

std::string temp_path_for(const std::string& path) {
  return path + ".tmp." + std::to_string(::getpid());
}

namespace {
void fsync_fd_path(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags);
  CANOPY_CHECK(fd >= 0, IoError, "cannot open '", path, "' to sync it: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  CANOPY_CHECK(rc == 0, IoError, "fsync of '", path, "' failed: ", std::strerror(err));
}

std::string parent_dir(const std::string& path) {
  const fs::path parent = fs::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}
}  // namespace

void fsync_path(const std::string& path) {
  fsync_fd_path(path, O_RDONLY);
  fsync_fd_path(parent_dir(path), O_RDONLY | O_DIRECTORY);
}

void rename_durable(const std::string& from, const std::string& to) {
  CANOPY_CHECK(::rename(from.c_str(), to.c_str()) == 0, IoError, "cannot rename '", from, "' to '",
               to, "': ", std::strerror(errno));
  fsync_fd_path(parent_dir(to), O_RDONLY | O_DIRECTORY);
}

void write_file_atomic(const std::string& path, std::string_view contents) {
  const std::string tmp = temp_path_for(path);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    CANOPY_CHECK(out, IoError, "cannot write '", tmp, "': ", std::strerror(errno));
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    out.flush();
    CANOPY_CHECK(out, IoError, "error writing '", tmp, "'");
  }
  fsync_fd_path(tmp, O_RDONLY);
  rename_durable(tmp, path);
}

void make_dirs(const std::string& path) {
  std::error_code ec;
  fs::create_directories(path, ec);
  CANOPY_CHECK(!ec, IoError, "cannot create directory '", path, "': ", ec.message());
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  CANOPY_CHECK(in, IoError, "cannot open '", path, "': ", std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace canopy
