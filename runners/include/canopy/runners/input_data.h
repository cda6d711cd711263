// What the cache job feeds the trunk: every split's samples with their labels, whatever the
// source (Fashion-MNIST/MNIST idx images, or texts with nominal labels from ARFF files),
// and the trunk's inputs for any set of rows.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/core/progress.h"
#include "canopy/runners/config.h"

namespace canopy::runners {

struct InputSplit {
  std::int64_t rows = 0;
  std::map<std::string, at::Tensor> labels;  // per label source: int64 (classes) or float64 [rows]
  at::Tensor ids;                            // int64 [rows]: row in the source
  // The trunk's inputs for the given rows: one preprocessed image tensor, or token ids and
  // attention mask (padded to the longest of these texts).
  std::function<std::vector<at::Tensor>(const std::vector<std::int64_t>& rows)> inputs;
  // Texts: tokens per row. The cache job groups texts of similar length into one trunk
  // batch (within a window of rows), so less of each batch is padding.
  std::vector<std::int64_t> lengths;
  // Image files: each row's path as listed (a manifest's joined to its folder); predict writes it.
  std::shared_ptr<const std::vector<std::string>> paths;
};

struct InputData {
  std::map<std::string, InputSplit> splits;  // "train", "test"
  std::vector<std::string> label_sources;
  std::vector<std::string> float_labels;
  std::map<std::string, std::pair<double, double>> label_stats;       // float sources: train mean, std
  std::vector<std::string> class_names;                               // of the first source, if known
  std::map<std::string, std::vector<std::string>> label_class_names;  // per source with names
  std::map<std::string, std::int64_t> label_classes;                  // declared class counts (CacheMeta)
  std::map<std::string, std::vector<std::string>> label_bits;         // bitmask sources: each bit's label
  std::string unit = "img";                                           // for progress: img | doc
};

// Loads the data named by config.data (and config.text for text sources).
InputData load_input_data(const JobConfig& config);

// New samples for `canopy predict`, from `path` (no labels; `limit` > 0 keeps the first
// rows): an idx file for fashion-mnist/mnist configs; an ARFF file (its text attribute), a
// table (FILE.csv, FILE.jsonl, .json, .ndjson: its text column) or a text file with one
// document per line for text configs (arff, text-csv, text-json); for image configs a
// manifest (FILE.csv, .jsonl, .json, .ndjson: its path or file_name column; label columns
// not needed), a folder (every PNG/JPEG below it, sorted) or one image.
InputSplit load_predict_input(const JobConfig& config, const std::string& path, std::int64_t limit);

// The columns `columns` of predict's input table `path` (a CSV or JSON table of texts, a
// manifest of images: as its name says), each row's values in that order, the first `limit`
// rows (> 0); ConfigError when `path` is not a table (an idx file, a folder, texts one per line,
// standard input), DataError naming a column the table lacks. A JSON list of labels is written
// as its items joined by '|', as a multilabel task's answer is.
std::vector<std::vector<std::string>> read_kept_columns(const JobConfig& config, const std::string& path,
                                                        const std::vector<std::string>& columns,
                                                        std::int64_t limit);

// Predict's inputs as `--input -` reads them, line by line from standard input: the texts of
// a text config, or the image file paths of an image config (blank lines left out), in
// chunks as they come; each chunk's ids count on from the last.
class PredictLines {
 public:
  explicit PredictLines(const JobConfig& config);
  ~PredictLines();
  // The next lines there are (at most `max`; waits for the first), as inputs; rows 0 at the end.
  InputSplit next(std::int64_t max);
  std::int64_t rows_so_far() const { return done_; }

 private:
  struct Impl;
  const JobConfig& config_;
  std::unique_ptr<Impl> impl_;
  std::int64_t done_ = 0;
};

// Labelled samples for `canopy evaluate`, the split "input" of the result, from `path` in the
// form of the config's data source, its first `limit` rows (> 0): an idx image file with the
// idx label file `labels` (empty: the one beside it, ...-labels-idx1-ubyte for
// ...-images-idx3-ubyte), and the ink computed as for training; a CSV manifest with the
// training CSV's columns, or class folders (classes numbered by the training data's names); for
// arff configs label_name:path.arff entries, comma-separated, as data.test_files lists them.
InputData load_labelled_input(const JobConfig& config, const std::string& path, const std::string& labels,
                              std::int64_t limit);

// The run's own eval split (train.eval_split, the rows training scored its heads on: the
// test split by default) as load_labelled_input returns an input, its first `limit` rows (> 0).
InputData load_eval_split(const JobConfig& config, std::int64_t limit);

// What the trunk's inputs went through before it: the image preprocessing or the
// tokenizer, as one line (cards record it; predict checks it).
std::string describe_preprocessing(const JobConfig& config);

// Rows begin .. end-1.
std::vector<std::int64_t> row_range(std::int64_t begin, std::int64_t end);

// After a memory fence refused a trunk batch: the largest of half, a quarter... of `batch`
// rows of `in` (its first rows; for texts, the longest) that `pass` completes, freed memory
// handed back before each try; 0 when not even one row's does.
std::int64_t largest_batch_that_passes(const InputSplit& in, std::int64_t batch,
                                       const std::function<void(const std::vector<std::int64_t>&)>& pass);
// The cache.batch_size to advise when `passes` rows passed: half of them (a long run's heap
// grows beyond one pass's, as freed blocks kept for reuse fragment, and a smaller batch costs
// the trunk pass little), lowered to a divisor of `shard_rows` as the config requires; >= 1.
std::int64_t advised_batch_size(std::int64_t passes, std::int64_t shard_rows);

// canopy check: every image file a cache job over `config` would read (both splits, their
// limits applied), decoded and preprocessed as the trunk pass would, ahead of it, on every
// LibTorch thread. The report says per split how many images of which kinds and sizes, the
// files that cannot be read (all of them, the first `shown` named; 0: all) and whether the
// preprocessed images share one shape, as the cache needs. ok: nothing the cache would fail on.
struct ImageCheck {
  bool ok = true;
  std::string report;
};
ImageCheck check_image_files(const JobConfig& config, ProgressStyle style, std::int64_t shown);

// The fingerprint lines for the inputs: data files (name, size, mtime), limits, and the
// preprocessing (images) or tokenizer (texts), plus what the labels are.
std::string describe_inputs(const JobConfig& config);

}  // namespace canopy::runners
