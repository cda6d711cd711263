#include "canopy/runners/input_data.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <variant>

#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/heap.h"
#include "canopy/core/label_lists.h"
#include "canopy/core/progress.h"
#include "canopy/core/sha256.h"
#include "canopy/core/strings.h"
#include "canopy/core/torch_team.h"
#include "canopy/datasets/images.h"
#include "canopy/datasets/mnist.h"
#include "canopy/datasets/preprocess.h"
#include "canopy/datasets/text.h"

namespace canopy::runners {

namespace {

// A real-valued label source's mean and standard deviation over the train split (a
// regression's target scale); the deviation is 0, not NaN, over one row (a NaN was written to
// the manifest as null, which no command could read back).
std::pair<double, double> label_stats_of(const at::Tensor& values) {
  return {values.mean().item<double>(), values.size(0) > 1 ? values.std().item<double>() : 0.0};
}

// Each image's "ink", its mean pixel intensity in [0, 1] (0 = blank, 1 = all white), from the raw
// uint8 images [N, ...]: the idx sources' real-valued label. Summed as integers: no float copy.
at::Tensor ink_of(const at::Tensor& images) {
  const double pixels = static_cast<double>(images[0].numel());
  return images.flatten(1).sum(1, false, at::kLong).to(at::kDouble) / (255.0 * pixels);
}

// A file's name, size and modification time; errno's value where it cannot be read.
std::variant<std::string, int> try_file_stamp(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return errno;
  return detail::str_cat(path.substr(path.find_last_of('/') + 1), ":", st.st_size, ":", st.st_mtim.tv_sec);
}

std::string file_stamp(const std::string& path) {
  const auto stamp = try_file_stamp(path);
  CANOPY_CHECK(std::holds_alternative<std::string>(stamp), DataError, "cannot read data file '", path,
               "': ", std::strerror(std::get<int>(stamp)));
  return std::get<std::string>(stamp);
}

// The input data is identified by each file's name, size and modification time (hashing
// 30 MB of idx files on every run would cost more than it protects against).
std::string describe_idx_files(const DataConfig& d) {
  const char* hint = d.source == "fashion-mnist" ? " (install the Debian package dataset-fashion-mnist)" : "";
  CANOPY_CHECK(is_directory(d.dir), DataError, "data.dir '", d.dir, "' is not a directory", hint);
  std::vector<std::string> names;
  for (const auto& name : list_dir(d.dir)) {
    if (name.find("idx") != std::string::npos) names.push_back(name);
  }
  CANOPY_CHECK(!names.empty(), DataError, "data.dir '", d.dir, "' holds no idx files", hint);
  std::sort(names.begin(), names.end());
  std::ostringstream out;
  for (const auto& n : names) out << file_stamp(join_path(d.dir, n)) << ";";
  return out.str();
}

std::int64_t limit_for(const DataConfig& d, const std::string& split) {
  return split == "train" ? d.train_limit : d.test_limit;
}

// Images held in memory, uint8 [N, H, W] or [N, C, H, W]: the trunk's input for a set of
// rows is their preprocessed batch.
void set_image_tensor_inputs(InputSplit& s, at::Tensor images, const datasets::PreprocessConfig& pre) {
  s.rows = images.size(0);
  s.inputs = [images = std::move(images), pre](const std::vector<std::int64_t>& rows) {
    const bool contiguous = rows.back() - rows.front() + 1 == static_cast<std::int64_t>(rows.size());
    const at::Tensor x = contiguous ? images.slice(0, rows.front(), rows.back() + 1)
                                    : images.index_select(0, at::tensor(rows, at::kLong));
    return std::vector<at::Tensor>{datasets::preprocess_images(x, pre)};
  };
}

// The index of the value of a label file's nominal values that counts as its label being
// present (all_labels' bit): `chosen` (data.positive_value) when given, else whichever of
// yes, 1, true the file declares; none when it declares none of them (or several).
std::optional<std::int64_t> positive_value(const std::vector<std::string>& values, const std::string& chosen,
                                           const std::string& path) {
  const auto find = [&](const std::string& v) -> std::optional<std::int64_t> {
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (lower_ascii(values[i]) == lower_ascii(v)) return static_cast<std::int64_t>(i);
    }
    return std::nullopt;
  };
  if (!chosen.empty()) {
    const auto i = find(chosen);
    CANOPY_CHECK(i, ConfigError, "data.positive_value = ", chosen, " is not a value of the label in '", path,
                 "' {", join(values, ","), "}");
    return i;
  }
  std::optional<std::int64_t> found;
  for (const char* v : {"yes", "1", "true"}) {
    const auto i = find(v);
    if (!i) continue;
    CANOPY_CHECK(
        !found, ConfigError, "the label in '", path, "' {", join(values, ","),
        "} declares more than one of yes, 1, true: say which one is positive with data.positive_value");
    found = i;
  }
  return found;
}

// The idx data sets' label sources: the class, and a real-valued target for regression heads:
// the image's ink.
void set_idx_label_sources(InputData& data, const std::string& source) {
  data.label_sources = {"class", "ink"};
  data.float_labels = {"ink"};
  if (source == "fashion-mnist") {
    data.class_names = datasets::fashion_mnist_class_names();
    data.label_class_names["class"] = data.class_names;
  }
  data.label_classes["class"] = 10;  // both idx data sets have ten classes, whatever a split holds
}

// An idx file of images, [N, H, W] or [N, C, H, W] uint8, its first `limit` (> 0).
at::Tensor read_idx_images(const std::string& path, std::int64_t limit) {
  at::Tensor images = datasets::read_idx(path, limit);
  CANOPY_CHECK(images.dim() == 3 || images.dim() == 4, DataError, "'", path,
               "' should hold images [N, H, W] or [N, C, H, W], holds ", images.dim(), "-dimensional data",
               images.dim() == 1 ? " (an idx label file?)" : "");
  return images;
}

InputData load_images(const JobConfig& config) {
  InputData data;
  set_idx_label_sources(data, config.data.source);
  for (const std::string split : {"train", "test"}) {
    const datasets::ImageSplit images =
        datasets::read_mnist_split(config.data.dir, split, limit_for(config.data, split));
    InputSplit s;
    CANOPY_CHECK(images.images.size(0) > 0, DataError, "split '", split, "' of '", config.data.dir,
                 "' has no samples");
    s.labels["class"] = images.labels;
    s.labels["ink"] = ink_of(images.images);
    s.ids = images.ids;
    set_image_tensor_inputs(s, images.images, config.preprocess);
    data.splits[split] = std::move(s);
  }
  const at::Tensor& ink = data.splits["train"].labels["ink"];
  data.label_stats["ink"] = label_stats_of(ink);
  return data;
}

// "name:path" -> {name, path}
std::pair<std::string, std::string> named_file(const std::string& entry, const char* key) {
  const auto colon = entry.find(':');
  CANOPY_CHECK(colon != std::string::npos && colon > 0 && colon + 1 < entry.size(), ConfigError, key,
               ": expected label_name:path.arff entries, got '", entry, "'");
  return {trim(entry.substr(0, colon)), trim(entry.substr(colon + 1))};
}

// Token ids of the texts `rows` padded to the longest: ids and attention mask, int64 [n, T].
std::vector<at::Tensor> pad_tokens(const std::vector<std::vector<std::int64_t>>& tokens,
                                   const std::vector<std::int64_t>& rows, std::int64_t pad_id) {
  std::size_t longest = 1;
  for (const auto r : rows) longest = std::max(longest, tokens[r].size());
  const auto n = static_cast<std::int64_t>(rows.size());
  at::Tensor ids = at::full({n, static_cast<std::int64_t>(longest)}, pad_id, at::kLong);
  at::Tensor mask = at::zeros({n, static_cast<std::int64_t>(longest)}, at::kLong);
  auto* id = ids.data_ptr<std::int64_t>();
  auto* m = mask.data_ptr<std::int64_t>();
  for (std::int64_t i = 0; i < n; ++i) {
    const auto& t = tokens[rows[i]];
    std::copy(t.begin(), t.end(), id + i * longest);
    std::fill(m + i * longest, m + i * longest + t.size(), 1);
  }
  return {ids, mask};
}

// Texts: tokenized once; the trunk's inputs for a set of rows are their padded ids and mask.
void set_text_inputs(InputSplit& s, const std::vector<std::string>& texts,
                     const datasets::TextTokenizer& tokenizer) {
  auto tokens = std::make_shared<std::vector<std::vector<std::int64_t>>>();
  tokens->reserve(texts.size());
  for (const auto& t : texts) {
    tokens->push_back(tokenizer.encode(t));
    s.lengths.push_back(static_cast<std::int64_t>(tokens->back().size()));
  }
  s.rows = static_cast<std::int64_t>(tokens->size());
  const std::int64_t pad = tokenizer.pad_id();
  s.inputs = [tokens, pad](const std::vector<std::int64_t>& rows) { return pad_tokens(*tokens, rows, pad); };
}

// The label of a label file: its last nominal attribute.
std::int64_t label_column(const datasets::ArffData& arff, const std::string& name) {
  std::int64_t col = -1;
  for (std::size_t a = 0; a < arff.attributes.size(); ++a) {
    if (!arff.nominal_values[a].empty()) col = static_cast<std::int64_t>(a);
  }
  CANOPY_CHECK(col >= 0, DataError, "'", arff.path, "' has no nominal attribute to use as label '", name,
               "'");
  return col;
}

// Per label, the file training read it from and the values that file declares: a label's
// classes are numbered in the order of its file's declaration.
using DeclaredValues = std::map<std::string, std::pair<std::string, std::vector<std::string>>>;

// Records the values `arff` declares for label `name` in `declared`, or, when training's are
// there, checks that they are the same in the same order: in another order the classes would
// be numbered otherwise, and heads scored against swapped labels.
void check_declared_values(DeclaredValues& declared, const std::string& name, const datasets::ArffData& arff,
                           std::int64_t col) {
  const auto& values = arff.nominal_values[col];
  const auto it = declared.find(name);
  if (it == declared.end()) {
    declared[name] = {arff.path, values};
    return;
  }
  CANOPY_CHECK(values == it->second.second, DataError, "'", arff.path, "' declares label '", name, "' as {",
               join(values, ","), "}, training's '", it->second.first, "' as {", join(it->second.second, ","),
               "}: its classes would be numbered otherwise; declare the same values in the same order");
}

// all_labels, the multi-label view of a split: label k set where label source `names[k]` has
// the class `positive[k]`; a bitmask per row, multi-hot past kMaxBits labels (label_lists.h).
void set_all_labels(InputSplit& s, const std::vector<std::string>& names,
                    const std::vector<std::int64_t>& positive, InputData& data) {
  std::vector<at::Tensor> has;
  for (std::size_t k = 0; k < names.size(); ++k)
    has.push_back((s.labels.at(names[k]) == positive[k]).to(at::kLong));
  if (is_multi_hot(names.size())) {
    s.labels["all_labels"] = at::stack(has, 1);
  } else {
    at::Tensor bits = at::zeros_like(has[0]);
    for (std::size_t k = 0; k < names.size(); ++k) bits += has[k] * (std::int64_t{1} << k);
    s.labels["all_labels"] = bits;
    data.label_classes["all_labels"] = std::int64_t{1} << names.size();
  }
  data.label_bits["all_labels"] = names;
}

// One split of texts: the documents of `files` (label_name:path.arff entries, one file per
// label, the same documents in each; `key` names them in messages), their first `limit` (> 0).
// Records each label's class count and names in `data`; `names` gets the label files' names in
// order (the split also has all_labels when every file has a positive value). `declared`: the
// values training's files declare (check_declared_values), recorded when it has none.
InputSplit load_text_split(const JobConfig& config, const std::vector<std::string>& files, const char* key,
                           std::int64_t limit, const datasets::TextTokenizer& tokenizer, InputData& data,
                           std::vector<std::string>& names, DeclaredValues& declared) {
  CANOPY_CHECK(!files.empty(), ConfigError, key, " is empty: list label_name:path.arff entries");
  std::vector<std::string> texts;
  InputSplit s;
  std::vector<std::optional<std::int64_t>> positive;  // per label file: the value setting its bit
  for (const auto& entry : files) {
    const auto [name, path] = named_file(entry, key);
    const datasets::ArffData arff = datasets::read_arff(path);
    const auto text_col = arff.string_attribute(config.data.text_attribute);
    const std::int64_t label_col = label_column(arff, name);
    CANOPY_CHECK(!s.labels.count(name), ConfigError, key, ": label name '", name, "' appears twice");
    check_declared_values(declared, name, arff, label_col);
    if (texts.empty()) {
      texts = arff.strings[text_col];
    } else {
      // The label files must describe the same documents in the same order.
      CANOPY_CHECK(arff.strings[text_col].size() == texts.size(), DataError, "'", path, "' has ",
                   arff.strings[text_col].size(), " documents but the first file of ", key, " has ",
                   texts.size());
      for (std::size_t i = 0; i < texts.size(); ++i) {
        CANOPY_CHECK(arff.strings[text_col][i] == texts[i], DataError, "document ", i, " of '", path,
                     "' differs from document ", i, " of the first file of ", key,
                     "; label files must list the same documents in the same order");
      }
    }
    const auto& col = arff.nominals[label_col];
    s.labels[name] = at::from_blob(const_cast<std::int64_t*>(col.data()),
                                   {static_cast<std::int64_t>(col.size())}, at::kLong)
                         .clone();
    names.push_back(name);
    positive.push_back(positive_value(arff.nominal_values[label_col], config.data.positive_value, path));
    data.label_classes[name] = static_cast<std::int64_t>(arff.nominal_values[label_col].size());
    data.label_class_names[name] = arff.nominal_values[label_col];
    if (data.class_names.empty()) data.class_names = arff.nominal_values[label_col];
  }
  std::int64_t n = static_cast<std::int64_t>(texts.size());
  if (limit > 0) n = std::min(n, limit);
  CANOPY_CHECK(n > 0, DataError, key, " holds no documents");
  texts.resize(static_cast<std::size_t>(n));
  for (auto& [name, t] : s.labels) t = t.slice(0, 0, n).clone();
  // Every label file as a bit, set when the document has the label's positive value (yes,
  // 1 or true as declared, or data.positive_value): the multi-label view of the documents.
  // Without a positive value for every file there is no such view.
  if (names.size() <= kMaxListLabels &&
      std::all_of(positive.begin(), positive.end(), [](const auto& p) { return p.has_value(); })) {
    std::vector<std::int64_t> values;
    for (const auto& p : positive) values.push_back(*p);
    set_all_labels(s, names, values, data);
  }
  set_text_inputs(s, texts, tokenizer);
  s.ids = at::arange(n, at::kLong);
  return s;
}

// The class count of every label source of named classes; the first source's names are the
// data's class names when it has names.
void record_label_classes(const datasets::LabelColumns& list, InputData& data) {
  const auto names = list.class_names.find(list.label_order[0]);
  if (names != list.class_names.end()) data.class_names = names->second;
  for (const auto& [source, classes] : list.class_names) {
    data.label_classes[source] = static_cast<std::int64_t>(classes.size());
    data.label_class_names[source] = classes;
  }
  for (const auto& [source, bits] : list.bit_names) {
    if (!is_multi_hot(bits.size())) data.label_classes[source] = std::int64_t{1} << bits.size();
    data.label_bits[source] = bits;
  }
}

// A table's label sources of one value per row: all_labels' candidate bits (a list of labels
// is a bitmask source of its own).
std::vector<std::string> single_labels(const datasets::LabelColumns& table) {
  std::vector<std::string> out;
  for (const auto& name : table.label_order)
    if (!table.bit_names.count(name)) out.push_back(name);
  return out;
}

// Says which label columns of the training table `path` have empty fields (a class named "":
// a task on such a column is refused when it trains).
void note_empty_fields(const datasets::LabelColumns& table, const std::string& path) {
  std::vector<std::string> empty;
  for (const auto& [source, classes] : table.class_names) {
    if (std::find(classes.begin(), classes.end(), "") != classes.end()) empty.push_back(source);
  }
  if (empty.empty()) return;
  log_info(detail::str_cat("label column(s) ", join(empty, ", "), " of '", path,
                           "' have empty fields: a task on them is refused until those fields are filled or "
                           "their rows dropped"));
}

// Says what the training table `path` holds beyond its columns of one value: empty fields, JSON
// keys left out (objects, lists of lists), lists of labels (bitmask sources).
void note_table_columns(const datasets::LabelColumns& table, const std::string& path) {
  note_empty_fields(table, path);
  if (!table.left_out.empty()) {
    log_info(detail::str_cat("key(s) ", join(table.left_out, ", "), " of '", path,
                             "' hold objects or lists of lists: no label sources"));
  }
  for (const auto& [source, bits] : table.bit_names) {
    log_info(detail::str_cat(
        "label source '", source, "': lists of ", bits.size(), " labels, ",
        is_multi_hot(bits.size()) ? "multi-hot (a row of zeros and ones)" : "a bitmask per row", " (",
        join_first(bits, "labels"), "): a multilabel task on it is named by them"));
  }
}

// The rows `keep` of a table's label columns, as the split's label sources.
void set_label_columns(InputSplit& s, const datasets::LabelColumns& table,
                       const std::vector<std::int64_t>& keep) {
  for (const auto& [name, v] : table.labels) {
    const auto bits = table.bit_names.find(name);
    const std::size_t width = bits == table.bit_names.end() ? 1 : list_width(bits->second.size());
    // Straight into the split's tensor: a multi-hot source is K values a row, copied once.
    const auto rows = static_cast<std::int64_t>(keep.size());
    at::Tensor t = width > 1 ? at::empty({rows, static_cast<std::int64_t>(width)}, at::kLong)
                             : at::empty({rows}, at::kLong);
    std::int64_t* out = t.data_ptr<std::int64_t>();
    for (const auto r : keep) {
      const auto first = v.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r) * width);
      out = std::copy(first, first + static_cast<std::ptrdiff_t>(width), out);
    }
    s.labels[name] = t;
  }
  for (const auto& [name, v] : table.float_labels) {
    std::vector<double> kept;
    for (const auto r : keep) kept.push_back(v[r]);
    s.labels[name] = at::tensor(kept, at::kDouble);
  }
}

