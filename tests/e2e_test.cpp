// End to end on real data: Fashion-MNIST (a small slice) through a tiny TorchScript trunk
// made at test time -> HDF5 cache -> three heads trained concurrently -> metrics, exports.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include <ATen/ops/allclose.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/nn/modules/linear.h>
#include <limits>
#include "canopy/core/device.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/sha256.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/feature_cache.h"
#include "canopy/heads/linear.h"
#include "canopy/runners/cache_job.h"
#include "canopy/runners/cli.h"
#include "canopy/runners/config.h"
#include "canopy/runners/export.h"
#include "canopy/runners/model_file.h"
#include "canopy/runners/train_job.h"
#include "canopy/trunk/trunk.h"
#include "support/test_support.h"

namespace canopy::runners {
namespace {

class EndToEnd : public ::testing::Test {
 protected:
  void SetUp() override {
    trunk_path_ = testing::write_tiny_trunk(dir_.file("trunk.pt"));
    std::ostringstream ini;
    ini << "[data]\ndir = " << testing::fashion_mnist_dir() << "\ntrain_limit = 2000\ntest_limit = 500\n"
        << "[preprocess]\nresize = 28\nchannels = 3\nmean = 0.5\nstd = 0.5\n"
        << "[trunk]\npath = " << trunk_path_ << "\ndevice = cpu\nallow_unpinned = true\n"
        << "[cache]\npath = " << dir_.file("cache") << "\nbatch_size = 256\nshard_rows = 512\n"
        << "[train]\nout_dir = " << dir_.file("out") << "\nepochs = 8\nbatch_size = 64\n"
        << "[task.class_linear]\nhead = linear\nlr = 0.01\n"
        << "[task.class_mlp]\nhead = mlp\nhead.hidden = 64\nlr = 0.003\n"
        << "[task.group]\nhead = linear\nlabel_map = 0,1,0,0,0,2,0,2,3,2\nlr = 0.01\n";
    config_path_ = dir_.file("job.ini");
    write_file_atomic(config_path_, ini.str());
    registry_ = tasks::HeadRegistry();
    tasks::register_builtin_heads(registry_);
  }
  testing::TempDir dir_;
  std::string trunk_path_, config_path_;
  tasks::HeadRegistry registry_;
};

TEST_F(EndToEnd, CacheThenTrainThreeHeadsConcurrently) {
  const JobConfig config = load_job_config(config_path_);
  trunk::Trunk trunk = trunk::Trunk::load(config.trunk);
  const auto before = trunk.state_snapshot();

  const CacheReport cache = run_cache(config, false, &trunk, ProgressStyle::kQuiet);
  EXPECT_TRUE(cache.rebuilt);
  EXPECT_EQ(cache.rows.at("train"), 2000);
  EXPECT_EQ(cache.rows.at("test"), 500);
  EXPECT_EQ(cache.feature_dim, 32);

  const TrainReport report = run_train(config, registry_, ProgressStyle::kQuiet);
  ASSERT_EQ(report.tasks.size(), 3u);
  for (const auto& t : report.tasks) {
    EXPECT_EQ(t.state, tasks::TaskState::kDone) << t.name << ": " << t.failure;
    EXPECT_EQ(t.epochs, 8);
    EXPECT_TRUE(path_exists(t.weights_path)) << t.weights_path;
    EXPECT_TRUE(path_exists(dir_.file("out/heads/" + t.name + ".json")));
  }
  // Far above chance (10% and ~25%), as real features of real images must give.
  EXPECT_GT(report.tasks[0].eval.accuracy, 0.55) << "class_linear";
  EXPECT_GT(report.tasks[1].eval.accuracy, 0.55) << "class_mlp";
  EXPECT_GT(report.tasks[2].eval.accuracy, 0.80) << "group";
  const std::string summary = format_summary(report);
  EXPECT_NE(summary.find("class -> 4 groups"), std::string::npos) << summary;

  // The trunk did all its work and nothing in it moved: parameters and BatchNorm buffers.
  const auto after = trunk.state_snapshot();
  ASSERT_EQ(before.size(), after.size());
  ASSERT_EQ(before.size(), 5u);
  for (std::size_t i = 0; i < before.size(); ++i) {
    EXPECT_EQ(before[i].first, after[i].first);
    EXPECT_TRUE(testing::bitwise_equal(before[i].second, after[i].second)) << before[i].first;
  }
  // Metrics files hold one line per head per epoch.
  const std::string jsonl = read_file(dir_.file("out/metrics.jsonl"));
  EXPECT_EQ(std::count(jsonl.begin(), jsonl.end(), '\n'), 3 * 8);
  EXPECT_TRUE(path_exists(dir_.file("out/config.ini")));
  // The exported head is the last epoch's (docs/training.md): its card's accuracy is the
  // last metrics row's, and that row says the head is done.
  std::istringstream rows(jsonl);
  std::map<std::string, nlohmann::json> last;
  for (std::string line; std::getline(rows, line);) {
    const auto row = nlohmann::json::parse(line);
    last[row.at("task").get<std::string>()] = row;
  }
  for (const auto& t : report.tasks) {
    const auto card = nlohmann::json::parse(read_file(dir_.file("out/heads/" + t.name + ".json")));
    EXPECT_EQ(last.at(t.name).at("epoch"), 8) << t.name;
    EXPECT_EQ(last.at(t.name).at("state"), "done") << t.name;
    EXPECT_DOUBLE_EQ(card.at("eval_accuracy").get<double>(),
                     last.at(t.name).at("eval_accuracy").get<double>())
        << t.name;
  }
}

TEST_F(EndToEnd, CacheIsReusedRebuiltOnChangeAndStaleCacheRefused) {
  const JobConfig config = load_job_config(config_path_);
  EXPECT_TRUE(run_cache(config, false, nullptr, ProgressStyle::kQuiet).rebuilt);
  const CacheReport again = run_cache(config, false, nullptr, ProgressStyle::kQuiet);
  EXPECT_FALSE(again.rebuilt);
  EXPECT_NE(again.reason.find("up to date"), std::string::npos);

  const JobConfig changed = load_job_config(config_path_, {"preprocess.resize=32"});
  EXPECT_TRUE(testing::throws_with<DataError>([&] { run_train(changed, registry_, ProgressStyle::kQuiet); },
                                              {"preprocess", "resize=28", "resize=32", "canopy cache"}));
  const CacheReport rebuilt = run_cache(changed, false, nullptr, ProgressStyle::kQuiet);
  EXPECT_TRUE(rebuilt.rebuilt);
  EXPECT_NE(rebuilt.reason.find("resize=28"), std::string::npos) << rebuilt.reason;
}

TEST_F(EndToEnd, StreamingTrainingStaysUnderItsMemoryCap) {
  // 2000 x 128 float features = 1 MiB; a 0.75 MiB cap forces streaming.
  const JobConfig config =
      load_job_config(config_path_, {"trunk.pooling=flatten", "cache.memory_cap_mb=0.75", "train.epochs=4",
                                     "cache.batch_size=64", "cache.shard_rows=128"});
  run_cache(config, false, nullptr, ProgressStyle::kQuiet);
  const TrainReport report = run_train(config, registry_, ProgressStyle::kQuiet);
  EXPECT_NE(report.source.find("streaming"), std::string::npos) << report.source;
  EXPECT_GT(report.source_peak_bytes, 0u);
  EXPECT_LE(report.source_peak_bytes, static_cast<std::uint64_t>(0.75 * 1024 * 1024));
  for (const auto& t : report.tasks) {
    EXPECT_EQ(t.state, tasks::TaskState::kDone) << t.name << ": " << t.failure;
    EXPECT_EQ(t.epochs, 4);
  }
  EXPECT_GT(report.tasks[0].eval.accuracy, 0.55) << "streamed batches train as well";
  // The same cache read whole gives a report that says so.
  const JobConfig whole = load_job_config(config_path_, {"trunk.pooling=flatten", "train.epochs=1",
                                                         "cache.batch_size=64", "cache.shard_rows=128"});
  EXPECT_EQ(run_train(whole, registry_, ProgressStyle::kQuiet).source, "in memory");
}

// A head that throws at a chosen step, and one whose output becomes NaN.
class FaultyHead : public heads::Head {
 public:
  FaultyHead(std::int64_t in, std::int64_t out, std::string mode, std::int64_t after)
      : mode_(std::move(mode)), after_(after) {
    linear_ = register_module("linear", torch::nn::Linear(in, out));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    if (is_training() && ++calls_ > after_) {
      if (mode_ == "throw") throw std::runtime_error("faulty head gave up");
      return linear_->forward(x) * std::numeric_limits<float>::quiet_NaN();
    }
    return linear_->forward(x);
  }
  std::string describe() const override { return "faulty " + mode_; }

