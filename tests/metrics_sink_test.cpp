// metrics.jsonl / metrics.csv rows, and their truncation when a run resumes.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/runners/metrics_sink.h"
#include "support/test_support.h"

namespace canopy::runners {
namespace {

std::vector<std::string> lines_of(const std::string& path) {
  std::istringstream in(read_file(path));
  std::vector<std::string> out;
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

HeadRun run_with(double loss, double acc, bool regression = false) {
  HeadRun r;
  r.train_loss = loss;
  r.eval.accuracy = acc;
  if (regression) {
    r.eval.regression = tasks::RegressionErrors{0.25, 0.5, 0.75};
  } else {
    r.eval.top5 = 0.875;
  }
  return r;
}

// Twelve epochs of two heads, as a run writes them.
void write_epochs(const std::string& dir, std::int64_t epochs) {
  MetricsSink sink(dir, {"a", "b"}, false, -1);
  for (std::int64_t e = 0; e < epochs; ++e) {
    sink.record(e, 0, run_with(1.0 / static_cast<double>(e + 1), 0.5));
    sink.record(e, 1, run_with(0.5, 0.1, true));
  }
  sink.flush();
}

TEST(MetricsSink, RowsReadBackAsJsonAndCsv) {
  testing::TempDir dir;
  write_epochs(dir.path(), 2);
  const auto jsonl = lines_of(dir.file("metrics.jsonl"));
  ASSERT_EQ(jsonl.size(), 4u);
  const auto row = nlohmann::json::parse(jsonl[3]);
  EXPECT_EQ(row.at("epoch"), 2);
  EXPECT_EQ(row.at("task"), "b");
  EXPECT_EQ(row.at("state"), "training");
  EXPECT_DOUBLE_EQ(row.at("eval_r2").get<double>(), 0.75);
  EXPECT_FALSE(nlohmann::json::parse(jsonl[0]).contains("eval_r2"))
      << "classifiers carry no regression metrics";
  EXPECT_DOUBLE_EQ(nlohmann::json::parse(jsonl[0]).at("eval_top5_accuracy").get<double>(), 0.875);
  EXPECT_FALSE(row.contains("eval_top5_accuracy"));
  const auto csv = lines_of(dir.file("metrics.csv"));
  ASSERT_EQ(csv.size(), 5u);
  EXPECT_EQ(csv[0].rfind("epoch,task,state,train_loss", 0), 0u);
  EXPECT_EQ(csv[0],
            "epoch,task,state,train_loss,eval_accuracy,eval_macro_f1,seconds,eval_mae,eval_rmse,eval_r2,"
            "eval_top5_accuracy");
  EXPECT_EQ(csv[1], "1,a,training,1,0.5,0,0,,,,0.875");
  EXPECT_EQ(csv[4], "2,b,training,0.5,0.1,0,0,0.25,0.5,0.75,");
}

// A grid member's name can hold commas and the CSV stays one field per column (RFC 4180).
TEST(MetricsSink, NamesWithCommasAreQuotedInTheCsv) {
  testing::TempDir dir;
  {
    MetricsSink sink(dir.path(), {"probe@hidden=512,256", "say \"hi\""}, false, -1);
    sink.record(0, 0, run_with(1.0, 0.5));
    sink.record(0, 1, run_with(1.0, 0.5));
    sink.flush();
  }
  const auto csv = lines_of(dir.file("metrics.csv"));
  ASSERT_EQ(csv.size(), 3u);
  EXPECT_EQ(csv[1], "1,\"probe@hidden=512,256\",training,1,0.5,0,0,,,,0.875");
  EXPECT_EQ(csv[2], "1,\"say \"\"hi\"\"\",training,1,0.5,0,0,,,,0.875");
  truncate_metrics(dir.file("metrics.csv"), 1, true);  // the epoch is still the first field
  EXPECT_EQ(lines_of(dir.file("metrics.csv")).size(), 3u);
}

TEST(MetricsSink, TruncationKeepsExactlyTheEpochsUpToTheCheckpoint) {
  for (std::int64_t keep = 0; keep <= 12; ++keep) {
    testing::TempDir dir;
    write_epochs(dir.path(), 12);
    truncate_metrics(dir.file("metrics.jsonl"), keep, false);
    truncate_metrics(dir.file("metrics.csv"), keep, true);
    const auto jsonl = lines_of(dir.file("metrics.jsonl"));
    const auto csv = lines_of(dir.file("metrics.csv"));
    ASSERT_EQ(jsonl.size(), static_cast<std::size_t>(2 * keep)) << "keep " << keep;
    ASSERT_EQ(csv.size(), static_cast<std::size_t>(2 * keep + 1)) << "keep " << keep;
    for (std::size_t i = 0; i < jsonl.size(); ++i) {
      EXPECT_EQ(nlohmann::json::parse(jsonl[i]).at("epoch").get<std::int64_t>(),
                static_cast<std::int64_t>(i / 2 + 1));
      EXPECT_EQ(std::stoll(csv[i + 1]), static_cast<std::int64_t>(i / 2 + 1));
    }
  }
}

TEST(MetricsSink, AResumedSinkDropsLaterEpochsAndAppends) {
  testing::TempDir dir;
  write_epochs(dir.path(), 5);
  {
    MetricsSink sink(dir.path(), {"a", "b"}, false, 3);
    sink.record(3, 0, run_with(9.0, 0.9));
    sink.flush();
  }
  const auto jsonl = lines_of(dir.file("metrics.jsonl"));
  ASSERT_EQ(jsonl.size(), 7u);
  EXPECT_EQ(nlohmann::json::parse(jsonl.back()).at("train_loss"), 9.0);
  EXPECT_EQ(lines_of(dir.file("metrics.csv")).size(), 8u) << "one header, six old rows, one new";
}

// A run begun before metrics.csv had its last column, resumed: the header gets it, the old
// rows get it empty, and the new rows fill it.
TEST(MetricsSink, AResumeUnderAWiderHeaderPadsTheOldRows) {
  testing::TempDir dir;
  const std::string old_header =
      "epoch,task,state,train_loss,eval_accuracy,eval_macro_f1,seconds,eval_mae,eval_rmse,eval_r2";
  write_file_atomic(dir.file("metrics.csv"),
                    old_header + "\n1,\"x,y\",training,1,0.5,0,0,,,\n2,\"x,y\",training,1,0.5,0,0,,,\n");
  {
    MetricsSink sink(dir.path(), {"x,y"}, false, 1);
    sink.record(1, 0, run_with(0.25, 0.75));
    sink.flush();
  }
  const auto csv = lines_of(dir.file("metrics.csv"));
  ASSERT_EQ(csv.size(), 3u);
  EXPECT_EQ(csv[0], old_header + ",eval_top5_accuracy");
  EXPECT_EQ(csv[1], "1,\"x,y\",training,1,0.5,0,0,,,,");
  EXPECT_EQ(csv[2], "2,\"x,y\",training,0.25,0.75,0,0,,,,0.875");
  // A header that is not the start of the current one is left as it is.
  write_file_atomic(dir.file("other.csv"), "epoch,loss\n1,2\n");
  truncate_metrics(dir.file("other.csv"), 1, true, "epoch,task,state");
  EXPECT_EQ(lines_of(dir.file("other.csv")), (std::vector<std::string>{"epoch,loss", "1,2"}));
}

TEST(MetricsSink, AnUnreadableRowIsAnErrorNamingFileAndLine) {
  testing::TempDir dir;
  write_file_atomic(dir.file("metrics.jsonl"), "{\"epoch\": 1}\n{\"epoch\": 2, \"task\": \n");
  EXPECT_TRUE(testing::throws_with<DataError>([&] { truncate_metrics(dir.file("metrics.jsonl"), 1, false); },
                                              {"metrics.jsonl", "line 2"}));
}

}  // namespace
}  // namespace canopy::runners
