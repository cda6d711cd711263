// Progress reporting for long work: a redrawn bar on a terminal, plain lines otherwise
// (logs, CI, pipes). Writes to stderr so stdout stays for results.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace canopy {

enum class ProgressStyle { kAuto, kBar, kLines, kQuiet };

class Progress {
 public:
  Progress(std::string label, std::int64_t total, std::string unit,
           ProgressStyle style = ProgressStyle::kAuto, std::FILE* out = stderr);
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;
  ~Progress();

  void advance(std::int64_t n, const std::string& note = {});
  // Prints a line of its own (e.g. an epoch's results) without breaking the bar.
  void message(const std::string& line);
  // Sets the note after the bar ("" clears it) and redraws the bar at once, for work between
  // advances that takes a while (an epoch's evaluation). Plain lines show it with the next.
  void set_note(const std::string& note);
  // Prints the closing line (done, elapsed, rate). Called by the destructor if needed.
  void finish(const std::string& note = {});
  double elapsed_seconds() const;

 private:
  void draw(bool final);
  std::string label_;
  std::int64_t total_;
  std::string unit_;
  ProgressStyle style_;
  std::FILE* out_;
  std::int64_t done_ = 0;
  std::string note_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
  int last_decile_ = 0;
  std::int64_t last_printed_ = -1;  // done_ when the last plain line was printed
};

// Logs a line to stderr with a "[canopy] " prefix.
void log_info(const std::string& line);

}  // namespace canopy
