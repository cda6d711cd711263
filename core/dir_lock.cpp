#include "canopy/core/dir_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"

namespace canopy {

std::string DirLock::lock_path(const std::string& dir) { return join_path(dir, "canopy.lock"); }

namespace {
// What the lock file open as `fd` says of its holder, trailing blanks dropped.
std::string holder_of(int fd) {
  char holder[64] = {0};
  const ssize_t n = ::pread(fd, holder, sizeof holder - 1, 0);
  std::string who(holder, n > 0 ? static_cast<std::size_t>(n) : 0);
  while (!who.empty() && (who.back() == '\n' || who.back() == ' ')) who.pop_back();
  return who;
}
}  // namespace

std::optional<std::string> DirLock::writer(const std::string& dir) {
  const int fd = ::open(lock_path(dir).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;  // never locked
  std::optional<std::string> who;
  if (::flock(fd, LOCK_SH | LOCK_NB) == 0) {
    ::flock(fd, LOCK_UN);
  } else if (errno == EWOULDBLOCK) {
    who = holder_of(fd);
  }
  ::close(fd);
  return who;
}

DirLock::DirLock(const std::string& dir, Mode mode, const std::string& what) : mode_(mode) {
  if (mode == Mode::kWrite) make_dirs(dir);
  const std::string path = lock_path(dir);
  // A reader of a directory that nothing ever wrote has nothing to lock. A reader opens the
  // file read-only (flock needs no write access), so a cache on a read-only filesystem, or
  // one another user owns, can be read.
  const int flags = mode == Mode::kWrite ? O_RDWR | O_CREAT | O_CLOEXEC : O_RDONLY | O_CLOEXEC;
  fd_ = ::open(path.c_str(), flags, 0666);
  if (fd_ < 0 && mode == Mode::kRead && errno == ENOENT) return;
  CANOPY_CHECK(fd_ >= 0 || mode == Mode::kRead || (errno != EROFS && errno != EACCES), IoError,
               "cannot write in '", dir, "' (", std::strerror(errno), "): ", what, " writes there");
  CANOPY_CHECK(fd_ >= 0, IoError, "cannot open the lock file '", path, "': ", std::strerror(errno));
  if (::flock(fd_, (mode == Mode::kWrite ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0) {
    const int err = errno;
    const std::string who = holder_of(fd_);
    ::close(fd_);
    fd_ = -1;
    CANOPY_CHECK(err == EWOULDBLOCK, IoError, "cannot lock '", path, "': ", std::strerror(err));
    throw DataError(detail::str_cat(
        "'", dir, "' is in use by another canopy process", who.empty() ? "" : " (" + who + ")", ": ", what,
        mode == Mode::kWrite ? " needs it alone" : " cannot read it while it is being written",
        "; wait for that process to finish, or use another directory (the lock goes when the process ends)"));
  }
  if (mode == Mode::kWrite) {  // record the holder: `what`, pid
    const std::string me = detail::str_cat(what, ", pid ", ::getpid(), "\n");
    if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, me.data(), me.size(), 0) < 0) {
      // nothing to do: the name is for messages only; the lock is what counts
    }
  }
}

DirLock::~DirLock() {
  if (fd_ < 0) return;
  // No holder any more: the file says so (a failure here only leaves an old name in it).
  if (mode_ == Mode::kWrite && ::ftruncate(fd_, 0) != 0) {
    // nothing to do: the name is for messages only
  }
  ::close(fd_);  // releases the flock
}

}  // namespace canopy
