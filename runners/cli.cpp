#include "canopy/runners/cli.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>
#include <string_view>
#include <thread>

#include <torch/version.h>
#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>

#include "canopy/core/device.h"
#include "canopy/core/dir_lock.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/memory.h"
#include "canopy/core/mpi.h"
#include "canopy/core/progress.h"
#include "canopy/core/sanitizers.h"
#include "canopy/core/sha256.h"
#include "canopy/core/stop.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/feature_cache.h"
#include "canopy/datasets/text.h"
#include "canopy/runners/cache_job.h"
#include "canopy/runners/compare_job.h"
#include "canopy/runners/config.h"
#include "canopy/runners/evaluate_job.h"
#include "canopy/runners/fusion_choice.h"
#include "canopy/runners/input_data.h"
#include "canopy/runners/model_file.h"
#include "canopy/runners/predict_job.h"
#include "canopy/runners/run_inspect.h"
#include "canopy/runners/step_runner.h"
#include "canopy/runners/sweep_job.h"
#include "canopy/runners/train_job.h"
#include "canopy/trunk/trunk.h"

namespace canopy::runners {
namespace po = boost::program_options;

namespace {

// A command: its name, its usage line, what it does, its options (with their help texts,
// which `canopy <command> --help` prints) and what it runs. One table, kCommands, lists them.
struct Command {
  const char* name;
  const char* usage;
  const char* summary;
  std::function<void(po::options_description&, po::positional_options_description&)> options;
  std::function<int(const po::variables_map&, const tasks::HeadRegistry&, std::ostream&, std::ostream&)> run;
};

ProgressStyle parse_progress(const std::string& s) {
  if (s == "auto") return ProgressStyle::kAuto;
  if (s == "bar") return ProgressStyle::kBar;
  if (s == "lines") return ProgressStyle::kLines;
  if (s == "quiet") return ProgressStyle::kQuiet;
  throw ConfigError("--progress: expected auto, bar, lines or quiet, got '" + s + "'");
}

// --config, --set and --allow-unpinned: how every command that reads a job config names it.
void add_config_options(po::options_description& d) {
  d.add_options()("config", po::value<std::string>()->value_name("FILE"),
                  "the job configuration (INI; see configs/)")(
      "set", po::value<std::vector<std::string>>()->value_name("KEY=VALUE"),
      "override a config value, e.g. --set train.epochs=5 (repeatable)")(
      "allow-unpinned", "load a trunk whose SHA-256 the config does not pin (the hash to pin is printed)");
}

void add_progress_option(po::options_description& d) {
  d.add_options()("progress", po::value<std::string>()->default_value("auto")->value_name("MODE"),
                  "auto (bar on a terminal, lines otherwise), bar, lines or quiet");
}

// The job config named by --config, with every --set applied (and --allow-unpinned).
JobConfig config_from(const po::variables_map& vm, const std::string& command,
                      std::vector<std::string> extra_overrides = {}) {
  CANOPY_CHECK(vm.count("config"), ConfigError, "canopy ", command,
               ": --config FILE is required (see canopy ", command, " --help)");
  std::vector<std::string> overrides =
      vm.count("set") ? vm["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
  if (vm.count("allow-unpinned")) overrides.push_back("trunk.allow_unpinned=true");
  overrides.insert(overrides.end(), extra_overrides.begin(), extra_overrides.end());
  return load_job_config(vm["config"].as<std::string>(), overrides);
}

void print_cache_report(const CacheReport& r, std::ostream& out) {
  out << "cache " << r.path << ": " << (r.rebuilt ? "built" : r.reason) << "\n";
  out << "  fingerprint " << r.fingerprint << "\n  features    " << r.feature_dim << " per sample\n";
  for (const auto& [split, rows] : r.rows)
    out << "  " << std::left << std::setw(11) << split << " " << rows << " rows\n";
  if (r.rebuilt) {
    out << std::fixed << std::setprecision(2) << "  time        " << r.seconds << " s (" << r.rows_computed
        << " rows through the trunk: " << r.trunk_seconds << " s; waiting on writes: " << r.write_wait_seconds
        << " s)\n"
        << std::defaultfloat;
  }
}

// cache, train and run: the job commands.
void job_options(po::options_description& d, bool cache, bool train) {
  add_config_options(d);
  d.add_options()("dump-config", "print the resolved configuration and exit");
  if (cache) d.add_options()("force", "rebuild the cache even if it is up to date");
  if (cache && !train)
    d.add_options()(
        "check-tasks",
        "refuse, before the trunk pass, a task that training would refuse (a label source the data "
        "lacks, a label_map or class_names for another class count, an option no head takes), as canopy "
        "run does; without it such a task is only said");
  if (train) {
    d.add_options()("resume",
                    "continue from the last checkpoint in <train.out_dir>/checkpoint (with --set "
                    "train.epochs=N: train on to N epochs)")(
        "fail-fast", "stop every head when one fails (default: only that head stops)")(
        "no-fuse", "train every head on its own instead of fusing same-shape heads (train.fuse = never)");
  }
  add_progress_option(d);
}

// Under mpirun every rank must run the same job (an MPMD launch, or files that differ between
// nodes, would not): the resolved configuration, after its first line (which names the file).
void check_same_config(const JobConfig& config) {
  const std::string resolved = dump_config(config);
  CANOPY_CHECK(
      mpi::all_equal(std::stoull(
          sha256_hex(std::string_view(resolved).substr(resolved.find('\n') + 1)).substr(0, 15), nullptr, 16)),
      ConfigError, "the ranks of this mpirun job were given different configurations (", config.source,
      " resolves to another job on some rank): every rank must read the same one");
}

void fit_threads(const JobConfig& config) {
  const std::string said = fit_threads_to_cpu_quota(config);
  if (!said.empty() && mpi::rank() == 0) log_info(said);
}

int run_job(const std::string& command, const po::variables_map& vm, const tasks::HeadRegistry& registry,
            std::ostream& out, std::ostream& err) {
  std::vector<std::string> flags;
  if (vm.count("fail-fast")) flags.push_back("train.fail_fast=true");
  if (vm.count("no-fuse")) flags.push_back("train.fuse=never");
  const JobConfig config = config_from(vm, command, flags);
  if (mpi::distributed()) check_same_config(config);
  if (vm.count("dump-config")) {
    out << dump_config(config);
    return kExitOk;
  }
  fit_threads(config);
  const ProgressStyle style = parse_progress(vm["progress"].as<std::string>());
  // Under mpirun, rank 0 prints the reports (every rank logs its own lines to stderr).
  std::ostringstream elsewhere;
  std::ostream& report_out = mpi::rank() == 0 ? out : elsewhere;
  if (command != "cache") {  // before `run` spends its time on the cache
    for (const auto& t : config.tasks) registry.check_known(t.head, t.name);
  }
  if (command == "cache" || command == "run") {
    print_cache_report(run_cache(config, vm.count("force") > 0, nullptr, style, &registry,
                                 command == "run" || vm.count("check-tasks") > 0),
                       report_out);
  }
  if (command == "cache") return kExitOk;
  const TrainReport report = run_train(config, registry, style, vm.count("resume") > 0);
  if (mpi::rank() != 0) return kExitOk;  // rank 0 reports every head
  out << "\n" << format_summary(report);
  out << "heads, metrics (metrics.jsonl, metrics.csv, tensorboard/), checkpoints and the resolved config are "
         "in "
      << report.out_dir << "\n";
  if (report.any_failed()) {
    err << "canopy: at least one head FAILED (see above); the others were trained and saved\n";
    return kExitHeadFailed;
  }
  return kExitOk;
}

Command job_command(const char* name, const char* usage, const char* summary, bool cache, bool train) {
  return {name, usage, summary,
          [cache, train](po::options_description& d, po::positional_options_description&) {
            job_options(d, cache, train);
          },
          [name](const po::variables_map& vm, const tasks::HeadRegistry& r, std::ostream& out,
                 std::ostream& err) { return run_job(name, vm, r, out, err); }};
}

// --limit, checked: the first N inputs (0: all).
std::int64_t limit_option(const po::variables_map& vm, const std::string& command) {
  const std::int64_t limit = vm["limit"].as<std::int64_t>();
  CANOPY_CHECK(limit >= 0, ConfigError, "canopy ", command, ": --limit must be >= 0 (0: every input), got ",
               limit);
  return limit;
}

// Predict's config (threads fitted), and --input (required) and --limit into `options`.
JobConfig model_inputs(const po::variables_map& vm, PredictOptions& options) {
  CANOPY_CHECK(vm.count("input"), ConfigError,
               "canopy predict: --input FILE is required (see canopy predict --help)");
  JobConfig config = config_from(vm, "predict");
  fit_threads(config);
  options.input = vm["input"].as<std::string>();
  options.limit = limit_option(vm, "predict");
  if (options.input == "-") return config;  // standard input: lines of text, or of image paths
  CANOPY_CHECK(path_exists(options.input), ConfigError, "canopy predict: --input '", options.input,
               "' does not exist");
  return config;
}

// What evaluate, compare and sweep score on: --input (none: the runs' eval split), --limit and
// --labels (idx images only, of --input's), for runs whose data.source is `source`.
EvaluateOptions labelled_inputs(const po::variables_map& vm, const std::string& command,
                                const std::string& source) {
  EvaluateOptions options;
  if (vm.count("input")) options.input = vm["input"].as<std::string>();
  options.limit = limit_option(vm, command);
  // Before any model loads. An arff config's input names label files (label:path,...) instead.
  CANOPY_CHECK(options.input.empty() || source == "arff" || path_exists(options.input), ConfigError,
               "canopy ", command, ": --input '", options.input, "' does not exist");
  if (vm.count("labels")) {
    CANOPY_CHECK(vm.count("input"), ConfigError, "canopy ", command,
                 ": --labels names the labels of --input's images; without --input the eval split is read "
                 "with its own");
    CANOPY_CHECK(source == "fashion-mnist" || source == "mnist", ConfigError, "canopy ", command,
                 ": --labels is for idx images (data.source = fashion-mnist or mnist); with data.source = ",
                 source, " the input holds its labels");
    options.labels = vm["labels"].as<std::string>();
  }
  return options;
}

// --output's path, checked to name a file ("" without --output).
std::string output_path(const po::variables_map& vm, const std::string& command) {
  if (!vm.count("output")) return {};
  const std::string path = vm["output"].as<std::string>();
  CANOPY_CHECK(!path.empty() && !is_directory(path), ConfigError, "canopy ", command,
               ": --output must name a file, got '", path, "'");
  return path;
}

int run_predict_command(const po::variables_map& vm, const tasks::HeadRegistry& registry, std::ostream& out,
                        std::ostream& err) {
  PredictOptions options;
  const JobConfig config = model_inputs(vm, options);
  options.format = vm["format"].as<std::string>();
  options.scores = vm.count("scores") > 0;
  options.top = vm["top"].as<std::int64_t>();
  if (vm.count("keep")) options.keep = split(vm["keep"].as<std::string>(), ',');
  const ProgressStyle style = parse_progress(vm["progress"].as<std::string>());
  const std::string path = output_path(vm, "predict");
  if (path.empty()) {
    run_predict(config, registry, options, out, style);
    return kExitOk;
  }
  std::ostringstream buffer;
  const auto rows = run_predict(config, registry, options, buffer, style);
  write_output_file(path, buffer.str());
  err << "canopy: wrote " << rows << " predictions to " << path << "\n";
  return kExitOk;
}

int run_evaluate_command(const po::variables_map& vm, const tasks::HeadRegistry& registry, std::ostream& out,
                         std::ostream& err) {
  const JobConfig config = config_from(vm, "evaluate");
  fit_threads(config);
  const EvaluateOptions options = labelled_inputs(vm, "evaluate", config.data.source);
  const std::string path = output_path(vm, "evaluate");
  const Evaluation e =
      run_evaluate(config, registry, options, parse_progress(vm["progress"].as<std::string>()));
  out << (vm.count("json") ? evaluation_json(e) : format_evaluation(e));
  if (options.input.empty())  // the eval split: the rows early stopping may have chosen on
    if (const std::string optimistic = stops_on_eval_split(config); !optimistic.empty())
      err << "canopy evaluate: " << optimistic << "\n";
  if (!path.empty()) {
    write_output_file(path, evaluation_json(e));
    err << "canopy: wrote the evaluation of " << e.heads.size() << " heads to " << path << "\n";
  }
  return kExitOk;
}

int run_export_command(const po::variables_map& vm, const tasks::HeadRegistry& registry, std::ostream&,
                       std::ostream& err) {
  CANOPY_CHECK(vm.count("output"), ConfigError,
               "canopy export: --output FILE is required, e.g. --output model.pt (see canopy export --help)");
  JobConfig config = config_from(vm, "export");
  fit_threads(config);
  const std::string path = output_path(vm, "export");
  const ModelFile written = export_model_file(config, registry, path);
  // On stderr, as predict's "wrote": the file may be the standard output (--output /dev/stdout).
  err << format_model_file(written);
  return kExitOk;
}

int run_check_command(const po::variables_map& vm, const tasks::HeadRegistry&, std::ostream& out,
                      std::ostream&) {
  JobConfig config = config_from(vm, "check");
  fit_threads(config);
  const std::int64_t shown = vm["list"].as<std::int64_t>();
  CANOPY_CHECK(shown >= 0, ConfigError, "canopy check: --list must be 0 (all) or more, got ", shown);
  const ImageCheck check = check_image_files(config, parse_progress(vm["progress"].as<std::string>()), shown);
  out << check.report;
  return check.ok ? kExitOk : kExitError;
}

int run_inspect_command(const po::variables_map& vm, const tasks::HeadRegistry&, std::ostream& out,
                        std::ostream&) {
  std::optional<JobConfig> config;
  if (vm.count("config")) config = config_from(vm, "inspect");
  CANOPY_CHECK(vm.count("path") || config, ConfigError, "canopy inspect: give a cache PATH or --config FILE");
  const std::string path = vm.count("path") ? vm["path"].as<std::string>() : config->cache.path;
  bool ok = false;
  if (is_sweep_dir(path)) {
    CANOPY_CHECK(!config, ConfigError, "canopy inspect: '", path,
                 "' is a sweep's folder, whose sweep.json says what it runs; --config is for a cache");
    out << inspect_sweep(path, vm.count("json") > 0, &ok);
    return ok ? kExitOk : kExitError;
  }
  if (is_run_dir(path)) {  // a training run's out_dir
    CANOPY_CHECK(
        !config, ConfigError, "canopy inspect: '", path,
        "' is a training run's out_dir, which says what it ran (config.ini); --config is for a cache");
    out << inspect_run(path, vm.count("verify") > 0, &ok, vm.count("json") > 0);
    return ok ? kExitOk : kExitError;
  }
  if (!is_regular_file(join_path(path, "manifest.json"))) {  // not a cache
    CANOPY_CHECK(vm.count("path"), DataError, "canopy inspect: no cache at '", path, "' (cache.path of ",
                 config->source, "); `canopy cache --config ", config->source, "` builds it");
    CANOPY_CHECK(path_exists(path), DataError, "canopy inspect: '", path, "' does not exist");
    CANOPY_CHECK(!is_regular_file(path) || !ends_with(path, ".ini"), ConfigError, "canopy inspect: '", path,
                 "' is a config file: `canopy inspect --config ", path, "` inspects the cache it names");
    throw DataError(
        detail::str_cat("canopy inspect: '", path,
                        "' is not a feature cache (no manifest.json), a training run's out_dir (no "
                        "config.ini or checkpoint/) or a sweep's folder (no sweep.json)"));
  }
  CANOPY_CHECK(!vm.count("json"), ConfigError,
               "canopy inspect: --json is for a training run's out_dir or a sweep's folder; '", path,
               "' is a feature cache");
  out << inspect_cache(path, config ? &*config : nullptr, vm.count("verify") > 0, &ok,
                       parse_progress(vm["progress"].as<std::string>()));
  return ok ? kExitOk : kExitError;
}

int run_tokenize_command(const po::variables_map& vm, const tasks::HeadRegistry&, std::ostream& out,
                         std::ostream&) {
  CANOPY_CHECK(
      vm.count("vocab") + vm.count("tokenizer") == 1 && (vm.count("arff") != vm.count("input")), ConfigError,
      "canopy tokenize: --tokenizer FILE (tokenizer.json) or --vocab FILE (vocab.txt), and one of --arff "
      "FILE or --input FILE are required");
  datasets::TokenizerConfig tc;
  tc.vocab = vm.count("vocab") ? vm["vocab"].as<std::string>() : "";
  tc.tokenizer = vm.count("tokenizer") ? vm["tokenizer"].as<std::string>() : "";
  tc.max_length = vm["max-length"].as<std::int64_t>();
  tc.lowercase = vm.count("cased") == 0;
  tc.lowercase_given = vm.count("cased") > 0;
  tc.prompt = vm.count("prompt") ? vm["prompt"].as<std::string>() : "";
  const datasets::TextTokenizer tokenizer(tc);
  const std::string attribute = vm["attribute"].as<std::string>();
  const std::string input = vm.count("input") ? vm["input"].as<std::string>() : "";
  const auto table = datasets::table_format(input);
  const std::vector<std::string> texts =
      vm.count("arff") ? datasets::read_arff_texts(vm["arff"].as<std::string>(), attribute)
      : input == "-"   ? datasets::read_text_lines(std::cin, "standard input")
      : table          ? datasets::read_table_texts({input, *table}, attribute)
                       : datasets::read_text_lines(input);
  for (const auto& t : texts) out << nlohmann::json{{"text", t}, {"ids", tokenizer.encode(t)}}.dump() << "\n";
  return kExitOk;
}

// Where train.fuse = auto keeps this machine's decisions, and how many it holds.
std::string fusion_calibration_line() {
  const std::string file = FusionChooser::default_file();
  const std::size_t shapes = FusionChooser::recorded_shapes(file);
  if (shapes == 0) return file + " (none yet: a training run times each group shape it meets, once)";
  return detail::str_cat(file, " (", count_of(static_cast<std::int64_t>(shapes), "group shape"),
                         " timed; delete it to time them again)");
}

std::string version_text() {
  // CANOPY_VERSION is the CMake project's version (runners/CMakeLists.txt).
  const auto quota = cpu_quota();
  const auto room = memory_room();
  return detail::str_cat(
      "canopy ", CANOPY_VERSION, "\nLibTorch ", TORCH_VERSION, "\nHDF5 ", datasets::hdf5_version(), "\nMPI ",
      mpi::library_version(), "\nCUDA available: ",
      cuda_available()                ? std::string("yes")
      : cuda_backend_status().empty() ? std::string("no (no GPU found)")
                                      : "no (" + cuda_backend_status() + ")",
      "\nCPU cores this process may use: ", machine_cores(), " (", affinity_cores(), " in its affinity",
      quota
          ? detail::str_cat("; a CPU quota, cgroup '", quota->cgroup, "', grants ", quota->cpus,
                            quota->share < quota->cpus ? detail::str_cat(", ", quota->share, " to each rank")
                                                       : std::string())
          : std::string(),
      ")\nmemory it may take: ",
      room ? format_mib(static_cast<double>(room->bytes)) + ", " + room->said : "unknown",
      "\nfusion calibration: ", fusion_calibration_line(), "\n");
}

void predict_options(po::options_description& d, po::positional_options_description&) {
  add_config_options(d);
  d.add_options()("input", po::value<std::string>()->value_name("FILE"),
                  "the inputs, in the form of the config's data source: an idx file, a manifest of images "
                  "(FILE.csv, .jsonl, .json, .ndjson: its path column), an image folder or file, an ARFF "
                  "file, a table's text column (FILE.csv, or JSON: FILE.jsonl, "
                  ".json, .ndjson) or texts one per line; - reads texts, or image file paths, one per line "
                  "from standard input")("output", po::value<std::string>()->value_name("FILE"),
                                         "write the predictions here (default: stdout)")(
      "format", po::value<std::string>()->default_value("csv"),
      "csv or jsonl: id (image files: then path), then a column per task")(
      "limit", po::value<std::int64_t>()->default_value(0)->value_name("N"),
      "the first N inputs only (0: all)")("scores",
                                          "also write each class's probability (softmax) and each "
                                          "label's (sigmoid), columns <task>:<class>")(
      "top", po::value<std::int64_t>()->default_value(0)->value_name("K"),
      "also each multiclass head's K most probable classes with their probabilities, best first: "
      "columns <task>:top1, <task>:top1_p, ...")(
      "keep", po::value<std::string>()->value_name("COLUMNS"),
      "columns of the --input table (CSV, JSON records, a manifest) to write beside each answer, "
      "comma-separated, e.g. --keep id,url: the row's own key, to join the answers back");
  add_progress_option(d);
}

// What evaluate and compare read: the labelled input, and how the report is written.
void labelled_input_options(po::options_description& d) {
  d.add_options()(
      "input", po::value<std::string>()->value_name("FILE"),
      "labelled inputs in the form of the config's data source: an idx image file, a manifest of "
      "images (CSV, or JSON records) with the training manifest's columns, a folder of class folders, a "
      "table of texts (CSV, or JSON "
      "records: .jsonl, .json, .ndjson) with the training table's columns, or label_name:path.arff entries "
      "as data.test_files lists them "
      "(default: the config's eval split, train.eval_split, the rows training scored the heads on)")(
      "labels", po::value<std::string>()->value_name("FILE"),
      "idx images: their idx label file (default: the ...-labels-idx1-ubyte file beside "
      "...-images-idx3-ubyte)")("limit", po::value<std::int64_t>()->default_value(0)->value_name("N"),
                                "the first N inputs only (0: all)")(
      "json", "print the report as one JSON object, for scripts")(
      "output", po::value<std::string>()->value_name("FILE"), "also write the JSON report to this file");
  add_progress_option(d);
}

void evaluate_options(po::options_description& d, po::positional_options_description&) {
  add_config_options(d);
  labelled_input_options(d);
}

void compare_options(po::options_description& d, po::positional_options_description& p) {
  d.add_options()("run", po::value<std::vector<std::string>>()->value_name("RUN"),
                  "a training run's out_dir (its config.ini is read) or a config file; 2 to 26 of them, "
                  "the first the baseline; several runs of one setting (seeds) as one comma-separated "
                  "argument, scored by their mean (positional)")(
      "set", po::value<std::vector<std::string>>()->value_name("KEY=VALUE"),
      "override a config value in every run, e.g. --set cache.batch_size=64 (repeatable)")(
      "allow-unpinned", "load a trunk whose SHA-256 the config does not pin (the hash to pin is printed)");
  d.add_options()("metric", po::value<std::string>()->value_name("NAME"),
                  "compare by accuracy, macro_f1, mean_ap, nll, mae, rmse or r2 where a head's kind has it "
                  "(default: accuracy; multilabel macro_f1; regression r2)");
  labelled_input_options(d);
  p.add("run", -1);
}

// Compared on the runs' eval split (no --input): the runs whose heads stopped early on those
// very rows, a line per reason, after the report.
void say_stops_on_eval_split(const Comparison& c, const std::vector<std::vector<JobConfig>>& configs,
                             const std::string& who, std::ostream& err) {
  if (!c.input.empty()) return;
  std::map<std::string, std::vector<std::string>> runs;  // line -> run labels
  std::size_t r = 0;
  for (const auto& arm : configs) {
    for (const auto& config : arm) {
      if (const std::string line = stops_on_eval_split(config); !line.empty() && r < c.runs.size())
        runs[line].push_back(c.runs[r].label);
      ++r;
    }
  }
  for (const auto& [line, labels] : runs)
    err << "canopy " << who << ": " << (labels.size() == 1 ? "run " : "runs ") << join(labels, ", ") << ": "
        << line << "\n";
}

int run_compare_command(const po::variables_map& vm, const tasks::HeadRegistry& registry, std::ostream& out,
                        std::ostream& err) {
  const std::vector<std::string> paths =
      vm.count("run") ? vm["run"].as<std::vector<std::string>>() : std::vector<std::string>{};
  std::vector<std::string> overrides =
      vm.count("set") ? vm["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
  if (vm.count("allow-unpinned")) overrides.push_back("trunk.allow_unpinned=true");
  // A comma-separated argument is one arm of several runs (the same setting, other seeds).
  std::vector<std::vector<std::string>> arm_paths;
  std::vector<std::vector<JobConfig>> configs;
  for (const auto& arg : paths) {
    arm_paths.push_back(split(arg, ','));
    CANOPY_CHECK(!arm_paths.back().empty() && std::none_of(arm_paths.back().begin(), arm_paths.back().end(),
                                                           [](const std::string& p) { return p.empty(); }),
                 ConfigError, "canopy compare: '", arg, "' names an empty run");
    configs.emplace_back();
    for (const auto& path : arm_paths.back()) configs.back().push_back(load_compared_run(path, overrides));
  }
  if (!configs.empty()) fit_threads(configs.front().front());
  const EvaluateOptions options =
      labelled_inputs(vm, "compare", configs.empty() ? std::string() : configs.front().front().data.source);
  const std::string path = output_path(vm, "compare");
  const Comparison c = run_compare(configs, arm_paths, registry, options,
                                   vm.count("metric") ? vm["metric"].as<std::string>() : "",
                                   parse_progress(vm["progress"].as<std::string>()));
  // What to choose by cost, where the runs' checkpoints record their training time. Each arm is
  // named as it was given (`paths`), so that no two arms share a name.
  std::vector<std::vector<RunCost>> costs;
  for (const auto& arm : c.arms) {
    costs.emplace_back();
    for (std::size_t r : arm.runs) costs.back().push_back(recorded_cost(c.runs[r].out_dir));
  }
  const std::string record = arms_record(paths, costs);
  std::string json = comparison_json(c);
  const std::string choice = record.empty() ? "" : choice_json(record, json);
  if (!choice.empty()) {
    auto j = nlohmann::ordered_json::parse(json);
    j["choice"] = nlohmann::ordered_json::parse(choice);
    json = j.dump(2) + "\n";
  }
  out << (vm.count("json") ? json
                           : format_comparison(c) + (choice.empty() ? "" : "\n" + describe_choice(choice)));
  say_stops_on_eval_split(c, configs, "compare", err);
  if (!path.empty()) {
    write_output_file(path, json);
    err << "canopy: wrote the comparison of " << c.runs.size() << " runs to " << path << "\n";
  }
  return kExitOk;
}

void sweep_options(po::options_description& d, po::positional_options_description&) {
  add_config_options(d);
  d.add_options()("vary", po::value<std::vector<std::string>>()->value_name("KEY=V1,V2,..."),
                  "a config key and the values to train it at, comma-separated (';'-separated where a value "
                  "holds commas), e.g. --vary trunk.freeze=all,first:13,first:11; repeatable: every "
                  "combination is one setting")(
      "seeds", po::value<std::string>()->value_name("S1,S2,..."),
      "train every setting once per seed (train.seed), e.g. --seeds 0,1,2 (default: the config's "
      "train.seed)")("out", po::value<std::string>()->value_name("DIR"),
                     "the sweep's folder: a run's out_dir per setting and seed, the caches (one per "
                     "distinct features), logs/, sweep.json, compare.json")(
      "dry-run", "print the runs, their out_dirs and caches, and what each would do; run nothing")(
      "cache-from", po::value<std::vector<std::string>>()->value_name("DIR"),
      "a feature cache, or an earlier sweep's folder (its caches), to read where it is (linked, not built "
      "again) for the settings whose features it holds, as the config's own cache.path is; repeatable")(
      "run-with", po::value<std::string>()->value_name("COMMAND"),
      "start each run under this command (split at spaces), e.g. --run-with 'mpirun -np 4 --hostfile "
      "hosts': each run then spreads its work over the launch's ranks")(
      "input", po::value<std::string>()->value_name("FILE"),
      "labelled inputs to compare the settings on once every run is trained, as canopy compare "
      "takes them (default: the runs' eval split)")(
      "labels", po::value<std::string>()->value_name("FILE"),
      "idx images: their idx label file (default: the one beside the images)")(
      "limit", po::value<std::int64_t>()->default_value(0)->value_name("N"),
      "compare on the first N inputs only (0: all)")("metric", po::value<std::string>()->value_name("NAME"),
                                                     "compare by this metric (as canopy compare)");
  add_progress_option(d);
}

// --vary's "key=v1,v2" (or "key=v1;v2" where a value holds a comma).
std::pair<std::string, std::vector<std::string>> parse_vary(const std::string& arg) {
  const auto eq = arg.find('=');
  CANOPY_CHECK(eq != std::string::npos && eq > 0, ConfigError, "canopy sweep: --vary '", arg,
               "': expected KEY=V1,V2,... (e.g. --vary trunk.freeze=all,first:13)");
  const std::string values = arg.substr(eq + 1);
  std::vector<std::string> split_values = split(values, values.find(';') != std::string::npos ? ';' : ',');
  for (auto& v : split_values) v = trim(v);
  return {trim(arg.substr(0, eq)), split_values};
}

// An argument as a POSIX shell reads it back: quoted where it holds anything but [A-Za-z0-9_./:=,+@%-].
std::string shell_word(const std::string& s) {
  const bool plain = !s.empty() && std::all_of(s.begin(), s.end(), [](unsigned char ch) {
    return std::isalnum(ch) ||
           std::string_view("_./:=,+@%-").find(static_cast<char>(ch)) != std::string_view::npos;
  });
  if (plain) return s;
  std::string out = "'";
  for (const char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

// The sweep's command line, as it runs again (what `canopy inspect` of its folder prints).
std::string sweep_command(const po::variables_map& vm) {
  std::vector<std::string> words{"canopy", "sweep", "--config", shell_word(vm["config"].as<std::string>())};
  const auto add = [&](const char* option, const std::string& value) {
    words.push_back(std::string("--") + option);
    words.push_back(shell_word(value));
  };
  if (vm.count("vary"))
    for (const auto& v : vm["vary"].as<std::vector<std::string>>()) add("vary", v);
  if (vm.count("seeds")) add("seeds", vm["seeds"].as<std::string>());
  if (vm.count("set"))
    for (const auto& v : vm["set"].as<std::vector<std::string>>()) add("set", v);
  if (vm.count("allow-unpinned")) words.push_back("--allow-unpinned");
  if (vm.count("cache-from"))
    for (const auto& v : vm["cache-from"].as<std::vector<std::string>>()) add("cache-from", v);
  for (const char* option : {"out", "run-with", "input", "labels", "metric"})
    if (vm.count(option)) add(option, vm[option].as<std::string>());
  if (vm["limit"].as<std::int64_t>() > 0) add("limit", std::to_string(vm["limit"].as<std::int64_t>()));
  return join(words, " ");
}

int run_sweep_command(const po::variables_map& vm, const tasks::HeadRegistry& registry, std::ostream& out,
                      std::ostream& err) {
  CANOPY_CHECK(vm.count("config"), ConfigError,
               "canopy sweep: --config FILE is required (see canopy sweep --help)");
  SweepOptions options;
  options.config = vm["config"].as<std::string>();
  if (vm.count("set")) options.overrides = vm["set"].as<std::vector<std::string>>();
  if (vm.count("allow-unpinned")) options.overrides.push_back("trunk.allow_unpinned=true");
  if (vm.count("vary"))
    for (const auto& v : vm["vary"].as<std::vector<std::string>>()) options.vary.push_back(parse_vary(v));
  if (vm.count("seeds")) options.seeds = parse_int_list(vm["seeds"].as<std::string>(), "--seeds");
  if (vm.count("out")) options.out = vm["out"].as<std::string>();
  if (vm.count("cache-from")) options.cache_from = vm["cache-from"].as<std::vector<std::string>>();
  if (vm.count("run-with")) {
    for (const auto& word : split(vm["run-with"].as<std::string>(), ' '))
      if (!trim(word).empty()) options.run_with.push_back(trim(word));
    CANOPY_CHECK(!options.run_with.empty(), ConfigError, "canopy sweep: --run-with is empty");
  }
  options.command = sweep_command(vm);
  const std::string metric = vm.count("metric") ? vm["metric"].as<std::string>() : "";
  check_compared_metric(metric);  // before the runs, not after them
  // One sweep in a folder at a time (the runs' own locks keep a run from two processes).
  check_sweep_folder(options.out);  // before its lock is taken there
  std::optional<DirLock> lock;
  if (!vm.count("dry-run")) lock.emplace(options.out, DirLock::Mode::kWrite, "canopy sweep");
  const EvaluateOptions compared =  // its options checked before the plan reads every run
      labelled_inputs(vm, "sweep", load_job_config(options.config, options.overrides).data.source);
  const std::string progress = vm["progress"].as<std::string>();
  const ProgressStyle style = parse_progress(progress);  // before the plan loads every trunk
  SweepPlan plan = plan_sweep(options);
  if (!plan.hint.empty()) err << "canopy sweep: " << plan.hint << "\n";
  if (vm.count("dry-run")) {
    out << format_plan(plan);
    return kExitOk;
  }
  run_sweep(plan, this_program(), progress, err);
  out << format_sweep(plan);
  const bool failed = std::any_of(plan.runs.begin(), plan.runs.end(),
                                  [](const SweepRun& r) { return r.exit_code == kExitHeadFailed; });
  std::vector<std::string> arms;
  for (const auto& paths : sweep_arm_paths(plan)) arms.push_back(join(paths, ","));
  if (failed) {
    err << "canopy: at least one head FAILED (see the runs' logs); once they are trained again, compare "
           "them: "
        << "canopy compare " << join(arms, " ") << "\n";
    return kExitHeadFailed;
  }
  if (const int signal = stop_signal())  // after the last run's last safe point
    throw Stopped(signal,
                  "stopped by " + signal_name(signal) +
                      " before the comparison: every run is kept; run the same command to compare them");
  fit_threads(plan.runs.front().config);
  const Comparison c = [&] {
    try {
      return run_compare(sweep_arms(plan), sweep_arm_paths(plan), registry, compared, metric, style);
    } catch (const Stopped& e) {
      throw Stopped(e.signal(),
                    std::string(e.what()) +
                        " by the comparison; every run is kept: run the same command to compare them");
    }
  }();
  const std::string compared_json = comparison_json(c);
  out << "\n" << format_comparison(c) << "\n" << choice_lines(sweep_json(plan), compared_json);
  say_stops_on_eval_split(c, sweep_arms(plan), "sweep", err);
  const std::string path = join_path(options.out, "compare.json");
  write_file_atomic(path, compared_json);
  err << "canopy: wrote the comparison of " << c.runs.size() << " runs to " << path << "\n";
  return kExitOk;
}

// `canopy trunk show`: a config's trunk, or a trunk file alone with --set trunk.* keys.
void trunk_file_options(po::options_description& d, po::positional_options_description& p) {
  add_config_options(d);
  d.add_options()("trunk", po::value<std::string>()->value_name("TRUNK_FILE"),
                  "a TorchScript trunk file, without a config (positional)");
  p.add("trunk", 1);
}

void trunk_show_options(po::options_description& d, po::positional_options_description& p) {
  trunk_file_options(d, p);
  d.add_options()("depth", po::value<int>()->default_value(2)->value_name("N"), "module tree depth")(
      "size", po::value<std::int64_t>()->value_name("S"),
      "also run a batch of two SxS zero images (a text trunk: S tokens) and show each tap point's output "
      "shape and its width under trunk.pooling")(
      "channels", po::value<std::int64_t>()->value_name("C"),
      "the images' channels for --size (default: the config's preprocess.channels, else 3)");
}

// The [trunk] of --config, or of a trunk file given alone with the keys --set gives.
trunk::TrunkConfig trunk_config_of(const po::variables_map& vm, const std::string& command) {
  CANOPY_CHECK(vm.count("trunk") + vm.count("config") == 1, ConfigError, "canopy ", command,
               ": give --config FILE or a trunk file, one of them (see canopy ", command, " --help)");
  if (vm.count("config")) return config_from(vm, command).trunk;
  std::map<std::string, std::string> values{{"trunk.path", vm["trunk"].as<std::string>()}};
  if (vm.count("set")) apply_overrides(values, vm["set"].as<std::vector<std::string>>());
  if (vm.count("allow-unpinned")) values["trunk.allow_unpinned"] = "true";
  return trunk_config_from_values(values, "canopy " + command + " TRUNK_FILE");
}

int run_trunk_show_command(const po::variables_map& vm, const tasks::HeadRegistry&, std::ostream& out,
                           std::ostream&) {
  const int depth = vm["depth"].as<int>();
  CANOPY_CHECK(depth >= 0, ConfigError, "canopy trunk show: --depth must be >= 0, got ", depth);
  const trunk::Trunk trunk = trunk::Trunk::load(trunk_config_of(vm, "trunk show"));
  out << trunk.show(depth);
  if (vm.count("size")) {
    std::int64_t channels = 3;
    if (vm.count("channels")) {
      channels = vm["channels"].as<std::int64_t>();
    } else if (vm.count("config")) {
      channels = config_from(vm, "trunk show").preprocess.channels;
    }
    out << trunk.show_outputs(vm["size"].as<std::int64_t>(), channels);
  }
  return kExitOk;
}

void trunk_extract_options(po::options_description& d, po::positional_options_description& p) {
  trunk_file_options(d, p);
  d.add_options()("output", po::value<std::string>()->value_name("FILE"), "the TorchScript file to write");
}

int run_trunk_extract_command(const po::variables_map& vm, const tasks::HeadRegistry&, std::ostream&,
                              std::ostream& err) {
  CANOPY_CHECK(vm.count("output"), ConfigError,
               "canopy trunk extract: --output FILE is required, e.g. --output features.pt (see canopy trunk "
               "extract --help)");
  const trunk::TrunkConfig config = trunk_config_of(vm, "trunk extract");
  const std::string path = output_path(vm, "trunk extract");
  err << format_trunk_file(export_trunk_file(config, path));
  return kExitOk;
}

void tokenize_options(po::options_description& d, po::positional_options_description&) {
  d.add_options()("tokenizer", po::value<std::string>()->value_name("FILE"),
                  "the trunk's tokenizer.json (WordPiece, byte-level BPE or Unigram)")(
      "vocab", po::value<std::string>()->value_name("FILE"), "or: the WordPiece vocabulary (vocab.txt)")(
      "max-length", po::value<std::int64_t>()->default_value(256)->value_name("N"), "most tokens per text")(
      "cased", "--vocab: keep case (default: lowercase, as uncased models expect)")(
      "prompt", po::value<std::string>()->value_name("TEXT"),
      "put before every text, as text.prompt does (e5's \"query: \")")(
      "arff", po::value<std::string>()->value_name("FILE"), "texts from an ARFF string attribute")(
      "attribute", po::value<std::string>()->default_value("Text")->value_name("NAME"),
      "the ARFF attribute, or a table's text column")(
      "input", po::value<std::string>()->value_name("FILE"),
      "texts, one per line (-: standard input), or a table's text column (FILE.csv; JSON records: "
      "FILE.jsonl, .json, .ndjson)");
}

int run_heads_command(const po::variables_map&, const tasks::HeadRegistry& registry, std::ostream& out,
                      std::ostream&) {
  out << "registered heads:\n";
  for (const auto& [name, description] : registry.list()) {
    out << "  " << std::left << std::setw(12) << name << description << "\n";
  }
  return kExitOk;
}

const std::vector<Command>& commands() {
  static const std::vector<Command> kCommands = {
      job_command("cache", "canopy cache --config FILE [options]",
                  "run the frozen trunk once per sample and store its features in the HDF5 cache", true,
                  false),
      job_command("train", "canopy train --config FILE [options]",
                  "train every task's head concurrently on the cached features", false, true),
      job_command("run", "canopy run --config FILE [options]", "cache (if needed), then train", true, true),
      {"check", "canopy check --config FILE [--list N] [options]",
       "decode every image file a cache job would read (both splits, limits applied) and preprocess it, "
       "ahead of the trunk pass: every file that cannot be read, the kinds and sizes, whether the trunk gets "
       "one shape",
       [](po::options_description& d, po::positional_options_description&) {
         add_config_options(d);
         d.add_options()("list", po::value<std::int64_t>()->default_value(20)->value_name("N"),
                         "name the first N files that cannot be read, per split; 0: all");
         add_progress_option(d);
       },
       run_check_command},
      {"predict", "canopy predict --config FILE --input FILE [options]",
       "run the trunk and every trained head on new inputs (idx images, image files, texts) in one pass",
       predict_options, run_predict_command},
      {"evaluate", "canopy evaluate --config FILE [--input FILE] [options]",
       "score every trained head on labelled inputs (new, or held out): accuracy, macro-F1, top-5, per-class "
       "F1, mean AP, MAE, RMSE, R^2",
       evaluate_options, run_evaluate_command},
      {"compare", "canopy compare RUN[,RUN...] RUN[,RUN...] [...] [--input FILE] [options]",
       "score several training runs (out_dirs or configs) on the same labelled inputs, and each head's "
       "difference from the first run's, with paired intervals, then say the cheapest unbeaten on each task "
       "by the runs' recorded training time: how much to freeze, which tap, which trunk",
       compare_options, run_compare_command},
      {"sweep",
       "canopy sweep --config FILE --vary KEY=V1,V2[,...] [--seeds S1,S2,...] --out DIR [--input FILE]",
       "train one run per setting of the keys varied and per seed (runs reading the same features share one "
       "cache; a sweep run again goes on where it stopped), then compare the settings and say the cheapest "
       "unbeaten on each task: how much to freeze, which tap, which rate",
       sweep_options, run_sweep_command},
      {"export", "canopy export --config FILE --output FILE",
       "write the trained model (preprocessing, trunk, taps, pooling, every head) as one TorchScript file "
       "that torch.jit.load reads without canopy",
       [](po::options_description& d, po::positional_options_description&) {
         add_config_options(d);
         d.add_options()("output", po::value<std::string>()->value_name("FILE"),
                         "the model file to write, e.g. model.pt");
         add_progress_option(d);
       },
       run_export_command},
      {"inspect", "canopy inspect PATH [--config FILE] [--verify] [--json]",
       "describe a cache (splits, shapes, dtype, size, fingerprint parts, completeness, whether it matches a "
       "config), a training run's out_dir (running or not, its checkpoint, each head, what was exported) or "
       "a sweep's folder (each run's status, the comparison and what to choose, the command that goes on)",
       [](po::options_description& d, po::positional_options_description& p) {
         add_config_options(d);
         d.add_options()(
             "path", po::value<std::string>()->value_name("PATH"),
             "the cache directory, a training run's out_dir, or a sweep's --out folder (positional)")(
             "verify",
             "a cache: check every shard's checksums, and that the HDF5 headers and the view cache.h5 read "
             "as "
             "the manifest says; a run: check its checkpoint's files and its exported heads against their "
             "checksums")("json",
                          "a training run's out_dir or a sweep's folder: print the report as one JSON "
                          "object, for scripts");
         add_progress_option(d);
         p.add("path", 1);
       },
       run_inspect_command},
      {"trunk show",
       "canopy trunk show (--config FILE | TRUNK_FILE) [--set trunk.KEY=VALUE] [--depth N] [--size S]",
       "load the trunk (hash checked first) and print its module tree, frozen/trainable state, BatchNorm "
       "pinning, blocks and taps; runs no data, unless --size S asks for each tap point's output shape. A "
       "trunk file alone (a model you exported) is shown with the [trunk] keys given by --set "
       "(trunk.expand, trunk.freeze, trunk.taps, trunk.sha256, ...)",
       trunk_show_options, run_trunk_show_command},
      {"trunk extract",
       "canopy trunk extract (--config FILE | TRUNK_FILE) [--set trunk.KEY=VALUE] --output FILE",
       "write the trunk as canopy runs it, up to its taps, as TorchScript: forward returns the taps' "
       "outputs unpooled (trunk.taps, trunk.expand as in a config); a feature extractor for Python, and "
       "what scripts/export_trunk.py compiles into a .pt2 of your own trunk",
       trunk_extract_options, run_trunk_extract_command},
      {"tokenize", "canopy tokenize --vocab FILE (--arff FILE [--attribute NAME] | --input FILE) [options]",
       "token ids of texts (a tokenizer.json's, WordPiece, byte-level BPE or Unigram; a vocab.txt's) as JSON "
       "lines "
       "{\"text\": ..., \"ids\": [...]}",
       tokenize_options, run_tokenize_command},
      {"heads", "canopy heads", "list the head types that can be named in a config",
       [](po::options_description&, po::positional_options_description&) {}, run_heads_command},
      {"keys", "canopy keys",
       "print the reference of every config key: section, type, default, range, meaning",
       [](po::options_description&, po::positional_options_description&) {},
       [](const po::variables_map&, const tasks::HeadRegistry&, std::ostream& out, std::ostream&) {
         out << config_reference();
         return kExitOk;
       }},
      {"version", "canopy version",
       "versions (canopy, LibTorch, HDF5, MPI), the GPU, the cores and memory it may use, the fusion "
       "calibration",
       [](po::options_description&, po::positional_options_description&) {},
       [](const po::variables_map&, const tasks::HeadRegistry&, std::ostream& out, std::ostream&) {
         out << version_text();
         return kExitOk;
       }},
  };
  return kCommands;
}

std::string global_usage() {
  std::ostringstream o;
  o << "canopy: train many task heads at once over a frozen, cached trunk\n\n"
    << "usage: canopy <command> [options]     canopy <command> --help     canopy --version\n\ncommands:\n";
  std::size_t width = 0;
  for (const auto& c : commands()) width = std::max(width, std::strlen(c.name));
  for (const auto& c : commands())
    o << "  " << std::left << std::setw(static_cast<int>(width)) << c.name << " " << c.summary << "\n";
  o << "\nexit codes: 0 ok, 1 data or runtime error, 2 bad usage or config, 3 a head FAILED,\n            "
       "129, 130, 138, 143: stopped by SIGHUP, SIGINT (Ctrl-C), SIGUSR1, SIGTERM; what was done is kept\n";
  return o.str();
}

// The command's options with their help texts, and its positional arguments.
po::options_description describe(const Command& c, po::positional_options_description& positional) {
  po::options_description d("options");
  c.options(d, positional);
  d.add_options()("help,h", "print this help and exit");
  return d;
}

int run_command(const Command& c, const std::vector<std::string>& args, const tasks::HeadRegistry& registry,
                std::ostream& out, std::ostream& err) {
  po::positional_options_description positional;
  const po::options_description desc = describe(c, positional);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(desc).positional(positional).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw ConfigError(detail::str_cat(e.what(), " (usage: ", c.usage, "; see canopy ", c.name, " --help)"));
  }
  if (vm.count("help")) {
    out << "usage: " << c.usage << "\n\n" << c.summary << "\n\n" << desc;
    return kExitOk;
  }
  const std::string name = c.name;
  CANOPY_CHECK(!mpi::distributed() || name == "cache" || name == "train" || name == "run", ConfigError,
               "canopy ", c.name, " runs in one process; under mpirun (", mpi::size(),
               " ranks) only cache, train and run spread their work: start it without mpirun");
  // A long job stops at its next safe point on Ctrl-C, SIGTERM, SIGHUP or SIGUSR1, keeping what
  // it has done; under mpirun every rank stops there when any rank is sent one (agree_on_stop).
  std::optional<StopOnSignal> stop;
  if (name == "cache" || name == "train" || name == "run" || name == "sweep") stop.emplace();
  const int rc = c.run(vm, registry, out, err);
  if (stop && stop_signal() != 0) {
    err << "canopy: " << signal_name(stop_signal()) << " came after the job's last safe point: it finished\n";
  }
  return rc;
}

// " on rank 1 of 3" under mpirun, for error messages; empty otherwise.
std::string on_rank() { return mpi::distributed() ? " on " + mpi::describe_rank() : std::string(); }

// The command named by the first argument (two words for `trunk show`, `trunk extract`) and
// the rest.
const Command& find_command(const std::vector<std::string>& args, std::size_t& consumed) {
  std::string name = args[0];
  consumed = 1;
  if (name == "trunk") {
    const std::string sub = args.size() >= 2 ? args[1] : std::string();
    std::vector<std::string> subs, usages;  // the table's `trunk` commands
    for (const auto& c : commands()) {
      const std::string_view n = c.name;
      if (n.substr(0, 6) != "trunk ") continue;
      subs.emplace_back(n.substr(6));
      usages.emplace_back(c.usage);
    }
    CANOPY_CHECK(std::find(subs.begin(), subs.end(), sub) != subs.end(), ConfigError,
                 "usage: ", join(usages, ", or "),
                 sub.empty() ? std::string() : "; got canopy trunk " + sub + did_you_mean(sub, subs),
                 " (see canopy trunk ", join(subs, " --help, canopy trunk "), " --help)");
    name = "trunk " + sub;
    consumed = 2;
  }
  for (const auto& c : commands()) {
    if (name == c.name) return c;
  }
  throw ConfigError("unknown command '" + name + "'" + did_you_mean(name, cli_commands()) +
                    " (commands: " + join(cli_commands(), ", ") + ")");
}

// What a command wrote to `out` (standard output: perhaps a file on a full disk) must have got
// there: a failed write is an error, exit 1, not a silent loss (as coreutils' tools do).
int checked_output(int rc, std::ostream& out, std::ostream& err) {
  errno = 0;
  out.flush();
  if (out) return rc;
  err << "canopy: error" << on_rank() << ": writing the output failed: " << describe_write_error(errno)
      << "\n";
  return rc == kExitOk ? kExitError : rc;
}

}  // namespace

std::string fit_threads_to_cpu_quota(const JobConfig& config) {
  return fit_threads_to_cpu_quota(!trunk::is_compiled_trunk(config.trunk.path));
}

int run_cli(const std::vector<std::string>& args, const tasks::HeadRegistry& registry, std::ostream& out,
            std::ostream& err) {
  if (args.empty() || args[0] == "help" || args[0] == "--help" || args[0] == "-h") {
    (args.empty() ? err : out) << global_usage();
    return checked_output(args.empty() ? kExitUsage : kExitOk, out, err);
  }
  if (args[0] == "--version" || args[0] == "-V") {
    out << version_text();
    return checked_output(kExitOk, out, err);
  }
  try {
    std::size_t consumed = 0;
    const Command& command = find_command(args, consumed);
    return checked_output(run_command(command,
                                      std::vector<std::string>(
                                          args.begin() + static_cast<std::ptrdiff_t>(consumed), args.end()),
                                      registry, out, err),
                          out, err);
  } catch (const Stopped& e) {
    // Ranks that stopped together say it once, on rank 0.
    if (!stopped_together() || mpi::rank() == 0) err << "canopy: " << printable(e.what()) << "\n";
    return 128 + e.signal();  // as a shell reports a process the signal ended
  } catch (const ConfigError& e) {
    err << "canopy: config error" << on_rank() << ": " << printable(e.what()) << "\n";
    return kExitUsage;
  } catch (const Error& e) {
    err << "canopy: error" << on_rank() << ": " << printable(e.what()) << "\n";
    return kExitError;
  } catch (const c10::Error& e) {
    err << "canopy: LibTorch error" << on_rank() << ": " << printable(e.what_without_backtrace()) << "\n";
    return kExitError;
  } catch (const std::exception& e) {
    err << "canopy: unexpected error" << on_rank() << ": " << printable(e.what()) << "\n";
    return kExitError;
  }
}

int run_cli(int argc, const char* const* argv, const tasks::HeadRegistry& registry) {
  // Under mpirun, one rank of a job; a rank that fails ends every rank at once (the others
  // would wait for it in their next collective call), its error printed first. Ranks that
  // stopped together at a safe point all end here, each with the stop's status.
  const mpi::Session session;
  std::vector<std::string> args(argv + 1, argv + argc);
  const int rc = run_cli(args, registry, std::cout, std::cerr);
  if (rc != kExitOk && mpi::distributed() && !(stopped_together() && rc == 128 + stop_signal())) {
    std::cout.flush();
    std::cerr.flush();
    // mpirun forwards a rank's output asynchronously and drops what it has not read when the
    // job ends: a moment for the error to reach the user first.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    mpi::abort_job(rc);
  }
  return rc;
}

void exit_process(int rc) {
  std::cout.flush();
  std::cerr.flush();
  std::clog.flush();
  std::fflush(nullptr);
#if defined(CANOPY_ASAN) || defined(CANOPY_TSAN)
  if (datasets::hdf5_close_failed()) std::_Exit(rc);  // HDF5's exit handler would crash
  std::exit(rc);
#else
  datasets::close_hdf5();  // what its exit handler would do: flush and close anything left open
  std::_Exit(rc);
#endif
}

std::vector<std::string> cli_commands() {
  std::vector<std::string> names;
  for (const auto& c : commands()) names.push_back(c.name);
  return names;
}

}  // namespace canopy::runners
