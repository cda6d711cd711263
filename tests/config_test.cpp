#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <sstream>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/runners/config.h"
#include "canopy/runners/input_data.h"
#include "canopy/runners/sweep_job.h"
#include "support/test_support.h"

namespace canopy::runners {
namespace {

const char* kConfig = R"(
[data]
train_limit = 100
[trunk]
path = /models/t.pt
[train]
epochs = 3
[task.fine]
head = mlp
head.hidden = 64,32
lr = 0.01
[task.coarse]
head = linear
label_map = 0,0,1,1
)";

TEST(Config, ReadsSectionsTasksAndHeadParams) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"), kConfig);
  const JobConfig c = load_job_config(dir.file("c.ini"));
  EXPECT_EQ(c.data.train_limit, 100);
  EXPECT_EQ(c.train.epochs, 3);
  EXPECT_EQ(c.train.batch_size, 256) << "default kept";
  ASSERT_EQ(c.tasks.size(), 2u);
  EXPECT_EQ(c.tasks[0].name, "coarse");  // tasks are ordered by name
  EXPECT_EQ(c.tasks[0].label_map, (std::vector<std::int64_t>{0, 0, 1, 1}));
  EXPECT_EQ(c.tasks[1].head, "mlp");
  EXPECT_DOUBLE_EQ(c.tasks[1].lr, 0.01);
  EXPECT_EQ(c.tasks[1].head_params.at("hidden"), "64,32");
  // A UTF-8 byte-order mark (Windows editors write one) made the first line invalid.
  write_file_atomic(dir.file("bom.ini"), "\xEF\xBB\xBF" + std::string(kConfig));
  const JobConfig b = load_job_config(dir.file("bom.ini"));
  EXPECT_EQ(b.data.train_limit, 100);
  EXPECT_EQ(b.tasks.size(), 2u);
}

TEST(Config, CommandLineOverridesFile) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"), kConfig);
  const JobConfig c = load_job_config(dir.file("c.ini"), {"train.epochs=7", "task.fine.lr = 0.5"});
  EXPECT_EQ(c.train.epochs, 7);
  EXPECT_DOUBLE_EQ(c.tasks[1].lr, 0.5);
}

TEST(Config, ErrorsNameKeyValueAndFile) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"), kConfig);
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { load_job_config(dir.file("c.ini"), {"train.epoch=3"}); },
      {"unknown config key", "train.epoch (did you mean 'train.epochs'?)", "c.ini"}));
  EXPECT_TRUE(
      testing::throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"trian.batch_size=3"}); },
                                        {"trian.batch_size (did you mean 'train.batch_size'?)"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { load_job_config(dir.file("c.ini"), {"task.fine.optimiser=adam"}); },
      {"unknown key 'task.fine.optimiser' (did you mean 'optimizer'?)", "a task has the keys"}));
  try {
    load_job_config(dir.file("c.ini"), {"train.zzzz=1"});
    ADD_FAILURE() << "train.zzzz was accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()).find("did you mean"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { load_job_config(dir.file("c.ini"), {"train.epochs=three"}); }, {"train.epochs", "'three'"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { load_job_config(dir.file("c.ini"), {"train.batch_size=0"}); }, {"train.batch_size", "0"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { load_job_config(dir.file("c.ini"), {"task.fine.optimizer=lbfgs"}); },
      {"task.fine.optimizer", "sgd, adam, adamw", "'lbfgs'"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { load_job_config(dir.file("c.ini"), {"task.fine.optimizer=adma"}); },
      {"task.fine.optimizer", "'adma' (did you mean 'adam'?)"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { load_job_config(dir.file("missing.ini")); },
                                                {"missing.ini", "No such file or directory"}));
  write_file_atomic(dir.file("dup.ini"), "[train]\nepochs = 1\nepochs = 2\n");
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { load_job_config(dir.file("dup.ini")); },
                                                {"train.epochs", "twice"}));
}

// data.list_columns: label columns of a table, split at a blank run or one punctuation mark;
// refused for sources without tables, for the text or path column, and for other separators.
TEST(Config, ListColumnsNameLabelColumnsOfATable) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"), kConfig);
  const std::vector<std::string> table = {"data.source=text-csv", "data.train=a.csv", "data.test=b.csv",
                                          "text.vocab=v.txt"};
  auto with = [&](std::vector<std::string> more) {
    std::vector<std::string> all = table;
    all.insert(all.end(), more.begin(), more.end());
    return load_job_config(dir.file("c.ini"), all);
  };
  const JobConfig c = with({"data.list_columns=tags, genres", "data.list_separator=|"});
  EXPECT_EQ(c.data.list_columns, (std::vector<std::string>{"tags", "genres"}));
  EXPECT_EQ(c.data.list_separator, "|");
  EXPECT_EQ(with({"data.list_columns=tags"}).data.list_separator, "space");
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        with({"data.list_columns=tags", "data.list_separator=ab"});
      },
      {"data.list_separator", "'ab'", "one punctuation character"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        with({"data.list_columns=tags", "data.list_separator=x"});
      },
      {"'x'"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { with({"data.list_columns=tags,text"}); },
                                                {"'text' is the text column (data.text_attribute)"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { load_job_config(dir.file("c.ini"), {"data.list_columns=tags"}); },
      {"data.list_columns", "names columns of a table", "data.source = fashion-mnist has none"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        load_job_config(dir.file("c.ini"), {"data.source=image-csv", "data.train=a.csv", "data.test=b.csv",
                                            "data.list_columns=file_name"});
      },
      {"'file_name' is the images' path column"}));
}