 private:
  std::string mode_;
  std::int64_t after_;
  std::int64_t calls_ = 0;
  torch::nn::Linear linear_{nullptr};
};

TEST_F(EndToEnd, AFailingHeadDoesNotStopTheOthers) {
  registry_.add(
      "faulty",
      [](const tasks::HeadSpec& s) {
        return std::make_shared<FaultyHead>(s.in_features, s.out_features,
                                            s.params.get_string("mode", "throw"),
                                            s.params.get_int("after", 5));
      },
      "test head that fails");
  std::ofstream(config_path_, std::ios::app)
      << "[task.z_throws]\nhead = faulty\nhead.mode = throw\nhead.after = 40\n"
      << "[task.z_nan]\nhead = faulty\nhead.mode = nan\nhead.after = 70\n";
  const JobConfig config = load_job_config(config_path_, {"train.epochs=3"});
  run_cache(config, false, nullptr, ProgressStyle::kQuiet);
  const TrainReport report = run_train(config, registry_, ProgressStyle::kQuiet);
  ASSERT_EQ(report.tasks.size(), 5u);
  EXPECT_TRUE(report.any_failed());
  for (const auto& t : report.tasks) {
    if (t.name == "z_throws") {
      EXPECT_EQ(t.state, tasks::TaskState::kFailed);
      EXPECT_NE(t.failure.find("epoch 2 step 9: faulty head gave up"), std::string::npos)
          << t.failure;  // 32 steps/epoch
    } else if (t.name == "z_nan") {
      EXPECT_EQ(t.state, tasks::TaskState::kFailed);
      EXPECT_NE(t.failure.find("epoch 3 step 7: loss is nan"), std::string::npos) << t.failure;
    } else {
      EXPECT_EQ(t.state, tasks::TaskState::kDone) << t.name;
      EXPECT_EQ(t.epochs, 3) << t.name;
      EXPECT_TRUE(path_exists(t.weights_path));
    }
  }
  EXPECT_NE(format_summary(report).find("task 'z_throws' FAILED at epoch 2 step 9"), std::string::npos);

  // The CLI exits 3 when a head failed; --fail-fast stops everything at the first failure.
  std::ostringstream out, err;
  EXPECT_EQ(run_cli({"train", "--config", config_path_, "--progress", "quiet", "--set", "train.epochs=3"},
                    registry_, out, err),
            kExitHeadFailed);
  err.str("");
  EXPECT_EQ(run_cli({"train", "--config", config_path_, "--progress", "quiet", "--set", "train.epochs=3",
                     "--fail-fast"},
                    registry_, out, err),
            kExitError);
  EXPECT_NE(err.str().find("head 'z_throws' FAILED at epoch 2 step 9"), std::string::npos) << err.str();
}

TEST_F(EndToEnd, MultilabelAttributesTrainNextToMulticlassHeads) {
  // upper body, lower body, long sleeves, footwear, derived from the class.
  std::ofstream(config_path_, std::ios::app)
      << "[task.attributes]\nkind = multilabel\nhead = mlp\nhead.hidden = 64\n"
      << "class_names = upper,lower,sleeves,footwear\n"
      << "label_map = 1,2,5,3,5,8,5,8,0,8\nlr = 0.003\n";
  const JobConfig config = load_job_config(config_path_, {"train.epochs=4"});
  run_cache(config, false, nullptr, ProgressStyle::kQuiet);
  const TrainReport report = run_train(config, registry_, ProgressStyle::kQuiet);
  const auto& t = report.tasks.front();
  ASSERT_EQ(t.name, "attributes");
  EXPECT_EQ(t.state, tasks::TaskState::kDone) << t.failure;
  EXPECT_EQ(t.labels, "class -> 4 labels");
  EXPECT_GT(t.eval.mean_ap.value_or(0), 0.8) << "mean AP of real attributes";
  EXPECT_GT(t.eval.accuracy, 0.5) << "exact-match ratio";
  const std::string card = read_file(dir_.file("out/heads/attributes.json"));
  EXPECT_NE(card.find("\"kind\": \"multilabel\""), std::string::npos);
  // The summary gives each label a row: its F1 and support as the metrics computed them.
  const std::string summary = format_summary(report);
  ASSERT_NE(summary.find("per-label scores of 'attributes' on the eval split"), std::string::npos) << summary;
  ASSERT_EQ(t.eval.labels.size(), 4U);
  const char* names[] = {"upper", "lower", "sleeves", "footwear"};
  for (std::size_t j = 0; j < 4; ++j) {
    const auto& l = t.eval.labels[j];
    std::istringstream row(summary.substr(summary.find(std::string("\n") + names[j] + " ") + 1));
    std::string name;
    double threshold = -1, precision = -1, recall = -1, f1 = -1;
    std::string ap;
    std::int64_t support = -1, predicted = -1;
    row >> name >> threshold >> precision >> recall >> f1 >> ap >> support >> predicted;
    EXPECT_EQ(threshold, 0.5) << names[j] << ": threshold 0.5 unless set";
    EXPECT_NEAR(f1, l.f1, 5e-4) << names[j] << "\n" << summary;
    EXPECT_NEAR(recall, l.recall, 5e-4) << names[j];
    EXPECT_EQ(support, l.support) << names[j];
    EXPECT_EQ(predicted, l.predicted) << names[j];
    EXPECT_GT(l.support, 0) << names[j] << ": every attribute occurs in the eval split";
  }
}

TEST_F(EndToEnd, RegressionHeadLearnsInkNextToClassifiers) {
  std::ofstream(config_path_, std::ios::app)
      << "[task.ink]\nkind = regression\nlabels = ink\nhead = mlp\nhead.hidden = 32\n"
      << "lr = 0.003\n[task.ink_l1]\nkind = regression\nlabels = ink\nloss = l1\n";
  const JobConfig config = load_job_config(config_path_, {"train.epochs=6"});
  run_cache(config, false, nullptr, ProgressStyle::kQuiet);
  const auto cache = datasets::FeatureCache::open(config.cache.path);
  EXPECT_TRUE(cache.meta().is_float_label("ink"));
  const auto test = cache.load_split("test");
  ASSERT_EQ(test.labels.at("ink").scalar_type(), at::kDouble);
  const TrainReport report = run_train(config, registry_, ProgressStyle::kQuiet);
  for (const auto& t : report.tasks) {
    EXPECT_EQ(t.state, tasks::TaskState::kDone) << t.name << ": " << t.failure;
    if (t.name.rfind("ink", 0) != 0) continue;
    ASSERT_TRUE(t.eval.regression.has_value()) << t.name;
    // Predicting the mean gives R^2 = 0 and MAE = the mean absolute deviation.
    const at::Tensor ink = test.labels.at("ink");
    const double mad = (ink - ink.mean()).abs().mean().item<double>();
    EXPECT_GT(t.eval.regression->r2, 0.5) << t.name;
    EXPECT_LT(t.eval.regression->mae, 0.75 * mad) << t.name;
  }
  const std::string summary = format_summary(report);
  EXPECT_NE(summary.find("task 'ink' (regression): MAE"), std::string::npos) << summary;
  EXPECT_NE(summary.find("per-class F1 on the eval split"), std::string::npos) << summary;
  EXPECT_NE(summary.find("Ankle boot"), std::string::npos) << summary;
  const std::string card = read_file(dir_.file("out/heads/ink.json"));
  EXPECT_NE(card.find("\"eval_r2\": "), std::string::npos);
  // Values cannot be learned from class labels, nor classes from values: refused up front.
  const JobConfig wrong = load_job_config(config_path_, {"train.epochs=1", "task.ink.labels=class"});
  EXPECT_TRUE(testing::throws_with<DataError>([&] { run_train(wrong, registry_, ProgressStyle::kQuiet); },
                                              {"task 'ink'", "real-valued label source"}));
  const JobConfig wrong2 = load_job_config(config_path_, {"train.epochs=1", "task.class_linear.labels=ink"});
  EXPECT_TRUE(testing::throws_with<DataError>([&] { run_train(wrong2, registry_, ProgressStyle::kQuiet); },
                                              {"task 'class_linear'", "use kind = regression"}));
  // One training row: the classifiers train; ink's standard deviation is 0, not NaN (which
  // the manifest wrote as null and could not read back), and the regression says why it cannot.
  const JobConfig one = load_job_config(
      config_path_,
      {"train.epochs=1", "data.train_limit=1", "data.test_limit=1", "cache.path=" + dir_.file("cache1")});
  run_cache(one, false, nullptr, ProgressStyle::kQuiet);
  EXPECT_EQ(datasets::FeatureCache::open(one.cache.path).meta().label_stats.at("ink").second, 0.0);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { run_train(one, registry_, ProgressStyle::kQuiet); },
                                              {"task 'ink'", "the same target on every training row"}));
}

