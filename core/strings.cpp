#include "canopy/core/strings.h"

#include <algorithm>
#include <cctype>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "canopy/core/error.h"

namespace canopy {

std::string trim(std::string_view s) {
  const auto begin = s.find_first_not_of(" \t\r\n");
  if (begin == std::string_view::npos) return {};
  const auto end = s.find_last_not_of(" \t\r\n");
  return std::string(s.substr(begin, end - begin + 1));
}

std::vector<std::string> split(std::string_view s, char sep) {
  std::vector<std::string> out;
  if (trim(s).empty()) return out;
  std::size_t start = 0;
  while (true) {
    const auto pos = s.find(sep, start);
    out.push_back(trim(s.substr(start, pos == std::string_view::npos ? pos : pos - start)));
    if (pos == std::string_view::npos) break;
    start = pos + 1;
  }
  return out;
}

std::string lower_ascii(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

namespace {
// The length of the valid UTF-8 character of 2-4 bytes at s[i], or 0 (RFC 3629: no overlong
// forms, no surrogates, nothing past U+10FFFF).
std::size_t utf8_length(std::string_view s, std::size_t i) {
  const auto b = [&](std::size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0u; };
  const auto cont = [&](std::size_t k, unsigned lo = 0x80, unsigned hi = 0xBF) {
    return b(k) >= lo && b(k) <= hi;
  };
  const unsigned c = b(0);
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c == 0xE0) return cont(1, 0xA0) && cont(2) ? 3 : 0;
  if (c == 0xED) return cont(1, 0x80, 0x9F) && cont(2) ? 3 : 0;
  if (c >= 0xE1 && c <= 0xEF) return cont(1) && cont(2) ? 3 : 0;
  if (c == 0xF0) return cont(1, 0x90) && cont(2) && cont(3) ? 4 : 0;
  if (c >= 0xF1 && c <= 0xF3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
  if (c == 0xF4) return cont(1, 0x80, 0x8F) && cont(2) && cont(3) ? 4 : 0;
  return 0;
}
}  // namespace

std::optional<std::size_t> first_invalid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
    } else if (const std::size_t n = utf8_length(s, i); n > 0) {
      i += n;
    } else {
      return i;
    }
  }
  return std::nullopt;
}

std::string utf8_problem(std::string_view s) {
  const auto at = first_invalid_utf8(s);
  if (!at) return {};
  char byte[8];
  std::snprintf(byte, sizeof byte, "0x%02x", static_cast<unsigned char>(s[*at]));
  // A long text (a document's line) is quoted around the byte only.
  const std::size_t from = *at > 24 ? *at - 24 : 0, to = std::min(s.size(), *at + 24);
  return "'" + std::string(from > 0 ? "..." : "") + printable(s.substr(from, to - from)) +
         (to < s.size() ? "..." : "") + "' is not UTF-8 (byte " + byte + " at offset " + std::to_string(*at) +
         ")";
}

bool strip_utf8_bom(std::string& s) {
  if (s.rfind("\xEF\xBB\xBF", 0) != 0) return false;
  s.erase(0, 3);
  return true;
}

bool read_text_line(std::istream& in, std::string& line, std::int64_t& line_no) {
  if (!std::getline(in, line)) return false;
  tidy_text_line(line, line_no);
  return true;
}

void tidy_text_line(std::string& line, std::int64_t& line_no) {
  if (!line.empty() && line.back() == '\r') line.pop_back();
  if (++line_no == 1) strip_utf8_bom(line);
}

std::string printable(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if ((c >= 0x20 && c < 0x7F) || c == '\t' || c == '\n') {
      out += s[i++];
    } else if (const std::size_t n = c >= 0x80 ? utf8_length(s, i) : 0; n > 0) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
      ++i;
    }
  }
  return out;
}

std::string join(const std::vector<std::string>& parts, std::string_view sep) {
  std::string out;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    if (i) out += sep;
    out += parts[i];
  }
  return out;
}

std::string join_first(const std::vector<std::string>& names, std::string_view what) {
  if (names.size() <= 12) return join(names, ", ");
  return join(std::vector<std::string>(names.begin(), names.begin() + 10), ", ") + ", ... " +
         std::to_string(names.size()) + " " + std::string(what);
}