// Keys and values go into JSON, HDF5 and TensorBoard as UTF-8: a Latin-1 byte in a task's name
// or a path is refused when the configuration is read, not at the run's first checkpoint.
TEST(Config, BytesThatAreNotUtf8AreRefusedNamingTheKey) {
  testing::TempDir dir;
  write_file_atomic(dir.file("latin.ini"), "[task.caf\xe9]\nhead = linear\n");
  EXPECT_TRUE(
      testing::throws_with<ConfigError>([&] { load_job_config(dir.file("latin.ini")); },
                                        {"task.caf\\xe9.head", "not UTF-8", "byte 0xe9 at offset 8"}));
  write_file_atomic(dir.file("c.ini"), kConfig);
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { load_job_config(dir.file("c.ini"), {"cache.path=/data/caf\xe9"}); },
      {"cache.path", "'/data/caf\\xe9' is not UTF-8", "iconv"}));
  EXPECT_NO_THROW(load_job_config(dir.file("c.ini"), {"cache.path=/data/caf\xc3\xa9"}));
}

// Head options live under head.: a task key and a head option of the same name never meet.
TEST(Config, HeadOptionsHaveTheirOwnNamespace) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"),
                    std::string(kConfig) +
                        "[task.custom]\nhead = mine\nhead.gamma = 3\nhead.epochs = 9\ngamma = 0.5\n"
                        "[task.sectioned.head]\nwidth = 7\n[task.sectioned]\nhead = mine\n");
  const JobConfig c = load_job_config(dir.file("c.ini"));
  const auto& custom = c.tasks[1];
  ASSERT_EQ(custom.name, "custom");
  EXPECT_DOUBLE_EQ(custom.gamma, 0.5) << "the task's own gamma";
  EXPECT_EQ(custom.epochs, 0) << "head.epochs is the head's, not the task's";
  EXPECT_EQ(custom.head_params, (std::map<std::string, std::string>{{"epochs", "9"}, {"gamma", "3"}}));
  EXPECT_EQ(c.tasks[3].head_params.at("width"), "7") << "a [task.X.head] section is the same";
  write_file_atomic(dir.file("old.ini"), std::string(kConfig) + "[task.x]\nhead = mlp\ndropout = 0.1\n");
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { load_job_config(dir.file("old.ini")); },
                                                {"unknown key 'task.x.dropout'", "head.dropout = 0.1"}));
}

// Settings for another optimizer or schedule than the task's are said, once per grid.
TEST(Config, SaysWhichTaskSettingsGoUnused) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"), kConfig);
  EXPECT_TRUE(task_keys_unused(load_job_config(dir.file("c.ini"))).empty());
  const JobConfig c =
      load_job_config(dir.file("c.ini"), {"task.fine.momentum=0.5", "task.fine.optimizer=sgd|adam|adamw",
                                          "train.validation_fraction=0.1", "task.coarse.gamma=0.5",
                                          "task.coarse.step_size=3", "task.coarse.schedule=cosine"});
  EXPECT_EQ(
      task_keys_unused(c),
      (std::vector<std::string>{"task.coarse.step_size = 3 (schedule = step only; its schedule is cosine)",
                                "task.coarse.gamma = 0.5 (schedule = step only; its schedule is cosine)",
                                "task.fine.momentum = 0.5 (sgd only; its optimizer is adam)",
                                "task.fine.momentum = 0.5 (sgd only; its optimizer is adamw)"}));
  EXPECT_TRUE(task_keys_unused(
                  load_job_config(dir.file("c.ini"), {"task.fine.momentum=0.5", "task.fine.optimizer=sgd",
                                                      "task.coarse.schedule=step", "task.coarse.gamma=0.5"}))
                  .empty());
}

TEST(Config, SaysWhenHeadsStopEarlyOnTheEvalSplit) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"), kConfig);
  EXPECT_EQ(stops_on_eval_split(load_job_config(dir.file("c.ini"))), "");
  const std::string said = stops_on_eval_split(load_job_config(
      dir.file("c.ini"), {"task.fine.early_stop_patience=2", "task.coarse.early_stop_patience=1"}));
  for (const char* part : {"tasks 'coarse', 'fine'", "(train.eval_split = test;", "lean optimistic",
                           "train.validation_fraction = 0.1"})
    EXPECT_NE(said.find(part), std::string::npos) << part << " in: " << said;
  // Chosen on a validation split instead: nothing to say.
  EXPECT_EQ(stops_on_eval_split(load_job_config(
                dir.file("c.ini"), {"task.fine.early_stop_patience=2", "train.validation_fraction=0.2"})),
            "");
}

