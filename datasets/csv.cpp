#include "canopy/datasets/csv.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iterator>
#include <set>

#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/strings.h"
#include "gz_file.h"

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

Csv read_csv(const std::string& path, const std::string& what, const CsvHeaderCheck& check_header,
             const std::size_t* as_written) {
  GzStream in(path, what);  // FILE.csv.gz, FILE.jsonl.gz: read through zlib
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
    const std::string where = detail::str_cat(path, ":", start);
    if (csv.header.empty()) {
      for (auto& f : fields) f = trim(f);
      check_header(fields, where, first_line);
      if (as_written) csv.as_written = *as_written;
      csv.header = std::move(fields);
    } else {
      for (std::size_t k = 0; k < fields.size(); ++k) {
        if (k != csv.as_written) fields[k] = trim(fields[k]);
      }
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

namespace {

// One record's value as a table field (csv.h: JSON tables).
std::string json_field(const nlohmann::ordered_json& v, const std::string& key, const std::string& where,
                       bool as_written = false) {
  switch (v.type()) {
    case nlohmann::ordered_json::value_t::string:
      return as_written ? v.get<std::string>() : trim(v.get<std::string>());
    case nlohmann::ordered_json::value_t::null:
      return "";
    case nlohmann::ordered_json::value_t::boolean:
      return v.get<bool>() ? "true" : "false";
    case nlohmann::ordered_json::value_t::number_integer:
    case nlohmann::ordered_json::value_t::number_unsigned:
    case nlohmann::ordered_json::value_t::number_float:
      return v.dump();
    default:
      break;
  }
  const std::string shown = v.dump();
  throw DataError(detail::str_cat(
      where, ": '", key, "' holds ", v.is_array() ? "a list" : "an object", " (",
      printable(shown.size() > 60 ? shown.substr(0, 60) + "..." : shown),
      ") where the first record holds one value; a label is one value per key: a text, a number, true/false "
      "or null, or a list of them in every record"));
}

bool is_nested(const nlohmann::ordered_json& v) { return v.is_array() || v.is_object(); }
bool is_list_of_values(const nlohmann::ordered_json& v) {
  return v.is_array() &&
         std::none_of(v.begin(), v.end(), [](const auto& x) { return is_nested(x) || x.is_null(); });
}
bool listed(const std::vector<std::string>& keys, const std::string& key) {
  return std::find(keys.begin(), keys.end(), key) != keys.end();
}

// The first record's columns, for messages: its keys of one value, then its lists.
std::string first_keys(const Csv& csv) {
  return join(csv.header, ", ") + (csv.list_keys.empty() ? "" : ", " + join(csv.list_keys, ", "));
}

// Appends `record` (read at `where`) to `csv` as a row; the first one makes the header of its
// keys of one value, csv.list_keys of those holding a list of values, csv.left_out of the rest.
void add_json_record(const nlohmann::ordered_json& record, std::int64_t line, const std::string& where,
                     const CsvHeaderCheck& check_header, const std::size_t* as_written, Csv& csv) {
  CANOPY_CHECK(record.is_object(), DataError, where,
               ": a record should be a JSON object {\"key\": value, ...}, got ", record.type_name());
  if (csv.header.empty()) {
    std::vector<std::string> keys;
    for (const auto& item : record.items()) {
      const auto& v = item.value();
      (!is_nested(v) ? keys : is_list_of_values(v) ? csv.list_keys : csv.left_out).push_back(item.key());
    }
    std::vector<std::string> nested = csv.list_keys;
    nested.insert(nested.end(), csv.left_out.begin(), csv.left_out.end());
    CANOPY_CHECK(!keys.empty(), DataError, where, ": the first record has no key of one value (",
                 nested.empty() ? "none at all" : join(nested, ", ") + ": lists or objects",
                 "); a table of texts has a text key");
    check_header(keys, where, join(keys, ","));
    if (as_written) csv.as_written = *as_written;
    csv.header = std::move(keys);
  }
  const auto value_of = [&](const std::string& key) {
    const auto it = record.find(key);
    CANOPY_CHECK(it != record.end(), DataError, where, ": the record has no '", key,
                 "' (the first record's keys: ", first_keys(csv), ")");
    return it;
  };
  std::vector<std::string> fields;
  fields.reserve(csv.header.size());
  for (const auto& key : csv.header) {
    fields.push_back(json_field(*value_of(key), key, where, fields.size() == csv.as_written));
  }
  for (const auto& key : csv.list_keys) {
    const auto it = value_of(key);
    CANOPY_CHECK(it->is_null() || is_list_of_values(*it), DataError, where, ": '", key, "' holds ",
                 printable(it->dump().substr(0, 60)),
                 " where the first record holds a list of labels: every record holds a list (or null: none)");
    std::vector<std::string> items;
    if (!it->is_null())
      for (const auto& x : *it) items.push_back(json_field(x, key, where));
    csv.lists[key].push_back(std::move(items));
  }
  if (record.size() != csv.header.size() + csv.list_keys.size() + csv.left_out.size()) {
    for (const auto& item : record.items()) {
      const auto& k = item.key();
      CANOPY_CHECK(listed(csv.header, k) || listed(csv.list_keys, k) || listed(csv.left_out, k), DataError,
                   where, ": the record has '", printable(k),
                   "', which the first record lacks (its keys: ", first_keys(csv),
                   "): every record has the same keys");
    }
  }
  csv.rows.push_back(std::move(fields));
  csv.lines.push_back(line);
}

std::string json_problem(const nlohmann::ordered_json::parse_error& e) {
  // nlohmann's what() is "[json.exception.parse_error.101] parse error at line 1, column 7: ...".
  std::string what = e.what();
  const auto at = what.find("] ");
  if (at != std::string::npos) what = what.substr(at + 2);
  // One line is parsed at a time: its column is what locates the problem.
  const auto line = what.find("at line 1, column");
  if (line != std::string::npos) what.erase(line + 3, 8);
  return printable(what);
}

}  // namespace

Csv read_json_table(const std::string& path, const std::string& what, const CsvHeaderCheck& check_header,
                    const std::size_t* as_written) {
  GzStream in(path, what);  // FILE.csv.gz, FILE.jsonl.gz: read through zlib
  Csv csv;
  csv.path = path;
  std::string line;
  std::int64_t n = 0;
  while (read_text_line(in, line, n)) {
    const std::string t = trim(line);
    if (t.empty()) continue;
    const std::string where = detail::str_cat(path, ":", n);
    if (csv.header.empty() && t[0] == '[') {
      // One array of records (pandas' to_json(orient="records")): read whole, from this line.
      // Through istreambuf_iterator, a damaged gzip stream's error reaches here as it is.
      const std::string rest = line + "\n" + std::string(std::istreambuf_iterator<char>(in), {});
      nlohmann::ordered_json array;
      try {
        array = nlohmann::ordered_json::parse(rest);
      } catch (const nlohmann::ordered_json::parse_error& e) {
        throw DataError(detail::str_cat(where, ": not a JSON array of records (", json_problem(e),
                                        ", counting from this line)"));
      }
      for (std::size_t i = 0; i < array.size(); ++i)
        add_json_record(array[i], n, detail::str_cat(path, ": record ", i + 1), check_header, as_written,
                        csv);
      break;
    }
    nlohmann::ordered_json record;
    try {
      record = nlohmann::ordered_json::parse(line);
    } catch (const nlohmann::ordered_json::parse_error& e) {
      throw DataError(detail::str_cat(
          where, ": not a JSON record (", json_problem(e), "); a JSON table has one object per line",
          t[0] == '{' && t.back() != '}'
              ? " (a record spread over several lines is not read: write one per line)"
              : ""));
    }
    add_json_record(record, n, where, check_header, as_written, csv);
  }
  CANOPY_CHECK(!csv.header.empty(), DataError, what, " '", path, "' is empty");
  return csv;
}

std::optional<TableFormat> table_format(const std::string& path) {
  std::string p = lower_ascii(path);
  if (ends_with(p, ".gz")) p.resize(p.size() - 3);  // compressed as pandas writes FILE.csv.gz
  if (ends_with(p, ".json") || ends_with(p, ".jsonl") || ends_with(p, ".ndjson")) return TableFormat::json;
  if (ends_with(p, ".csv")) return TableFormat::csv;
  return std::nullopt;
}

namespace {

// A field of a list column: its labels (ListColumns).
std::vector<std::string> split_labels(const std::string& field, const std::string& separator) {
  std::vector<std::string> out;
  const bool blanks = separator == "space";
  std::size_t begin = 0;
  while (begin <= field.size()) {
    std::size_t end = blanks ? field.find_first_of(" \t\r\n", begin) : field.find(separator[0], begin);
    if (end == std::string::npos) end = field.size();
    std::string item = trim(std::string_view(field).substr(begin, end - begin));
    if (!item.empty()) out.push_back(std::move(item));
    begin = end + 1;
  }
  return out;
}

// Makes each column `lists` names a list of labels, as a JSON table's (a JSON list stays as it is).
void split_list_columns(Csv& csv, const ListColumns& lists) {
  for (const auto& name : lists.names) {
    if (std::find(csv.list_keys.begin(), csv.list_keys.end(), name) != csv.list_keys.end()) continue;
    const auto it = std::find(csv.header.begin(), csv.header.end(), name);
    CANOPY_CHECK(it != csv.header.end(), DataError, csv.path, ": data.list_columns names '", name,
                 "', which it lacks (its columns: ", join(csv.header, ", "), ")");
    const auto col = it - csv.header.begin();
    auto& items = csv.lists[name];
    for (auto& row : csv.rows) {
      items.push_back(split_labels(row[static_cast<std::size_t>(col)], lists.separator));
      row.erase(row.begin() + col);
    }
    csv.header.erase(it);
    csv.list_keys.push_back(name);
  }
}

}  // namespace

std::size_t column_after_lists(const Csv& csv, const std::string& name, const char* what) {
  const auto it = std::find(csv.header.begin(), csv.header.end(), name);
  CANOPY_CHECK(it != csv.header.end(), DataError, csv.path, ": its ", what, " column '", name,
               "' is named in data.list_columns; list only label columns there");
  return static_cast<std::size_t>(it - csv.header.begin());
}

Csv read_table(const TableFile& file, const std::string& what, const CsvHeaderCheck& check_header,
               const std::size_t* as_written) {
  Csv csv = file.format == TableFormat::json ? read_json_table(file.path, what, check_header, as_written)
                                             : read_csv(file.path, what, check_header, as_written);
  split_list_columns(csv, file.lists);
  return csv;
}

void check_name(const std::string& name, const std::string& where, const char* what, const char* mend) {
  const std::string bad = utf8_problem(name);
  CANOPY_CHECK(bad.empty(), DataError, where, ": the ", what, " ", bad, "; canopy writes names as UTF-8 (",
               mend, ")");
}

namespace {

// A JSON list column as a multi-label source (read_label_columns).
void add_list_column(const Csv& csv, const Csv& names, const std::string& key, LabelColumns& out) {
  CANOPY_CHECK(!out.labels.count(key) && !out.float_labels.count(key), DataError, csv.path,
               ": label column '", key, "' is repeated");
  check_name(key, csv.path + ":1", "label column", kConvertCsv);
  std::vector<std::vector<std::string>> items;  // the names table's, as rows of one field
  for (const auto& row : names.lists.at(key))
    for (const auto& item : row) items.push_back({item});
  CANOPY_CHECK(!items.empty(), DataError, names.path, ": '", key,
               "' holds only empty lists: a list of labels needs some labels to learn");
  std::vector<std::string> bits;
  const bool indices = all_parse(items, 0, true);
  if (indices) {
    std::int64_t top = 0;
    for (const auto& item : items)
      top = std::max<std::int64_t>(top, std::strtoll(item[0].c_str(), nullptr, 10));
    CANOPY_CHECK(top < static_cast<std::int64_t>(kMaxListLabels), DataError, names.path, ": '", key,
                 "' lists label ", top, "; a list of labels holds at most ", kMaxListLabels, " (0 to ",
                 kMaxListLabels - 1, ": a row keeps a value per label)");
    for (std::int64_t j = 0; j <= top; ++j) bits.push_back(std::to_string(j));
  } else {
    std::set<std::string> found;
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (found.insert(items[i][0]).second)
        check_name(items[i][0], detail::str_cat(names.path, ": '", key, "'"), "label", kConvertCsv);
    }
    CANOPY_CHECK(found.size() <= kMaxListLabels, DataError, names.path, ": '", key, "' lists ", found.size(),
                 " different labels; a list of labels holds at most ", kMaxListLabels,
                 " (a row keeps a value per label)");
    bits.assign(found.begin(), found.end());
  }
  // A bitmask per row, or past kMaxBits labels a row of K zeros and ones (label_lists.h).
  const auto k = static_cast<std::int64_t>(bits.size());
  const bool multi_hot = is_multi_hot(bits.size());
  const std::string known = join_first(bits, "labels");
  auto& values = out.labels[key];
  const auto& rows = csv.lists.at(key);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    std::int64_t mask = 0;
    const std::size_t row = values.size();
    if (multi_hot) values.resize(row + bits.size(), 0);
    for (const auto& item : rows[i]) {
      std::int64_t bit = -1;
      if (indices) {
        char* end = nullptr;
        const std::int64_t index = std::strtoll(item.c_str(), &end, 10);
        if (!item.empty() && *end == '\0' && index >= 0) bit = index;
      } else if (const auto named = std::lower_bound(bits.begin(), bits.end(), item);  // sorted names
                 named != bits.end() && *named == item) {
        bit = named - bits.begin();
      }
      CANOPY_CHECK(bit >= 0 && bit < k, DataError, csv.path, ": row ", i + 1, " lists ", key, " '", item,
                   "', which '", names.path, "' never lists (its labels: ", known, ")");
      if (multi_hot) {
        values[row + static_cast<std::size_t>(bit)] = 1;
      } else {
        mask |= std::int64_t{1} << bit;
      }
    }
    if (!multi_hot) values.push_back(mask);
  }
  out.label_order.push_back(key);
  out.bit_names[key] = std::move(bits);
}

}  // namespace

