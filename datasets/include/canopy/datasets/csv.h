#pragma once
// Tables: image manifests (path,<label>,...) and tables of texts (text,<label>,...), plain or
// gzip-compressed. A folder named as a table is refused as one.
//
// CSV is read as spreadsheets and pandas write it (RFC 4180): fields separated by commas; a
// field in double quotes may hold commas, line breaks and "" for a quote; lines end in LF or
// CRLF; a UTF-8 byte-order mark and blank lines between rows are skipped. Every field is
// trimmed of the blanks around it.
//
// JSON tables are records, as Hugging Face datasets' to_json and pandas' to_json(orient=
// "records", lines=True) write them: one object per line (JSON lines; blank lines skipped), or
// one array of objects. The first object's keys, in its order, are the header; every object
// has the same keys, in any order. A string is its field (trimmed as a CSV field), a number
// as JSON writes it, true and false as those words, null an empty field. A key whose value in
// the first record is a list of such values (a list of tags) is a multi-label column, a list
// in every record (null: an empty one); one holding an object, or a list of lists, is no
// column: left out and named in `left_out`. A key's list where the first record holds one
// value, or one value where it holds a list, is refused.

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "canopy/core/label_lists.h"

namespace canopy::datasets {

struct Csv {
  std::string path;
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;  // each as many fields as the header
  std::vector<std::int64_t> lines;             // the line each row starts on (1-based)
  // JSON: the keys whose first value is a list of values (labels), each row's items as fields
  std::vector<std::string> list_keys;
  std::map<std::string, std::vector<std::vector<std::string>>> lists;
  std::vector<std::string> left_out;  // JSON: the keys whose first value is an object or holds one
  // The column whose fields are kept as written, blanks at their ends too (a text's: a byte-level
  // BPE tokenizer reads a leading space, as Python's reader keeps it); every other field is trimmed.
  std::size_t as_written = static_cast<std::size_t>(-1);
};

// `what` names the file in messages ("image list"); `check_header` gets the header's fields,
// "path:line" and the header line as read, and throws when they are not what the caller reads.
// `as_written`, when given, is read once the header is checked (the check may set it): the
// column whose fields are not trimmed (Csv::as_written).
using CsvHeaderCheck = std::function<void(const std::vector<std::string>& fields, const std::string& where,
                                          const std::string& line)>;
Csv read_csv(const std::string& path, const std::string& what, const CsvHeaderCheck& check_header,
             const std::size_t* as_written = nullptr);
// A JSON table as a Csv (its rows' `lines`: the line each object is on; for an array, the
// array's first line). `check_header` gets the keys, "path:line" and the keys joined by ",".
Csv read_json_table(const std::string& path, const std::string& what, const CsvHeaderCheck& check_header,
                    const std::size_t* as_written = nullptr);

enum class TableFormat { csv, json };
// json for a file named .json, .jsonl or .ndjson (any case); csv for .csv; nothing otherwise.
// A name ending .gz is read for the name before it (FILE.csv.gz: csv): every reader here takes a
// gzip-compressed file as the plain one, told by its first bytes (gz_file.h).
std::optional<TableFormat> table_format(const std::string& path);
// Columns whose fields are lists of labels, as Kaggle's and MovieLens' CSVs write tags
// ("haze primary water", "Action|Comedy"): each field split at `separator` ("space": at any run
// of blanks; else that one character), items trimmed, empty ones dropped (an empty field is no
// label). read_table makes each such column a list, as a JSON table's list of labels.
struct ListColumns {
  std::vector<std::string> names;
  std::string separator = "space";
};
// A table and how it is written.
struct TableFile {
  TableFile() = default;
  TableFile(std::string p, TableFormat f, ListColumns l = {})
      : path(std::move(p)), format(f), lists(std::move(l)) {}
  std::string path;
  TableFormat format = TableFormat::csv;
  ListColumns lists;  // columns read as lists of labels
};
Csv read_table(const TableFile& file, const std::string& what, const CsvHeaderCheck& check_header,
               const std::size_t* as_written = nullptr);
// Where column `name` (the table's `what` column: its texts, its paths) is once read_table has
// made list columns lists; DataError when it was made one.
std::size_t column_after_lists(const Csv& csv, const std::string& name, const char* what);

// Why a header read as one field may not be comma-separated, "" otherwise: a spreadsheet in a
// locale whose decimal mark is a comma saves "CSV" with semicolons.
std::string separator_hint(const std::vector<std::string>& fields, const std::string& line);

// A label or class name is written into JSON and HDF5 as UTF-8: DataError naming `where` and
// `what` when it is not, `mend` saying how to mend it.
void check_name(const std::string& name, const std::string& where, const char* what, const char* mend);
inline constexpr const char* kConvertCsv = "convert the file, e.g. iconv -f latin1 -t utf-8";

// A table's label columns: every column but `skip`. A column whose values are all integers
// (>= 0) holds class indices; one whose values are all numbers but not all integers is
// real-valued (regression); any other column holds class names, numbered in sorted order of
// the names found in `names` (the training table, so train and test agree; a row with a name
// `names` lacks is a DataError). `names` must have `csv`'s columns, in any order; the label
// sources are listed in `names`' order (all_labels' bits follow it). A JSON list column is a
// multi-label source: each row's bitmask of its items, bit j the j-th of the labels `names`
// lists (all of them integers >= 0: the integers 0 to the largest; else their sorted names;
// at most kMaxListLabels), multi-hot past kMaxBits labels (label_lists.h: `labels` then holds
// rows x K values, row by row); an item `names` lacks is a DataError.
struct LabelColumns {
  std::map<std::string, std::vector<std::int64_t>> labels;      // per label source, class index
  std::map<std::string, std::vector<double>> float_labels;      // per real-valued label source
  std::map<std::string, std::vector<std::string>> class_names;  // per named-class label source
  std::vector<std::string> label_order;                         // label sources as listed
  std::map<std::string, std::vector<std::string>> bit_names;    // per list source: each bit's label
  std::vector<std::string> left_out;  // JSON keys holding objects or lists of lists: no columns (Csv's)
};
LabelColumns read_label_columns(const Csv& csv, const Csv& names, std::size_t skip);
// The same with the training table named, read by `read_names` unless it is `csv`'s own file
// (or empty: `csv` numbers itself).
LabelColumns read_label_columns(const Csv& csv, const TableFile& names, std::size_t skip,
                                const std::function<Csv(const TableFile&)>& read_names);

}  // namespace canopy::datasets
