#include "canopy/runners/predict_job.h"

#include <cstdio>

#include <ostream>

#include <nlohmann/json.hpp>
#include <torch/csrc/api/include/torch/utils.h>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/mnist.h"
#include "canopy/datasets/preprocess.h"
#include "canopy/runners/export.h"
#include "canopy/runners/input_data.h"
#include "canopy/trunk/trunk.h"

namespace canopy::runners {

namespace {
struct LoadedHead {
  std::string task;
  bool multilabel = false;
  bool regression = false;
  double target_mean = 0.0, target_std = 1.0;  // regression: value = output * std + mean
  heads::HeadPtr head;
  std::vector<std::string> class_names;
};

LoadedHead load_head(const tasks::TaskConfig& tc, const tasks::HeadRegistry& registry, const std::string& dir,
                     const trunk::Trunk& trunk, const JobConfig& config, const std::string& preprocessing) {
  const std::string card_path = join_path(dir, tc.name + ".json");
  CANOPY_CHECK(is_regular_file(card_path), DataError, "task '", tc.name, "': no trained head '", card_path,
               "'; run `canopy train --config ", config.source, "` first");
  nlohmann::json card;
  try {
    card = nlohmann::json::parse(read_file(card_path));
  } catch (const nlohmann::json::exception& e) {
    throw DataError(detail::str_cat("head card '", card_path, "' is malformed: ", e.what()));
  }
  const std::string trained_on = card.at("trunk_sha256");
  CANOPY_CHECK(trained_on == trunk.sha256(), DataError, "task '", tc.name, "': head was trained on features of trunk ",
               trained_on, ", the config's trunk is ", trunk.sha256(), "; retrain it");
  const std::string pre = card.at("preprocessing");
  const std::string tap = card.value("tap", "output");
  CANOPY_CHECK(pre == preprocessing && card.at("pooling") == config.trunk.pooling &&
                   tap == trunk::describe_taps(config.trunk),
               DataError, "task '", tc.name, "': head was trained with preprocessing '", pre, "', tap '", tap,
               "' and pooling '", card.at("pooling").get<std::string>(), "', the config has '",
               preprocessing, "', '", trunk::describe_taps(config.trunk), "' and '",
               config.trunk.pooling, "'");
  tasks::HeadSpec spec{card.at("in_features").get<std::int64_t>(), card.at("out_features").get<std::int64_t>(),
                       tasks::HeadParams(tc.name, tc.head_params)};
  LoadedHead out;
  out.task = tc.name;
  out.head = registry.create(tc.head, spec);
  out.class_names = card.at("class_names").get<std::vector<std::string>>();
  out.multilabel = card.value("kind", "multiclass") == "multilabel";
  out.regression = card.value("kind", "multiclass") == "regression";
  out.target_mean = card.value("target_mean", 0.0);
  out.target_std = card.value("target_std", 1.0);
  const auto weights = load_safetensors(join_path(dir, card.at("weights").get<std::string>()));
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
}  // namespace

std::int64_t run_predict(const JobConfig& config, const tasks::HeadRegistry& registry, const PredictOptions& options,
                         std::ostream& out, ProgressStyle style) {
  CANOPY_CHECK(options.format == "csv" || options.format == "jsonl", ConfigError,
               "--format: expected csv or jsonl, got '", options.format, "'");
  CANOPY_CHECK(!config.tasks.empty(), ConfigError, "no tasks in ", config.source);
  trunk::Trunk trunk = trunk::Trunk::load(config.trunk);
  const std::string dir = join_path(config.train.out_dir, "heads");
  std::vector<LoadedHead> heads;
  const std::string preprocessing = describe_preprocessing(config);  // hashes the vocabulary: once
  for (const auto& tc : config.tasks) heads.push_back(load_head(tc, registry, dir, trunk, config, preprocessing));

  const InputSplit input = load_predict_input(config, options.input, options.limit);
  const std::int64_t n = input.rows;
  if (options.format == "csv") {
    out << "id";
    for (const auto& h : heads) out << "," << h.task;
    out << "\n";
  }
  Progress progress("predict", n, config.data.source == "arff" ? "doc" : "img", style);
  torch::NoGradGuard no_grad;
  for (std::int64_t i = 0; i < n; i += config.cache.batch_size) {
    const std::int64_t end = std::min(n, i + config.cache.batch_size);
    const at::Tensor f = trunk.encode(input.inputs(row_range(i, end)));
    std::vector<at::Tensor> preds;
    for (auto& h : heads) {
      const at::Tensor logits = h.head->forward(f);
      preds.push_back(h.regression ? logits.squeeze(1).to(at::kDouble) * h.target_std + h.target_mean : h.multilabel ? logits.gt(0).to(at::kLong) : logits.argmax(1));
    }
    for (std::int64_t r = 0; r < end - i; ++r) {
      auto name = [&](std::size_t k) {
        if (heads[k].regression) {  // the predicted value
          char v[32];
          std::snprintf(v, sizeof v, "%.6g", preds[k][r].item<double>());
          return std::string(v);
        }
        if (heads[k].multilabel) {  // the labels it carries, joined by '|'
          std::string labels;
          for (std::int64_t j = 0; j < preds[k].size(1); ++j) {
            if (preds[k][r][j].item<std::int64_t>()) {
              labels += (labels.empty() ? "" : "|") + heads[k].class_names.at(static_cast<std::size_t>(j));
            }
          }
          return labels;
        }
        const auto c = preds[k][r].item<std::int64_t>();
        const auto& names = heads[k].class_names;
        return c < static_cast<std::int64_t>(names.size()) ? names[static_cast<std::size_t>(c)] : std::to_string(c);
      };
      if (options.format == "csv") {
        out << i + r;
        for (std::size_t k = 0; k < heads.size(); ++k) out << "," << name(k);
        out << "\n";
      } else {
        nlohmann::ordered_json row{{"id", i + r}};
        for (std::size_t k = 0; k < heads.size(); ++k) row[heads[k].task] = name(k);
        out << row.dump() << "\n";
      }
    }
    progress.advance(end - i);
  }
  progress.finish();
  return n;
}

}  // namespace canopy::runners