TEST(Config, RangesComeFromTheKeyTable) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"), kConfig);
  using testing::throws_with;
  EXPECT_TRUE(throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"task.fine.lr=0"}); },
                                       {"task.fine.lr", "> 0", "got 0"}));
  EXPECT_TRUE(throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"task.fine.lr=nan"}); },
                                       {"task.fine.lr", "finite"}));
  EXPECT_TRUE(throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"trunk.lr=1e300"}); },
                                       {"trunk.lr", "float32's range", "got 1e+300"}));
  EXPECT_NO_THROW(load_job_config(dir.file("c.ini"), {"trunk.lr=3e38"}));
  EXPECT_TRUE(throws_with<ConfigError>(
      [&] { load_job_config(dir.file("c.ini"), {"train.validation_fraction=0.9999999"}); },
      {"train.validation_fraction", "<= 0.9", "got 0.9999999"}));
  EXPECT_TRUE(
      throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"cache.memory_cap_mb=1e14"}); },
                               {"cache.memory_cap_mb", "<= 1.099511628e+12", "got 1e+14"}));
  EXPECT_TRUE(throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"train.out_dir="}); },
                                       {"train.out_dir", "is empty"}));
  EXPECT_TRUE(throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"cache.dtype=int8"}); },
                                       {"cache.dtype", "float32, float16, bfloat16", "'int8'"}));
  EXPECT_TRUE(
      throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"train.intra_op_threads=100000"}); },
                               {"train.intra_op_threads", "4x the cores this process may use", "100000"}));
  EXPECT_TRUE(throws_with<ConfigError>([&] { load_job_config(dir.path()); }, {"is a directory"}));
  EXPECT_TRUE(
      throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"task.fine.kind=ordinal"}); },
                               {"task.fine.kind", "multiclass, multilabel, regression", "'ordinal'"}));
}

// docs/configuration.md holds the key reference the table generates (`canopy keys`): a key
// added, removed or changed without the docs fails here.
TEST(Config, TheDocsListEveryKeyAsTheTableDoes) {
  const std::string doc = read_file(std::string(CANOPY_SOURCE_DIR) + "/docs/configuration.md");
  const std::string begin = "<!-- keys:begin (generated by `canopy keys`) -->\n", end = "<!-- keys:end -->";
  const auto b = doc.find(begin), e = doc.find(end);
  ASSERT_NE(b, std::string::npos);
  ASSERT_NE(e, std::string::npos);
  EXPECT_EQ(doc.substr(b + begin.size(), e - b - begin.size()), config_reference())
      << "regenerate the block with: canopy keys";
}

TEST(Config, WeightsAreNumbersOrBalanced) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"), kConfig);
  const JobConfig c = load_job_config(dir.file("c.ini"), {"task.fine.class_weights = balanced"});
  EXPECT_TRUE(c.tasks[1].balanced_class_weights);
  EXPECT_TRUE(c.tasks[1].class_weights.empty());
  EXPECT_FALSE(c.tasks[0].balanced_class_weights);
  const std::string dumped = dump_config(c);
  EXPECT_NE(dumped.find("class_weights = balanced"), std::string::npos) << dumped;
  write_file_atomic(dir.file("dumped.ini"), dumped);
  EXPECT_TRUE(load_job_config(dir.file("dumped.ini")).tasks[1].balanced_class_weights);
  EXPECT_EQ(load_job_config(dir.file("c.ini"), {"task.fine.class_weights=1,2"}).tasks[1].class_weights,
            (std::vector<double>{1, 2}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { load_job_config(dir.file("c.ini"), {"task.fine.class_weights=balance"}); },
      {"task.fine.class_weights", "'balance'", "(or balanced) (did you mean 'balanced'?)"}));
}

TEST(Config, DumpIsAFixedPoint) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"), kConfig);
  const JobConfig c = load_job_config(dir.file("c.ini"), {"train.seed=9"});
  const std::string dumped = dump_config(c);
  write_file_atomic(dir.file("dumped.ini"), dumped);
  const JobConfig again = load_job_config(dir.file("dumped.ini"));
  EXPECT_EQ(again.train.seed, 9u);
  // Identical apart from the first line naming the source file.
  EXPECT_EQ(dumped.substr(dumped.find('\n')), dump_config(again).substr(dump_config(again).find('\n')));
}