// A folder named where a manifest of images is read: the manifest in it as Hugging Face's
// imagefolder lays it out (metadata.jsonl for JSON, metadata.csv for CSV); anything else as it is.
std::string manifest_in_folder(const DataConfig& d, const std::string& path, datasets::TableFormat format) {
  if (!reads_image_table(d) || !is_directory(path)) return path;
  const std::string name = format == datasets::TableFormat::json ? "metadata.jsonl" : "metadata.csv";
  const std::string inside = join_path(path, name);
  CANOPY_CHECK(is_regular_file(inside), DataError, "'", path, "' is a folder without ", name,
               ": name the manifest file (data.source = ", d.source,
               "), or read class folders with data.source = image-folders");
  return inside;
}

// A table data.source reads (text-csv/-json, image-csv/-json): how data.train and data.test are
// written, and for images a folder's manifest.
datasets::TableFormat source_format(const DataConfig& d) {
  return reads_json_tables(d) ? datasets::TableFormat::json : datasets::TableFormat::csv;
}
datasets::ListColumns list_columns(const DataConfig& d) { return {d.list_columns, d.list_separator}; }
datasets::TableFile data_table(const DataConfig& d, const std::string& path) {
  return {manifest_in_folder(d, path, source_format(d)), source_format(d), list_columns(d)};
}
// A table named on the command line: as its name says (.csv, .json, .jsonl, .ndjson), else as data.source's.
datasets::TableFile input_table(const DataConfig& d, const std::string& path) {
  const auto format = datasets::table_format(path).value_or(source_format(d));
  return {manifest_in_folder(d, path, format), format, list_columns(d)};
}

