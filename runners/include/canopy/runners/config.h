// The job configuration: one INI file with sections [data] [text] [preprocess] [trunk]
// [cache] [train], one [task.<name>] section per task and, for a head's own options, a
// [task.<name>.head] section. Keys are named by section
// (`train.batch_size`). Precedence: built-in defaults < the config file < `--set key=value`
// on the command line. `canopy <cmd> --dump-config` prints the resolved configuration,
// and every training run saves it next to its outputs.
#pragma once

#include <cstdint>
#include <istream>
#include <map>
#include <string>
#include <vector>

#include "canopy/datasets/augment.h"
#include "canopy/datasets/image_limits.h"
#include "canopy/datasets/preprocess.h"
#include "canopy/datasets/text.h"
#include "canopy/runners/freeze_schedule.h"
#include "canopy/runners/weighting.h"
#include "canopy/tasks/task.h"
#include "canopy/trunk/trunk.h"

namespace canopy::runners {

// train.fuse: fuse a group where timing says it is faster, always, or never.
enum class FuseMode { kAuto, kAlways, kNever };
FuseMode parse_fuse_mode(const std::string& name, const std::string& where);
const char* to_string(FuseMode mode);

// train.export: which epoch of each head is exported.
enum class ExportMode { kAuto, kBest, kLast };  // auto: best with a validation split, else last
ExportMode parse_export_mode(const std::string& name, const std::string& where);
const char* to_string(ExportMode mode);

struct DataConfig {
  // fashion-mnist | mnist: idx files in `dir`;
  // arff: texts with nominal labels, one ARFF file per label (train_files, test_files);
  // text-csv, text-json: texts in CSV or JSON tables (train, test: <text>,<label>,...);
  // image-csv, image-json: PNG/JPEG files listed in CSV or JSON manifests (train, test:
  // path (or file_name),<label>,...);
  // image-folders: PNG/JPEG files in class folders (train, test: <dir>/<class>/<image>)
  std::string source = "fashion-mnist";
  std::string dir = "/usr/share/datasets/fashion-mnist";
  std::string train;  // image-csv/-json, text-csv/-json: the training table; image-folders: its folder
  std::string test;
  std::vector<std::string> train_files;  // arff: label_name:path entries, same documents
  std::vector<std::string> test_files;
  std::string text_attribute = "Text";  // arff: the string attribute holding the text; text-csv,
                                        // text-json: the column (its name, else ignoring case)
  std::string positive_value;           // arff, text tables: the value that sets a label's bit in all_labels;
                                        // empty: yes, 1 or true, whichever is declared
  std::int64_t train_limit = 0;         // keep the first N training samples (class folders: taken
                                        // from each class in turn, so every class stays); 0: all
  std::int64_t test_limit = 0;
  // image-csv / image-json / image-folders: an image of more pixels (width x height) is refused before it is
  // decoded (PIL's decompression-bomb limit by default); 0: no limit
  std::int64_t max_image_pixels = datasets::kDefaultMaxImagePixels;
  // image-csv / image-json / image-folders: "ignore" reads an image's pixels as stored, as
  // torchvision's ImageFolder does; "apply" turns them as their EXIF orientation says (a phone
  // photo taken sideways), as PIL's ImageOps.exif_transpose does.
  std::string exif_orientation = "ignore";
  // text-csv/-json, image-csv/-json: columns whose fields are lists of labels, and how they split
  // ("space": at runs of blanks; else one character). See datasets::ListColumns.
  std::vector<std::string> list_columns;
  std::string list_separator = "space";
};

// Whether the samples are a table of texts (CSV or JSON).
inline bool reads_text_table(const DataConfig& d) {
  return d.source == "text-csv" || d.source == "text-json";
}
// Whether the samples are texts (ARFF files, or a table of texts).
inline bool reads_text_data(const DataConfig& d) { return d.source == "arff" || reads_text_table(d); }

// Whether the samples are image files listed in a table (CSV or JSON manifests).
inline bool reads_image_table(const DataConfig& d) {
  return d.source == "image-csv" || d.source == "image-json";
}
// Whether the source lists image files (manifests or class folders).
inline bool reads_image_files(const DataConfig& d) {
  return reads_image_table(d) || d.source == "image-folders";
}
// Whether data.train and data.test are JSON tables (text-json, image-json).
inline bool reads_json_tables(const DataConfig& d) {
  return d.source == "text-json" || d.source == "image-json";
}

struct CacheConfig {
  std::string path = "runs/cache";    // a directory (format: canopy/datasets/feature_cache.h)
  std::int64_t batch_size = 128;      // trunk batch size
  std::int64_t shard_rows = 4096;     // rows per shard file; a multiple of batch_size
  std::string dtype = "float32";      // storage dtype: float32 | float16 | bfloat16
  double memory_cap_mb = 0;           // training reads the train split whole when it fits
                                      // under this cap, else streams it; 0: always whole
  std::string read_method = "pread";  // pread | hdf5 (see docs/decisions.md)
  std::int64_t views = 1;             // views per training image: the plain one, then augmented
                                      // ([augment]); each epoch a head sees one per sample
};

struct TrainConfig {
  std::string out_dir = "runs/train";
  std::string train_split = "train";
  std::string eval_split = "test";
  double validation_fraction = 0;  // held out of train_split (stratified, seeded) to choose
                                   // epochs and grid winners on; 0: none
  ExportMode export_mode = ExportMode::kAuto;
  std::string export_monitor;               // export = best over a top: the task (or grid) whose validation
                                            // score chooses the epoch; empty: the tasks' mean
  std::int64_t grid_halving = 0;            // successive halving of grids: the epochs before the first
                                            // cut (then at each multiple by the factor); 0: off
  std::int64_t grid_halving_factor = 3;     // each cut keeps 1 / factor of a grid's members training
  std::int64_t bootstrap_resamples = 1000;  // resamples of the eval split behind the metrics'
                                            // intervals (tasks/intervals.h); 0: none
  double interval_level = 0.95;             // the share of resampled values an interval holds
  std::int64_t batch_size = 256;
  std::int64_t epochs = 10;
  std::uint64_t seed = 0;
  std::int64_t workers = 0;               // TBB workers training heads concurrently; 0: one per core
  std::int64_t intra_op_threads = 1;      // LibTorch threads inside each head's work
  bool check_fingerprint = true;          // refuse a cache whose fingerprint does not match
  std::int64_t checkpoint_steps = 0;      // also checkpoint every N steps (0: at epoch ends only)
  bool fail_fast = false;                 // stop everything when one head fails
  bool flush_denormals = true;            // FTZ/DAZ while training (core/denormals.h)
  bool tensorboard = true;                // write TensorBoard event files per head
  FuseMode fuse = FuseMode::kAuto;        // same-input heads in batched operations
                                          // (canopy/heads/fused.h): where measured faster
                                          // (fusion_choice.h), always, or never
  double fuse_kib = 256;                  // most fused first-layer activations per group
                                          // (batch x widths x 4 bytes), in KiB
  Weighting weighting = Weighting::kSum;  // how the losses reach a shared top (weighting.h)
  double weighting_lr = 0.025;            // uncertainty's and famo's own learning rate
};

// How the trunk's trainable top learns, when the freeze policy leaves one over a cached
// frozen prefix ([trunk] lr, lr_decay, optimizer, weight_decay, schedule).
struct TopConfig {
  tasks::OptimizerKind optimizer = tasks::OptimizerKind::kAdam;
  double lr = 0.0;        // of the top block; 0: 0.1 x the mean of the tasks' learning rates
  double lr_decay = 2.6;  // each block further down learns at lr / lr_decay^depth (ULMFiT)
  double weight_decay = 0.0;
  tasks::LrSchedule lr_schedule = tasks::LrSchedule::kConstant;  // over train.epochs
  std::int64_t lr_warmup_steps = 0;  // the rate rises linearly over the top's first N steps
  double max_grad_norm = 0.0;        // the top's gradient scaled down to this L2 norm; 0: off
  // Which of the top's blocks train when (freeze_schedule.h).
  FreezeSchedule schedule = FreezeSchedule::kStatic;
  std::int64_t warmup_epochs = 1;    // gradual: epochs with only the heads training
  std::int64_t unfreeze_every = 1;   // gradual: epochs between unfreezing one more block
  std::int64_t freeze_interval = 0;  // autofreeze: steps between decisions; 0: one epoch's
  double percentile = 50;            // autofreeze: freeze blocks below this percentile's rate
  std::int64_t min_trainable = 1;    // autofreeze: blocks that always keep training
  bool level_on_disk = true;         // autofreeze: levels of a streamed split, or too large for
                                     // memory, kept on disk (false: computed, or held)
};

struct JobConfig {
  DataConfig data;
  datasets::PreprocessConfig preprocess;  // images
  datasets::AugmentConfig augment;        // images, when cache.views > 1
  datasets::TokenizerConfig text;         // texts ([text] vocab, lowercase, max_length)
  trunk::TrunkConfig trunk;
  TopConfig top;
  CacheConfig cache;
  TrainConfig train;
  std::vector<tasks::TaskConfig> tasks;  // grids expanded: one per head, a grid's members together
  std::string source;                    // the file it came from
};

// The epochs task `t` trains: its own, or train.epochs.
inline std::int64_t task_epochs(const tasks::TaskConfig& t, const TrainConfig& train) {
  return t.epochs > 0 ? t.epochs : train.epochs;
}

// Reads `path`, applies `overrides` ("key=value"), validates and returns the config.
// Unknown keys and bad values are ConfigErrors naming the key, the value and the file.
JobConfig load_job_config(const std::string& path, const std::vector<std::string>& overrides = {});
// --set KEY=VALUE overrides into `values` (the last of a key wins); one without '=' is refused.
void apply_overrides(std::map<std::string, std::string>& values, const std::vector<std::string>& overrides);
// The "section.key" -> value pairs of an INI text (a config file's, or a saved resolved one);
// `source` names it in errors. A key given twice is a ConfigError.
std::map<std::string, std::string> read_config_values(std::istream& in, const std::string& source);
// Builds a config from flat key/value pairs (what load_job_config does after reading).
JobConfig job_config_from_values(const std::map<std::string, std::string>& values, const std::string& source);
// The [trunk] section alone from KEY = VALUE pairs, trunk.* keys only (`canopy trunk show
// FILE`, which needs no job around the trunk); another key is refused, naming it.
trunk::TrunkConfig trunk_config_from_values(const std::map<std::string, std::string>& values,
                                            const std::string& source);
// train.epochs and task.NAME.epochs: what --resume lets change (with train.out_dir).
bool is_epochs_key(const std::string& key);
// The resolved configuration in the same INI format (every key, defaults included).
std::string dump_config(const JobConfig& config);
// The reference of every key (section, type, default, range, meaning) as Markdown tables:
// what `canopy keys` prints and docs/configuration.md holds. One table in config.cpp drives
// parsing, validation, dumping and this reference.
std::string config_reference();
void validate_job_config(const JobConfig& config);
// The keys only a trainable top reads (its optimizer, rates and schedule, and
// train.export_monitor) that `config` sets to other than their defaults, as "trunk.lr = 0.01":
// what a run whose trunk is frozen whole does not use.
std::vector<std::string> top_keys_set(const JobConfig& config);
// Whether "section.key" is one of those keys.
bool is_top_key(const std::string& full_name);
// The task settings `config` gives that their task does not use, as "task.a.momentum = 0.5
// (sgd only; its optimizer is adam)": an optimizer's or a schedule's keys set for another one.
std::vector<std::string> task_keys_unused(const JobConfig& config);
// Whether heads are chosen on a validation split (train.validation_fraction > 0).
inline bool has_validation(const TrainConfig& t) { return t.validation_fraction > 0; }
// Where heads stop early (early_stop_patience) without a validation split, the epoch they stop
// at is chosen on train.eval_split, so their numbers on it lean optimistic: the line that says
// so, naming those tasks; "" when there are none.
std::string stops_on_eval_split(const JobConfig& config);
// Whether each head exports its best epoch on the validation split (train.export resolved).
inline bool exports_best(const TrainConfig& t) {
  return t.export_mode == ExportMode::kBest || (t.export_mode == ExportMode::kAuto && has_validation(t));
}

}  // namespace canopy::runners
