// Checkpoints: a save and a load restore every task and its run state exactly; older
// generations go; a different configuration, other tasks or a malformed state are refused.
#include <gtest/gtest.h>

#include <functional>
#include <memory>

#include <sys/stat.h>

#include <ATen/Context.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/runners/checkpoint_store.h"
#include "canopy/tasks/registry.h"
#include "support/test_support.h"

namespace canopy::runners {
namespace {

struct Tasks {
  explicit Tasks(std::uint64_t seed) {
    tasks::register_builtin_heads(registry);
    tasks::TaskConfig lin;
    lin.name = "lin";
    tasks::TaskConfig mlp;
    mlp.name = "mlp";
    mlp.head = "mlp";
    mlp.head_params = {{"hidden", "8"}, {"dropout", "0.2"}};
    owned.push_back(std::make_unique<tasks::Task>(lin, registry, 6, 3, seed));
    owned.push_back(std::make_unique<tasks::Task>(mlp, registry, 6, 3, seed + 1));
    for (auto& t : owned) ptrs.push_back(t.get());
  }
  void train(int steps) {
    for (int s = 0; s < steps; ++s) {
      for (auto* t : ptrs) t->train_step(at::randn({16, 6}), at::randint(3, {16}));
    }
  }
  tasks::HeadRegistry registry;
  std::vector<std::unique_ptr<tasks::Task>> owned;
  std::vector<tasks::Task*> ptrs;
};

void expect_same_weights(Tasks& a, Tasks& b) {
  for (std::size_t i = 0; i < a.ptrs.size(); ++i) {
    const auto pa = a.ptrs[i]->head().named_parameters(true), pb = b.ptrs[i]->head().named_parameters(true);
    for (const auto& p : pa) EXPECT_TRUE(testing::bitwise_equal(p.value(), pb[p.key()])) << p.key();
  }
}

TEST(CheckpointStore, SaveThenLoadRestoresTasksAndRunsExactly) {
  testing::TempDir dir;
  Tasks a(1);
  a.train(3);
  std::vector<HeadRun> runs(2);
  runs[0].fail(1, 4, "loss is nan");
  runs[1].add_loss(0.25);
  runs[1].best_score = 0.75;
  runs[1].best_epoch = 2;
  runs[1].stop_note = "note";
  CheckpointStore store(dir.file("checkpoint"), "config v1");
  store.save({2, 5}, a.ptrs, runs);
  EXPECT_TRUE(store.exists());

  Tasks b(99);  // other initial weights
  std::vector<HeadRun> loaded;
  CheckpointStore reader(dir.file("checkpoint"), "config v1");
  const CheckpointPosition at = reader.load(b.ptrs, loaded);
  EXPECT_EQ(at.epoch, 2);
  EXPECT_EQ(at.step, 5);
  expect_same_weights(a, b);
  ASSERT_EQ(loaded.size(), 2u);
  EXPECT_TRUE(loaded[0].failed());
  EXPECT_EQ(loaded[0].failure, "epoch 2 step 5: loss is nan");
  EXPECT_EQ(loaded[1].loss_count, 1);
  EXPECT_EQ(loaded[1].best_epoch, 2);
  EXPECT_EQ(loaded[1].stop_note, "note");
  // Optimizer and RNG state came along too: the same next steps give the same weights.
  at::manual_seed(5);
  a.train(2);
  at::manual_seed(5);
  b.train(2);
  expect_same_weights(a, b);
}

TEST(CheckpointStore, OnlyTheNewestGenerationStays) {
  testing::TempDir dir;
  Tasks a(1);
  std::vector<HeadRun> runs(2);
  CheckpointStore store(dir.file("checkpoint"), "c");
  for (int g = 0; g < 3; ++g) store.save({g, 0}, a.ptrs, runs);
  EXPECT_EQ(list_dir(dir.file("checkpoint")),
            (std::vector<std::string>{"lin.3.pt", "mlp.3.pt", "state.json"}));
}

// The task files go through the store's for_each (the trainer's workers write them side by
// side); when writes fail, the first task's error in task order is the one thrown, and no
// state.json commits the half-written generation.
TEST(CheckpointStore, WritesTaskFilesThroughItsForEachAndThrowsTheFirstTasksError) {
  testing::TempDir dir;
  Tasks a(1);
  a.train(2);
  std::vector<HeadRun> runs(2);
  CheckpointStore store(dir.file("checkpoint"), "c");
  std::vector<std::size_t> order;
  store.set_for_each([&](std::size_t n, const std::function<void(std::size_t)>& body) {
    for (std::size_t k = n; k-- > 0;) {  // last first
      order.push_back(k);
      body(k);
    }
  });
  store.save({1, 0}, a.ptrs, runs);
  EXPECT_EQ(order, (std::vector<std::size_t>{1, 0}));
  Tasks b(99);
  std::vector<HeadRun> loaded;
  CheckpointStore(dir.file("checkpoint"), "c").load(b.ptrs, loaded);
  expect_same_weights(a, b);

  // Generation 2's temporary names are taken by directories: both writes fail.
  testing::TempDir other;
  CheckpointStore failing(other.file("checkpoint"), "c");
  failing.set_for_each([](std::size_t n, const std::function<void(std::size_t)>& body) {
    for (std::size_t k = n; k-- > 0;) body(k);
  });
  make_dirs(temp_path_for(other.file("checkpoint/lin.1.pt")));
  make_dirs(temp_path_for(other.file("checkpoint/mlp.1.pt")));
  EXPECT_TRUE(testing::throws_with<IoError>(
      [&] {
        failing.save({1, 0}, a.ptrs, runs);
      },
      {"cannot write", "lin.1.pt"}));
  EXPECT_FALSE(failing.exists());
}

// Asynchronous saves: save() returns once the heads are serialised; the files are written and
// committed by the store's own thread. A load sees the committed generation; a write error
// comes out of the next call that waits for it, and the generation is not committed.
TEST(CheckpointStore, AnAsynchronousSaveCommitsLaterAndItsErrorComesOutOfTheNextCall) {
  testing::TempDir dir;
  Tasks a(1);
  a.train(2);
  std::vector<HeadRun> runs(2);
  runs[1].add_loss(0.5);
  {
    CheckpointStore store(dir.file("checkpoint"), "c");
    store.set_async(true);
    store.save({1, 0}, a.ptrs, runs);
    a.train(1);  // after the save: not in generation 1
    store.save({2, 0}, a.ptrs, runs);
  }  // the store waits for its last write
  Tasks b(99);
  std::vector<HeadRun> loaded;
  EXPECT_EQ(CheckpointStore(dir.file("checkpoint"), "c").load(b.ptrs, loaded).epoch, 2);
  expect_same_weights(a, b);
  EXPECT_EQ(loaded[1].loss_count, 1);
  EXPECT_EQ(list_dir(dir.file("checkpoint")),
            (std::vector<std::string>{"lin.2.pt", "mlp.2.pt", "state.json"}));

  testing::TempDir other;
  CheckpointStore failing(other.file("checkpoint"), "c");
  failing.set_async(true);
  make_dirs(temp_path_for(other.file("checkpoint/mlp.1.pt")));
  failing.save({1, 0}, a.ptrs, runs);  // returns: the write fails on the store's thread
  EXPECT_TRUE(testing::throws_with<IoError>(
      [&] {
        failing.save({2, 0}, a.ptrs, runs);
      },
      {"cannot write", "mlp.1.pt"}));
  EXPECT_FALSE(failing.exists());
  failing.flush();  // the error was thrown once; the next generation commits
  failing.save({2, 0}, a.ptrs, runs);
  failing.flush();
  EXPECT_EQ(CheckpointStore(other.file("checkpoint"), "c").load(b.ptrs, loaded).epoch, 2);
}

ino_t inode(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_ino;
}

// A head that no longer trains is serialised once more after it stops, then its file is
// hard-linked into each new generation, its CRC-32C recorded again: it loads, and a flipped
// byte in it is still caught.
TEST(CheckpointStore, AHeadThatNoLongerTrainsIsLinkedIntoNewGenerationsNotWrittenAgain) {
  testing::TempDir dir;
  Tasks a(1);
  a.train(2);
  std::vector<HeadRun> runs(2);
  runs[0].state = tasks::TaskState::kDone;  // lin stopped; mlp trains on
  CheckpointStore store(dir.file("checkpoint"), "c");
  std::size_t serialised = 0;
  store.set_for_each([&](std::size_t n, const std::function<void(std::size_t)>& body) {
    for (std::size_t k = 0; k < n; ++k, ++serialised) body(k);
  });
  store.save({1, 0}, a.ptrs, runs);
  EXPECT_EQ(serialised, 2u) << "the first generation has every head";
  const ino_t lin = inode(dir.file("checkpoint/lin.1.pt"));
  for (int g = 2; g <= 3; ++g) {
    a.ptrs[1]->train_step(at::randn({16, 6}), at::randint(3, {16}));
    store.save({g, 0}, a.ptrs, runs);
  }
  EXPECT_EQ(serialised, 4u) << "generations 2 and 3 serialised mlp alone";
  EXPECT_EQ(list_dir(dir.file("checkpoint")),
            (std::vector<std::string>{"lin.3.pt", "mlp.3.pt", "state.json"}));
  EXPECT_EQ(inode(dir.file("checkpoint/lin.3.pt")), lin) << "the same file, linked";

  Tasks b(99);
  std::vector<HeadRun> loaded;
  EXPECT_EQ(CheckpointStore(dir.file("checkpoint"), "c").load(b.ptrs, loaded).epoch, 3);
  expect_same_weights(a, b);
  EXPECT_FALSE(loaded[0].training());

  std::string bytes = read_file(dir.file("checkpoint/lin.3.pt"));
  bytes[bytes.size() / 2] ^= 0x10;
  write_file_atomic(dir.file("checkpoint/lin.3.pt"), bytes);
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { CheckpointStore(dir.file("checkpoint"), "c").load(b.ptrs, loaded); },
      {"lin.3.pt", "does not match the checksum"}));
}

