// Small string helpers shared by config parsing and reporting.
#pragma once

#include <cstddef>
#include <cstdint>
#include <istream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace canopy {

std::string trim(std::string_view s);
// Splits on `sep`, trimming each piece; an empty input gives an empty list.
std::vector<std::string> split(std::string_view s, char sep);
std::string join(const std::vector<std::string>& parts, std::string_view sep);
// For messages naming many names: all of them joined by ", ", or past 12 the first ten and
// ", ... N <what>" ("a, b, ..., j, ... 80 labels").
std::string join_first(const std::vector<std::string>& names, std::string_view what);
// A CSV field as RFC 4180 writes it: quoted, quotes doubled, when it holds a comma, a quote
// or a line break; as it is otherwise.
std::string csv_field(std::string_view v);
// ASCII letters lowercased, other bytes unchanged (file extensions, format keywords).
std::string lower_ascii(std::string s);
bool ends_with(std::string_view s, std::string_view suffix);
// `s` with each byte that is not printable ASCII, a tab, a line break or part of a valid
// UTF-8 character written as \xNN: error messages quote what they read (a manifest, a
// config line), and a corrupt file must not put raw bytes on the terminal.
std::string printable(std::string_view s);
// Removes a UTF-8 byte-order mark (EF BB BF) from the start of `s`, as Windows editors and
// Excel's "CSV UTF-8" write one; true when there was one. For a file's first line or whole text.
bool strip_utf8_bom(std::string& s);
// The next line of a text file users write (CSV manifests, ARFF files, texts one per line):
// false at the end. Counts `line_no` (1-based), takes a Windows line end's '\r' off, and the
// first line's byte-order mark.
bool read_text_line(std::istream& in, std::string& line, std::int64_t& line_no);
// What read_text_line does to a line it has read, for lines read otherwise (a pipe as it
// comes): counts `line_no`, takes a '\r' off its end, and the first line's byte-order mark.
void tidy_text_line(std::string& line, std::int64_t& line_no);
// The offset of the first byte of `s` that does not begin a valid UTF-8 character (RFC 3629),
// or nothing when `s` is valid UTF-8. Names, config values and texts canopy writes into JSON,
// HDF5 or TensorBoard must be; JSON writers refuse other bytes.
std::optional<std::size_t> first_invalid_utf8(std::string_view s);
// Empty when `s` is valid UTF-8; otherwise, for an error message, e.g.
// "'caf\xe9' is not UTF-8 (byte 0xe9 at offset 3)" (a long `s` quoted around the byte).
std::string utf8_problem(std::string_view s);

// Parses a whole string as a number; `what` names the value in the error message.
std::int64_t parse_int(std::string_view s, std::string_view what);
double parse_double(std::string_view s, std::string_view what);
bool parse_bool(std::string_view s, std::string_view what);
std::vector<std::int64_t> parse_int_list(std::string_view s, std::string_view what);
std::vector<double> parse_double_list(std::string_view s, std::string_view what);

// Replaces ${VAR} and ${VAR:-default} with the environment's values. An unset variable
// without a default is a ConfigError naming it.
std::string expand_env(std::string_view s);

// "1 epoch", "3 epochs": n and the word, with an s unless n is 1.
std::string count_of(std::int64_t n, const std::string& word);
// Rows of cells as lines of a text table: each column padded to its widest cell, two spaces
// between columns, no trailing spaces; rows may have fewer cells than others.
std::string aligned_columns(const std::vector<std::vector<std::string>>& rows);

// Formats seconds as "1h 02m" / "1m 05s" / "3.2s" / "0.33s" / "18ms": two digits or more.
std::string format_duration(double seconds);

// Formats bytes in MiB: "293 MiB", "7.5 MiB" (one decimal under 10).
std::string format_mib(double bytes);

// The candidate a mistyped `word` most likely meant, for "did you mean" in errors: the one
// fewest single-character edits away (insert, delete, replace, swap two neighbours; case
// ignored), if that is at most 1 for words of up to 4 characters, 2 for longer ones, and
// fewer than the word's length; "" when none is that close or two are equally close.
std::string closest_match(std::string_view word, const std::vector<std::string>& candidates);
// What changed from `before` to `after`, key by key: "k (old -> new)", "k (new)", "k (removed)".
std::vector<std::string> map_changes(const std::map<std::string, std::string>& before,
                                     const std::map<std::string, std::string>& after);
// " (did you mean 'x'?)" for closest_match's answer, or "".
std::string did_you_mean(std::string_view word, const std::vector<std::string>& candidates);

}  // namespace canopy
