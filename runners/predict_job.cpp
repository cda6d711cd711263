#include "canopy/runners/predict_job.h"

#include <algorithm>
#include <cstdio>
#include <ostream>

#include <torch/csrc/api/include/torch/utils.h>
#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/heap.h"
#include "canopy/core/memory.h"
#include "canopy/core/memory_fence.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/mnist.h"
#include "canopy/datasets/preprocess.h"
#include "canopy/runners/card_check.h"
#include "canopy/runners/export.h"
#include "canopy/runners/input_data.h"
#include "canopy/trunk/trunk.h"

namespace canopy::runners {

namespace {
struct LoadedHead {
  std::string task;
  tasks::TaskKind kind = tasks::TaskKind::kMulticlass;
  double target_mean = 0.0, target_std = 1.0;  // regression: value = output * std + mean
  heads::HeadPtr head;
  std::int64_t out_features = 0;  // the card's
  std::vector<std::string> class_names;
};

using nlohmann::ordered_json;

// Runs `read` on a card's contents; JSON that does not parse, or a key missing or of the wrong
// type, is a DataError naming the card.
template <class F>
auto reading_card(const std::string& card_path, F&& read) {
  try {
    return read();
  } catch (const nlohmann::json::exception& e) {
    throw DataError(detail::str_cat("head card '", card_path, "' is malformed: ", e.what()));
  }
}

// A head card, checked against the checksum it carries (cards from before it have none): a
// flipped bit in a class name, a key or target_mean would otherwise predict other answers.
ordered_json read_card(const std::string& card_path) {
  ordered_json card = reading_card(card_path, [&] { return ordered_json::parse(read_file(card_path)); });
  const std::string problem = card_checksum_problem(card, card_path);
  CANOPY_CHECK(
      problem.empty(), DataError, problem,
      ": it is corrupt or was edited; train again to export it anew (an edit you mean to keep: delete its "
      "card_crc32c)");
  return card;
}

LoadedHead load_head_from(const tasks::TaskConfig& tc, const tasks::HeadRegistry& registry,
                          const std::string& dir, const trunk::Trunk& trunk, const JobConfig& config,
                          const std::string& preprocessing, const std::string& card_path,
                          const ordered_json& card) {
  const std::string trained_on = card.at("trunk_sha256");
  CANOPY_CHECK(trained_on == trunk.sha256(), DataError, "task '", tc.name,
               "': head was trained on features of trunk ", trained_on, ", the config's trunk is ",
               trunk.sha256(), "; retrain it");
  const std::string pre = card.at("preprocessing");
  const std::string tap = card.value("tap", "output");
  CANOPY_CHECK(pre == preprocessing && card.at("pooling") == config.trunk.pooling &&
                   tap == trunk::describe_taps(config.trunk),
               DataError, "task '", tc.name, "': head was trained with preprocessing '", pre, "', tap '", tap,
               "' and pooling '", card.at("pooling").get<std::string>(), "', the config has '", preprocessing,
               "', '", trunk::describe_taps(config.trunk), "' and '", config.trunk.pooling, "'");
  const std::string precision = card.value("trunk_precision", "float32");
  CANOPY_CHECK(precision == config.trunk.precision, DataError, "task '", tc.name,
               "': head was trained on features of trunk passes at ", precision,
               ", the config's trunk.precision is ", config.trunk.precision,
               "; set trunk.precision = ", precision);
  if (card.contains("trunk_file")) {
    const std::string top = card.value("top_precision", "float32");
    CANOPY_CHECK(top == config.trunk.top_precision, DataError, "task '", tc.name,
                 "': the trunk's top was trained at ", top, ", the config's trunk.top_precision is ",
                 config.trunk.top_precision, "; set trunk.top_precision = ", top);
  }
  tasks::HeadSpec spec{card.at("in_features").get<std::int64_t>(),
                       card.at("out_features").get<std::int64_t>(),
                       tasks::HeadParams(tc.name, tc.head_params)};
  if (tc.grid_axes.count("head")) spec.params.leave_out_unused();  // as in training
  LoadedHead out;
  out.task = tc.name;
  out.head = registry.create(tc.head, spec);
  out.out_features = spec.out_features;
  out.class_names = card.at("class_names").get<std::vector<std::string>>();
  out.kind = tasks::parse_task_kind(card.value("kind", "multiclass"), "head card '" + card_path + "': kind");
  out.target_mean = card.value("target_mean", 0.0);
  out.target_std = card.value("target_std", 1.0);
  const std::string weights_path = join_path(dir, card.at("weights").get<std::string>());
  const std::string problem = weights_problem(card, card_path, weights_path);
  CANOPY_CHECK(problem.empty(), DataError, "task '", tc.name, "': ", problem,
               ": the file is corrupt or was replaced; train again to export it anew");
  const auto weights = load_safetensors(weights_path);
  torch::NoGradGuard no_grad;
  auto restore = [&](const std::string& name, at::Tensor& dst) {
    const auto it = weights.find(name);
    CANOPY_CHECK(it != weights.end() && it->second.sizes() == dst.sizes(), DataError, "task '", tc.name,
                 "': weights file lacks '", name, "' of shape ", dst.sizes(), " (architecture changed?)");
    dst.copy_(it->second);
  };
  for (auto& p : out.head->named_parameters(true)) restore(p.key(), p.value());
  for (auto& b : out.head->named_buffers(true)) restore(b.key(), b.value());
  out.head->eval();
  return out;
}

LoadedHead load_head(const tasks::TaskConfig& tc, const tasks::HeadRegistry& registry, const std::string& dir,
                     const trunk::Trunk& trunk, const JobConfig& config, const std::string& preprocessing) {
  const std::string card_path = join_path(dir, tc.name + ".json");
  CANOPY_CHECK(is_regular_file(card_path), DataError, "task '", tc.name, "': no trained head '", card_path,
               "'; run `canopy train --config ", config.source, "` first");
  const ordered_json card = read_card(card_path);
  return reading_card(card_path, [&] {
    return load_head_from(tc, registry, dir, trunk, config, preprocessing, card_path, card);
  });
}

// A number as predictions and scores are written (6 significant digits).
std::string format_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

// Each row's prediction as written: a class name, '|'-joined label names, or a value.
std::vector<std::string> prediction_names(const LoadedHead& h, const at::Tensor& outputs) {
  std::vector<std::string> out;
  if (h.kind == tasks::TaskKind::kRegression) {
    const at::Tensor v = (outputs.squeeze(1).to(at::kDouble) * h.target_std + h.target_mean).contiguous();
    for (std::int64_t r = 0; r < v.size(0); ++r) out.push_back(format_number(v.data_ptr<double>()[r]));
    return out;
  }
  if (h.kind == tasks::TaskKind::kMultilabel) {
    const at::Tensor on = outputs.gt(0).contiguous();
    const auto a = on.accessor<bool, 2>();
    for (std::int64_t r = 0; r < on.size(0); ++r) {
      std::string labels;
      for (std::int64_t j = 0; j < on.size(1); ++j) {
        if (a[r][j]) labels += (labels.empty() ? "" : "|") + h.class_names.at(static_cast<std::size_t>(j));
      }
      out.push_back(labels);
    }
    return out;
  }
  const at::Tensor best = outputs.argmax(1).contiguous();
  for (std::int64_t r = 0; r < best.size(0); ++r) {
    const auto c = best.data_ptr<std::int64_t>()[r];
    out.push_back(c < static_cast<std::int64_t>(h.class_names.size())
                      ? h.class_names[static_cast<std::size_t>(c)]
                      : std::to_string(c));
  }
  return out;
}
// The heads a training run exported, as configured: each task, and for a grid the member
// that won (its card names it), under the grid's name.
std::vector<tasks::TaskConfig> exported_tasks(const JobConfig& config, const std::string& dir) {
  std::vector<tasks::TaskConfig> out;
  for (std::size_t i = 0; i < config.tasks.size(); ++i) {
    const auto& tc = config.tasks[i];
    if (tc.grid.empty()) {
      out.push_back(tc);
      continue;
    }
    if (i > 0 && config.tasks[i - 1].grid == tc.grid) continue;
    tasks::TaskConfig chosen = tc;  // without a card, load_head says what is missing
    const std::string card_path = join_path(dir, tc.grid + ".json");
    if (is_regular_file(card_path)) {
      const auto card = read_card(card_path);
      const std::string winner = reading_card(card_path, [&] {
        return card.contains("grid") ? card.at("grid").value("winner", "") : std::string();
      });
      const auto it = std::find_if(config.tasks.begin(), config.tasks.end(),
                                   [&](const tasks::TaskConfig& m) { return m.name == winner; });
      CANOPY_CHECK(it != config.tasks.end(), DataError, "head card '", card_path, "' names grid winner '",
                   winner, "', which grid '", tc.grid, "' in ", config.source, " does not have; retrain it");
      chosen = *it;
    }
    chosen.name = tc.grid;
    out.push_back(std::move(chosen));
  }
  return out;
}

// The trunk predictions run: the config's, or, when the heads were trained with the trunk's
// top (their cards name a `trunk_file`), the fine-tuned trunk that run exported
// (out_dir/trunk.pt), pinned by the cards' SHA-256 and run frozen whole (under autocast: its
// prefix under it, its top in float32).
trunk::TrunkConfig predict_trunk(const JobConfig& config, const std::string& heads_dir,
                                 const tasks::TaskConfig& first_head) {
  const std::string card_path = join_path(heads_dir, first_head.name + ".json");
  if (!is_regular_file(card_path)) return config.trunk;  // load_head says what is missing
  const ordered_json card = read_card(card_path);
  if (!card.contains("trunk_file")) return config.trunk;
  trunk::TrunkConfig tuned = config.trunk;
  tuned.path = join_path(config.train.out_dir, "trunk.pt");
  tuned.sha256 = reading_card(card_path, [&] { return card.at("trunk_sha256").get<std::string>(); });
  // Frozen whole; under autocast with the training's policy instead, so that the trunk runs
  // its cached prefix under the autocast and its trained top in float32, as training did.
  if (config.trunk.precision == "float32" && config.trunk.top_precision == "float32")
    tuned.freeze = trunk::FreezePolicy{};
  CANOPY_CHECK(is_regular_file(tuned.path), DataError, "the heads in '", heads_dir,
               "' were trained with the trunk's top, but the fine-tuned trunk '", tuned.path,
               "' is missing; run `canopy train --config ", config.source, "` again");
  log_info("predicting with the fine-tuned trunk " + tuned.path + " (sha256 " + tuned.sha256 + ")");
  return tuned;
}
// The predictions of every row of `input`, in trunk batches of `batch` rows, to `out`; `done`
// counts the rows written.
void predict_rows(const InputSplit& input, trunk::Trunk& trunk, std::vector<LoadedHead>& heads,
                  const PredictOptions& options, const std::vector<std::string>& score_columns,
                  std::int64_t batch, std::ostream& out, Progress& progress, std::int64_t& done) {
  const std::int64_t n = input.rows;
  for (std::int64_t i = 0; i < n; i += batch) {
    const std::int64_t end = std::min(n, i + batch);
    const at::Tensor f = trunk.encode(input.inputs(row_range(i, end)));
    std::vector<std::vector<std::string>> cells(static_cast<std::size_t>(end - i));
    std::vector<std::vector<double>> scores(static_cast<std::size_t>(end - i));
    for (auto& h : heads) {
      const at::Tensor out_h = h.head->forward(f);
      tasks::check_head_outputs(out_h, f.size(0), h.out_features, h.task, *h.head);
      const auto names = prediction_names(h, out_h);
      for (std::size_t r = 0; r < names.size(); ++r) cells[r].push_back(names[r]);
      if (options.scores && h.kind != tasks::TaskKind::kRegression) {
        const at::Tensor p = (h.kind == tasks::TaskKind::kMultilabel ? out_h.sigmoid() : out_h.softmax(1))
                                 .to(at::kDouble)
                                 .contiguous();
        const double* v = p.data_ptr<double>();
        for (std::int64_t r = 0; r < p.size(0); ++r) {
          scores[static_cast<std::size_t>(r)].insert(scores[static_cast<std::size_t>(r)].end(),
                                                     v + r * p.size(1), v + (r + 1) * p.size(1));
        }
      }
    }
    for (std::int64_t r = 0; r < end - i; ++r) {
      const auto& row = cells[static_cast<std::size_t>(r)];
      const auto& sc = scores[static_cast<std::size_t>(r)];
      if (options.format == "csv") {
        out << i + r;
        for (const auto& cell : row) out << "," << csv_field(cell);  // class names may hold commas
        for (double v : sc) out << "," << format_number(v);
        out << "\n";
      } else {
        nlohmann::ordered_json line{{"id", i + r}};
        for (std::size_t k = 0; k < heads.size(); ++k) line[heads[k].task] = row[k];
        for (std::size_t k = 0; k < sc.size(); ++k) line[score_columns[k]] = sc[k];
        out << line.dump() << "\n";
      }
    }
    // Standard output on a full disk, say: stopped here, not reported as written.
    CANOPY_CHECK(out, IoError, "writing the predictions failed after ", i, " of ", n,
                 " rows: ", describe_write_error(errno));
    progress.advance(end - i);
    done = end;
  }
}

// Predicting met the memory fence: why, and a batch size that fits (advised_batch_size of the
// largest that passes through the trunk and every head, tried by halving).
[[noreturn]] void predict_out_of_memory(const MemoryFence& fence, const InputSplit& input,
                                        trunk::Trunk& trunk, std::vector<LoadedHead>& heads,
                                        std::int64_t batch, std::int64_t shard_rows, std::int64_t done) {
  const auto refused = fence.refusal();
  const std::int64_t passes =
      largest_batch_that_passes(input, batch, [&](const std::vector<std::int64_t>& rows) {
        const at::Tensor f = trunk.encode(input.inputs(rows));
        for (auto& h : heads) h.head->forward(f);
      });
  const std::int64_t fits = advised_batch_size(passes, shard_rows);
  throw DataError(detail::str_cat(
      "predicting over batches of ", batch,
      " rows (cache.batch_size) needs more memory than this process may take",
      refused ? " (" + format_mib(static_cast<double>(refused->asked)) + " more was asked for)" : "", ": ",
      fence.room().said, " leaves ", format_mib(static_cast<double>(fence.room().bytes)), ". ",
      passes > 0 ? detail::str_cat("A pass over ", passes,
                                   " rows fits (tried after, halving the batch): set cache.batch_size = ",
                                   fits, " or less, or run where there is more memory")
                 : std::string("Not even a pass over one row fits: run where there is more memory"),
      "; ", done, " of the ", input.rows, " rows had been predicted"));
}
}  // namespace

std::int64_t run_predict(const JobConfig& config, const tasks::HeadRegistry& registry,
                         const PredictOptions& options, std::ostream& out, ProgressStyle style) {
  CANOPY_CHECK(options.format == "csv" || options.format == "jsonl", ConfigError,
               "--format: expected csv or jsonl, got '", options.format, "'");
  CANOPY_CHECK(!config.tasks.empty(), ConfigError, "no tasks in ", config.source);
  const std::string dir = join_path(config.train.out_dir, "heads");
  const std::vector<tasks::TaskConfig> exported = exported_tasks(config, dir);  // reads grids' cards
  trunk::Trunk trunk = trunk::Trunk::load(predict_trunk(config, dir, exported.front()));
  std::vector<LoadedHead> heads;
  const std::string preprocessing = describe_preprocessing(config);  // hashes the vocabulary: once
  for (const auto& tc : exported) heads.push_back(load_head(tc, registry, dir, trunk, config, preprocessing));

  const InputSplit input = load_predict_input(config, options.input, options.limit);
  const std::int64_t n = input.rows;
  // Column names: one per task, then (with scores) one per class or label of each classifier.
  std::vector<std::string> score_columns;
  if (options.scores) {
    for (const auto& h : heads) {
      if (h.kind == tasks::TaskKind::kRegression) continue;
      for (const auto& c : h.class_names) score_columns.push_back(h.task + ":" + c);
    }
  }
  if (options.format == "csv") {
    out << "id";
    for (const auto& h : heads) out << "," << csv_field(h.task);
    for (const auto& c : score_columns) out << "," << csv_field(c);
    out << "\n";
  }
  Progress progress("predict", n, config.data.source == "arff" ? "doc" : "img", style);
  torch::NoGradGuard no_grad;
  // Past the memory this process may take, an allocation fails and says so, instead of the
  // kernel's OOM kill (a trunk on a GPU keeps its activations there: no fence on the host).
  const MemoryFence fence(trunk.device().is_cpu() ? memory_room(1, PageCache::kFree) : std::nullopt);
  // Every batch's activations on the last one's pages, as in the cache pass.
  const KeepFreedMemory reuse_activations;
  std::int64_t done = 0;
  try {
    predict_rows(input, trunk, heads, options, score_columns, config.cache.batch_size, out, progress, done);
  } catch (const std::exception& e) {
    if (!fence.caused(e)) throw;
    predict_out_of_memory(fence, input, trunk, heads, config.cache.batch_size, config.cache.shard_rows, done);
  }
  out.flush();
  CANOPY_CHECK(out, IoError, "writing the predictions failed at the end: ", describe_write_error(errno));
  progress.finish();
  return n;
}

}  // namespace canopy::runners