TEST_F(EndToEnd, AHeadThatStopsEarlyLeavesTheOthersRunning) {
  std::ofstream(config_path_, std::ios::app) << "[task.frozen_lr]\nhead = linear\noptimizer = sgd\nmomentum "
                                                "= 0\nlr = 1e-12\nearly_stop_patience = 1\n";
  const JobConfig config =
      load_job_config(config_path_, {"train.epochs=4", "task.class_mlp.schedule=cosine"});
  run_cache(config, false, nullptr, ProgressStyle::kQuiet);
  const TrainReport report = run_train(config, registry_, ProgressStyle::kQuiet);
  for (const auto& t : report.tasks) {
    EXPECT_EQ(t.state, tasks::TaskState::kDone) << t.name;
    if (t.name == "frozen_lr") {
      EXPECT_EQ(t.epochs, 2) << "no better accuracy after epoch 1: stops after epoch 2";
      EXPECT_NE(t.note.find("stopped early at epoch 2"), std::string::npos) << t.note;
    } else {
      EXPECT_EQ(t.epochs, 4) << t.name;
    }
  }
  EXPECT_NE(format_summary(report).find("task 'frozen_lr' stopped early at epoch 2"), std::string::npos);
}

// A linear head that records every feature row it trains on, as raw bytes.
class RecordingHead : public heads::Head {
 public:
  RecordingHead(std::int64_t in, std::int64_t out) {
    linear_ = register_module("linear", torch::nn::Linear(in, out));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    if (is_training()) {
      const at::Tensor c = x.contiguous();
      const auto row_bytes = static_cast<std::size_t>(c.size(1)) * sizeof(float);
      std::lock_guard<std::mutex> lock(mutex_);
      for (std::int64_t r = 0; r < c.size(0); ++r) {
        rows_.emplace_back(reinterpret_cast<const char*>(c.data_ptr<float>() + r * c.size(1)), row_bytes);
      }
    }
    return linear_->forward(x);
  }
  std::string describe() const override { return "recording"; }
  std::vector<std::string> rows() const { return rows_; }

 private:
  std::mutex mutex_;
  std::vector<std::string> rows_;
  torch::nn::Linear linear_{nullptr};
};