// The label columns of a training table of texts that are the bits of all_labels, as the class
// of each that sets its bit: when every column has two classes, one of them positive
// (data.positive_value, else yes, 1 or true): a column of 0 and 1, or of two names such as no
// and yes. None otherwise (a real-valued column, a column of three classes, ...).
std::optional<std::vector<std::int64_t>> all_labels_positives(const datasets::TextTable& train,
                                                              const std::string& path, const DataConfig& d) {
  const std::vector<std::string> order = single_labels(train);
  if (!train.float_labels.empty() || order.empty() || order.size() > kMaxListLabels) return std::nullopt;
  std::vector<std::int64_t> out;
  for (const auto& name : order) {
    std::vector<std::string> values{"0", "1"};
    if (const auto names = train.class_names.find(name); names != train.class_names.end()) {
      values = names->second;
    } else {
      const auto& v = train.labels.at(name);
      if (std::any_of(v.begin(), v.end(), [](std::int64_t x) { return x > 1; })) return std::nullopt;
    }
    if (values.size() != 2 || std::find(values.begin(), values.end(), "") != values.end())
      return std::nullopt;
    const auto p = positive_value(values, d.positive_value, detail::str_cat(path, "' column '", name));
    if (!p) return std::nullopt;
    out.push_back(*p);
  }
  return out;
}

