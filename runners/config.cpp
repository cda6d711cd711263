#include "canopy/runners/config.h"

#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include <boost/program_options/options_description.hpp>
#include <boost/program_options/parsers.hpp>

#include "canopy/core/error.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/feature_cache.h"

namespace canopy::runners {
namespace po = boost::program_options;

namespace {

const std::set<std::string> kTaskKeys = {
    "kind", "head",     "labels", "label_map", "class_names", "optimizer",           "lr",
    "weight_decay", "momentum", "epochs", "schedule", "step_size", "gamma", "early_stop_patience",
    "label_smoothing", "class_weights", "loss"};

class Values {
 public:
  Values(const std::map<std::string, std::string>& v, std::string source) : v_(v), source_(std::move(source)) {}
  std::string where(const std::string& key) const { return key + " (in " + source_ + ")"; }
  void str(const std::string& key, std::string& out, bool path = false) {
    if (auto it = take(key)) out = path ? expand_env(**it) : **it;
  }
  void i64(const std::string& key, std::int64_t& out) {
    if (auto it = take(key)) out = parse_int(**it, where(key));
  }
  void u64(const std::string& key, std::uint64_t& out) {
    if (auto it = take(key)) {
      const auto v = parse_int(**it, where(key));
      CANOPY_CHECK(v >= 0, ConfigError, where(key), ": expected a non-negative integer, got ", v);
      out = static_cast<std::uint64_t>(v);
    }
  }
  void f64(const std::string& key, double& out) {
    if (auto it = take(key)) out = parse_double(**it, where(key));
  }
  void boolean(const std::string& key, bool& out) {
    if (auto it = take(key)) out = parse_bool(**it, where(key));
  }
  void f64_list(const std::string& key, std::vector<double>& out) {
    if (auto it = take(key)) out = parse_double_list(**it, where(key));
  }
  void i64_list(const std::string& key, std::vector<std::int64_t>& out) {
    if (auto it = take(key)) out = parse_int_list(**it, where(key));
  }
  void str_list(const std::string& key, std::vector<std::string>& out, bool path = false) {
    if (auto it = take(key)) {
      out = split(**it, ',');  // split trims each item
      if (path) {
        for (auto& item : out) item = expand_env(item);
      }
    }
  }
  std::vector<std::string> unused() const {
    std::vector<std::string> out;
    for (const auto& kv : v_) {
      if (!used_.count(kv.first)) out.push_back(kv.first);
    }
    return out;
  }
  const std::map<std::string, std::string>& all() const { return v_; }
  void mark(const std::string& key) { used_.insert(key); }