TEST(Config, TrunkFreezeTapsAndTextAndImageSources) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"), kConfig);
  const JobConfig c = load_job_config(
      dir.file("c.ini"),
      {"trunk.taps=layers.4, layers.5", "trunk.freeze=first:3", "trunk.batchnorm_affine_trainable=true",
       "trunk.pooling=masked_mean", "trunk.allow_unpinned=true", "data.source=arff",
       "data.train_files=grain:/d/g.arff, corn:/d/c.arff", "data.test_files=grain:/d/gt.arff",
       "text.vocab=/v.txt", "text.max_length=128", "text.lowercase=false"});
  EXPECT_EQ(c.trunk.taps, (std::vector<std::string>{"layers.4", "layers.5"}));
  EXPECT_EQ(c.trunk.freeze.freeze, "first:3");
  EXPECT_TRUE(c.trunk.freeze.batchnorm_affine_trainable);
  EXPECT_TRUE(c.trunk.allow_unpinned);
  EXPECT_EQ(c.data.train_files, (std::vector<std::string>{"grain:/d/g.arff", "corn:/d/c.arff"}));
  EXPECT_EQ(c.text.max_length, 128);
  EXPECT_FALSE(c.text.lowercase);
  // The dump reads back to the same configuration.
  write_file_atomic(dir.file("dumped.ini"), dump_config(c));
  const JobConfig again = load_job_config(dir.file("dumped.ini"));
  EXPECT_EQ(again.trunk.taps, c.trunk.taps);
  EXPECT_EQ(again.data.train_files, c.data.train_files);
  EXPECT_EQ(again.trunk.freeze.freeze, "first:3");
  const JobConfig images = load_job_config(
      dir.file("c.ini"), {"data.source=image-folders", "data.train=/img/train", "data.test=/img/test"});
  EXPECT_EQ(images.data.train, "/img/train");
  EXPECT_EQ(dump_config(images).find("\ndir = "), std::string::npos) << "an image-folders run has no idx dir";
  EXPECT_EQ(dump_config(images).find("[text]"), std::string::npos) << "nor text settings";
  EXPECT_NE(dump_config(again).find("[text]\nvocab = /v.txt"), std::string::npos);
  using testing::throws_with;
  EXPECT_TRUE(throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"data.source=image-csv"}); },
                                       {"needs data.train and data.test"}));
  EXPECT_TRUE(throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"data.source=arff"}); },
                                       {"needs data.train_files and data.test_files"}));
  EXPECT_TRUE(
      throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"data.source=webdataset"}); },
                               {"data.source", "image-folders", "'webdataset'"}));
  EXPECT_TRUE(throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini"), {"trunk.taps=a,a"}); },
                                       {"trunk.taps", "listed twice"}));
  EXPECT_TRUE(throws_with<ConfigError>(
      [&] {
        load_job_config(dir.file("c.ini"), {"data.source=arff", "data.train_files=g:/a",
                                            "data.test_files=g:/b", "text.vocab=/v", "text.max_length=2"});
      },
      {"text.max_length", "got 2"}));
}

// Seeded mutations of the shipped configs (seed 20261130, 150 per config): a value emptied,
// replaced by a hostile one, a line dropped, duplicated or cut, a section header broken,
// unknown keys. Loading and validating must end in the config or the data being refused
// with a canopy error, or in a valid config, never in another exception or a crash.
TEST(Config, FuzzedConfigsAreRefusedCleanlyOrValid) {
  const std::vector<std::string> hostile = {"",
                                            "  ",
                                            "-1",
                                            "0",
                                            "1",
                                            "1e308",
                                            "-1e308",
                                            "nan",
                                            "inf",
                                            "0x10",
                                            "abc",
                                            "999999999999999999999",
                                            "9223372036854775807",
                                            "first:99",
                                            "first:-1",
                                            "match:(",
                                            "modules:nowhere",
                                            "a,a,a,a",
                                            "/",
                                            "../../etc",
                                            "true",
                                            "maybe",
                                            "cosine",
                                            "step",
                                            "gradual",
                                            "autofreeze",
                                            "pcgrad",
                                            "0,1,2",
                                            "\xc3\x28",
                                            std::string(3000, 'x'),
                                            "12 34",
                                            "=",
                                            "[x]",
                                            "%"};
  testing::TempDir dir;
  std::mt19937_64 rng(20261130);
  std::int64_t refused = 0, valid = 0;
  for (const char* name : {"fmnist_lite0_tune.ini", "reuters_minilm_tune.ini"}) {
    const std::string text = read_file(std::string(CANOPY_SOURCE_DIR) + "/configs/" + name);
    std::vector<std::string> lines;
    std::istringstream in(text);
    for (std::string l; std::getline(in, l);) lines.push_back(l);
    for (int round = 0; round < 150; ++round) {
      std::vector<std::string> m = lines;
      const int edits = 1 + static_cast<int>(rng() % 3);
      for (int e = 0; e < edits; ++e) {
        const std::size_t at = rng() % m.size();
        std::string& line = m[at];
        const auto eq = line.find('=');
        switch (rng() % 7) {
          case 0:
          case 1:
          case 2:  // a value replaced
            if (eq != std::string::npos)
              line = line.substr(0, eq + 1) + " " + hostile[rng() % hostile.size()];
            break;
          case 3:  // a line dropped
            m.erase(m.begin() + static_cast<std::ptrdiff_t>(at));
            break;
          case 4:  // a line duplicated
            m.insert(m.begin() + static_cast<std::ptrdiff_t>(at), line);
            break;
          case 5:  // a line cut short
            line = line.substr(0, rng() % (line.size() + 1));
            break;
          default:  // an unknown key, or a broken header
            line = rng() % 2 ? "no_such_key = 3" : "[task.";
        }
      }
      std::string body;
      for (const auto& l : m) body += l + "\n";
      const std::string path = dir.file("fuzz.ini");
      std::ofstream(path) << body;
      try {
        validate_job_config(load_job_config(path));
        ++valid;
      } catch (const Error&) {
        ++refused;
      } catch (const std::exception& e) {
        ADD_FAILURE() << name << " round " << round << ": not a canopy error: " << e.what() << "\n" << body;
      }
    }
  }
  EXPECT_EQ(refused + valid, 300);
  EXPECT_GT(refused, 100);  // the mutations mostly break something, and each is refused by name
}