// A table of texts as a split: its first `limit` rows (all: 0), their labels (and all_labels
// where `positives` says which class sets each bit), their token ids.
InputSplit text_table_split(const datasets::TextTable& table, std::int64_t limit,
                            const datasets::TextTokenizer& tokenizer,
                            const std::optional<std::vector<std::int64_t>>& positives, InputData& data) {
  auto n = static_cast<std::int64_t>(table.texts.size());
  if (limit > 0) n = std::min(n, limit);
  InputSplit s;
  set_label_columns(s, table, row_range(0, n));
  if (positives) set_all_labels(s, single_labels(table), *positives, data);
  set_text_inputs(s, std::vector<std::string>(table.texts.begin(), table.texts.begin() + n), tokenizer);
  s.ids = at::arange(n, at::kLong);  // the row in the table
  return s;
}

// data.source = text-csv | text-json: the training and test tables. Class names are numbered from the
// training table's; all_labels where its columns allow (all_labels_positives).
InputData load_text_tables(const JobConfig& config) {
  InputData data;
  data.unit = "doc";
  const datasets::TextTokenizer tokenizer(config.text);
  const datasets::TextTable train =
      datasets::read_text_table(data_table(config.data, config.data.train), config.data.text_attribute);
  CANOPY_CHECK(!train.label_order.empty(), DataError, "'", config.data.train,
               "' has no label columns: its header names only the text column '", train.text_column,
               "'; canopy trains on the columns beside it");
  const auto positives = all_labels_positives(train, config.data.train, config.data);
  data.label_sources = train.label_order;
  if (positives) {
    data.label_sources.push_back("all_labels");
  } else {
    log_info(detail::str_cat("no all_labels label source: not every label column of '", config.data.train,
                             "' has two values, one of them yes, 1 or true (or data.positive_value)"));
  }
  record_label_classes(train, data);
  note_table_columns(train, config.data.train);
  data.splits["train"] = text_table_split(train, config.data.train_limit, tokenizer, positives, data);
  const datasets::TextTable test =
      datasets::read_text_table(data_table(config.data, config.data.test), config.data.text_attribute,
                                data_table(config.data, config.data.train));
  data.splits["test"] = text_table_split(test, config.data.test_limit, tokenizer, positives, data);
  for (const auto& [name, v] : train.float_labels) {
    data.float_labels.push_back(name);
    data.label_stats[name] = label_stats_of(data.splits["train"].labels[name]);
  }
  return data;
}

InputData load_texts(const JobConfig& config) {
  InputData data;
  data.unit = "doc";
  const datasets::TextTokenizer tokenizer(config.text);
  DeclaredValues declared;
  std::vector<std::string> trained;  // the training split's label files' names
  for (const std::string split : {"train", "test"}) {
    const bool train = split == "train";
    std::vector<std::string> names;
    const InputSplit& s = data.splits[split] =
        load_text_split(config, train ? config.data.train_files : config.data.test_files,
                        train ? "data.train_files" : "data.test_files", limit_for(config.data, split),
                        tokenizer, data, names, declared);
    if (train) {
      data.label_sources = names;
      if (s.labels.count("all_labels")) {
        data.label_sources.push_back("all_labels");
      } else {
        log_info(
            "no all_labels label source: a label file declares none of yes, 1, true; name its positive value "
            "with data.positive_value");
      }
    }
    // The test split's labels are those of training (all_labels only when both have it).
    if (train) trained = names;
    CANOPY_CHECK(names == trained, ConfigError,
                 "data.train_files and data.test_files must name the same labels in the same order");
  }
  return data;
}

datasets::ImageList read_image_list(const JobConfig& config, const std::string& split) {
  const std::string& where = split == "train" ? config.data.train : config.data.test;
  if (reads_image_table(config.data))
    return datasets::read_image_table(data_table(config.data, where),
                                      data_table(config.data, config.data.train));
  return datasets::read_image_folders(where, config.data.train);
}

