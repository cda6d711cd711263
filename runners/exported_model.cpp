#include "canopy/runners/exported_model.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include <torch/csrc/api/include/torch/utils.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/heap.h"
#include "canopy/core/memory.h"
#include "canopy/core/memory_fence.h"
#include "canopy/core/progress.h"
#include "canopy/core/stop.h"
#include "canopy/core/strings.h"
#include "canopy/runners/card_check.h"
#include "canopy/runners/export.h"

namespace canopy::runners {

namespace {
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

// What to do about a head trained over another trunk than the config's: where the run's own
// resolved config (out_dir/config.ini) names the trunk it was trained over (a run given
// `--set trunk.path=... --set trunk.sha256=...`, as scripts/demo gives its compiled .pt2),
// use that config; else retrain it.
std::string other_trunk_remedy(const JobConfig& config, const std::string& trained_on) {
  const std::string saved = join_path(config.train.out_dir, "config.ini");
  if (is_regular_file(saved) && saved != config.source) {
    try {
      std::istringstream text(read_file(saved));
      const auto values = read_config_values(text, saved);
      const auto path = values.find("trunk.path"), sha = values.find("trunk.sha256");
      if (path != values.end() && sha != values.end() && sha->second == trained_on)
        return detail::str_cat("; the run's own config names that trunk (trunk.path = ", path->second,
                               "): use --config ", saved, ", or --set trunk.path=", path->second,
                               " --set trunk.sha256=", trained_on, "; or retrain the head");
    } catch (const Error&) {  // a config that cannot be read gives no hint
    }
  }
  return "; retrain it";
}

ExportedHead load_head_from(const tasks::TaskConfig& tc, const tasks::HeadRegistry& registry,
                            const std::string& dir, const trunk::Trunk& trunk, const JobConfig& config,
                            const std::string& preprocessing, const std::string& card_path,
                            const ordered_json& card) {
  const std::string trained_on = card.at("trunk_sha256");
  CANOPY_CHECK(trained_on == trunk.sha256(), DataError, "task '", tc.name,
               "': head was trained on features of trunk ", trained_on, ", the config's trunk is ",
               trunk.sha256(), other_trunk_remedy(config, trained_on));
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
  ExportedHead out;
  out.config = tc;
  out.head = registry.create(tc.head, spec);
  out.out_features = spec.out_features;
  out.class_names = card.at("class_names").get<std::vector<std::string>>();
  out.kind = tasks::parse_task_kind(card.value("kind", "multiclass"), "head card '" + card_path + "': kind");
  if (out.kind == tasks::TaskKind::kMultilabel) {  // cards from before thresholds: 0.5 each
    out.cutoffs =
        card.value("threshold_logits", std::vector<double>(static_cast<std::size_t>(spec.out_features), 0.0));
    CANOPY_CHECK(static_cast<std::int64_t>(out.cutoffs.size()) == spec.out_features, DataError, "head card '",
                 card_path, "' has ", out.cutoffs.size(), " threshold_logits for ", spec.out_features,
                 " labels");
  }
  if (out.kind == tasks::TaskKind::kMulticlass) {  // cards from before calibration: 1
    out.temperature = card.value("temperature", 1.0);
    CANOPY_CHECK(out.temperature > 0 && std::isfinite(out.temperature), DataError, "head card '", card_path,
                 "' has temperature ", out.temperature, "; a temperature is > 0");
  }
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
  out.card = card;
  return out;
}

ExportedHead load_head(const tasks::TaskConfig& tc, const tasks::HeadRegistry& registry,
                       const std::string& dir, const trunk::Trunk& trunk, const JobConfig& config,
                       const std::string& preprocessing) {
  const std::string card_path = join_path(dir, tc.name + ".json");
  CANOPY_CHECK(is_regular_file(card_path), DataError, "task '", tc.name, "': no trained head '", card_path,
               "'; run `canopy train --config ", config.source, "` first");
  const ordered_json card = read_card(card_path);
  return reading_card(card_path, [&] {
    return load_head_from(tc, registry, dir, trunk, config, preprocessing, card_path, card);
  });
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

// The trunk the heads read: the config's, or, when the heads were trained with the trunk's
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
  log_info("the heads read the fine-tuned trunk " + tuned.path + " (sha256 " + tuned.sha256 + ")");
  return tuned;
}
// The pass met the memory fence: why, and a batch size that fits.
[[noreturn]] void model_pass_out_of_memory(const char* doing, const char* done_word, const MemoryFence& fence,
                                           const InputSplit& input, ExportedModel& model, std::int64_t batch,
                                           std::int64_t shard_rows, std::int64_t done) {
  const auto refused = fence.refusal();
  const std::int64_t passes =
      largest_batch_that_passes(input, batch, [&](const std::vector<std::int64_t>& rows) {
        const at::Tensor f = model.trunk.encode(input.inputs(rows));
        for (auto& h : model.heads) h.head->forward(f);
      });
  const std::int64_t fits = advised_batch_size(passes, shard_rows);
  throw DataError(detail::str_cat(
      doing, " over batches of ", batch,
      " rows (cache.batch_size) needs more memory than this process may take",
      refused ? " (" + format_mib(static_cast<double>(refused->asked)) + " more was asked for)" : "", ": ",
      fence.room().said, " leaves ", format_mib(static_cast<double>(fence.room().bytes)), ". ",
      passes > 0 ? detail::str_cat("A pass over ", passes,
                                   " rows fits (tried after, halving the batch): set cache.batch_size = ",
                                   fits, " or less, or run where there is more memory")
                 : std::string("Not even a pass over one row fits: run where there is more memory"),
      "; ", done, " of the ", input.rows, " rows had been ", done_word));
}

}  // namespace

ExportedModel load_exported_model(const JobConfig& config, const tasks::HeadRegistry& registry) {
  CANOPY_CHECK(!config.tasks.empty(), ConfigError, "no tasks in ", config.source);
  const std::string dir = join_path(config.train.out_dir, "heads");
  const std::vector<tasks::TaskConfig> exported = exported_tasks(config, dir);  // reads grids' cards
  ExportedModel model{trunk::Trunk::load(predict_trunk(config, dir, exported.front())), {}};
  model.heads = load_exported_heads(config, registry, model.trunk);
  return model;
}

std::vector<ExportedHead> load_exported_heads(const JobConfig& config, const tasks::HeadRegistry& registry,
                                              const trunk::Trunk& trunk) {
  CANOPY_CHECK(!config.tasks.empty(), ConfigError, "no tasks in ", config.source);
  const std::string dir = join_path(config.train.out_dir, "heads");
  const std::string preprocessing = describe_preprocessing(config);  // hashes the vocabulary: once
  std::vector<ExportedHead> heads;
  for (const auto& tc : exported_tasks(config, dir))
    heads.push_back(load_head(tc, registry, dir, trunk, config, preprocessing));
  return heads;
}

std::string features_signature(const JobConfig& config) {
  if (config.tasks.empty()) return {};
  const std::string dir = join_path(config.train.out_dir, "heads");
  const std::string card_path = join_path(dir, exported_tasks(config, dir).front().name + ".json");
  if (!is_regular_file(card_path)) return {};  // loading the model says what is missing
  const ordered_json card = read_card(card_path);
  return reading_card(card_path, [&] {
    // A fine-tuned trunk is the run's own file: no other run reads its features.
    const std::string trunk = card.contains("trunk_file")
                                  ? "tuned " + join_path(config.train.out_dir, "trunk.pt")
                                  : card.at("trunk_sha256").get<std::string>();
    return detail::str_cat(trunk, "\n", card.at("preprocessing").get<std::string>(), "\n",
                           card.at("pooling").get<std::string>(), "\n", card.value("tap", "output"), "\n",
                           card.value("trunk_precision", "float32"), "\n", config.trunk.device, "\n",
                           config.trunk.optimize, "\n", config.data.source, "\n", config.data.text_attribute,
                           "\n", config.data.positive_value, "\n", config.data.train, "\n",
                           join(config.data.train_files, ","), "\n", join(config.data.test_files, ","), "\n",
                           config.data.max_image_pixels, "\n", config.data.exif_orientation);
  });
}

void run_model_pass(ExportedModel& model, const InputSplit& input, const JobConfig& config,
                    Progress& progress, const char* doing, const char* done_word,
                    const std::function<void(std::int64_t, const std::vector<at::Tensor>&)>& each) {
  torch::NoGradGuard no_grad;
  // A trunk on a GPU keeps its activations there: no fence on the host.
  const MemoryFence fence(model.trunk.device().is_cpu() ? memory_room(1, PageCache::kFree) : std::nullopt);
  // Every batch's activations on the last one's pages, as in the cache pass.
  const KeepFreedMemory reuse_activations;
  const std::int64_t batch = config.cache.batch_size;
  std::int64_t done = 0;
  try {
    for (std::int64_t i = 0; i < input.rows; i += batch) {
      // Asked to stop (a command under StopOnSignal, as the sweep's comparison): nothing is kept.
      if (const int signal = stop_signal())
        throw Stopped(signal, detail::str_cat("stopped by ", signal_name(signal), " while ", doing, ": ",
                                              done, " of the ", input.rows, " rows done, none kept"));
      const std::int64_t end = std::min(input.rows, i + batch);
      const at::Tensor f = model.trunk.encode(input.inputs(row_range(i, end)));
      std::vector<at::Tensor> outputs;
      for (auto& h : model.heads) {
        outputs.push_back(h.head->forward(f));
        tasks::check_head_outputs(outputs.back(), f.size(0), h.out_features, h.task(), *h.head);
        if (h.temperature != 1.0) outputs.back() = outputs.back() / h.temperature;  // calibrated logits
      }
      each(i, outputs);
      progress.advance(end - i);
      done = end;
    }
  } catch (const std::exception& e) {
    if (!fence.caused(e)) throw;
    model_pass_out_of_memory(doing, done_word, fence, input, model, batch, config.cache.shard_rows, done);
  }
}

}  // namespace canopy::runners
