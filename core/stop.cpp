#include "canopy/core/stop.h"

#include <atomic>
#include <csignal>
#include <cstring>

#include <unistd.h>

#include "canopy/core/mpi.h"

namespace canopy {

namespace {
std::atomic<int> g_stop{0};
bool g_together = false;  // only the thread that calls MPI sets it
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler stores into it");

extern "C" void on_stop_signal(int signal) {
  g_stop.store(signal, std::memory_order_relaxed);
  // Only async-signal-safe calls here: one write(2) of a fixed text.
  static const char text[] =
      "\ncanopy: stopping at the next safe point, keeping what is done (the same signal again ends it now)\n";
  const ssize_t ignored = ::write(STDERR_FILENO, text, sizeof text - 1);
  (void)ignored;
}

constexpr int kSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGUSR1};
constexpr int kCount = sizeof kSignals / sizeof kSignals[0];
}  // namespace

struct StopOnSignal::Saved {
  struct sigaction old[kCount];
  bool taken[kCount] = {};
};

StopOnSignal::StopOnSignal() : saved_(std::make_unique<Saved>()) {
  g_stop.store(0, std::memory_order_relaxed);
  g_together = false;
  for (int k = 0; k < kCount; ++k) {
    struct sigaction now {};
    if (::sigaction(kSignals[k], nullptr, &now) != 0 || now.sa_handler == SIG_IGN) continue;
    struct sigaction act {};
    act.sa_handler = on_stop_signal;
    sigemptyset(&act.sa_mask);
    act.sa_flags = SA_RESETHAND | SA_RESTART;  // the second signal meets the default action
    saved_->taken[k] = ::sigaction(kSignals[k], &act, &saved_->old[k]) == 0;
  }
}

StopOnSignal::~StopOnSignal() {
  for (int k = 0; k < kCount; ++k) {
    if (saved_->taken[k]) ::sigaction(kSignals[k], &saved_->old[k], nullptr);
  }
}

int stop_signal() { return g_stop.load(std::memory_order_relaxed); }

void request_stop(int signal) { g_stop.store(signal, std::memory_order_relaxed); }

bool is_stop_status(int status) {
  for (int s : kSignals) {
    if (status == 128 + s) return true;
  }
  return false;
}

int agree_on_stop(int mine) {
  if (!mpi::distributed()) return mine;
  const int agreed = mpi::all_max(mine);
  if (agreed != 0) {
    g_stop.store(agreed, std::memory_order_relaxed);
    g_together = true;
  }
  return agreed;
}

bool stopped_together() { return g_together; }

std::string signal_name(int signal) {
  if (signal == SIGINT) return "SIGINT";
  if (signal == SIGTERM) return "SIGTERM";
  if (signal == SIGHUP) return "SIGHUP";
  const char* abbrev = ::sigabbrev_np(signal);
  return abbrev ? std::string("SIG") + abbrev : "signal " + std::to_string(signal);
}

}  // namespace canopy