LabelColumns read_label_columns(const Csv& csv, const TableFile& names, std::size_t skip,
                                const std::function<Csv(const TableFile&)>& read_names) {
  if (names.path.empty() || names.path == csv.path) return read_label_columns(csv, csv, skip);
  return read_label_columns(csv, read_names(names), skip);
}

LabelColumns read_label_columns(const Csv& csv, const Csv& names, std::size_t skip) {
  auto sorted = [](std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  CANOPY_CHECK(
      sorted(names.header) == sorted(csv.header) && sorted(names.list_keys) == sorted(csv.list_keys),
      DataError, "'", names.path, "' and '", csv.path, "' have different columns (", join(names.header, ","),
      names.list_keys.empty() ? "" : " and lists " + join(names.list_keys, ","), " vs ",
      join(csv.header, ","), csv.list_keys.empty() ? "" : " and lists " + join(csv.list_keys, ","), ")");
  LabelColumns out;
  // In the order `names` lists them; `col` is the column in `csv`, `ncol` in `names`.
  for (std::size_t ncol = 0; ncol < names.header.size(); ++ncol) {
    const std::string& label = names.header[ncol];
    const auto col =
        static_cast<std::size_t>(std::find(csv.header.begin(), csv.header.end(), label) - csv.header.begin());
    if (col == skip) continue;
    CANOPY_CHECK(!label.empty() && !out.labels.count(label) && !out.float_labels.count(label), DataError,
                 csv.path, ": label column '", label, "' is empty or repeated");
    check_name(label, csv.path + ":1", "label column", kConvertCsv);
    out.label_order.push_back(label);
    if (all_parse(names.rows, ncol, true) && all_parse(csv.rows, col, true)) {
      auto& v = out.labels[label];
      for (const auto& r : csv.rows) v.push_back(std::strtoll(r[col].c_str(), nullptr, 10));
    } else if (all_parse(names.rows, ncol, false) && all_parse(csv.rows, col, false)) {
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
        if (found.insert(names.rows[i][ncol]).second) {
          check_name(names.rows[i][ncol], detail::str_cat(names.path, ": row ", i + 1), "class name",
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
  for (const auto& key : names.list_keys) add_list_column(csv, names, key, out);
  out.left_out = csv.left_out;
  return out;
}

}  // namespace canopy::datasets
