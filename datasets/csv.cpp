#include "canopy/datasets/csv.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>

#include "canopy/core/error.h"
#include "canopy/core/strings.h"

namespace canopy::datasets {

namespace {

// Adds `line` to the record being read, `fields`, from the state `quoted` (inside a quoted
// field) the previous line left; returns whether the record goes on to the next line (a quoted
// field still open), in which case the line break is part of the field.
bool add_csv_line(const std::string& line, std::vector<std::string>& fields, bool& quoted) {
  if (fields.empty()) fields.emplace_back();
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        fields.back() += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        fields.back() += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      fields.emplace_back();
    } else {
      fields.back() += c;
    }
  }
  if (quoted) fields.back() += '\n';
  return quoted;
}

bool all_parse(const std::vector<std::vector<std::string>>& rows, std::size_t col, bool integer) {
  for (const auto& r : rows) {
    const std::string& v = r[col];
    if (v.empty()) return false;
    char* end = nullptr;
    if (integer) {
      const long long x = std::strtoll(v.c_str(), &end, 10);
      if (*end != '\0' || x < 0) return false;
    } else {
      std::strtod(v.c_str(), &end);
      if (*end != '\0') return false;
    }
  }
  return true;
}

}  // namespace

std::string separator_hint(const std::vector<std::string>& fields, const std::string& line) {
  if (fields.size() > 1) return "";
  if (line.find(';') != std::string::npos) return " (its fields are separated by ';')";
  if (line.find('\t') != std::string::npos) return " (its fields are separated by tabs)";
  return "";
}

Csv read_csv(const std::string& path, const std::string& what, const CsvHeaderCheck& check_header) {
  std::ifstream in(path);
  CANOPY_CHECK(in, DataError, "cannot open ", what, " '", path, "': ", std::strerror(errno));
  Csv csv;
  csv.path = path;
  std::string line, first_line;
  std::int64_t n = 0, start = 0;
  std::vector<std::string> fields;
  bool quoted = false;
  while (read_text_line(in, line, n)) {
    if (fields.empty()) {
      if (trim(line).empty()) continue;
      start = n;
      first_line = line;
    }
    if (add_csv_line(line, fields, quoted)) continue;  // a quoted field goes on
    for (auto& f : fields) f = trim(f);
    const std::string where = detail::str_cat(path, ":", start);
    if (csv.header.empty()) {
      check_header(fields, where, first_line);
      csv.header = std::move(fields);
    } else {
      CANOPY_CHECK(fields.size() == csv.header.size(), DataError, where, ": ", fields.size(),
                   " fields, the header has ", csv.header.size());
      csv.rows.push_back(std::move(fields));
      csv.lines.push_back(start);
    }
    fields.clear();
  }
  CANOPY_CHECK(!quoted, DataError, path, ":", start, ": a quoted field opened in this row is never closed (",
               n - start + 1,
               " line(s) to the end of the file); a quote inside a quoted field is written \"\"");
  CANOPY_CHECK(!csv.header.empty(), DataError, what, " '", path, "' is empty");
  return csv;
}

void check_name(const std::string& name, const std::string& where, const char* what, const char* mend) {
  const std::string bad = utf8_problem(name);
  CANOPY_CHECK(bad.empty(), DataError, where, ": the ", what, " ", bad, "; canopy writes names as UTF-8 (",
               mend, ")");
}

LabelColumns read_label_columns(const Csv& csv, const Csv& names, std::size_t skip) {
  CANOPY_CHECK(names.header == csv.header, DataError, "'", names.path, "' and '", csv.path,
               "' have different headers (", join(names.header, ","), " vs ", join(csv.header, ","), ")");
  LabelColumns out;
  for (std::size_t col = 0; col < csv.header.size(); ++col) {
    if (col == skip) continue;
    const std::string& label = csv.header[col];
    CANOPY_CHECK(!label.empty() && !out.labels.count(label) && !out.float_labels.count(label), DataError,
                 csv.path, ": label column '", label, "' is empty or repeated");
    check_name(label, csv.path + ":1", "label column", kConvertCsv);
    out.label_order.push_back(label);
    if (all_parse(names.rows, col, true) && all_parse(csv.rows, col, true)) {
      auto& v = out.labels[label];
      for (const auto& r : csv.rows) v.push_back(std::strtoll(r[col].c_str(), nullptr, 10));
    } else if (all_parse(names.rows, col, false) && all_parse(csv.rows, col, false)) {
      // strtod reads "nan" and "inf" (and 1e999 as inf): a real label must be a finite number,
      // or its mean and standard deviation, the targets' scale, are not numbers.
      auto& v = out.float_labels[label];
      for (std::size_t i = 0; i < csv.rows.size(); ++i) {
        const std::string& text = csv.rows[i][col];
        v.push_back(std::strtod(text.c_str(), nullptr));
        CANOPY_CHECK(std::isfinite(v.back()), DataError, csv.path, ": row ", i + 1, " has ", label, " '",
                     text,
                     "', not a finite number: a real-valued label column must hold finite numbers (fill or "
                     "drop that row)");
      }
    } else {
      std::set<std::string> found;
      for (std::size_t i = 0; i < names.rows.size(); ++i) {
        if (found.insert(names.rows[i][col]).second) {
          check_name(names.rows[i][col], detail::str_cat(names.path, ": row ", i + 1), "class name",
                     kConvertCsv);
        }
      }
      std::vector<std::string> classes(found.begin(), found.end());
      auto& v = out.labels[label];
      for (std::size_t i = 0; i < csv.rows.size(); ++i) {
        const auto it = std::lower_bound(classes.begin(), classes.end(), csv.rows[i][col]);
        CANOPY_CHECK(it != classes.end() && *it == csv.rows[i][col], DataError, csv.path, ": row ", i + 1,
                     " has ", label, " '", csv.rows[i][col], "', which '", names.path,
                     "' never uses (its classes: ", join(classes, ", "), ")");
        v.push_back(it - classes.begin());
      }
      out.class_names[label] = classes;
    }
  }
  return out;
}

}  // namespace canopy::datasets
