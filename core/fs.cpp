#include "canopy/core/fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "canopy/core/error.h"

namespace canopy {

std::string temp_path_for(const std::string& path) { return path + ".tmp." + std::to_string(::getpid()); }

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
  const std::string parent = parent_path(path);
  return parent.empty() ? std::string(".") : parent;
}
}  // namespace

void fsync_dir(const std::string& dir) { fsync_fd_path(dir, O_RDONLY | O_DIRECTORY); }

void fsync_path(const std::string& path) {
  fsync_fd_path(path, O_RDONLY);
  fsync_dir(parent_dir(path));
}

void rename_durable(const std::string& from, const std::string& to) {
  CANOPY_CHECK(::rename(from.c_str(), to.c_str()) == 0, IoError, "cannot rename '", from, "' to '", to,
               "': ", std::strerror(errno));
  fsync_dir(parent_dir(to));
}

void pread_exact(int fd, void* dst, std::uint64_t n, std::uint64_t offset, const std::string& what) {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    const ssize_t got = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    CANOPY_CHECK(got >= 0, IoError, "reading ", what, " failed: ", describe_errno(errno));
    CANOPY_CHECK(got > 0, DataError, what, " ends early at byte ", offset, " (truncated)");
    p += got;
    n -= static_cast<std::uint64_t>(got);
    offset += static_cast<std::uint64_t>(got);
  }
}

void pwrite_exact(int fd, const void* src, std::uint64_t n, std::uint64_t offset, const std::string& what) {
  const auto* p = static_cast<const char*>(src);
  while (n > 0) {
    const ssize_t put = ::pwrite(fd, p, n, static_cast<off_t>(offset));
    if (put < 0 && errno == EINTR) continue;
    CANOPY_CHECK(put > 0, IoError, "writing ", what, " failed: ", describe_errno(put < 0 ? errno : ENOSPC));
    p += put;
    n -= static_cast<std::uint64_t>(put);
    offset += static_cast<std::uint64_t>(put);
  }
}

std::string describe_errno(int err) {
  if (err == ENOSPC || err == EDQUOT) {
    return detail::str_cat("the disk is full (", err == ENOSPC ? "ENOSPC" : "EDQUOT", ": ",
                           std::strerror(err), ")");
  }
  return std::strerror(err);
}

std::optional<std::uint64_t> free_space(const std::string& path) {
  struct statvfs st {};
  if (::statvfs(path.c_str(), &st) != 0) return std::nullopt;
  return static_cast<std::uint64_t>(st.f_bavail) * st.f_frsize;
}

bool short_of_space(const std::string& path, std::uint64_t bytes) {
  const auto free = free_space(path);
  return free && *free < bytes;
}

std::string describe_write_error(int err) {
  return err ? describe_errno(err) : "a write to it failed (a full disk, or a closed file)";
}

std::string lack_of_space(const std::string& path, std::uint64_t bytes) {
  if (!short_of_space(path, bytes)) return "";
  return detail::str_cat("the disk is full (ENOSPC: fewer than ", bytes, " bytes free under '", path, "')");
}

bool mounted_noexec(const std::string& path) {
  struct statvfs st {};
  return ::statvfs(path.c_str(), &st) == 0 && (st.f_flag & ST_NOEXEC) != 0;
}

namespace {
// Writes all of `contents` to `fd`; 0, or the errno of the write that failed.
int write_all(int fd, std::string_view contents) {
  for (std::size_t done = 0; done < contents.size();) {
    const ssize_t n = ::write(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    done += static_cast<std::size_t>(n);
  }
  return 0;
}
}  // namespace

void write_file_atomic(const std::string& path, std::string_view contents, bool sync_dir) {
  const std::string tmp = temp_path_for(path);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  CANOPY_CHECK(fd >= 0, IoError, "cannot write '", path, "': ", describe_errno(errno));
  // Any failure removes the temporary file: the old `path`, if any, stays as it was.
  auto fail = [&](int err, const char* what) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw IoError(detail::str_cat(what, " '", path, "' failed: ", describe_errno(err), "; '", path,
                                  "' was not replaced"));
  };
  if (const int err = write_all(fd, contents)) fail(err, "writing");
  if (::fsync(fd) != 0) fail(errno, "syncing");
  const int closed = ::close(fd);
  fd = -1;
  if (closed != 0) fail(errno, "closing");
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail(errno, "renaming the new file over");
  if (sync_dir) fsync_dir(parent_dir(path));
}