TEST(CheckpointStore, RefusesAnotherConfigOtherTasksAndMalformedState) {
  testing::TempDir dir;
  Tasks a(1);
  std::vector<HeadRun> runs(2);
  CheckpointStore(dir.file("checkpoint"), "[train]\nepochs = 3\nseed = 0\n").save({1, 0}, a.ptrs, runs);
  std::vector<HeadRun> out;
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        CheckpointStore(dir.file("checkpoint"), "[train]\nepochs = 5\n[task.x]\nlr = 1\n").load(a.ptrs, out);
      },
      {"configuration differs",
       "state.json': task.x.lr (new), train.epochs (3 -> 5), train.seed (removed); resume", "config.ini"}));
  std::vector<tasks::Task*> reversed{a.ptrs[1], a.ptrs[0]};
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { CheckpointStore(dir.file("checkpoint"), "[train]\nepochs = 3\nseed = 0\n").load(reversed, out); },
      {"checkpoint task 0 is 'lin'", "config has 'mlp'"}));
  write_file_atomic(dir.file("checkpoint/state.json"), "{\"generation\": 1, \"epo");
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { CheckpointStore(dir.file("checkpoint"), "config v1").load(a.ptrs, out); },
      {"state.json", "malformed"}));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { CheckpointStore(dir.file("nowhere"), "config v1").load(a.ptrs, out); },
      {"no checkpoint", "nowhere"}));
}