// Lists where one value is expected make a grid: one head per combination, named by its
// values, the grid written back as it was (the dump reloads to the same heads).
TEST(Config, ListsInATaskExpandToAGridOfHeads) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"), std::string(kConfig) + R"(
[task.probe]
head = mlp
lr = 1e-3, 1e-2
weight_decay = 0 | 1e-4
head.hidden = 128 | 512, 256
)");
  const JobConfig c = load_job_config(dir.file("c.ini"), {"train.validation_fraction=0.1"});
  ASSERT_EQ(c.tasks.size(), 2u + 8u);
  std::vector<std::string> members;
  for (const auto& t : c.tasks) {
    if (t.grid == "probe") members.push_back(t.name);
  }
  ASSERT_EQ(members.size(), 8u);
  EXPECT_EQ(members.front(), "probe@hidden=128@lr=1e-3@weight_decay=0");
  EXPECT_EQ(members[1], "probe@hidden=128@lr=1e-3@weight_decay=1e-4") << "the last key varies fastest";
  EXPECT_EQ(members.back(), "probe@hidden=512,256@lr=1e-2@weight_decay=1e-4");
  const auto& last = c.tasks[9];
  EXPECT_EQ(last.name, members.back());
  EXPECT_DOUBLE_EQ(last.lr, 1e-2);
  EXPECT_DOUBLE_EQ(last.weight_decay, 1e-4);
  EXPECT_EQ(last.head_params.at("hidden"), "512, 256") << "a list value of a head option, whole";
  EXPECT_EQ(last.grid_point.at("lr"), "1e-2");
  EXPECT_EQ(last.grid_axes.at("head.hidden"), "128 | 512, 256");
  EXPECT_TRUE(c.tasks[0].grid.empty()) << "other tasks stay single heads";
  const std::string dumped = dump_config(c);
  EXPECT_NE(dumped.find("lr = 1e-3, 1e-2"), std::string::npos) << dumped;
  EXPECT_EQ(dumped.find("probe@"), std::string::npos) << "members are not written out";
  write_file_atomic(dir.file("d.ini"), dumped);
  const JobConfig again = load_job_config(dir.file("d.ini"));
  ASSERT_EQ(again.tasks.size(), c.tasks.size());
  for (std::size_t i = 0; i < c.tasks.size(); ++i) EXPECT_EQ(again.tasks[i].name, c.tasks[i].name);
  EXPECT_EQ(dump_config(again).substr(dumped.find('\n')), dumped.substr(dumped.find('\n')));
}

TEST(Config, GridsAndBestExportNeedAValidationSplit) {
  testing::TempDir dir;
  write_file_atomic(dir.file("c.ini"),
                    std::string(kConfig) + "[task.probe]\nhead = linear\nlr = 1e-3, 1e-2\n");
  EXPECT_TRUE(
      testing::throws_with<ConfigError>([&] { load_job_config(dir.file("c.ini")); },
                                        {"task.probe", "grid of 2 heads", "train.validation_fraction"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        load_job_config(dir.file("c.ini"),
                        {"train.validation_fraction=0.1", "task.probe.monitor=accuracy, nll"});
      },
      {"task.probe.monitor", "compared by one metric"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        load_job_config(dir.file("c.ini"), {"task.probe.lr=0.1", "train.export=best"});
      },
      {"train.export = best", "validation_fraction"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        load_job_config(dir.file("c.ini"),
                        {"task.probe.lr=0.1", "train.validation_fraction=0.1", "train.grid_halving=2"});
      },
      {"train.grid_halving = 2", "no task is a grid"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        load_job_config(dir.file("c.ini"), {"train.validation_fraction=0.1", "train.grid_halving=1",
                                            "train.grid_halving_factor=1"});
      },
      {"train.grid_halving_factor", ">= 2", "1"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        load_job_config(dir.file("c.ini"),
                        {"train.validation_fraction=0.1", "train.epochs=4", "train.grid_halving=4"});
      },
      {"train.grid_halving = 4", "after epoch 4", "no grid member trains more than 4 epochs"}));
  EXPECT_EQ(load_job_config(dir.file("c.ini"), {"train.validation_fraction=0.1", "train.grid_halving=1"})
                .train.grid_halving_factor,
            3);
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        load_job_config(dir.file("c.ini"), {"train.validation_fraction=0.1", "task.probe.labels=a|b"});
      },
      {"task.probe.labels", "same labels"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        load_job_config(dir.file("c.ini"), {"train.validation_fraction=0.1", "task.probe.lr=1e-3,,1e-2"});
      },
      {"task.probe.lr", "must not be empty"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        load_job_config(dir.file("c.ini"), {"train.validation_fraction=0.1", "task.a@b.head=linear"});
      },
      {"a@b", "not allowed"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] { load_job_config(dir.file("c.ini"), {"train.validation_fraction=0.95"}); },
      {"train.validation_fraction", "<= 0.9"}));
  const JobConfig ok = load_job_config(dir.file("c.ini"), {"train.validation_fraction=0.1"});
  EXPECT_TRUE(exports_best(ok.train)) << "auto: best with a validation split";
  EXPECT_FALSE(exports_best(load_job_config(dir.file("c.ini"), {"task.probe.lr=0.1"}).train));
}