void write_output_file(const std::string& path, std::string_view contents) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    // A device, FIFO or socket: written in place (renaming a new file over it would replace it).
    const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    CANOPY_CHECK(fd >= 0, IoError, "cannot write '", path, "': ", describe_errno(errno));
    int err = write_all(fd, contents);
    if (::close(fd) != 0 && err == 0) err = errno;
    CANOPY_CHECK(err == 0, IoError, "writing '", path, "' failed: ", describe_errno(err));
    return;
  }
  // An existing file through a symbolic link: the file it names is replaced, the link kept.
  char* real = ::realpath(path.c_str(), nullptr);
  const std::string target = real ? real : path;
  std::free(real);
  write_file_atomic(target, contents);
}

void remove_temporaries(const std::string& dir) {
  if (!is_directory(dir)) return;
  for (const auto& name : list_dir(dir)) {
    if (name.find(".tmp.") != std::string::npos) ::unlink(join_path(dir, name).c_str());
  }
}

void make_dirs(const std::string& path) {
  if (path.empty() || is_directory(path)) return;
  make_dirs(parent_path(path));
  if (::mkdir(path.c_str(), 0777) != 0 && errno != EEXIST) {
    throw IoError(detail::str_cat("cannot create directory '", path, "': ", std::strerror(errno)));
  }
  CANOPY_CHECK(is_directory(path), IoError, "'", path, "' exists and is not a directory");
}

std::string why_not_writable(const std::string& dir) {
  if (!is_directory(dir) || ::access(dir.c_str(), W_OK) == 0) return "";
  return std::strerror(errno);
}

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

bool is_regular_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::uint64_t file_size(const std::string& path) {
  struct stat st {};
  CANOPY_CHECK(::stat(path.c_str(), &st) == 0, DataError, "'", path, "' is missing: ", std::strerror(errno));
  return static_cast<std::uint64_t>(st.st_size);
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string parent_path(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const auto slash = p.rfind('/');
  if (slash == std::string::npos) return "";
  if (slash == 0) return "/";
  return p.substr(0, slash);
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::vector<std::string> list_dir(const std::string& path) {
  DIR* d = ::opendir(path.c_str());
  CANOPY_CHECK(d != nullptr, IoError, "cannot list directory '", path, "': ", std::strerror(errno));
  std::vector<std::string> names;
  while (const dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

void remove_tree(const std::string& path) {
  if (!path_exists(path)) return;
  auto unlink_cb = [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); };
  CANOPY_CHECK(::nftw(path.c_str(), unlink_cb, 16, FTW_DEPTH | FTW_PHYS) == 0, IoError, "cannot remove '",
               path, "': ", std::strerror(errno));
}

bool is_symlink(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode);
}

std::string real_path(const std::string& path) {
  char* real = ::realpath(path.c_str(), nullptr);
  if (!real) return "";
  std::string out(real);
  std::free(real);
  return out;
}

void make_symlink(const std::string& target, const std::string& link) {
  CANOPY_CHECK(::symlink(target.c_str(), link.c_str()) == 0, IoError, "cannot make '", link, "' a link to '",
               target, "': ", std::strerror(errno));
}

void remove_symlink(const std::string& link) {
  CANOPY_CHECK(::unlink(link.c_str()) == 0 || errno == ENOENT, IoError, "cannot remove the link '", link,
               "': ", std::strerror(errno));
}

namespace {
// The whole file, or nullopt when it cannot be opened (errno says why).
std::optional<std::string> try_read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
}  // namespace

std::string read_file(const std::string& path) {
  auto text = try_read_file(path);
  CANOPY_CHECK(text, IoError, "cannot open '", path, "': ", std::strerror(errno));
  return std::move(*text);
}

std::string read_file_or_empty(const std::string& path) { return try_read_file(path).value_or(""); }

}  // namespace canopy
