// The `canopy` command line. main() is three lines: make a registry, register the built-in
// heads, pass run_cli()'s code to exit_process(). A program with its own heads does the same
// after registry.add().
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

#include "canopy/tasks/registry.h"

namespace canopy::runners {

struct JobConfig;

// Exit codes.
constexpr int kExitOk = 0;
constexpr int kExitError = 1;       // data, file or runtime error
constexpr int kExitUsage = 2;       // bad command line or config
constexpr int kExitHeadFailed = 3;  // training finished but at least one head FAILED

int run_cli(int argc, const char* const* argv, const tasks::HeadRegistry& registry);
// The same, with arguments as strings and output streams (for tests).
int run_cli(const std::vector<std::string>& args, const tasks::HeadRegistry& registry, std::ostream& out,
            std::ostream& err);

// Ends the process with `rc` after run_cli has returned: flushes the standard streams, closes
// whatever HDF5 still holds open, and exits without running the libraries' static destructors.
// LibTorch's alone (unregistering thousands of operators, freeing their schemas) took about
// 0.1 s of every command, a third of `canopy version`. Nothing canopy writes waits for them:
// a job closes its files and joins its threads before run_cli returns, and MPI is finalized
// there. Builds under AddressSanitizer or ThreadSanitizer exit normally, so their reports run.
[[noreturn]] void exit_process(int rc);

// What `canopy cache`, `train`, `run` and `predict` do before they run, for a program calling
// run_cache or run_train itself: under a CPU quota below the cores it may run on (a container's
// CPU limit), TBB's parallelism and LibTorch's intra-op threads are cut to the quota, LibTorch's
// not for a compiled (.pt2) trunk (fit_threads_to_cpu_quota in step_runner.h). Returns the line
// the CLI logs, or "" when there is no such quota.
std::string fit_threads_to_cpu_quota(const JobConfig& config);

// The commands run_cli knows ("trunk show" is two words); each answers --help / -h with its
// own usage and options (exit 0). `canopy --version` prints canopy's, LibTorch's and HDF5's.
std::vector<std::string> cli_commands();

}  // namespace canopy::runners