// The rows a data limit keeps: a CSV's first `limit` rows; for class folders (listed class
// by class) rows taken from each class in turn, in listing order, so that a limit keeps
// every class instead of only the first ones.
std::vector<std::int64_t> kept_rows(const datasets::ImageList& list, const std::string& source,
                                    std::int64_t limit) {
  const auto n = static_cast<std::int64_t>(list.paths.size());
  if (limit <= 0 || limit >= n) return row_range(0, n);
  if (source != "image-folders") return row_range(0, limit);
  std::map<std::int64_t, std::vector<std::int64_t>> by_class;
  const auto& labels = list.labels.at("class");
  for (std::int64_t r = 0; r < n; ++r) by_class[labels[r]].push_back(r);
  std::vector<std::int64_t> out;
  for (std::size_t i = 0; static_cast<std::int64_t>(out.size()) < limit; ++i) {
    for (const auto& [cls, rows] : by_class) {
      if (i < rows.size() && static_cast<std::int64_t>(out.size()) < limit) out.push_back(rows[i]);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

// An image file as the trunk gets it: decoded, turned as its EXIF orientation says when
// `orient`, preprocessed to [1, C, H, W]; with its stored size and orientation.
struct PreparedImage {
  at::Tensor input;
  std::int64_t channels = 0, height = 0, width = 0;  // as stored
  int orientation = 1;
};
PreparedImage prepare_image(const std::string& path, const datasets::PreprocessConfig& pre,
                            std::int64_t max_pixels, bool orient) {
  datasets::DecodedImage image = datasets::read_image(path, max_pixels);
  PreparedImage out;
  out.channels = image.pixels.size(0);
  out.height = image.pixels.size(1);
  out.width = image.pixels.size(2);
  out.orientation = image.orientation;
  if (orient) image.pixels = datasets::apply_exif_orientation(image.pixels, image.orientation);
  out.input = datasets::preprocess_images(image.pixels.unsqueeze(0), pre);
  return out;
}

// Image files, decoded and preprocessed when the trunk needs them (they may differ in size and
// channels), an image to each of LibTorch's threads: libjpeg, libpng and libwebp decode on one
// thread each, and the ATen ops after them run serially inside the team.
at::Tensor load_image_batch(const std::vector<std::string>& paths, const std::vector<std::int64_t>& rows,
                            const datasets::PreprocessConfig& pre, std::int64_t max_pixels, bool orient) {
  static std::atomic<bool> said{false};
  const std::size_t n = rows.size();
  std::vector<at::Tensor> out(n);
  std::vector<int> orientation(n, 1);
  std::vector<std::exception_ptr> failed(n);
  on_every_torch_thread([&](int t, int threads) {
    for (std::size_t k = static_cast<std::size_t>(t); k < n; k += static_cast<std::size_t>(threads)) {
      try {
        PreparedImage image = prepare_image(paths[rows[k]], pre, max_pixels, orient);
        orientation[k] = image.orientation;
        out[k] = std::move(image.input);
      } catch (...) {
        failed[k] = std::current_exception();
      }
    }
  });
  // In row order: the first failure, the first turned image, the first size that differs.
  for (std::size_t k = 0; k < n; ++k) {
    if (failed[k]) std::rethrow_exception(failed[k]);
    const std::string& path = paths[rows[k]];
    if (!orient && orientation[k] != 1 && !said.exchange(true)) {
      log_info(detail::str_cat(
          "image '", path, "' records EXIF orientation ", orientation[k],
          " (a viewer shows it turned); read as stored, as torchvision's ImageFolder reads it; "
          "data.exif_orientation = apply turns such images as PIL's ImageOps.exif_transpose does"));
    }
    CANOPY_CHECK(out[k].sizes() == out[0].sizes(), DataError, "image '", path, "' becomes ", out[k].sizes(),
                 " after preprocessing but '", paths[rows[0]], "' becomes ", out[0].sizes(),
                 "; set preprocess.resize, or preprocess.center_crop, to give every image one size");
  }
  return at::cat(out, 0);
}

void set_image_file_inputs(InputSplit& s, std::vector<std::string> paths, const JobConfig& config) {
  s.rows = static_cast<std::int64_t>(paths.size());
  s.paths = std::make_shared<const std::vector<std::string>>(std::move(paths));
  s.inputs = [paths = s.paths, pre = config.preprocess, max_pixels = config.data.max_image_pixels,
              orient = config.data.exif_orientation == "apply"](const std::vector<std::int64_t>& rows) {
    return std::vector<at::Tensor>{load_image_batch(*paths, rows, pre, max_pixels, orient)};
  };
}

// The rows `keep` of an image list: their files (decoded when the trunk needs them) and labels.
InputSplit image_file_split(const datasets::ImageList& list, const std::vector<std::int64_t>& keep,
                            const JobConfig& config) {
  InputSplit s;
  s.ids = at::tensor(keep, at::kLong);  // the row in the CSV or the sorted folder listing
  set_label_columns(s, list, keep);
  std::vector<std::string> kept_paths;
  for (const auto r : keep) kept_paths.push_back(list.paths[r]);
  set_image_file_inputs(s, std::move(kept_paths), config);
  return s;
}

// What reading class folders left out, in the log: files that are not images, and images of
// kinds torchvision's ImageFolder leaves out.
void log_left_out(const datasets::ImageList& list, const std::string& where) {
  if (!list.not_images.empty())
    log_info(detail::str_cat("image folder '", where, "': left out files that are not images (",
                             datasets::describe_counts(list.not_images), ")"));
  if (!list.left_out_images.empty())
    log_info(detail::str_cat("image folder '", where, "': ",
                             datasets::describe_left_out_images(list.left_out_images, list.first_left_out)));
}

InputData load_image_files(const JobConfig& config) {
  InputData data;
  for (const std::string split : {"train", "test"}) {
    datasets::ImageList list = read_image_list(config, split);
    log_left_out(list, split == "train" ? config.data.train : config.data.test);
    InputSplit s =
        image_file_split(list, kept_rows(list, config.data.source, limit_for(config.data, split)), config);
    if (split == "train") {
      data.label_sources = list.label_order;
      for (const auto& [name, v] : list.float_labels) {
        data.float_labels.push_back(name);
        data.label_stats[name] = label_stats_of(s.labels[name]);
      }
      record_label_classes(list, data);
      if (reads_image_table(config.data))
        note_table_columns(list, data_table(config.data, config.data.train).path);
    } else {
      CANOPY_CHECK(list.label_order == data.label_sources, DataError, "the test images' labels (",
                   join(list.label_order, ", "), ") differ from the training images' (",
                   join(data.label_sources, ", "), ")");
    }
    data.splits[split] = std::move(s);
  }
  return data;
}

// The idx label file beside an idx image file, named as the MNIST-style data sets name it
// (t10k-images-idx3-ubyte.gz -> t10k-labels-idx1-ubyte.gz); "" when the name is not of that form.
std::string idx_labels_beside(const std::string& images) {
  const auto slash = images.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "" : images.substr(0, slash + 1);
  std::string name = images.substr(slash == std::string::npos ? 0 : slash + 1);
  const auto at = name.find("images-idx3");
  if (at == std::string::npos) return {};
  return dir + name.replace(at, 11, "labels-idx1");
}

// How a JSON table's lists of labels become label sources (a cache's description).
constexpr const char* kListsDescribed =
    ";lists=a bitmask per row of the labels listed (integers: their own bits; names: bits in sorted order), "
    "past 62 labels a row of 0 or 1 per label in that order";

// The lists of labels a table holds, a JSON table's own and data.list_columns' (said only when
// there are such columns, so that the caches of other tables keep their fingerprints).
std::string lists_described(const DataConfig& d) {
  if (d.list_columns.empty()) return reads_json_tables(d) ? kListsDescribed : "";
  return detail::str_cat(kListsDescribed, ";list_columns=", join(d.list_columns, ","), " split at ",
                         d.list_separator);
}

// Every image file's name, size and modification time, hashed: the image set's identity.
std::string describe_image_files(const JobConfig& c) {
  std::ostringstream listing;
  for (const std::string split : {"train", "test"}) {
    const auto paths = read_image_list(c, split).paths;
    const std::string list = !reads_image_table(c.data)
                                 ? ""
                                 : data_table(c.data, split == "train" ? c.data.train : c.data.test).path;
    // Every file checked before any is refused: a manifest written on another machine, or a
    // folder of images moved, lacks many, and one error at a time would take a run each.
    std::vector<std::string> unreadable;
    std::size_t missing = 0;
    for (std::size_t i = 0; i < paths.size(); ++i) {
      const auto stamp = try_file_stamp(paths[i]);
      if (const auto* s = std::get_if<std::string>(&stamp)) {
        listing << paths[i] << "=" << *s << "\n";
      } else if (++missing <= 3) {
        unreadable.push_back(detail::str_cat(list.empty() ? "" : detail::str_cat("row ", i + 1, " "), "'",
                                             paths[i], "': ", std::strerror(std::get<int>(stamp))));
      }
    }
    CANOPY_CHECK(
        missing == 0, DataError, missing, " of the ", paths.size(), " images ",
        list.empty() ? "of " + split : "'" + list + "' lists", " cannot be read (", join(unreadable, "; "),
        missing > unreadable.size() ? "; ..." : "", ")",
        missing == paths.size() && !list.empty()
            ? "; none can: a relative path is read from the manifest's folder, '" + parent_path(list) + "'"
            : "",
        list.empty() ? "" : "; fix the paths, or drop those rows");
  }
  return sha256_hex(listing.str());
}

}  // namespace

std::string describe_preprocessing(const JobConfig& c) {
  return reads_text_data(c.data) ? datasets::describe(c.text) : datasets::describe(c.preprocess);
}

std::vector<std::vector<std::string>> read_kept_columns(const JobConfig& config, const std::string& path,
                                                        const std::vector<std::string>& columns,
                                                        std::int64_t limit) {
  const auto format = datasets::table_format(path);
  CANOPY_CHECK(path != "-" && format && (reads_text_data(config.data) || reads_image_files(config.data)),
               ConfigError, "--keep ", join(columns, ","),
               ": writes columns of a table given as --input (FILE.csv, .jsonl, .json, .ndjson, also .gz: "
               "a table of texts or a manifest of images); '",
               path, "' is not one");
  const datasets::Csv table =
      datasets::read_table({path, *format}, "table", [](const auto&, const auto&, const auto&) {});
  // Each column's place in the header, or its lists of labels (written joined by '|', as a
  // multilabel task's answer is).
  struct Kept {
    std::size_t at = 0;
    const std::vector<std::vector<std::string>>* lists = nullptr;
  };
  std::vector<Kept> kept;
  for (const auto& c : columns) {
    const auto it = std::find(table.header.begin(), table.header.end(), c);
    const auto list = table.lists.find(c);
    if (it != table.header.end()) {
      kept.push_back({static_cast<std::size_t>(it - table.header.begin()), nullptr});
    } else if (list != table.lists.end()) {
      kept.push_back({0, &list->second});
    } else {
      std::vector<std::string> all = table.header;
      all.insert(all.end(), table.list_keys.begin(), table.list_keys.end());
      throw DataError(detail::str_cat("--keep ", c, ": '", path,
                                      "' has no such column (its columns: ", join(all, ", "), ")"));
    }
  }
  std::vector<std::vector<std::string>> rows;
  for (std::size_t r = 0; r < table.rows.size(); ++r) {
    if (limit > 0 && static_cast<std::int64_t>(rows.size()) == limit) break;
    rows.emplace_back();
    for (const Kept& k : kept)
      rows.back().push_back(k.lists ? join((*k.lists)[r], "|") : table.rows[r][k.at]);
  }
  return rows;
}

InputSplit load_predict_input(const JobConfig& config, const std::string& path, std::int64_t limit) {
  InputSplit s;
  const auto keep_first = [limit](auto& items) {
    if (limit > 0 && static_cast<std::int64_t>(items.size()) > limit)
      items.resize(static_cast<std::size_t>(limit));
  };
  if (reads_text_data(config.data)) {
    const auto table = datasets::table_format(path);
    std::vector<std::string> texts =
        ends_with(path, ".arff") || ends_with(path, ".arff.gz")
            ? datasets::read_arff_texts(path, config.data.text_attribute)
        : table ? datasets::read_table_texts({path, *table}, config.data.text_attribute)
                : datasets::read_text_lines(path);
    keep_first(texts);
    set_text_inputs(s, texts, datasets::TextTokenizer(config.text));
  } else if (reads_image_files(config.data)) {
    std::vector<std::string> paths;
    if (is_directory(path)) {
      const datasets::ImageFiles files = datasets::find_image_files(path);
      if (!files.left_out_images.empty())
        log_info(detail::str_cat(
            "'", path,
            "': ", datasets::describe_left_out_images(files.left_out_images, files.first_left_out)));
      paths = files.paths;
    } else if (const auto table = datasets::table_format(path)) {
      paths = datasets::read_image_table_paths({path, *table});
    } else {
      paths.push_back(path);
    }
    CANOPY_CHECK(!paths.empty(), DataError, "'", path, "' holds no ", datasets::folder_image_extensions("or"),
                 " images");
    keep_first(paths);
    set_image_file_inputs(s, std::move(paths), config);
  } else {
    set_image_tensor_inputs(s, read_idx_images(path, limit), config.preprocess);
  }
  s.ids = at::arange(s.rows, at::kLong);
  return s;
}

struct PredictLines::Impl {
  datasets::LineStream lines{0, "standard input"};
  std::optional<datasets::TextTokenizer> tokenizer;
};

PredictLines::PredictLines(const JobConfig& config) : config_(config), impl_(std::make_unique<Impl>()) {
  CANOPY_CHECK(
      reads_text_data(config.data) || reads_image_files(config.data), ConfigError,
      "canopy predict: --input - reads texts, or image file paths, one per line from standard input; "
      "with data.source = ",
      config.data.source, " the inputs are an idx file: --input FILE");
  if (reads_text_data(config.data)) impl_->tokenizer.emplace(config.text);
}

PredictLines::~PredictLines() = default;

InputSplit PredictLines::next(std::int64_t max) {
  InputSplit s;
  for (;;) {
    std::vector<std::string> lines =
        impl_->lines.next(static_cast<std::size_t>(std::max<std::int64_t>(1, max)));
    if (lines.empty()) return s;  // the end: rows 0
    if (impl_->tokenizer) {
      set_text_inputs(s, lines, *impl_->tokenizer);
    } else {
      std::vector<std::string> paths;
      for (const auto& line : lines)
        if (!trim(line).empty()) paths.push_back(trim(line));
      if (paths.empty()) continue;  // blank lines only: wait for more
      set_image_file_inputs(s, std::move(paths), config_);
    }
    s.ids = at::arange(done_, done_ + s.rows, at::kLong);
    done_ += s.rows;
    return s;
  }
}

InputData load_labelled_input(const JobConfig& config, const std::string& path, const std::string& labels,
                              std::int64_t limit) {
  InputData data;
  if (config.data.source == "arff") {
    data.unit = "doc";
    // Training's label files, their headers: the values each declares, and the labels' order.
    DeclaredValues declared;
    std::vector<std::string> trained;
    for (const auto& entry : config.data.train_files) {
      const auto [name, file] = named_file(entry, "data.train_files");
      const datasets::ArffData header = datasets::read_arff(file, true);
      check_declared_values(declared, name, header, label_column(header, name));
      trained.push_back(name);
    }
    InputSplit s = load_text_split(config, split(path, ','), "--input", limit,
                                   datasets::TextTokenizer(config.text), data, data.label_sources, declared);
    // all_labels has a bit per label file: it means what training's meant only when the input
    // names training's labels, in its order (a file left out would shift or drop bits).
    if (data.label_sources != trained) s.labels.erase("all_labels");
    if (s.labels.count("all_labels")) data.label_sources.push_back("all_labels");
    data.splits["input"] = std::move(s);
    return data;
  }
  if (reads_text_table(config.data)) {
    // A table with the training table's columns (CSV or JSON, as its name says, else as the
    // config's); classes numbered as training's, all_labels as training's columns allow.
    data.unit = "doc";
    const datasets::TableFile train = data_table(config.data, config.data.train);
    const auto positives = all_labels_positives(datasets::read_text_table(train, config.data.text_attribute),
                                                config.data.train, config.data);
    const datasets::TextTable table =
        datasets::read_text_table(input_table(config.data, path), config.data.text_attribute, train);
    data.label_sources = table.label_order;
    if (positives) data.label_sources.push_back("all_labels");
    record_label_classes(table, data);
    data.splits["input"] =
        text_table_split(table, limit, datasets::TextTokenizer(config.text), positives, data);
    return data;
  }
  if (reads_image_files(config.data)) {
    // Class names are numbered as training numbered them: from the training CSV or folder.
    const datasets::ImageList list =
        reads_image_table(config.data)
            ? datasets::read_image_table(input_table(config.data, path),
                                         data_table(config.data, config.data.train))
            : datasets::read_image_folders(path, config.data.train);
    log_left_out(list, path);
    data.label_sources = list.label_order;
    record_label_classes(list, data);
    data.splits["input"] = image_file_split(list, kept_rows(list, config.data.source, limit), config);
    return data;
  }
  const std::string labels_path = labels.empty() ? idx_labels_beside(path) : labels;
  CANOPY_CHECK(!labels_path.empty(), ConfigError, "--labels: name the idx label file of '", path,
               "' (its name is not of the form ...-images-idx3-ubyte, whose labels are ...-labels-idx1-ubyte "
               "beside it)");
  CANOPY_CHECK(is_regular_file(labels_path), DataError, "the labels of '", path, "' should be in '",
               labels_path, "', which does not exist", labels.empty() ? "; name them with --labels" : "");
  const at::Tensor images = read_idx_images(path, limit);
  const at::Tensor classes = datasets::read_idx(labels_path, limit);
  CANOPY_CHECK(classes.dim() == 1 && classes.size(0) == images.size(0), DataError, "'", labels_path,
               "' should hold one label per image of '", path, "' (", images.size(0), "), holds ",
               classes.dim() == 1 ? detail::str_cat(classes.size(0), " labels")
                                  : detail::str_cat(classes.dim(), "-dimensional data"));
  InputSplit s;
  s.labels["class"] = classes.to(at::kLong);
  s.labels["ink"] = ink_of(images);
  s.ids = at::arange(images.size(0), at::kLong);
  set_image_tensor_inputs(s, images, config.preprocess);
  set_idx_label_sources(data, config.data.source);
  data.splits["input"] = std::move(s);
  return data;
}

std::vector<std::int64_t> row_range(std::int64_t begin, std::int64_t end) {
  std::vector<std::int64_t> rows(static_cast<std::size_t>(end - begin));
  for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = begin + static_cast<std::int64_t>(i);
  return rows;
}

std::int64_t largest_batch_that_passes(const InputSplit& in, std::int64_t batch,
                                       const std::function<void(const std::vector<std::int64_t>&)>& pass) {
  std::vector<std::int64_t> rows = row_range(0, in.rows);
  if (!in.lengths.empty()) {
    std::stable_sort(rows.begin(), rows.end(),
                     [&](std::int64_t a, std::int64_t b) { return in.lengths[a] > in.lengths[b]; });
  }
  for (std::int64_t n = std::min(batch / 2, in.rows); n >= 1; n /= 2) {
    release_freed_memory();  // what the refused pass left in the heap, fragmented
    try {
      pass(std::vector<std::int64_t>(rows.begin(), rows.begin() + n));
      return n;
    } catch (const std::exception&) {
      // refused again: try half as many
    }
  }
  return 0;
}

std::int64_t advised_batch_size(std::int64_t passes, std::int64_t shard_rows) {
  std::int64_t fits = std::max<std::int64_t>(1, passes / 2);
  while (shard_rows % fits != 0) --fits;
  return fits;
}

InputData load_input_data(const JobConfig& config) {
  if (reads_text_table(config.data)) return load_text_tables(config);
  if (config.data.source == "arff") return load_texts(config);
  if (reads_image_files(config.data)) return load_image_files(config);
  return load_images(config);
}

InputData load_eval_split(const JobConfig& config, std::int64_t limit) {
  InputData data = load_input_data(config);
  const std::string& name = config.train.eval_split;
  const auto it = data.splits.find(name);
  CANOPY_CHECK(it != data.splits.end(), ConfigError, "train.eval_split = ", name,
               ": the data has no such split");
  InputSplit split = std::move(it->second);
  data.splits.clear();
  if (limit > 0 && limit < split.rows) {
    split.rows = limit;
    split.ids = split.ids.slice(0, 0, limit);
    for (auto& [source, labels] : split.labels) labels = labels.slice(0, 0, limit);
    if (!split.lengths.empty()) split.lengths.resize(static_cast<std::size_t>(limit));
  }
  data.splits["input"] = std::move(split);
  return data;
}

std::string describe_inputs(const JobConfig& c) {
  std::ostringstream out;
  out << "preprocess=" << describe_preprocessing(c) << "\n";
  if (c.data.source == "arff") {
    out << "data=arff;text_attribute=" << c.data.text_attribute
        << (c.data.positive_value.empty() ? "" : ";positive_value=" + c.data.positive_value)
        << ";train_limit=" << c.data.train_limit << ";test_limit=" << c.data.test_limit;
    for (const auto* files : {&c.data.train_files, &c.data.test_files}) {
      for (const auto& f : *files) {
        const auto [name, path] = named_file(f, "data files");
        out << ";" << name << "=" << file_stamp(path);
      }
    }
    out << "\nlabels=one source per label file (nominal index);all_labels=bit k set when label k has its "
           "positive value (data.positive_value, or yes, 1 or true as declared)"
        // Said only where it applies, so that the caches of fewer files keep their fingerprints.
        << (is_multi_hot(c.data.train_files.size()) ? ", multi-hot: a row of 0 or 1 per label file" : "")
        << "\n";
  } else if (reads_text_table(c.data)) {
    out << "data=" << c.data.source << ";text_column=" << c.data.text_attribute
        << (c.data.positive_value.empty() ? "" : ";positive_value=" + c.data.positive_value)
        << ";train_limit=" << c.data.train_limit << ";test_limit=" << c.data.test_limit
        << ";train=" << file_stamp(data_table(c.data, c.data.train).path)
        << ";test=" << file_stamp(data_table(c.data, c.data.test).path)
        << "\nlabels=the table's columns but the text (integers: class indices; numbers: real values; names: "
           "classes in sorted order);all_labels=bit k set when column k has its positive value, where every "
           "column has two values (past 62 columns a row of 0 or 1 per column)"
        << lists_described(c.data) << "\n";
  } else if (reads_image_files(c.data)) {
    const bool csv = reads_image_table(c.data);
    out << "data=" << c.data.source << ";train_limit=" << c.data.train_limit
        << ";test_limit=" << c.data.test_limit
        << ";train=" << (csv ? file_stamp(data_table(c.data, c.data.train).path) : c.data.train)
        << ";test=" << (csv ? file_stamp(data_table(c.data, c.data.test).path) : c.data.test)
        << ";images_sha256="
        << describe_image_files(c)
        // Since 2026-12-07 (before: libpng's simplified API, which applied a PNG's gamma and
        // took 16-bit samples as linear light).
        << ";decoded=as PIL's convert(\"RGB\") (PNG: stored values, no gamma; 16-bit: the high byte)"
        << (c.data.exif_orientation == "apply" ? ";exif_orientation=applied, as PIL's ImageOps.exif_transpose"
                                               : "")
        << "\nlabels="
        << (c.data.source == "image-csv"    ? "the CSV's label columns" + lists_described(c.data)
            : c.data.source == "image-json" ? "the JSON manifest's label columns" + lists_described(c.data)
                                            : std::string("class (sorted folder names)"))
        << "\n";
  } else {
    out << "data=" << c.data.source << ";train_limit=" << c.data.train_limit
        << ";test_limit=" << c.data.test_limit << ";" << describe_idx_files(c.data) << "\n"
        << "labels=class;ink=mean pixel intensity/255 (float64, with its train mean and std)\n";
  }
  return out.str();
}

namespace {

// One image as canopy check saw it: what prepare_image gave, or why it could not.
struct CheckedImage {
  std::string error;
  PreparedImage image;
};

// Every row's image prepared as the trunk pass would, on every LibTorch thread, in chunks that
// the progress line follows.
std::vector<CheckedImage> prepare_every_image(const std::vector<std::string>& paths,
                                              const std::vector<std::int64_t>& rows, const JobConfig& config,
                                              const std::string& split, ProgressStyle style) {
  const std::size_t n = rows.size();
  std::vector<CheckedImage> seen(n);
  Progress progress("check " + split, static_cast<std::int64_t>(n), "img", style);
  constexpr std::size_t kChunk = 256;
  for (std::size_t begin = 0; begin < n; begin += kChunk) {
    const std::size_t end = std::min(n, begin + kChunk);
    on_every_torch_thread([&](int t, int threads) {
      for (std::size_t k = begin + static_cast<std::size_t>(t); k < end;
           k += static_cast<std::size_t>(threads)) {
        try {
          seen[k].image = prepare_image(paths[rows[k]], config.preprocess, config.data.max_image_pixels,
                                        config.data.exif_orientation == "apply");
        } catch (const std::exception& e) {
          seen[k].error = e.what();
        }
      }
    });
    progress.advance(static_cast<std::int64_t>(end - begin));
  }
  return seen;
}

// A split's part of canopy check's report: kinds by extension, colour or grey, the stored
// sizes, the shapes the trunk would get (one is needed), the files that cannot be read.
// False when the cache job would stop.
bool describe_checked_split(const std::string& split, const std::vector<std::string>& paths,
                            const std::vector<std::int64_t>& rows, const std::vector<CheckedImage>& seen,
                            const JobConfig& config, std::int64_t shown, std::ostream& out) {
  std::map<std::string, std::int64_t> kinds, shapes;
  std::map<std::string, std::string> first_of_shape;
  std::int64_t grey = 0, turned = 0, min_w = 0, max_w = 0, min_h = 0, max_h = 0, read = 0;
  std::set<std::pair<std::int64_t, std::int64_t>> sizes;
  std::vector<const std::string*> failed;
  for (std::size_t k = 0; k < rows.size(); ++k) {
    const std::string& path = paths[rows[k]];
    const std::string ext = datasets::file_extension(path);
    ++kinds[ext.empty() ? "" : "." + ext];
    if (!seen[k].error.empty()) {
      failed.push_back(&seen[k].error);
      continue;
    }
    const PreparedImage& s = seen[k].image;
    min_w = read ? std::min(min_w, s.width) : s.width;
    max_w = read ? std::max(max_w, s.width) : s.width;
    min_h = read ? std::min(min_h, s.height) : s.height;
    max_h = read ? std::max(max_h, s.height) : s.height;
    ++read;
    grey += s.channels == 1;
    turned += s.orientation != 1;
    sizes.emplace(s.width, s.height);
    std::ostringstream shape;
    shape << s.input.sizes().slice(1);
    if (shapes[shape.str()]++ == 0) first_of_shape[shape.str()] = path;
  }
  bool ok = true;
  out << split << ": " << rows.size() << " image" << (rows.size() == 1 ? "" : "s") << " ("
      << datasets::describe_counts(kinds) << ")";
  if (read > 0) {
    out << ", " << read - grey << " in colour, " << grey << " grey; stored " << min_w << " x " << min_h;
    if (sizes.size() > 1) out << " to " << max_w << " x " << max_h << " (" << sizes.size() << " sizes)";
    out << "\n";
    if (shapes.size() == 1) {
      out << "  the trunk gets " << shapes.begin()->first << " from each (" << describe_preprocessing(config)
          << ")\n";
    } else {
      ok = false;
      std::vector<std::string> parts;
      for (const auto& [shape, count] : shapes)
        parts.push_back(detail::str_cat(shape, " from ", count, " (the first: ", first_of_shape[shape], ")"));
      out << "  PROBLEM: the images become " << shapes.size()
          << " shapes after preprocessing: " << join(parts, "; ")
          << "; the cache needs one: set preprocess.resize, or preprocess.center_crop\n";
    }
    if (turned > 0)
      out << "  " << turned << " record an EXIF orientation other than upright: "
          << (config.data.exif_orientation == "apply"
                  ? "turned as it says (data.exif_orientation = apply)"
                  : "read as stored, as torchvision's ImageFolder reads them (data.exif_orientation = apply "
                    "turns them)")
          << "\n";
  } else {
    out << "\n";
  }
  if (!failed.empty()) {
    ok = false;
    out << "  PROBLEM: " << failed.size() << " cannot be read"
        << (shown > 0 && static_cast<std::int64_t>(failed.size()) > shown
                ? detail::str_cat(" (the first ", shown, "; --list 0 names all)")
                : "")
        << ":\n";
    for (std::size_t i = 0; i < failed.size() && (shown <= 0 || static_cast<std::int64_t>(i) < shown); ++i)
      out << "    " << *failed[i] << "\n";
  }
  return ok;
}

}  // namespace

ImageCheck check_image_files(const JobConfig& config, ProgressStyle style, std::int64_t shown) {
  CANOPY_CHECK(reads_image_files(config.data), ConfigError,
               "canopy check: data.source = ", config.data.source,
               " holds no image files; canopy check decodes those of data.source = image-csv, image-json or "
               "image-folders ahead of the trunk pass");
  ImageCheck result;
  std::ostringstream out;
  for (const std::string split : {"train", "test"}) {
    const datasets::ImageList list = read_image_list(config, split);
    log_left_out(list, split == "train" ? config.data.train : config.data.test);
    const std::vector<std::int64_t> rows = kept_rows(list, config.data.source, limit_for(config.data, split));
    const std::vector<CheckedImage> seen = prepare_every_image(list.paths, rows, config, split, style);
    result.ok = describe_checked_split(split, list.paths, rows, seen, config, shown, out) && result.ok;
  }
  out << (result.ok ? "check: every image reads, and the trunk gets one shape from each split\n"
                    : "check: FAILED: a cache job over this config would stop where a PROBLEM line says\n");
  result.report = out.str();
  return result;
}

}  // namespace canopy::runners