TEST(InputData, AFolderLimitKeepsEveryClass) {
  testing::TempDir dir;
  const std::map<std::string, int> files = {{"ant", 5}, {"bee", 1}, {"cat", 4}};
  for (const char* split : {"train", "test"}) {
    for (const auto& [cls, count] : files) {
      make_dirs(dir.file(std::string(split) + "/" + cls));
      for (int i = 0; i < count; ++i)
        write_file_atomic(dir.file(std::string(split) + "/" + cls + "/" + std::to_string(i) + ".png"), "x");
    }
  }
  write_file_atomic(dir.file("c.ini"), kConfig);
  const JobConfig c = load_job_config(
      dir.file("c.ini"), {"data.source=image-folders", "data.train=" + dir.file("train"),
                          "data.test=" + dir.file("test"), "data.train_limit=6", "data.test_limit=0"});
  const InputData data = load_input_data(c);  // lists and labels; nothing is decoded yet
  const InputSplit& train = data.splits.at("train");
  EXPECT_EQ(train.rows, 6);
  // Classes in turn: ant 0, bee 0, cat 0, ant 1, cat 1, ant 2 — kept in listing order.
  const std::vector<std::int64_t> ids(train.ids.data_ptr<std::int64_t>(),
                                      train.ids.data_ptr<std::int64_t>() + 6);
  EXPECT_EQ(ids, (std::vector<std::int64_t>{0, 1, 2, 5, 6, 7}));
  const at::Tensor& y = train.labels.at("class");
  EXPECT_EQ(std::vector<std::int64_t>(y.data_ptr<std::int64_t>(), y.data_ptr<std::int64_t>() + 6),
            (std::vector<std::int64_t>{0, 0, 0, 1, 2, 2}));
  EXPECT_EQ(data.splits.at("test").rows, 10) << "no test limit";
  EXPECT_EQ(data.class_names, (std::vector<std::string>{"ant", "bee", "cat"}));
}

// canopy sweep's plan: every combination of the values, named by them, each run's config set.
SweepOptions sweep_of(const testing::TempDir& dir,
                      std::vector<std::pair<std::string, std::vector<std::string>>> vary) {
  write_file_atomic(dir.file("c.ini"), kConfig);
  SweepOptions o;
  o.config = dir.file("c.ini");
  o.overrides = {"trunk.sha256=" + std::string(64, 'a')};  // pinned: the plan hashes no trunk file
  o.vary = std::move(vary);
  o.out = dir.file("sweep");
  return o;
}

TEST(Sweep, EveryCombinationIsASettingNamedByItsValues) {
  testing::TempDir dir;
  SweepOptions o =
      sweep_of(dir, {{"task.fine.lr", {"0.01", "0.003"}}, {"trunk.pooling", {"avg", "flatten"}}});
  o.seeds = {0, 1};
  const SweepPlan plan = plan_sweep(o);
  EXPECT_EQ(plan.settings, (std::vector<std::string>{"task.fine.lr = 0.01, trunk.pooling = avg",
                                                     "task.fine.lr = 0.01, trunk.pooling = flatten",
                                                     "task.fine.lr = 0.003, trunk.pooling = avg",
                                                     "task.fine.lr = 0.003, trunk.pooling = flatten"}));
  ASSERT_EQ(plan.runs.size(), 8u);
  EXPECT_EQ(plan.runs[0].name, "lr-0.01_pooling-avg-s0");
  EXPECT_EQ(plan.runs[1].name, "lr-0.01_pooling-avg-s1");
  EXPECT_EQ(plan.runs[7].name, "lr-0.003_pooling-flatten-s1");
  const SweepRun& r = plan.runs[3];  // setting 1, seed 1
  EXPECT_EQ(r.setting, 1u);
  EXPECT_EQ(r.config.train.seed, 1);
  EXPECT_EQ(r.config.trunk.pooling, "flatten");
  EXPECT_EQ(r.config.train.out_dir, dir.file("sweep/lr-0.01_pooling-flatten-s1"));
  EXPECT_EQ(r.action, SweepAction::kTrain);
  // The head's rate does not change the features, the pooling does: two caches.
  ASSERT_EQ(plan.caches.size(), 2u);
  EXPECT_EQ(plan.runs[0].config.cache.path, plan.runs[4].config.cache.path);
  EXPECT_NE(plan.runs[0].config.cache.path, plan.runs[2].config.cache.path);
  EXPECT_TRUE(plan.hint.empty()) << "a trunk key is varied: no grid can do it";
  EXPECT_EQ(sweep_arm_paths(plan)[1],
            (std::vector<std::string>{dir.file("sweep/lr-0.01_pooling-flatten-s0"),
                                      dir.file("sweep/lr-0.01_pooling-flatten-s1")}));
}

