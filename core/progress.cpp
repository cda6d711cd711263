#include "canopy/core/progress.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "canopy/core/mpi.h"
#include "canopy/core/strings.h"

namespace canopy {

namespace {
// Where a bar is drawn now (nullptr: none): log_info clears the bar's line before its own, or
// the line would follow the bar's text. The next draw puts the bar back.
std::atomic<std::FILE*> g_bar_out{nullptr};

ProgressStyle resolve(ProgressStyle style, std::FILE* out) {
  if (style != ProgressStyle::kAuto) return style;
  const char* term = std::getenv("TERM");
  const bool tty = ::isatty(::fileno(out)) && !(term && std::strcmp(term, "dumb") == 0);
  return tty ? ProgressStyle::kBar : ProgressStyle::kLines;
}
}  // namespace

Progress::Progress(std::string label, std::int64_t total, std::string unit, ProgressStyle style,
                   std::FILE* out)
    : label_(std::move(label)),
      total_(std::max<std::int64_t>(total, 0)),
      unit_(std::move(unit)),
      // Over MPI ranks, rank 0 alone reports progress.
      style_(mpi::rank() == 0 ? resolve(style, out) : ProgressStyle::kQuiet),
      out_(out),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {
  if (style_ == ProgressStyle::kLines) {
    std::fprintf(out_, "[canopy] %s: 0/%lld %s\n", label_.c_str(), static_cast<long long>(total_),
                 unit_.c_str());
    std::fflush(out_);
  }
  if (style_ == ProgressStyle::kBar) g_bar_out = out_;
}

Progress::~Progress() {
  if (!finished_) finish();
}

double Progress::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::advance(std::int64_t n, const std::string& note) {
  done_ += n;
  if (!note.empty()) note_ = note;
  draw(false);
}

void Progress::message(const std::string& line) {
  if (style_ == ProgressStyle::kQuiet) return;
  if (style_ == ProgressStyle::kBar) std::fprintf(out_, "\r\033[K");
  std::fprintf(out_, "[canopy] %s\n", line.c_str());
  if (style_ == ProgressStyle::kBar && !finished_) {
    last_draw_ = {};
    draw(false);
  }
  std::fflush(out_);
}

void Progress::set_note(const std::string& note) {
  note_ = note;
  if (style_ != ProgressStyle::kBar || finished_) return;
  last_draw_ = {};
  draw(false);
}

void Progress::finish(const std::string& note) {
  if (finished_) return;
  if (!note.empty()) note_ = note;
  finished_ = true;
  draw(true);
  std::FILE* mine = out_;
  g_bar_out.compare_exchange_strong(mine, nullptr);
}

void Progress::draw(bool final) {
  if (style_ == ProgressStyle::kQuiet) return;
  const auto now = std::chrono::steady_clock::now();
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const double rate = elapsed > 0 ? static_cast<double>(done_) / elapsed : 0.0;
  const double frac = total_ > 0 ? std::min(1.0, static_cast<double>(done_) / total_) : 1.0;
  std::string eta;
  if (!final && rate > 0 && total_ > done_) {
    eta = " eta " + format_duration(static_cast<double>(total_ - done_) / rate);
  }
  if (style_ == ProgressStyle::kBar) {
    if (!final && now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    constexpr int kWidth = 28;
    const int filled = static_cast<int>(frac * kWidth);
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(kWidth, '.');
    std::fprintf(out_, "\r\033[K%s [%s] %3d%% %lld/%lld %s %.0f %s/s %s%s%s", label_.c_str(), bar.c_str(),
                 static_cast<int>(frac * 100), static_cast<long long>(done_), static_cast<long long>(total_),
                 unit_.c_str(), rate, unit_.c_str(), format_duration(elapsed).c_str(), eta.c_str(),
                 note_.empty() ? "" : ("  " + note_).c_str());
    if (final) std::fputc('\n', out_);
    std::fflush(out_);
    return;
  }
  // Lines: one per tenth of the work, or every 10 s, and a final one.
  const int decile = static_cast<int>(frac * 10);
  if (!final && decile <= last_decile_ && now - last_draw_ < std::chrono::seconds(10)) return;
  if (final && last_printed_ == done_) return;  // the last line already said it all
  last_printed_ = done_;
  last_decile_ = decile;
  last_draw_ = now;
  std::fprintf(out_, "[canopy] %s: %lld/%lld %s (%d%%) %.0f %s/s elapsed %s%s%s%s\n", label_.c_str(),
               static_cast<long long>(done_), static_cast<long long>(total_), unit_.c_str(),
               static_cast<int>(frac * 100), rate, unit_.c_str(), format_duration(elapsed).c_str(),
               eta.c_str(), note_.empty() ? "" : "  ", note_.c_str());
  std::fflush(out_);
}

void log_info(const std::string& line) {
  if (g_bar_out.load() == stderr) std::fputs("\r\033[K", stderr);
  if (mpi::distributed()) {  // every rank logs; each line says which
    std::fprintf(stderr, "[canopy %d/%d] %s\n", mpi::rank(), mpi::size(), line.c_str());
    std::fflush(stderr);
    return;
  }
  std::fprintf(stderr, "[canopy] %s\n", line.c_str());
  std::fflush(stderr);
}

}  // namespace canopy
