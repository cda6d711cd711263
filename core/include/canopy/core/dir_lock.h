// Advisory locks on a directory canopy writes (a cache, a training run's out_dir): an
// flock(2) on <dir>/canopy.lock. The kernel drops the lock when the holding process ends,
// however it ends, so a SIGKILLed run never leaves a stale lock. The file holds the
// holder's pid, for the message only.
//   kWrite: one writer and no reader (cache, train); kRead: any number of readers, no
//   writer (train reading a cache, inspect). A reader opens the file read-only, so a
//   directory on a read-only mount, or another user's, can be read.
// A lock that is taken is refused at once (no waiting), with a DataError naming the
// directory, what holds it and its pid.
#pragma once

#include <optional>
#include <string>

namespace canopy {

class DirLock {
 public:
  enum class Mode { kRead, kWrite };
  // `what` names the job in messages, e.g. "canopy cache". Creates `dir` for kWrite.
  DirLock(const std::string& dir, Mode mode, const std::string& what);
  ~DirLock();
  DirLock(const DirLock&) = delete;
  DirLock& operator=(const DirLock&) = delete;

  static std::string lock_path(const std::string& dir);
  // Whether a writer holds `dir` now: what its lock file says of it ("canopy train, pid 812";
  // empty when it says nothing), or nullopt when no process holds it. Takes nothing.
  static std::optional<std::string> writer(const std::string& dir);

 private:
  int fd_ = -1;
  Mode mode_;
};

}  // namespace canopy