TEST(Sweep, NamesThatWouldBeAlikeAreNumberedAndLongOnesCut) {
  testing::TempDir dir;
  const SweepPlan alike = plan_sweep(sweep_of(dir, {{"trunk.path", {"/m/t.pt", "/m_t.pt"}}}));
  EXPECT_EQ(alike.runs[0].name, "1_path-_m_t.pt-s0");
  EXPECT_EQ(alike.runs[1].name, "2_path-_m_t.pt-s0");
  const SweepPlan long_names =
      plan_sweep(sweep_of(dir, {{"trunk.path", {"/" + std::string(120, 'x'), "/t.pt"}}}));
  EXPECT_EQ(long_names.runs[0].name, "setting1-s0");
  EXPECT_EQ(long_names.runs[1].name, "path-_t.pt-s0");
  const SweepPlan heads = plan_sweep(sweep_of(dir, {{"task.fine.lr", {"0.01", "0.003"}}}));
  EXPECT_NE(heads.hint.find("a grid in the config (task.fine.lr = 0.01, 0.003)"), std::string::npos)
      << heads.hint;
  EXPECT_EQ(heads.caches.size(), 1u);
}

TEST(Sweep, RefusesWhatItPlacesRepeatsAndTooFewOrManySettings) {
  testing::TempDir dir;
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        plan_sweep(sweep_of(dir, {{"train.seed", {"1", "2"}}}));
      },
      {"--vary train.seed", "--seeds gives the seeds"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        plan_sweep(sweep_of(dir, {{"trunk.pooling", {"avg", "avg"}}}));
      },
      {"names a value twice"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        plan_sweep(sweep_of(dir, {{"trunk.pooling", {"avg"}}}));
      },
      {"1 setting", "2 to 26"}));
  std::vector<std::string> many;
  for (int i = 0; i < 27; ++i) many.push_back(std::to_string(i + 1));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        plan_sweep(sweep_of(dir, {{"train.epochs", many}}));
      },
      {"27 settings", "2 to 26"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>(
      [&] {
        plan_sweep(sweep_of(dir, {{"trunk.pooling", {"avg", "bogus"}}}));
      },
      {"trunk.pooling", "bogus"}));
  SweepOptions seeds = sweep_of(dir, {{"trunk.pooling", {"avg", "flatten"}}});
  seeds.seeds = {3, 3};
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { plan_sweep(seeds); }, {"names a seed twice"}));
  SweepOptions placed = sweep_of(dir, {{"trunk.pooling", {"avg", "flatten"}}});
  placed.overrides.push_back("cache.path=x");
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { plan_sweep(placed); }, {"--set cache.path=x"}));
}
// The sweep's choice: per task the cheapest setting no other is shown better than, the cheapest
// unbeaten on every task, and what each cheaper choice is shown worse on (the largest difference
// shown, read the other way round where only the reverse pair is recorded; lower is better for nll).
TEST(Sweep, ChoosesTheCheapestUnbeatenSettingPerTaskAndOnEveryTask) {
  const std::string record = R"({"settings": ["k = a", "k = b", "k = c"], "runs": [
      {"setting": "k = a", "train_seconds": 1.0}, {"setting": "k = a", "train_seconds": 3.0},
      {"setting": "k = b", "train_seconds": 10.0}, {"setting": "k = c", "train_seconds": 20.0}]})";
  const std::string compared = R"({"tasks": [
      {"task": "t1", "metric": "accuracy", "unbeaten": ["B", "C"],
       "versus_A": {"B": {"difference": 0.03, "interval": [0.01, 0.05]},
                    "C": {"difference": 0.04, "interval": [0.02, 0.06]}},
       "between": {"C - B": {"difference": 0.01, "interval": [-0.01, 0.02]}}},
      {"task": "t2", "metric": "accuracy", "unbeaten": ["C"],
       "versus_A": {"B": {"difference": 0.01, "interval": [-0.005, 0.02]},
                    "C": {"difference": 0.02, "interval": [0.01, 0.03]}},
       "between": {"C - B": {"difference": 0.002, "interval": [0.001, 0.003]}}},
      {"task": "t3", "metric": "nll", "unbeaten": ["A", "C"],
       "versus_A": {"B": {"difference": 0.2, "interval": [0.1, 0.3]},
                    "C": {"difference": 0.05, "interval": [-0.02, 0.1]}},
       "between": {"C - B": {"difference": -0.15, "interval": [-0.25, -0.05]}}}]})";
  const std::string said = choice_lines(record, compared);
  for (const char* line : {"  A  k = a  2.0s   1 task: t3\n", "  B  k = b  10.0s  1 task: t1\n",
                           "  C  k = c  20.0s  1 task: t2\n",
                           "the cheapest setting unbeaten on every task: C (k = c), 20.0s per run\n",
                           "A, at 0.10x C's training time, is shown worse on 2 of 3 tasks: t1 (C - A "
                           "+4.00 points [+2.00, +6.00]); "
                           "t2 (C - A +2.00 points [+1.00, +3.00])\n",
                           "B, at 0.50x C's training time, is shown worse on 2 of 3 tasks: t2 (C - B "
                           "+0.20 points [+0.10, +0.30]); "
                           "t3 (A - B -0.2000 [-0.3000, -0.1000])\n"})
    EXPECT_NE(said.find(line), std::string::npos) << "want: " << line << "in:\n" << said;

  // No setting unbeaten on both tasks; a setting whose time is unknown comes after the timed ones.
  const std::string untimed = R"({"settings": ["k = a", "k = b"], "runs": [
      {"setting": "k = a", "train_seconds": 0}, {"setting": "k = b", "train_seconds": 5.0}]})";
  const std::string split = R"({"tasks": [
      {"task": "t1", "metric": "r2", "unbeaten": ["B"], "versus_A": {"B": {"difference": 0.2, "interval": [0.1, 0.3]}}},
      {"task": "t2", "metric": "r2", "unbeaten": ["A"], "versus_A": {"B": {"difference": -0.1, "interval": [-0.2, -0.05]}}}]})";
  const std::string other = choice_lines(untimed, split);
  EXPECT_NE(other.find("  B  k = b  5.0s          1 task: t1\n  A  k = a  time unknown  1 task: t2\n"),
            std::string::npos)
      << other;
  EXPECT_NE(other.find("no setting is unbeaten on every task"), std::string::npos) << other;
  EXPECT_NE(other.find("B is shown worse on 1 of 2 tasks: t2 (A - B +0.1000 [+0.0500, +0.2000])"),
            std::string::npos)
      << other;
  EXPECT_NE(other.find("A is shown worse on 1 of 2 tasks: t1 (B - A +0.2000 [+0.1000, +0.3000])"),
            std::string::npos)
      << other;
  EXPECT_EQ(choice_lines(record, R"({"tasks": []})"), "") << "nothing compared, nothing chosen";
}