std::string csv_field(std::string_view v) {
  if (v.find_first_of(",\"\r\n") == std::string_view::npos) return std::string(v);
  std::string out = "\"";
  for (char c : v) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

std::int64_t parse_int(std::string_view s, std::string_view what) {
  const std::string t = trim(s);
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(t.c_str(), &end, 10);
  CANOPY_CHECK(!t.empty() && end == t.c_str() + t.size() && errno == 0, ConfigError, what,
               ": expected an integer, got '", t, "'");
  return v;
}

double parse_double(std::string_view s, std::string_view what) {
  const std::string t = trim(s);
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(t.c_str(), &end);
  CANOPY_CHECK(!t.empty() && end == t.c_str() + t.size() && errno == 0 && std::isfinite(v), ConfigError, what,
               ": expected a finite number, got '", t, "'");
  return v;
}

bool parse_bool(std::string_view s, std::string_view what) {
  const std::string t = trim(s);
  if (t == "true" || t == "1" || t == "yes" || t == "on") return true;
  if (t == "false" || t == "0" || t == "no" || t == "off") return false;
  throw ConfigError(detail::str_cat(what, ": expected true or false, got '", t, "'"));
}

std::vector<std::int64_t> parse_int_list(std::string_view s, std::string_view what) {
  std::vector<std::int64_t> out;
  for (const auto& piece : split(s, ',')) out.push_back(parse_int(piece, what));
  return out;
}

std::vector<double> parse_double_list(std::string_view s, std::string_view what) {
  std::vector<double> out;
  for (const auto& piece : split(s, ',')) out.push_back(parse_double(piece, what));
  return out;
}

std::string expand_env(std::string_view s) {
  std::string out;
  std::size_t i = 0;
  while (i < s.size()) {
    if (s[i] == '$' && i + 1 < s.size() && s[i + 1] == '{') {
      // Find the matching brace: defaults may hold ${...} themselves.
      std::size_t close = i + 2;
      for (int depth = 1; close < s.size(); ++close) {
        if (s[close] == '{') ++depth;
        if (s[close] == '}' && --depth == 0) break;
      }
      CANOPY_CHECK(close < s.size(), ConfigError, "unterminated ${ in '", s, "'");
      const std::string_view body = s.substr(i + 2, close - i - 2);
      const auto dflt = body.find(":-");
      const std::string name(body.substr(0, dflt));
      const char* value = std::getenv(name.c_str());
      if (value && *value) {
        out += value;
      } else {
        CANOPY_CHECK(dflt != std::string_view::npos, ConfigError, "environment variable ", name,
                     " is not set (used in '", s, "'); set it or write ${", name, ":-default}");
        out += expand_env(body.substr(dflt + 2));
      }
      i = close + 1;
    } else {
      out += s[i++];
    }
  }
  return out;
}

std::string format_duration(double seconds) {
  char buf[64];
  if (seconds < 0.0995) {  // a frozen trunk's heads train in tens of milliseconds: not "0.0s"
    std::snprintf(buf, sizeof buf, "%.0fms", seconds * 1000);
  } else if (seconds < 0.995) {
    std::snprintf(buf, sizeof buf, "%.2fs", seconds);
  } else if (seconds < 60) {
    std::snprintf(buf, sizeof buf, "%.1fs", seconds);
  } else if (seconds < 3600) {
    std::snprintf(buf, sizeof buf, "%dm %02ds", int(seconds) / 60, int(seconds) % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%dh %02dm", int(seconds) / 3600, (int(seconds) / 60) % 60);
  }
  return buf;
}

std::string format_mib(double bytes) {
  const double m = bytes / (1024.0 * 1024.0);
  char buf[64];
  std::snprintf(buf, sizeof buf, m < 10 ? "%.1f MiB" : "%.0f MiB", m);
  return buf;
}

namespace {
// Optimal string alignment distance: edits of one character, and swaps of two neighbours.
std::size_t edit_distance(const std::string& a, const std::string& b) {
  const std::size_t n = a.size(), m = b.size();
  std::vector<std::vector<std::size_t>> d(n + 1, std::vector<std::size_t>(m + 1));
  for (std::size_t i = 0; i <= n; ++i) d[i][0] = i;
  for (std::size_t j = 0; j <= m; ++j) d[0][j] = j;
  for (std::size_t i = 1; i <= n; ++i) {
    for (std::size_t j = 1; j <= m; ++j) {
      const std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[n][m];
}
}  // namespace

std::string closest_match(std::string_view word, const std::vector<std::string>& candidates) {
  const std::string w = lower_ascii(std::string(word));
  const std::size_t limit = std::min<std::size_t>(w.size() <= 4 ? 1 : 2, w.empty() ? 0 : w.size() - 1);
  std::string best;
  std::size_t best_distance = limit + 1;
  bool tie = false;
  for (const auto& c : candidates) {
    const std::size_t d = edit_distance(w, lower_ascii(c));
    if (d < best_distance) {
      best = c;
      best_distance = d;
      tie = false;
    } else if (d == best_distance && c != best) {
      tie = true;
    }
  }
  return tie || best_distance > limit ? std::string() : best;
}

std::string count_of(std::int64_t n, const std::string& word) {
  return std::to_string(n) + " " + word + (n == 1 ? "" : "s");
}

std::string aligned_columns(const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width;
  for (const auto& row : rows) {
    width.resize(std::max(width.size(), row.size()));
    for (std::size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (std::size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) line += std::string(width[c] - row[c].size() + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  }
  return out;
}

std::vector<std::string> map_changes(const std::map<std::string, std::string>& before,
                                     const std::map<std::string, std::string>& after) {
  std::vector<std::string> out;
  for (const auto& [k, v] : after) {
    const auto it = before.find(k);
    if (it == before.end()) {
      out.push_back(k + " (new)");
    } else if (it->second != v) {
      out.push_back(k + " (" + it->second + " -> " + v + ")");
    }
  }
  for (const auto& [k, v] : before) {
    if (!after.count(k)) out.push_back(k + " (removed)");
  }
  return out;
}

std::string did_you_mean(std::string_view word, const std::vector<std::string>& candidates) {
  const std::string m = closest_match(word, candidates);
  return m.empty() ? std::string() : " (did you mean '" + m + "'?)";
}

}  // namespace canopy