 private:
  std::optional<const std::string*> take(const std::string& key) {
    const auto it = v_.find(key);
    if (it == v_.end()) return std::nullopt;
    used_.insert(key);
    return &it->second;
  }
  const std::map<std::string, std::string>& v_;
  std::string source_;
  std::set<std::string> used_;
};

}  // namespace

JobConfig job_config_from_values(const std::map<std::string, std::string>& values,
                                 const std::string& source) {
  JobConfig c;
  c.source = source;
  Values v(values, source);
  v.str("data.source", c.data.source);
  v.str("data.dir", c.data.dir, true);
  v.i64("data.train_limit", c.data.train_limit);
  v.i64("data.test_limit", c.data.test_limit);
  v.str("data.train", c.data.train, true);
  v.str("data.test", c.data.test, true);
  v.str_list("data.train_files", c.data.train_files, true);
  v.str_list("data.test_files", c.data.test_files, true);
  v.str("data.text_attribute", c.data.text_attribute);
  v.str("text.vocab", c.text.vocab, true);
  v.boolean("text.lowercase", c.text.lowercase);
  v.i64("text.max_length", c.text.max_length);
  v.i64("preprocess.resize", c.preprocess.resize);
  v.i64("preprocess.channels", c.preprocess.channels);
  v.f64_list("preprocess.mean", c.preprocess.mean);
  v.f64_list("preprocess.std", c.preprocess.std);
  v.str("trunk.path", c.trunk.path, true);
  v.str("trunk.sha256", c.trunk.sha256);
  v.boolean("trunk.allow_unpinned", c.trunk.allow_unpinned);
  v.str("trunk.device", c.trunk.device);
  v.str("trunk.pooling", c.trunk.pooling);
  v.boolean("trunk.optimize", c.trunk.optimize);
  v.str_list("trunk.taps", c.trunk.taps);
  v.str("trunk.freeze", c.trunk.freeze.freeze);
  v.str("trunk.train_only", c.trunk.freeze.train_only);
  v.boolean("trunk.batchnorm_affine_trainable", c.trunk.freeze.batchnorm_affine_trainable);
  v.str("cache.path", c.cache.path, true);
  v.i64("cache.batch_size", c.cache.batch_size);
  v.i64("cache.shard_rows", c.cache.shard_rows);
  v.str("cache.dtype", c.cache.dtype);
  v.f64("cache.memory_cap_mb", c.cache.memory_cap_mb);
  v.str("cache.read_method", c.cache.read_method);
  v.str("train.out_dir", c.train.out_dir, true);
  v.str("train.train_split", c.train.train_split);
  v.str("train.eval_split", c.train.eval_split);
  v.i64("train.batch_size", c.train.batch_size);
  v.i64("train.epochs", c.train.epochs);
  v.u64("train.seed", c.train.seed);
  v.i64("train.workers", c.train.workers);
  v.i64("train.intra_op_threads", c.train.intra_op_threads);
  v.boolean("train.check_fingerprint", c.train.check_fingerprint);
  v.i64("train.checkpoint_steps", c.train.checkpoint_steps);
  v.boolean("train.fail_fast", c.train.fail_fast);
  v.boolean("train.tensorboard", c.train.tensorboard);
  v.boolean("train.fuse", c.train.fuse);
  v.f64("train.fuse_kib", c.train.fuse_kib);

  // Tasks: every key task.<name>.<key>; task names keep the order of first appearance
  // in the map (alphabetical), which is also the order results are reported in.
  std::map<std::string, tasks::TaskConfig> by_name;
  std::vector<std::string> order;
  for (const auto& [key, value] : values) {
    if (key.rfind("task.", 0) != 0) continue;
    const auto dot = key.find('.', 5);
    CANOPY_CHECK(dot != std::string::npos && dot > 5 && dot + 1 < key.size(), ConfigError,
                 "config key '", key, "' (in ", source, "): task keys are task.<name>.<key>");
    const std::string name = key.substr(5, dot - 5);
    const std::string sub = key.substr(dot + 1);
    if (!by_name.count(name)) {
      order.push_back(name);
      by_name[name].name = name;
    }
    if (!kTaskKeys.count(sub)) {
      by_name[name].head_params[sub] = value;  // validated by the head factory
      v.mark(key);
    }
  }
  for (const auto& name : order) {
    auto& t = by_name[name];
    const std::string p = "task." + name + ".";
    v.str(p + "kind", t.kind);
    v.str(p + "head", t.head);
    v.str(p + "labels", t.labels);
    v.i64_list(p + "label_map", t.label_map);
    v.str_list(p + "class_names", t.class_names);
    v.str(p + "optimizer", t.optimizer);
    v.f64(p + "lr", t.lr);
    v.f64(p + "weight_decay", t.weight_decay);
    v.f64(p + "momentum", t.momentum);
    v.i64(p + "epochs", t.epochs);
    v.str(p + "schedule", t.schedule);
    v.i64(p + "step_size", t.step_size);
    v.f64(p + "gamma", t.gamma);
    v.i64(p + "early_stop_patience", t.early_stop_patience);
    v.f64(p + "label_smoothing", t.label_smoothing);
    v.f64_list(p + "class_weights", t.class_weights);
    v.str(p + "loss", t.loss);
    c.tasks.push_back(t);
  }
  const auto unused = v.unused();
  CANOPY_CHECK(unused.empty(), ConfigError, "unknown config key(s) in ", source, ": ",
               join(unused, ", "), " (see `canopy <command> --dump-config` for every key)");
  validate_job_config(c);
  return c;
}

void validate_job_config(const JobConfig& c) {
  const std::set<std::string> sources = {"fashion-mnist", "mnist", "arff", "image-csv", "image-folders"};
  CANOPY_CHECK(sources.count(c.data.source), ConfigError,
               "data.source: expected fashion-mnist, mnist, arff, image-csv or image-folders, got '", c.data.source, "'");
  if (reads_image_files(c.data)) {
    CANOPY_CHECK(!c.data.train.empty() && !c.data.test.empty(), ConfigError, "data.source = ", c.data.source,
                 " needs data.train and data.test (", c.data.source == "image-csv" ? "CSV manifests" : "class folders", ")");
  }
  if (c.data.source == "arff") {
    CANOPY_CHECK(!c.data.train_files.empty() && !c.data.test_files.empty(), ConfigError,
                 "data.source = arff needs data.train_files and data.test_files (label_name:path.arff, ...)");
    datasets::validate_tokenizer_config(c.text);
  }
  CANOPY_CHECK(c.data.train_limit >= 0 && c.data.test_limit >= 0, ConfigError,
               "data.train_limit and data.test_limit must be >= 0, got ", c.data.train_limit, " and ",
               c.data.test_limit);
  datasets::validate_preprocess_config(c.preprocess);
  trunk::validate_trunk_config(c.trunk);
  CANOPY_CHECK(c.cache.batch_size > 0, ConfigError, "cache.batch_size must be > 0, got ", c.cache.batch_size);
  CANOPY_CHECK(!c.cache.path.empty(), ConfigError, "cache.path is empty");
  CANOPY_CHECK(c.cache.shard_rows > 0 && c.cache.shard_rows % c.cache.batch_size == 0, ConfigError,
               "cache.shard_rows must be a positive multiple of cache.batch_size (", c.cache.batch_size,
               "), got ", c.cache.shard_rows);
  datasets::parse_storage_dtype(c.cache.dtype);
  datasets::parse_read_method(c.cache.read_method);
  CANOPY_CHECK(c.cache.memory_cap_mb >= 0, ConfigError, "cache.memory_cap_mb must be >= 0 (0: no cap), got ",
               c.cache.memory_cap_mb);
  CANOPY_CHECK(c.train.batch_size > 0, ConfigError, "train.batch_size must be > 0, got ", c.train.batch_size);
  CANOPY_CHECK(c.train.epochs > 0, ConfigError, "train.epochs must be > 0, got ", c.train.epochs);
  CANOPY_CHECK(c.train.workers >= 0, ConfigError, "train.workers must be >= 0 (0: one per core), got ",
               c.train.workers);
  CANOPY_CHECK(c.train.checkpoint_steps >= 0, ConfigError, "train.checkpoint_steps must be >= 0, got ",
               c.train.checkpoint_steps);
  CANOPY_CHECK(c.train.fuse_kib >= 0, ConfigError, "train.fuse_kib must be >= 0, got ", c.train.fuse_kib);
  CANOPY_CHECK(c.train.intra_op_threads > 0, ConfigError, "train.intra_op_threads must be > 0, got ",
               c.train.intra_op_threads);
  for (const auto& t : c.tasks) tasks::validate_task_config(t, 0);
}

JobConfig load_job_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  CANOPY_CHECK(in, ConfigError, "cannot open config file '", path, "'");
  std::map<std::string, std::string> values;
  try {
    po::options_description none;
    const auto parsed = po::parse_config_file(in, none, /*allow_unregistered=*/true);
    for (const auto& opt : parsed.options) {
      CANOPY_CHECK(!values.count(opt.string_key), ConfigError, "config key '", opt.string_key,
                   "' appears twice in ", path);
      values[opt.string_key] = opt.value.empty() ? std::string() : trim(opt.value.front());
    }
  } catch (const po::error& e) {
    throw ConfigError(detail::str_cat("cannot parse config file '", path, "': ", e.what()));
  }
  for (const auto& o : overrides) {
    const auto eq = o.find('=');
    CANOPY_CHECK(eq != std::string::npos && eq > 0, ConfigError, "--set expects key=value, got '", o, "'");
    values[trim(o.substr(0, eq))] = trim(o.substr(eq + 1));
  }
  return job_config_from_values(values, path);
}