// Times measured on two machines do not compare: the choice says so under its first line (and
// not where every time comes from one); a sweep's cost lines count the runs timed by their
// process, where a checkpoint records no training time, beside runs timed by theirs.
TEST(Sweep, SaysWhenTheTimesComeFromMoreThanOneMachine) {
  const auto record = [](const std::string& b_machine, const std::string& b_by) {
    return R"({"settings": ["k = a", "k = b"], "runs": [
        {"setting": "k = a", "out_dir": "", "train_seconds": 1.0, "timed_by": "checkpoint", "machines": ["CPU X, 2 cores"]},
        {"setting": "k = b", "out_dir": "", "train_seconds": 4.0, "timed_by": ")" +
           b_by + R"(", "machines": [)" + b_machine + "]}]}";
  };
  const std::string compared = R"({"tasks": [{"task": "t", "metric": "accuracy", "unbeaten": ["A", "B"],
      "versus_A": {"B": {"difference": 0.01, "interval": [-0.01, 0.03]}}}]})";
  const std::string two = choice_lines(record(R"("CPU X, 1 core")", "checkpoint"), compared);
  EXPECT_NE(
      two.find("\n  the times were measured on more than one machine, so they do not compare: A on CPU X, "
               "2 cores; B on CPU X, 1 core (train the runs compared on one machine to choose by cost)\n"),
      std::string::npos)
      << two;
  const std::string one = choice_lines(record(R"("CPU X, 2 cores")", "checkpoint"), compared);
  EXPECT_EQ(one.find("more than one machine"), std::string::npos) << one;
  EXPECT_NE(choice_json(record(R"("CPU X, 2 cores")", "checkpoint"), compared).find(R"("one_machine":true)"),
            std::string::npos);

  testing::TempDir dir;
  write_file_atomic(dir.file("sweep.json"), record("", "process"));
  const std::string said = inspect_sweep(dir.path(), false);
  EXPECT_NE(
      said.find("(1 run without a training time in the checkpoint: counted by the process's time, start-up "
                "included)"),
      std::string::npos)
      << said;
}
}  // namespace
}  // namespace canopy::runners
