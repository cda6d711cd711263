#pragma once
// Comma-separated tables: image manifests (path,<label>,...) and tables of texts
// (text,<label>,...). Read as spreadsheets and pandas write them (RFC 4180): fields separated
// by commas; a field in double quotes may hold commas, line breaks and "" for a quote; lines
// end in LF or CRLF; a UTF-8 byte-order mark and blank lines between rows are skipped. Every
// field is trimmed of the blanks around it.

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace canopy::datasets {

struct Csv {
  std::string path;
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;  // each as many fields as the header
  std::vector<std::int64_t> lines;             // the line each row starts on (1-based)
};

// `what` names the file in messages ("image list"); `check_header` gets the header's fields,
// "path:line" and the header line as read, and throws when they are not what the caller reads.
using CsvHeaderCheck = std::function<void(const std::vector<std::string>& fields, const std::string& where,
                                          const std::string& line)>;
Csv read_csv(const std::string& path, const std::string& what, const CsvHeaderCheck& check_header);

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
// `names` lacks is a DataError). `names` must have `csv`'s header.
struct LabelColumns {
  std::map<std::string, std::vector<std::int64_t>> labels;      // per label source, class index
  std::map<std::string, std::vector<double>> float_labels;      // per real-valued label source
  std::map<std::string, std::vector<std::string>> class_names;  // per named-class label source
  std::vector<std::string> label_order;                         // label sources as listed
};
LabelColumns read_label_columns(const Csv& csv, const Csv& names, std::size_t skip);

}  // namespace canopy::datasets