TEST_F(EndToEnd, EveryHeadTrainsOnEveryRowExactlyOncePerEpoch) {
  std::vector<std::shared_ptr<RecordingHead>> made;
  std::mutex made_mutex;
  registry_.add(
      "recording",
      [&](const tasks::HeadSpec& s) {
        auto h = std::make_shared<RecordingHead>(s.in_features, s.out_features);
        std::lock_guard<std::mutex> lock(made_mutex);
        made.push_back(h);
        return h;
      },
      "test head");
  std::ofstream(config_path_, std::ios::app)
      << "[task.rec_a]\nhead = recording\n[task.rec_b]\nhead = recording\n"
      << "label_map = 0,1,0,0,0,2,0,2,3,2\n";
  const JobConfig config = load_job_config(
      config_path_, {"train.epochs=3", "train.batch_size=48", "train.workers=2", "train.fuse=always"});
  run_cache(config, false, nullptr, ProgressStyle::kQuiet);
  const TrainReport report = run_train(config, registry_, ProgressStyle::kQuiet);
  for (const auto& t : report.tasks)
    EXPECT_EQ(t.state, tasks::TaskState::kDone) << t.name << ": " << t.failure;
  const auto train = datasets::FeatureCache::open(config.cache.path).load_split("train");
  std::map<std::string, int> expected;
  const at::Tensor f = train.features.contiguous();
  for (std::int64_t r = 0; r < f.size(0); ++r) {
    ++expected[std::string(reinterpret_cast<const char*>(f.data_ptr<float>() + r * f.size(1)),
                           f.size(1) * sizeof(float))];
  }
  ASSERT_EQ(made.size(), 2u);
  for (const auto& head : made) {
    const auto rows = head->rows();
    ASSERT_EQ(rows.size(), 3u * 2000u);
    for (std::size_t epoch = 0; epoch < 3; ++epoch) {  // a head's steps run in order
      std::map<std::string, int> seen;
      for (std::size_t r = epoch * 2000; r < (epoch + 1) * 2000; ++r) ++seen[rows[r]];
      EXPECT_EQ(seen, expected) << "epoch " << epoch + 1;
    }
    EXPECT_NE(rows[0], rows[2000]) << "each epoch is shuffled anew";
  }
  EXPECT_FALSE(report.fused.empty()) << "the built-in heads were fused next to the recording ones";
}

// Fused and unfused training agree whatever the worker count: the planner splits fused
// groups until every worker has a unit, so the count is pinned and varied here.
class FusionWithWorkers : public EndToEnd, public ::testing::WithParamInterface<int> {};

TEST_P(FusionWithWorkers, FusedAndUnfusedTrainingAgree) {
  {
    std::ofstream more(config_path_, std::ios::app);  // twelve fusable heads in all
    for (int k = 0; k < 9; ++k) more << "[task.extra" << k << "]\nhead = linear\nlr = 0.00" << k + 1 << "\n";
  }
  const std::string workers = "train.workers=" + std::to_string(GetParam());
  const JobConfig fused = load_job_config(
      config_path_, {"train.epochs=3", "train.out_dir=" + dir_.file("fused"), "train.fuse=always", workers});
  JobConfig alone = load_job_config(
      config_path_, {"train.epochs=3", "train.out_dir=" + dir_.file("alone"), "train.fuse=never", workers});
  run_cache(fused, false, nullptr, ProgressStyle::kQuiet);
  const TrainReport a = run_train(fused, registry_, ProgressStyle::kQuiet);
  const TrainReport b = run_train(alone, registry_, ProgressStyle::kQuiet);
  ASSERT_FALSE(a.fused.empty());
  EXPECT_LE(a.fused.size(), static_cast<std::size_t>(GetParam())) << "no more groups than workers";
  EXPECT_TRUE(b.fused.empty());
  EXPECT_NE(format_summary(a).find("fused: "), std::string::npos);
  ASSERT_EQ(a.tasks.size(), b.tasks.size());
  for (std::size_t i = 0; i < a.tasks.size(); ++i) {
    EXPECT_EQ(a.tasks[i].state, tasks::TaskState::kDone) << a.tasks[i].name << ": " << a.tasks[i].failure;
    EXPECT_NEAR(a.tasks[i].eval.accuracy, b.tasks[i].eval.accuracy, 0.005) << a.tasks[i].name;
    const auto wa = load_safetensors(a.tasks[i].weights_path), wb = load_safetensors(b.tasks[i].weights_path);
    ASSERT_EQ(wa.size(), wb.size());
    for (const auto& [name, t] : wa) {
      EXPECT_LT((t - wb.at(name)).abs().max().item<double>(), 1e-4) << a.tasks[i].name << " " << name;
    }
  }
  // A group budget too small for two heads fuses nothing.
  alone.train.fuse = FuseMode::kAlways;
  alone.train.fuse_kib = 1;
  EXPECT_TRUE(run_train(alone, registry_, ProgressStyle::kQuiet).fused.empty());
}

INSTANTIATE_TEST_SUITE_P(Workers, FusionWithWorkers, ::testing::Values(1, 2, 3, 8));

// train.fuse = auto: the group is timed fused and alone once, the decision recorded in the
// calibration file; the timing leaves no trace (the run equals the same decision forced,
// bitwise, dropout included); a later run reads the file instead of measuring.
TEST_F(EndToEnd, FusionDecidedByMeasuredCostAndRecorded) {
  {
    std::ofstream more(config_path_, std::ios::app);  // 7 same-input heads: one group, one shape
    for (int k = 0; k < 4; ++k)
      more << "[task.drop" << k << "]\nhead = mlp\nhead.hidden = 16\nhead.dropout = 0.3\n";
  }
  const std::string file = dir_.file("calibration/fusion.tsv");
  const testing::ScopedEnv calibration("CANOPY_FUSION_CALIBRATION", file);
  const auto job = [&](const std::string& out, const std::string& fuse) {
    return load_job_config(config_path_, {"train.epochs=2", "train.workers=1",
                                          "train.out_dir=" + dir_.file(out), "train.fuse=" + fuse});
  };
  run_cache(job("auto", "auto"), false, nullptr, ProgressStyle::kQuiet);
  const TrainReport a = run_train(job("auto", "auto"), registry_, ProgressStyle::kQuiet);
  ASSERT_TRUE(path_exists(file));
  const auto lines = split(trim(read_file(file)), '\n');
  ASSERT_EQ(lines.size(), 1u) << read_file(file);
  const bool fused = lines[0].find("\tfused\t") != std::string::npos;
  ASSERT_EQ(a.fused.size() + a.not_fused.size(), 1u);
  const std::string said = fused ? a.fused.at(0) : a.not_fused.at(0);
  EXPECT_NE(said.find("measured now"), std::string::npos) << said;
  EXPECT_NE(said.find("drop3"), std::string::npos) << said;

  const TrainReport b =
      run_train(job("forced", fused ? "always" : "never"), registry_, ProgressStyle::kQuiet);
  ASSERT_EQ(a.tasks.size(), b.tasks.size());
  for (std::size_t i = 0; i < a.tasks.size(); ++i) {
    const auto wa = load_safetensors(a.tasks[i].weights_path), wb = load_safetensors(b.tasks[i].weights_path);
    for (const auto& [name, t] : wa) EXPECT_TRUE(at::equal(t, wb.at(name))) << a.tasks[i].name << " " << name;
  }

  // The recorded decision rules later runs: flipped by hand, it is followed and not re-measured.
  std::string flipped = lines[0];
  const std::string from = fused ? "\tfused\t" : "\talone\t", to = fused ? "\talone\t" : "\tfused\t";
  flipped.replace(flipped.find(from), from.size(), to);
  write_file_atomic(file, flipped + "\n");
  const TrainReport c = run_train(job("again", "auto"), registry_, ProgressStyle::kQuiet);
  ASSERT_EQ((fused ? c.not_fused : c.fused).size(), 1u);
  EXPECT_NE((fused ? c.not_fused : c.fused).at(0).find("measured before"), std::string::npos);
  EXPECT_EQ(read_file(file), flipped + "\n");
}

