// Stopping a long job at its next safe point, on SIGINT, SIGTERM, SIGHUP or SIGUSR1.
//
// While a StopOnSignal lives, SIGINT (Ctrl-C), SIGTERM (`kill`, a batch scheduler's
// preemption), SIGHUP (the terminal or ssh session gone) and SIGUSR1 (what `mpirun` and
// `srun` pass on to their ranks without ending them; a scheduler's warning signal) no longer
// end the process at once: the first one asks for a stop, which `canopy cache` honours before
// its next trunk batch and `canopy train` after its current window of steps. The job keeps
// what it has (the shards already written; a checkpoint at that step), and throws Stopped,
// which the CLI reports with exit status 128 + the signal's number, as a shell shows a process
// the signal ended. A second signal of the same kind ends the process at once. A signal the
// process was started to ignore (`nohup`, a background job) stays ignored.
// Process-wide, one at a time; the CLI sets one up for cache, train, run and sweep, on every
// rank under mpirun, where the ranks stop together: at a safe point every rank reaches, each
// asks agree_on_stop(), and a signal sent to any rank stops them all there (a training's
// ranks after each window; a cache's, which do not go in step, each before its next trunk
// batch, told by the rank that was sent it).
#pragma once

#include <memory>
#include <string>

#include "canopy/core/error.h"

namespace canopy {

class StopOnSignal {
 public:
  StopOnSignal();   // takes SIGINT, SIGTERM, SIGHUP and SIGUSR1; clears any stop asked for before
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
// Whether `status` is a process's exit status after a stop these signals ask for (128 + one).
bool is_stop_status(int status);

// The stop every rank of an mpirun job agrees on, at a safe point all of them reach in step:
// the largest signal any rank passed (its stop_signal(), or the signal its part of the work
// stopped at), or 0; every rank's stop_signal() is it from then on, and stopped_together()
// true. Collective under mpirun; `mine` in one process.
int agree_on_stop(int mine);
inline int agree_on_stop() { return agree_on_stop(stop_signal()); }
// Whether the ranks agreed on the stop (agree_on_stop returned a signal): each ends the job with
// 128 + it, after MPI_Finalize, instead of aborting the others.
bool stopped_together();

// A job that stopped because a stop was asked for; what() says what was kept and how to go on.
class Stopped : public Error {
 public:
  Stopped(int signal, const std::string& what) : Error(what), signal_(signal) {}
  int signal() const { return signal_; }

 private:
  int signal_;
};

}  // namespace canopy
