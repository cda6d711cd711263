#include "canopy/runners/cli.h"

#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>

#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>
#include <torch/version.h>

#include "canopy/core/device.h"
#include "canopy/core/error.h"
#include "canopy/core/progress.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/text.h"
#include "canopy/runners/cache_job.h"
#include "canopy/runners/config.h"
#include "canopy/runners/predict_job.h"
#include "canopy/runners/train_job.h"
#include "canopy/core/fs.h"
#include "canopy/trunk/trunk.h"

namespace canopy::runners {
namespace po = boost::program_options;

namespace {

const char* kUsage = R"(canopy: train many task heads at once over a frozen, cached trunk

usage: canopy <command> [options]

commands:
  cache   run the frozen trunk once per sample and store features in the HDF5 cache
  train   train every task's head concurrently on the cached features
  run     cache (if needed), then train
  predict --config FILE --input IMAGES [--output FILE] [--format csv|jsonl] [--limit N]
          run the trunk and every trained head on new images (an idx file) in one pass
  inspect PATH [--config FILE] [--verify]
          describe a cache: splits, shapes, dtype, size, fingerprint parts, completeness,
          whether it matches a config; --verify checks every shard's checksums
  trunk show --config FILE [--depth N] [--allow-unpinned]
          load the trunk (hash checked first) and print its module tree: parameter
          counts, frozen/trainable under the config's freeze policy, BatchNorm layers and
          how they are pinned, blocks and tap points; runs no data
  tokenize --vocab FILE [--max-length N] [--cased] (--arff FILE [--attribute NAME] | --input FILE)
          WordPiece token ids of texts as JSON lines {"text": ..., "ids": [...]}; texts
          from an ARFF string attribute (default Text) or one per line of FILE
  heads   list the head types that can be named in a config
  version print versions

options for cache, train and run:
  --config FILE        the job configuration (INI; see configs/)
  --set KEY=VALUE      override a config value, e.g. --set train.epochs=5 (repeatable)
  --dump-config        print the resolved configuration and exit
  --force              cache: rebuild even if the cache is up to date
  --resume             train: continue from the last checkpoint in <train.out_dir>/checkpoint
  --allow-unpinned     load a trunk whose SHA-256 the config does not pin
                       (trunk.allow_unpinned = true; the hash to pin is printed)
  --fail-fast          train: stop every head when one fails (default: only that head stops)
  --no-fuse            train: train every head on its own instead of fusing same-shape
                       heads into batched operations (train.fuse = false)
  --progress MODE      auto (bar on a terminal, lines otherwise), bar, lines or quiet

exit codes: 0 ok, 1 data or runtime error, 2 bad usage or config, 3 a head FAILED
)";

ProgressStyle parse_progress(const std::string& s) {
  if (s == "auto") return ProgressStyle::kAuto;
  if (s == "bar") return ProgressStyle::kBar;
  if (s == "lines") return ProgressStyle::kLines;
  if (s == "quiet") return ProgressStyle::kQuiet;
  throw ConfigError("--progress: expected auto, bar, lines or quiet, got '" + s + "'");
}

// Parses a command's options; a malformed command line is a ConfigError ending with `hint`.
po::variables_map parse_options(const po::options_description& desc, const std::vector<std::string>& args,
                                const std::string& hint,
                                const po::positional_options_description* positional = nullptr) {
  po::variables_map vm;
  try {
    auto parser = po::command_line_parser(args).options(desc);
    if (positional) parser.positional(*positional);
    po::store(parser.run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw ConfigError(std::string(e.what()) + " (" + hint + ")");
  }
  return vm;
}

// The job config named by --config, with every --set applied (and --allow-unpinned, for the
// commands that take it).
JobConfig config_from(const po::variables_map& vm, std::vector<std::string> extra_overrides = {}) {
  std::vector<std::string> overrides = vm.count("set") ? vm["set"].as<std::vector<std::string>>()
                                                       : std::vector<std::string>{};
  if (vm.count("allow-unpinned")) overrides.push_back("trunk.allow_unpinned=true");
  overrides.insert(overrides.end(), extra_overrides.begin(), extra_overrides.end());
  return load_job_config(vm["config"].as<std::string>(), overrides);
}

void print_cache_report(const CacheReport& r, std::ostream& out) {
  out << "cache " << r.path << ": " << (r.rebuilt ? "built" : r.reason) << "\n";
  out << "  fingerprint " << r.fingerprint << "\n  features    " << r.feature_dim << " per sample\n";
  for (const auto& [split, rows] : r.rows) out << "  " << std::left << std::setw(11) << split << " " << rows << " rows\n";
  if (r.rebuilt) {
    out << std::fixed << std::setprecision(1) << "  time        " << r.seconds << " s (" << r.rows_computed
        << " rows through the trunk: " << r.trunk_seconds << " s; waiting on writes: " << r.write_wait_seconds
        << " s)\n" << std::defaultfloat;
  }
}

int run_command(const std::string& command, const std::vector<std::string>& rest,
                const tasks::HeadRegistry& registry, std::ostream& out, std::ostream& err) {
  if (command == "heads") {
    out << "registered heads:\n";
    for (const auto& [name, description] : registry.list()) {
      out << "  " << std::left << std::setw(12) << name << description << "\n";
    }
    return kExitOk;
  }
  if (command == "version") {
    out << "canopy 0.1.0\nLibTorch " << TORCH_VERSION << "\nCUDA available: "
        << (cuda_available() ? "yes" : "no") << "\n";
    return kExitOk;
  }
  if (command == "inspect") {
    po::options_description idesc("options");
    idesc.add_options()("path", po::value<std::string>(), "")("config", po::value<std::string>(), "")(
        "set", po::value<std::vector<std::string>>(), "")("verify", "");
    po::positional_options_description pos;
    pos.add("path", 1);
    const auto ivm = parse_options(idesc, rest, "usage: canopy inspect PATH [--config FILE] [--verify]", &pos);
    std::optional<JobConfig> config;
    if (ivm.count("config")) config = config_from(ivm);
    CANOPY_CHECK(ivm.count("path") || config, ConfigError, "canopy inspect: give a cache PATH or --config FILE");
    const std::string path = ivm.count("path") ? ivm["path"].as<std::string>() : config->cache.path;
    bool ok = false;
    out << inspect_cache(path, config ? &*config : nullptr, ivm.count("verify") > 0, &ok);
    return ok ? kExitOk : kExitError;
  }
  if (command == "predict") {
    po::options_description pdesc("options");
    pdesc.add_options()("config", po::value<std::string>(), "")("set", po::value<std::vector<std::string>>(), "")(
        "input", po::value<std::string>(), "")("output", po::value<std::string>(), "")(
        "format", po::value<std::string>()->default_value("csv"), "")("limit", po::value<std::int64_t>()->default_value(0), "")(
        "progress", po::value<std::string>()->default_value("auto"), "")("allow-unpinned", "");
    const auto pvm = parse_options(pdesc, rest, "see canopy --help");
    CANOPY_CHECK(pvm.count("config") && pvm.count("input"), ConfigError,
                 "canopy predict: --config FILE and --input IMAGES are required");
    const JobConfig config = config_from(pvm);
    PredictOptions options;
    options.input = pvm["input"].as<std::string>();
    options.limit = pvm["limit"].as<std::int64_t>();
    options.format = pvm["format"].as<std::string>();
    const ProgressStyle style = parse_progress(pvm["progress"].as<std::string>());
    if (pvm.count("output")) {
      const std::string path = pvm["output"].as<std::string>();
      std::ostringstream buffer;
      const auto rows = run_predict(config, registry, options, buffer, style);
      write_file_atomic(path, buffer.str());
      err << "canopy: wrote " << rows << " predictions to " << path << "\n";
    } else {
      run_predict(config, registry, options, out, style);
    }
    return kExitOk;
  }
  if (command == "trunk") {
    CANOPY_CHECK(!rest.empty() && rest[0] == "show", ConfigError, "usage: canopy trunk show --config FILE [--depth N]");
    po::options_description tdesc("options");
    tdesc.add_options()("config", po::value<std::string>(), "")("set", po::value<std::vector<std::string>>(), "")(
        "depth", po::value<int>()->default_value(2), "")("allow-unpinned", "");
    const auto tvm = parse_options(tdesc, std::vector<std::string>(rest.begin() + 1, rest.end()),
                                   "usage: canopy trunk show --config FILE [--depth N]");
    CANOPY_CHECK(tvm.count("config"), ConfigError, "canopy trunk show: --config FILE is required");
    const JobConfig config = config_from(tvm);
    out << trunk::Trunk::load(config.trunk).show(tvm["depth"].as<int>());
    return kExitOk;
  }
  if (command == "tokenize") {
    po::options_description kdesc("options");
    kdesc.add_options()("vocab", po::value<std::string>(), "")("max-length", po::value<std::int64_t>()->default_value(256), "")(
        "cased", "")("arff", po::value<std::string>(), "")("attribute", po::value<std::string>()->default_value("Text"), "")(
        "input", po::value<std::string>(), "");
    const auto kvm = parse_options(kdesc, rest, "see canopy --help");
    CANOPY_CHECK(kvm.count("vocab") && (kvm.count("arff") != kvm.count("input")), ConfigError,
                 "canopy tokenize: --vocab FILE and one of --arff FILE or --input FILE are required");
    datasets::TokenizerConfig tc;
    tc.vocab = kvm["vocab"].as<std::string>();
    tc.max_length = kvm["max-length"].as<std::int64_t>();
    tc.lowercase = kvm.count("cased") == 0;
    const datasets::WordPieceTokenizer tokenizer(tc);
    const std::vector<std::string> texts =
        kvm.count("arff") ? datasets::read_arff_texts(kvm["arff"].as<std::string>(), kvm["attribute"].as<std::string>())
                          : datasets::read_text_lines(kvm["input"].as<std::string>());
    for (const auto& t : texts) out << nlohmann::json{{"text", t}, {"ids", tokenizer.encode(t)}}.dump() << "\n";
    return kExitOk;
  }
  if (command != "cache" && command != "train" && command != "run") {
    throw ConfigError("unknown command '" + command +
                      "' (commands: cache, train, run, predict, inspect, trunk, tokenize, heads, version)");
  }
  po::options_description desc("options");
  desc.add_options()("config", po::value<std::string>(), "")("set", po::value<std::vector<std::string>>(), "")(
      "dump-config", "")("allow-unpinned", "")("force", "")("resume", "")("fail-fast", "")("no-fuse", "")("progress", po::value<std::string>()->default_value("auto"), "")("help,h", "");
  const auto vm = parse_options(desc, rest, "see canopy --help");
  if (vm.count("help")) {
    out << kUsage;
    return kExitOk;
  }
  CANOPY_CHECK(vm.count("config"), ConfigError, "canopy ", command, ": --config FILE is required");
  std::vector<std::string> flags;
  if (vm.count("fail-fast")) flags.push_back("train.fail_fast=true");
  if (vm.count("no-fuse")) flags.push_back("train.fuse=false");
  const JobConfig config = config_from(vm, flags);
  if (vm.count("dump-config")) {
    out << dump_config(config);
    return kExitOk;
  }
  const ProgressStyle style = parse_progress(vm["progress"].as<std::string>());
  if (command == "cache" || command == "run") {
    print_cache_report(run_cache(config, vm.count("force") > 0, nullptr, style), out);
  }
  if (command == "train" || command == "run") {
    for (const auto& t : config.tasks) {
      CANOPY_CHECK(registry.contains(t.head), ConfigError, "task '", t.name, "': unknown head '", t.head,
                   "' (see `canopy heads`)");
    }
    const TrainReport report = run_train(config, registry, style, vm.count("resume") > 0);
    out << "\n" << format_summary(report);
    out << "heads, metrics (metrics.jsonl, metrics.csv, tensorboard/), checkpoints and the resolved config are in "
        << report.out_dir << "\n";
    if (report.any_failed()) {
      err << "canopy: at least one head FAILED (see above); the others were trained and saved\n";
      return kExitHeadFailed;
    }
  }
  return kExitOk;
}

}  // namespace

int run_cli(const std::vector<std::string>& args, const tasks::HeadRegistry& registry, std::ostream& out,
            std::ostream& err) {
  if (args.empty() || args[0] == "help" || args[0] == "--help" || args[0] == "-h") {
    (args.empty() ? err : out) << kUsage;
    return args.empty() ? kExitUsage : kExitOk;
  }
  try {
    return run_command(args[0], std::vector<std::string>(args.begin() + 1, args.end()), registry, out, err);
  } catch (const ConfigError& e) {
    err << "canopy: config error: " << e.what() << "\n";
    return kExitUsage;
  } catch (const Error& e) {
    err << "canopy: error: " << e.what() << "\n";
    return kExitError;
  } catch (const c10::Error& e) {
    err << "canopy: LibTorch error: " << e.what_without_backtrace() << "\n";
    return kExitError;
  } catch (const std::exception& e) {
    err << "canopy: unexpected error: " << e.what() << "\n";
    return kExitError;
  }
}

int run_cli(int argc, const char* const* argv, const tasks::HeadRegistry& registry) {
  std::vector<std::string> args(argv + 1, argv + argc);
  return run_cli(args, registry, std::cout, std::cerr);
}

}  // namespace canopy::runners