// A run's fusion decisions are recorded in its checkpoint, and a resumed run follows them
// whatever the calibration file says by then (timed again, deleted): it ends bitwise as the
// run that was not interrupted. (Over frozen features these heads' bits come out the same
// fused or alone; test_finetune checks the decision over a shared top, where they do not.)
TEST_F(EndToEnd, ResumeKeepsTheCheckpointsFusionDecisions) {
  {
    std::ofstream more(config_path_, std::ios::app);  // one group of same-shape MLP heads
    for (int k = 0; k < 4; ++k)
      more << "[task.drop" << k << "]\nhead = mlp\nhead.hidden = 16\nhead.dropout = 0.3\n";
  }
  const std::string file = dir_.file("calibration/fusion.tsv");
  const testing::ScopedEnv calibration("CANOPY_FUSION_CALIBRATION", file);
  const auto job = [&](const std::string& out, const std::string& fuse, int epochs) {
    return load_job_config(config_path_, {"train.epochs=" + std::to_string(epochs), "train.workers=1",
                                          "train.out_dir=" + dir_.file(out), "train.fuse=" + fuse});
  };
  run_cache(job("resumed", "auto", 1), false, nullptr, ProgressStyle::kQuiet);
  const TrainReport first = run_train(job("resumed", "auto", 1), registry_, ProgressStyle::kQuiet);
  ASSERT_EQ(first.fused.size() + first.not_fused.size(), 1u);
  const bool fused = !first.fused.empty();
  const std::string decided = fused ? first.fused.at(0) : first.not_fused.at(0);
  const auto state = nlohmann::json::parse(read_file(dir_.file("resumed/checkpoint/state.json")));
  ASSERT_EQ(state.at("fusion").size(), 1u) << state.at("fusion").dump();
  const std::string group = state.at("fusion").begin().key();
  EXPECT_EQ(decided.rfind(group, 0), 0u) << "the group the run reported: " << decided;
  EXPECT_NE(group.find("drop3"), std::string::npos) << group;
  std::ostringstream out, err;  // canopy inspect --json says it too
  ASSERT_EQ(run_cli({"inspect", dir_.file("resumed"), "--json"}, registry_, out, err), 0) << err.str();
  EXPECT_EQ(nlohmann::json::parse(out.str()).at("checkpoint").at("fusion"), nlohmann::json({{group, fused}}));
  EXPECT_EQ(state.at("fusion").at(group).at("fuse").get<bool>(), fused);

  // The machine's calibration now says the other thing: the resumed run keeps its own.
  std::string line = trim(read_file(file));
  const std::string from = fused ? "\tfused\t" : "\talone\t", to = fused ? "\talone\t" : "\tfused\t";
  ASSERT_NE(line.find(from), std::string::npos) << line;
  line.replace(line.find(from), from.size(), to);
  write_file_atomic(file, line + "\n");
  const TrainReport resumed = run_train(job("resumed", "auto", 2), registry_, ProgressStyle::kQuiet, true);
  ASSERT_EQ((fused ? resumed.fused : resumed.not_fused).size(), 1u);
  const std::string said = (fused ? resumed.fused : resumed.not_fused).at(0);
  EXPECT_NE(said.find("kept from the checkpoint"), std::string::npos) << said;
  EXPECT_EQ(read_file(file), line + "\n") << "the calibration file is left as it was";

  const TrainReport whole =
      run_train(job("whole", fused ? "always" : "never", 2), registry_, ProgressStyle::kQuiet);
  ASSERT_EQ(resumed.tasks.size(), whole.tasks.size());
  for (std::size_t i = 0; i < whole.tasks.size(); ++i) {
    const auto a = load_safetensors(resumed.tasks[i].weights_path),
               b = load_safetensors(whole.tasks[i].weights_path);
    for (const auto& [name, t] : a)
      EXPECT_TRUE(at::equal(t, b.at(name))) << whole.tasks[i].name << " " << name;
  }
  // A run started anew follows the calibration file again.
  const TrainReport anew = run_train(job("anew", "auto", 1), registry_, ProgressStyle::kQuiet);
  EXPECT_EQ((fused ? anew.not_fused : anew.fused).size(), 1u);
}