// A config check sees both configurations and where the checkpoint is: what it lets through
// loads, what it refuses is said with its reason.
TEST(CheckpointStore, AConfigCheckDecidesWhichDifferencesLoad) {
  testing::TempDir dir;
  Tasks a(1);
  a.train(2);
  std::vector<HeadRun> runs(2);
  runs[0].epochs = runs[1].epochs = 3;
  CheckpointStore(dir.file("checkpoint"), "[train]\nepochs = 3\nseed = 0\n").save({3, 0}, a.ptrs, runs);
  Tasks b(2);
  std::vector<HeadRun> out;
  CheckpointStore store(dir.file("checkpoint"), "[train]\nepochs = 5\nseed = 0\n");
  CheckpointStore::ConfigValues seen_saved, seen_now;
  CheckpointPosition seen_at;
  std::string answer;
  store.set_config_check([&](const CheckpointStore::ConfigValues& saved,
                             const CheckpointStore::ConfigValues& now, const CheckpointPosition& at) {
    seen_saved = saved;
    seen_now = now;
    seen_at = at;
    return answer;
  });
  answer = ": no, because";
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { store.load(b.ptrs, out); },
      {"configuration differs from the one that wrote", "json': no, because"}));
  EXPECT_EQ(seen_saved.at("train.epochs"), "3");
  EXPECT_EQ(seen_now.at("train.epochs"), "5");
  EXPECT_EQ(seen_now.at("train.seed"), "0");
  EXPECT_EQ(seen_at.epoch, 3);
  answer.clear();
  const CheckpointPosition at = store.load(b.ptrs, out);
  EXPECT_EQ(at.epoch, 3);
  EXPECT_EQ(out[1].epochs, 3);
  expect_same_weights(a, b);
  EXPECT_EQ(config_changes(seen_saved, seen_now), ": train.epochs (3 -> 5)");
  EXPECT_EQ(config_changes(seen_saved, seen_saved), "");
}

}  // namespace
}  // namespace canopy::runners
