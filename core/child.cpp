#include "canopy/core/child.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>

#include "canopy/core/error.h"

namespace canopy {
namespace {

// The child's report, one record per write: a kind byte, then the text, then a NUL.
//   'M' a mark, 'D' DataError, 'I' IoError, 'C' ConfigError, 'E' Error, 'X' another exception.
void send(int fd, char kind, const std::string& text) {
  std::string record(1, kind);
  record += text;
  record += '\0';
  const char* p = record.data();
  std::size_t left = record.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) ::_exit(3);  // the parent is gone
    p += n;
    left -= static_cast<std::size_t>(n);
  }
}

// The record kind of an exception, by its most derived canopy type.
char kind_of(const std::exception& e) {
  if (dynamic_cast<const DataError*>(&e)) return 'D';
  if (dynamic_cast<const IoError*>(&e)) return 'I';
  if (dynamic_cast<const ConfigError*>(&e)) return 'C';
  return dynamic_cast<const Error*>(&e) ? 'E' : 'X';
}

[[noreturn]] void child(int fd, const std::function<void(const ChildMark&)>& check) {
  try {
    check([fd](const std::string& what) { send(fd, 'M', what); });
  } catch (const std::exception& e) {
    send(fd, kind_of(e), e.what());
    ::_exit(1);
  } catch (...) {
    send(fd, 'X', "an exception that is not a std::exception");
    ::_exit(1);
  }
  ::_exit(0);
}

}  // namespace

void run_in_child(const std::string& what, const std::function<void(const ChildMark&)>& check,
                  const std::string& advice) {
  int fds[2];
  CANOPY_CHECK(::pipe2(fds, O_CLOEXEC) == 0, IoError, what, ": cannot make a pipe: ", std::strerror(errno));
  std::fflush(nullptr);  // nothing buffered is written twice
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    throw IoError(detail::str_cat(what, ": cannot fork: ", std::strerror(err)));
  }
  if (pid == 0) {
    ::close(fds[0]);
    child(fds[1], check);
  }
  ::close(fds[1]);
  std::string got;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    CANOPY_CHECK(errno == EINTR, IoError, what,
                 ": waiting for the child process failed: ", std::strerror(errno));
  }
  std::string mark, error;
  char kind = 0;
  for (std::size_t at = 0; at < got.size();) {
    const std::size_t end = got.find('\0', at);
    if (end == std::string::npos) break;  // a record cut short by a crash
    const std::string text = got.substr(at + 1, end - at - 1);
    if (got[at] == 'M') {
      mark = text;
    } else {
      kind = got[at];
      error = text;
    }
    at = end + 1;
  }
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (code == 0 && kind == 0) return;
  // Killed by a signal, or ended without a report (a sanitizer's handler reports a crash and
  // exits with a status of its own).
  if (WIFSIGNALED(status) || kind == 0) {
    std::string how;
    if (WIFSIGNALED(status)) {
      const char* name = ::sigabbrev_np(WTERMSIG(status));
      how = detail::str_cat("signal ", WTERMSIG(status), name ? detail::str_cat(", SIG", name) : "");
    } else {
      how = detail::str_cat("exit status ", code, ", no report");
    }
    throw DataError(detail::str_cat(what, " crashed (", how, ")",
                                    mark.empty() ? "" : " while reading " + mark,
                                    ": the file is corrupt in a way the library does not catch; ", advice));
  }
  switch (kind) {
    case 'D':
      throw DataError(error);
    case 'I':
      throw IoError(error);
    case 'C':
      throw ConfigError(error);
    default:
      throw Error(error);
  }
}

}  // namespace canopy