TEST_F(EndToEnd, CliRunsInProcessWithACustomHead) {
  // A head registered from outside the library, used from a config like a built-in.
  registry_.add(
      "tiny_linear",
      [](const tasks::HeadSpec& s) {
        return std::make_shared<heads::LinearHead>(heads::LinearHeadOptions(s.in_features, s.out_features));
      },
      "test head");
  std::ostringstream out, err;
  const std::vector<std::string> args = {"run",
                                         "--config",
                                         config_path_,
                                         "--progress",
                                         "quiet",
                                         "--set",
                                         "task.class_mlp.head=tiny_linear",
                                         "--set",
                                         "train.epochs=2"};
  // The config's head.hidden is not an option of tiny_linear: the run is refused, naming the key.
  EXPECT_EQ(run_cli(args, registry_, out, err), kExitUsage);
  EXPECT_NE(err.str().find("task.class_mlp.head.hidden"), std::string::npos) << err.str();
  // A head option written as a task key cannot be taken for one: it is refused with the fix.
  out.str("");
  err.str("");
  EXPECT_EQ(run_cli({"train", "--config", config_path_, "--set", "task.class_mlp.gamma_head=2"}, registry_,
                    out, err),
            kExitUsage);
  EXPECT_NE(err.str().find("head.gamma_head = 2"), std::string::npos) << err.str();

  // A head type misspelt: `run` refuses it with the likely name before it builds any cache.
  out.str("");
  err.str("");
  EXPECT_EQ(run_cli({"run", "--config", config_path_, "--progress", "quiet", "--set",
                     "task.class_mlp.head=tiny_lienar", "--set", "cache.path=" + dir_.file("never")},
                    registry_, out, err),
            kExitUsage);
  EXPECT_NE(err.str().find("unknown head 'tiny_lienar' (did you mean 'tiny_linear'?)"), std::string::npos)
      << err.str();
  EXPECT_FALSE(is_directory(dir_.file("never"))) << "a cache was built for a run that cannot train";

  std::ofstream(config_path_, std::ios::app) << "[task.custom]\nhead = tiny_linear\n";
  out.str("");
  err.str("");
  EXPECT_EQ(run_cli({"run", "--config", config_path_, "--progress", "quiet", "--set", "train.epochs=2"},
                    registry_, out, err),
            kExitOk)
      << err.str();
  EXPECT_NE(out.str().find("custom"), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("linear 32-10"), std::string::npos) << out.str();
  // The run's out_dir given to inspect: the run, how far it got, its cache, each head.
  out.str("");
  err.str("");
  EXPECT_EQ(run_cli({"inspect", dir_.file("out")}, registry_, out, err), kExitOk) << err.str();
  for (const std::string& want :
       {"training run " + dir_.file("out"), "cache " + dir_.file("cache"),
        std::string("status      finished"), std::string("checkpoint  generation 2: 2 epochs done")}) {
    EXPECT_NE(out.str().find(want), std::string::npos) << want << " in:\n" << out.str();
  }
  // The custom head's row: its name, state and epochs done of planned.
  const auto row = out.str().find("\ncustom ");
  ASSERT_NE(row, std::string::npos) << out.str();
  std::istringstream cells(out.str().substr(row + 1, out.str().find('\n', row + 1) - row - 1));
  std::string name, state, epochs;
  cells >> name >> state >> epochs;
  EXPECT_EQ(state + " " + epochs, "done 2/2") << out.str();
  EXPECT_EQ(run_cli({"inspect", dir_.file("out"), "--config", config_path_}, registry_, out, err),
            kExitUsage);
  // What is not there, or is none of what inspect reads, is named as such (not as a cache).
  for (const auto& [path, want] : std::vector<std::pair<std::string, std::string>>{
           {dir_.file("nowhere"), "'" + dir_.file("nowhere") + "' does not exist"},
           {dir_.file("out/heads"), "is not a feature cache (no manifest.json), a training run's out_dir"}}) {
    err.str("");
    EXPECT_EQ(run_cli({"inspect", path}, registry_, out, err), kExitError) << path;
    EXPECT_NE(err.str().find(want), std::string::npos) << err.str();
  }
  err.str("");
  EXPECT_EQ(run_cli({"inspect", config_path_}, registry_, out, err), kExitUsage);
  EXPECT_NE(err.str().find("`canopy inspect --config " + config_path_ + "` inspects the cache it names"),
            std::string::npos)
      << err.str();
  err.str("");
  EXPECT_EQ(run_cli({"inspect", "--config", config_path_, "--set", "cache.path=" + dir_.file("nocache")},
                    registry_, out, err),
            kExitError);
  EXPECT_NE(err.str().find("`canopy cache --config " + config_path_ + "` builds it"), std::string::npos)
      << err.str();

  out.str("");
  EXPECT_EQ(run_cli({"heads"}, registry_, out, err), kExitOk);
  EXPECT_NE(out.str().find("tiny_linear"), std::string::npos);
  EXPECT_EQ(run_cli({"train"}, registry_, out, err), kExitUsage);
  EXPECT_EQ(run_cli({"frobnicate"}, registry_, out, err), kExitUsage);
  EXPECT_EQ(run_cli({"trian"}, registry_, out, err), kExitUsage);
  EXPECT_NE(err.str().find("unknown command 'trian' (did you mean 'train'?)"), std::string::npos)
      << err.str();
}

// A linear head whose forward is its own: the model file cannot know what it does.
class DoubledLinearHead : public heads::LinearHead {
 public:
  using heads::LinearHead::LinearHead;
  torch::Tensor forward(const torch::Tensor& x) override { return heads::LinearHead::forward(x) * 2; }
};

TEST_F(EndToEnd, ExportWritesOneTorchScriptFileAndRefusesANativeHead) {
  // A task name may hold any character but '@' and '/': the file keys its outputs by it.
  std::ofstream(config_path_, std::ios::app) << "[task.gr\xc3\xb6\xc3\x9f"
                                                "e \"x\\]\nhead = linear\n";
  const JobConfig config = load_job_config(config_path_, {"train.epochs=1"});
  run_cache(config, false, nullptr, ProgressStyle::kQuiet);
  run_train(config, registry_, ProgressStyle::kQuiet);
  const std::string path = dir_.file("model.pt");
  const ModelFile written = export_model_file(config, registry_, path);
  const std::string odd =
      "gr\xc3\xb6\xc3\x9f"
      "e \"x\\";
  EXPECT_EQ(written.tasks, (std::vector<std::string>{"class_linear", "class_mlp", "group", odd}));
  EXPECT_EQ(written.sha256, sha256_file(path));
  // LibTorch loads it as any TorchScript file; a batch of raw pixels gives every head's output.
  torch::jit::Module model = torch::jit::load(path);
  const auto images = at::randint(0, 256, {5, 28, 28}, at::TensorOptions().dtype(at::kByte));
  const auto out = model.forward({images}).toGenericDict();
  ASSERT_EQ(out.size(), 4U);
  EXPECT_EQ(out.at(odd).toTensor().sizes(), (std::vector<std::int64_t>{5, 10}));
  const at::Tensor group = out.at("group").toTensor();
  EXPECT_EQ(group.sizes(), (std::vector<std::int64_t>{5, 4}));
  EXPECT_TRUE(at::allclose(group.sum(1), at::ones({5}))) << "softmax probabilities";

  // A registered head of another forward: refused, naming the task, and the file left as it was.
  registry_.add(
      "doubled",
      [](const tasks::HeadSpec& s) {
        return std::make_shared<DoubledLinearHead>(heads::LinearHeadOptions(s.in_features, s.out_features));
      },
      "a linear head times 2");
  std::ofstream(config_path_, std::ios::app) << "[task.doubled]\nhead = doubled\n";
  const JobConfig with_native = load_job_config(config_path_, {"train.epochs=1"});
  run_train(with_native, registry_, ProgressStyle::kQuiet);
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { export_model_file(with_native, registry_, path); },
                                                {"task 'doubled'", "head 'doubled' is registered C++ code"}));
  EXPECT_EQ(sha256_file(path), written.sha256);
  // From the CLI: --output is required.
  std::ostringstream o, e;
  EXPECT_EQ(run_cli({"export", "--config", config_path_}, registry_, o, e), kExitUsage);
  EXPECT_NE(e.str().find("--output FILE is required"), std::string::npos) << e.str();
}

