// `canopy inspect OUT_DIR`: what a training run's out_dir holds, read without loading any
// weights or taking its lock: whether a process is training in it now, how far its checkpoint
// got and what goes on from it, each head's state, epochs and scores, and the heads exported.
#pragma once

#include <string>

namespace canopy::runners {

// Whether `dir` is a training run's out_dir (its config.ini or checkpoint/ is there, and it
// is not a cache).
bool is_run_dir(const std::string& dir);

// The report. With `verify`, the checkpoint's files and state.json are checked against the
// CRC-32Cs it records, and each exported head's card against its own checksum and its weights
// against the card's SHA-256. `ok` (if given) is set to whether every check passed. With
// `json`, the same as one JSON object (status: running, finished, stopped, not_exported,
// no_checkpoint or unreadable; resume_command when there is one to run).
std::string inspect_run(const std::string& dir, bool verify, bool* ok = nullptr, bool json = false);

}  // namespace canopy::runners
