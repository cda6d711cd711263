// Running a check in a child process, for input that may crash a library instead of making it
// return an error.
//
// HDF5 1.10 aborts or segfaults on some corrupt headers (a flipped bit in a virtual dataset's
// selection overflows a buffer in H5S_select_deserialize) where it usually returns an error.
// `canopy inspect --verify` exists to look at files that may be corrupt, so it reads their
// HDF5 structure in a forked child: a crash there becomes a DataError naming the file.
#pragma once

#include <functional>
#include <string>

namespace canopy {

// Says, from inside the child, what it is reading now; a crash is reported with the last one.
using ChildMark = std::function<void(const std::string& what)>;

// Runs `check` in a forked child and waits for it. Returns when `check` returned; rethrows
// an Error it threw as the same kind (DataError, IoError, ConfigError, Error) with the same
// message; throws DataError("<what> crashed (signal N, SIGNAME) while reading <last mark>:
// ... `advice`") when the child died by a signal or ended without a report (under a
// sanitizer, whose handler reports a crash and exits). The child ends with _exit: no exit handlers,
// no static destructors, nothing flushed twice. `check` must not start threads.
void run_in_child(const std::string& what, const std::function<void(const ChildMark&)>& check,
                  const std::string& advice);

}  // namespace canopy