// `canopy trunk extract`: the trunk up to its taps as TorchScript, read back with LibTorch and
// checked against the trunk's blocks run one by one; a tap whose output is not one tensor, and
// a trunk returning a tuple without taps, are refused before anything is written.
TEST(TrunkExtract, WritesTheTapsOutputsAndRefusesWhatIsNotOneTensor) {
  testing::TempDir dir;
  torch::jit::Module a("A"), b("B"), pair("Pair"), net("Net");
  for (auto* m : {&a, &b, &pair, &net}) m->register_attribute("training", c10::BoolType::get(), false);
  a.register_parameter("w", at::randn({3, 1, 1}), false);
  a.define("def forward(self, x):\n    return torch.relu(x * self.w)\n");
  b.define("def forward(self, x):\n    return x.mean(2, True) + 1.0\n");
  pair.define("def forward(self, x):\n    return (x, x * 2.0)\n");
  net.register_module("a", a);
  net.register_module("b", b);
  net.register_module("pair", pair);
  net.define(R"(def forward(self, x):
    y = self.b.forward(self.a.forward(x))
    p = self.pair.forward(y)
    return p[0] + p[1]
)");
  net.save(dir.file("net.pt"));
  tasks::HeadRegistry registry;
  std::ostringstream out, err;
  const auto extract = [&](std::vector<std::string> args) {
    err.str("");
    args.insert(args.begin(), {"trunk", "extract", dir.file("net.pt"), "--allow-unpinned"});
    return run_cli(args, registry, out, err);
  };
  const at::Tensor x = at::randn({2, 3, 4, 5});
  ASSERT_EQ(extract({"--set", "trunk.taps=a,b", "--output", dir.file("ab.pt")}), kExitOk) << err.str();
  EXPECT_NE(err.str().find("outputs a, b (unpooled, a tuple)"), std::string::npos) << err.str();
  std::unordered_map<std::string, std::string> extra{{"canopy/trunk.json", ""}};
  torch::jit::Module ab = torch::jit::load(dir.file("ab.pt"), c10::kCPU, extra);
  const auto taps = ab.forward({x}).toTuple()->elements();
  ASSERT_EQ(taps.size(), 2U);
  const at::Tensor want_a = a.forward({x}).toTensor();
  EXPECT_TRUE(at::equal(taps[0].toTensor(), want_a));
  EXPECT_TRUE(at::equal(taps[1].toTensor(), b.forward({want_a}).toTensor()));
  const auto meta = nlohmann::json::parse(extra.at("canopy/trunk.json"));
  EXPECT_EQ(meta.at("outputs"), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(meta.at("source_sha256"), sha256_file(dir.file("net.pt")));

  // One tap: one tensor, not a tuple of one.
  ASSERT_EQ(extract({"--set", "trunk.taps=b", "--output", dir.file("b.pt")}), kExitOk) << err.str();
  EXPECT_TRUE(
      at::equal(torch::jit::load(dir.file("b.pt")).forward({x}).toTensor(), b.forward({want_a}).toTensor()));

  EXPECT_EQ(extract({"--set", "trunk.taps=pair", "--output", dir.file("pair.pt")}), kExitUsage);
  EXPECT_NE(err.str().find("tap pair's output is a Tuple[Tensor, Tensor], not one tensor"), std::string::npos)
      << err.str();
  EXPECT_FALSE(path_exists(dir.file("pair.pt")));
  torch::jit::Module whole("Whole");
  whole.register_attribute("training", c10::BoolType::get(), false);
  whole.register_module("pair", pair);
  whole.define("def forward(self, x):\n    return self.pair.forward(x)\n");
  whole.save(dir.file("whole.pt"));
  err.str("");
  EXPECT_EQ(
      run_cli({"trunk", "extract", dir.file("whole.pt"), "--allow-unpinned", "--output", dir.file("w.pt")},
              registry, out, err),
      kExitUsage);
  EXPECT_NE(err.str().find("its output is a Tuple[Tensor, Tensor], not one tensor"), std::string::npos)
      << err.str();
  EXPECT_FALSE(path_exists(dir.file("w.pt")));
}

TEST_F(EndToEnd, TrunkShowAndTokenizeFromTheCli) {
  std::ostringstream out, err;
  // The test config's trunk is not pinned but allows it; without the allowance it is refused.
  EXPECT_EQ(run_cli({"trunk", "show", "--config", config_path_}, registry_, out, err), kExitOk) << err.str();
  EXPECT_NE(out.str().find("parameters  "), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("freeze      all"), std::string::npos) << out.str();
  err.str("");
  EXPECT_EQ(run_cli({"trunk", "show", "--config", config_path_, "--set", "trunk.allow_unpinned=false"},
                    registry_, out, err),
            kExitUsage);
  EXPECT_NE(err.str().find("not pinned"), std::string::npos) << err.str();
  err.str("");
  EXPECT_EQ(run_cli({"trunk", "show", "--config", config_path_, "--set", "trunk.allow_unpinned=false",
                     "--allow-unpinned"},
                    registry_, out, err),
            kExitOk)
      << err.str();
  // --size: the output's shape and width for a batch of zero images; what cannot run is said.
  out.str("");
  EXPECT_EQ(run_cli({"trunk", "show", "--config", config_path_, "--size", "28"}, registry_, out, err),
            kExitOk)
      << err.str();
  EXPECT_NE(out.str().find("outputs     at 28x28 (a batch of zero images [2, 3, 28, 28]), pooling avg:\n"
                           "    (output)  [N, 32, 2, 2]         32 per sample\n"),
            std::string::npos)
      << out.str();
  err.str("");
  EXPECT_EQ(run_cli({"trunk", "show", "--config", config_path_, "--size", "0"}, registry_, out, err),
            kExitUsage);
  EXPECT_NE(err.str().find("--size and --channels must be > 0, got 0 and 3"), std::string::npos) << err.str();
  err.str("");
  EXPECT_EQ(run_cli({"trunk", "show", "--config", config_path_, "--size", "28", "--channels", "2"}, registry_,
                    out, err),
            kExitError);
  EXPECT_NE(err.str().find("the trunk failed at 28x28 (a batch of zero images [2, 2, 28, 28]): "),
            std::string::npos)
      << err.str();
  EXPECT_EQ(run_cli({"trunk", "list"}, registry_, out, err), kExitUsage);
  err.str("");
  EXPECT_EQ(run_cli({"trunk", "show", "--config", config_path_, "--depth", "-1"}, registry_, out, err),
            kExitUsage);
  EXPECT_NE(err.str().find("--depth must be >= 0, got -1"), std::string::npos) << err.str();
  err.str("");
  EXPECT_EQ(run_cli({"predict", "--config", config_path_, "--input", dir_.file("none.idx"), "--limit", "-1"},
                    registry_, out, err),
            kExitUsage);
  EXPECT_NE(err.str().find("--limit must be >= 0 (0: every input), got -1"), std::string::npos) << err.str();

  std::ofstream(dir_.file("vocab.txt")) << "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\nworld\n";
  std::ofstream(dir_.file("texts.txt")) << "Hello, world\nhello\n";
  out.str("");
  EXPECT_EQ(run_cli({"tokenize", "--vocab", dir_.file("vocab.txt"), "--input", dir_.file("texts.txt")},
                    registry_, out, err),
            kExitOk)
      << err.str();
  EXPECT_EQ(out.str(),
            "{\"ids\":[2,4,1,5,3],\"text\":\"Hello, world\"}\n{\"ids\":[2,4,3],\"text\":\"hello\"}\n");
  // A CSV table's text column (named in another case than --attribute's default Text), its
  // quoted line break kept.
  std::ofstream(dir_.file("texts.csv")) << "id,text\n1,\"Hello,\nworld\"\n2,hello\n";
  out.str("");
  EXPECT_EQ(run_cli({"tokenize", "--vocab", dir_.file("vocab.txt"), "--input", dir_.file("texts.csv")},
                    registry_, out, err),
            kExitOk)
      << err.str();
  EXPECT_EQ(out.str(),
            "{\"ids\":[2,4,1,5,3],\"text\":\"Hello,\\nworld\"}\n{\"ids\":[2,4,3],\"text\":\"hello\"}\n");
  // tokenize's own output read back as JSON lines: the texts again, the ids' lists left out.
  std::ofstream(dir_.file("ids.jsonl")) << out.str();
  const std::string first = out.str();
  out.str("");
  EXPECT_EQ(run_cli({"tokenize", "--vocab", dir_.file("vocab.txt"), "--input", dir_.file("ids.jsonl")},
                    registry_, out, err),
            kExitOk)
      << err.str();
  EXPECT_EQ(out.str(), first);
  err.str("");
  EXPECT_EQ(run_cli({"tokenize", "--input", dir_.file("texts.txt")}, registry_, out, err), kExitUsage);
  EXPECT_NE(err.str().find("--vocab FILE"), std::string::npos) << err.str();
}

TEST(Cli, EveryCommandAnswersHelpWithItsOwnUsage) {
  tasks::HeadRegistry registry;
  tasks::register_builtin_heads(registry);
  ASSERT_GE(cli_commands().size(), 9u);
  for (const auto& name : cli_commands()) {
    for (const char* flag : {"--help", "-h"}) {
      std::vector<std::string> args = split(name, ' ');
      args.push_back(flag);
      std::ostringstream out, err;
      EXPECT_EQ(run_cli(args, registry, out, err), kExitOk) << name << " " << flag << ": " << err.str();
      EXPECT_NE(out.str().find("usage: canopy " + name), std::string::npos) << name << ":\n" << out.str();
      EXPECT_NE(out.str().find("--help"), std::string::npos) << name;
      EXPECT_TRUE(err.str().empty()) << name << ": " << err.str();
    }
  }
  std::ostringstream out, err;
  ASSERT_EQ(run_cli({"train", "--help"}, registry, out, err), kExitOk);
  for (const char* option : {"--config", "--set", "--resume", "--fail-fast", "--no-fuse", "--progress"}) {
    EXPECT_NE(out.str().find(option), std::string::npos) << option;
  }
  EXPECT_EQ(out.str().find("--force"), std::string::npos) << "train has no --force";
  std::ostringstream help;
  ASSERT_EQ(run_cli({"--help"}, registry, help, err), kExitOk);
  for (const auto& name : cli_commands()) EXPECT_NE(help.str().find(name), std::string::npos) << name;
  // docs/usage.md lists every command and shows train's help as the CLI prints it.
  const std::string doc = read_file(std::string(CANOPY_SOURCE_DIR) + "/docs/usage.md");
  for (const auto& name : cli_commands()) EXPECT_NE(doc.find("canopy " + name), std::string::npos) << name;
  EXPECT_NE(doc.find(out.str()), std::string::npos) << "docs/usage.md shows `canopy train --help` as printed";
}

TEST(Cli, VersionNamesCanopyLibTorchAndHdf5) {
  tasks::HeadRegistry registry;
  for (const char* flag : {"--version", "version"}) {
    std::ostringstream out, err;
    ASSERT_EQ(run_cli({flag}, registry, out, err), kExitOk);
    EXPECT_NE(out.str().find("canopy 0.1.0"), std::string::npos) << out.str();
    EXPECT_NE(out.str().find("LibTorch 2."), std::string::npos) << out.str();
    EXPECT_NE(out.str().find("HDF5 1."), std::string::npos) << out.str();
    EXPECT_NE(out.str().find("CPU cores this process may use: " + std::to_string(machine_cores()) + " ("),
              std::string::npos)
        << out.str();
    EXPECT_NE(out.str().find("memory it may take: "), std::string::npos) << out.str();
  }
  // Where train.fuse = auto keeps the machine's decisions, and how many: none, then two shapes.
  testing::TempDir dir;
  const std::string file = dir.file("fusion.tsv");
  const testing::ScopedEnv calibration("CANOPY_FUSION_CALIBRATION", file);
  std::ostringstream none, two, err;
  ASSERT_EQ(run_cli({"version"}, registry, none, err), kExitOk);
  EXPECT_NE(none.str().find("fusion calibration: " + file + " (none yet"), std::string::npos) << none.str();
  write_file_atomic(
      file, "v1\tcpu=a widths=8,8\tfused\t1.0\t2.0\nv1\tcpu=a widths=8,16\talone\t2.0\t1.0\nnot a line\n");
  ASSERT_EQ(run_cli({"version"}, registry, two, err), kExitOk);
  EXPECT_NE(
      two.str().find("fusion calibration: " + file + " (2 group shapes timed; delete it to time them again)"),
      std::string::npos)
      << two.str();
  std::ostringstream out;
  EXPECT_EQ(run_cli({"inspect", "a", "b"}, registry, out, err), kExitUsage) << "an extra positional argument";
}

}  // namespace
}  // namespace canopy::runners