std::string dump_config(const JobConfig& c) {
  auto list = [](const auto& xs) {
    std::ostringstream o;
    o.precision(10);
    for (std::size_t i = 0; i < xs.size(); ++i) o << (i ? "," : "") << xs[i];
    return o.str();
  };
  std::ostringstream o;
  o.precision(10);
  o << "# resolved canopy configuration (from " << c.source << ")\n";
  o << "[data]\nsource = " << c.data.source << "\ndir = " << c.data.dir
    << "\ntrain_limit = " << c.data.train_limit << "\ntest_limit = " << c.data.test_limit << "\n";
  if (!c.data.train.empty() || !c.data.test.empty()) {
    o << "train = " << c.data.train << "\ntest = " << c.data.test << "\n";
  }
  if (!c.data.train_files.empty() || !c.data.test_files.empty()) {
    o << "train_files = " << list(c.data.train_files) << "\ntest_files = " << list(c.data.test_files)
      << "\ntext_attribute = " << c.data.text_attribute << "\n";
  }
  o << "\n";
  o << "[text]\nvocab = " << c.text.vocab << "\nlowercase = " << (c.text.lowercase ? "true" : "false")
    << "\nmax_length = " << c.text.max_length << "\n\n";
  o << "[preprocess]\nresize = " << c.preprocess.resize << "\nchannels = " << c.preprocess.channels
    << "\nmean = " << list(c.preprocess.mean) << "\nstd = " << list(c.preprocess.std) << "\n\n";
  o << "[trunk]\npath = " << c.trunk.path << "\nsha256 = " << c.trunk.sha256
    << "\nallow_unpinned = " << (c.trunk.allow_unpinned ? "true" : "false")
    << "\ndevice = " << c.trunk.device << "\npooling = " << c.trunk.pooling
    << "\ntaps = " << list(c.trunk.taps) << "\noptimize = " << (c.trunk.optimize ? "true" : "false")
    << "\nfreeze = " << c.trunk.freeze.freeze << "\ntrain_only = " << c.trunk.freeze.train_only
    << "\nbatchnorm_affine_trainable = " << (c.trunk.freeze.batchnorm_affine_trainable ? "true" : "false") << "\n\n";
  o << "[cache]\npath = " << c.cache.path << "\nbatch_size = " << c.cache.batch_size
    << "\nshard_rows = " << c.cache.shard_rows << "\ndtype = " << c.cache.dtype
    << "\nmemory_cap_mb = " << c.cache.memory_cap_mb << "\nread_method = " << c.cache.read_method << "\n\n";
  o << "[train]\nout_dir = " << c.train.out_dir << "\ntrain_split = " << c.train.train_split
    << "\neval_split = " << c.train.eval_split << "\nbatch_size = " << c.train.batch_size
    << "\nepochs = " << c.train.epochs << "\nseed = " << c.train.seed << "\nworkers = " << c.train.workers
    << "\nintra_op_threads = " << c.train.intra_op_threads
    << "\ncheck_fingerprint = " << (c.train.check_fingerprint ? "true" : "false")
    << "\ncheckpoint_steps = " << c.train.checkpoint_steps << "\nfail_fast = " << (c.train.fail_fast ? "true" : "false")
    << "\ntensorboard = " << (c.train.tensorboard ? "true" : "false")
    << "\nfuse = " << (c.train.fuse ? "true" : "false") << "\nfuse_kib = " << c.train.fuse_kib << "\n";
  for (const auto& t : c.tasks) {
    o << "\n[task." << t.name << "]\nkind = " << t.kind << "\nhead = " << t.head << "\nlabels = " << t.labels << "\n";
    if (!t.label_map.empty()) o << "label_map = " << list(t.label_map) << "\n";
    if (!t.class_names.empty()) o << "class_names = " << list(t.class_names) << "\n";
    o << "optimizer = " << t.optimizer << "\nlr = " << t.lr << "\nweight_decay = " << t.weight_decay
      << "\nmomentum = " << t.momentum << "\nepochs = " << t.epochs << "\nschedule = " << t.schedule
      << "\nstep_size = " << t.step_size << "\ngamma = " << t.gamma << "\nearly_stop_patience = " << t.early_stop_patience
      << "\nlabel_smoothing = " << t.label_smoothing << "\n";
    if (!t.class_weights.empty()) o << "class_weights = " << list(t.class_weights) << "\n";
    if (!t.loss.empty()) o << "loss = " << t.loss << "\n";
    for (const auto& [k, val] : t.head_params) o << k << " = " << val << "\n";
  }
  return o.str();
}

}  // namespace canopy::runners
