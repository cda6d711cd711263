// Stopping a long job at its next safe point, on SIGINT, SIGTERM or SIGHUP.
//
// While a StopOnSignal lives, SIGINT (Ctrl-C), SIGTERM (`kill`, a batch scheduler's
// preemption) and SIGHUP (the terminal or ssh session gone) no longer end the process at
// once: the first one asks for a stop, which `canopy cache` honours before its next trunk
// batch and `canopy train` after its current window of steps. The job keeps what it has (the
// shards already written; a checkpoint at that step), and throws Stopped, which the CLI
// reports with exit status 128 + the signal's number, as a shell shows a process the signal
// ended. A second signal of the same kind ends the process at once. A signal the process was
// started to ignore (`nohup`, a background job) stays ignored.
// Process-wide, one at a time; the CLI sets one up for cache, train and run in one process
// (under mpirun the ranks could not agree on where to stop, and the signals end the job).
#pragma once

#include <memory>
#include <string>

#include "canopy/core/error.h"

namespace canopy {

class StopOnSignal {
 public:
  StopOnSignal();   // takes SIGINT, SIGTERM and SIGHUP; clears any stop asked for before
  ~StopOnSignal();  // gives them back as they were
  StopOnSignal(const StopOnSignal&) = delete;
  StopOnSignal& operator=(const StopOnSignal&) = delete;

 private:
  struct Saved;
  std::unique_ptr<Saved> saved_;
};

// The signal that asked for a stop, or 0. Cheap: jobs ask it at every safe point.
int stop_signal();
// Asks for a stop as the signal would (for a program that decides to stop by other means).
void request_stop(int signal);
// "SIGTERM", "SIGINT", or "signal N".
std::string signal_name(int signal);

// A job that stopped because a stop was asked for; what() says what was kept and how to go on.
class Stopped : public Error {
 public:
  Stopped(int signal, const std::string& what) : Error(what), signal_(signal) {}
  int signal() const { return signal_; }

 private:
  int signal_;
};

}  // namespace canopy
