#include "canopy/runners/predict_job.h"

#include <algorithm>
#include <cstdio>
#include <optional>
#include <ostream>

#include <ATen/ops/tensor.h>
#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/mnist.h"
#include "canopy/datasets/preprocess.h"
#include "canopy/runners/export.h"
#include "canopy/runners/exported_model.h"
#include "canopy/runners/input_data.h"
#include "canopy/trunk/trunk.h"

namespace canopy::runners {

namespace {
// A number as predictions and scores are written (6 significant digits).
std::string format_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

// Each row's prediction as written: a class name, '|'-joined label names, or a value.
std::vector<std::string> prediction_names(const ExportedHead& h, const at::Tensor& outputs) {
  std::vector<std::string> out;
  if (h.kind == tasks::TaskKind::kRegression) {
    const at::Tensor v = (outputs.squeeze(1).to(at::kDouble) * h.target_std + h.target_mean).contiguous();
    for (std::int64_t r = 0; r < v.size(0); ++r) out.push_back(format_number(v.data_ptr<double>()[r]));
    return out;
  }
  if (h.kind == tasks::TaskKind::kMultilabel) {
    const at::Tensor on = outputs.gt(at::tensor(h.cutoffs, at::kFloat)).contiguous();
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
// The columns predict writes beyond each task's answer, and the --keep values they come from.
struct AnswerColumns {
  bool paths = false;                          // image files: each input's file, after id
  std::vector<std::vector<std::string>> kept;  // --keep: each input row's values of those columns
  std::vector<std::string> scores;             // --scores: <task>:<class> per classifier's class
  std::vector<std::string> top;                // --top K: <task>:topJ, <task>:topJ_p per multiclass head
};

// The rows from `first` on of what AnswerColumns writes before the answers: null where none.
struct RowKeys {
  const std::string* paths = nullptr;
  const std::vector<std::string>* kept = nullptr;
};
RowKeys row_keys(const AnswerColumns& columns, const InputSplit& in, std::int64_t first) {
  RowKeys keys;
  if (columns.paths) keys.paths = in.paths->data() + first;  // image files: set_image_file_inputs set them
  if (!columns.kept.empty()) keys.kept = columns.kept.data() + first;
  return keys;
}

// The predictions of the rows from `first` on, given every head's outputs for them, to `out`.
void write_predictions(std::int64_t first, RowKeys keys, const std::vector<at::Tensor>& outputs,
                       const ExportedModel& model, const PredictOptions& options,
                       const AnswerColumns& columns, std::int64_t n, std::ostream& out) {
  const auto rows = static_cast<std::size_t>(outputs.front().size(0));
  std::vector<std::vector<std::string>> cells(rows);
  std::vector<std::vector<double>> scores(rows);
  std::vector<std::vector<std::pair<std::string, double>>> top(rows);  // class and probability
  for (std::size_t k = 0; k < model.heads.size(); ++k) {
    const auto& h = model.heads[k];
    const at::Tensor& out_h = outputs[k];
    const auto names = prediction_names(h, out_h);
    for (std::size_t r = 0; r < names.size(); ++r) cells[r].push_back(names[r]);
    if (options.top > 0 && h.kind == tasks::TaskKind::kMulticlass) {
      const auto best = out_h.softmax(1).to(at::kDouble).topk(std::min(options.top, out_h.size(1)), 1);
      const at::Tensor p = std::get<0>(best).contiguous(), c = std::get<1>(best).contiguous();
      for (std::int64_t r = 0; r < p.size(0); ++r) {
        for (std::int64_t j = 0; j < p.size(1); ++j) {
          const auto cls = static_cast<std::size_t>(c.data_ptr<std::int64_t>()[r * p.size(1) + j]);
          top[static_cast<std::size_t>(r)].emplace_back(
              cls < h.class_names.size() ? h.class_names[cls] : std::to_string(cls),
              p.data_ptr<double>()[r * p.size(1) + j]);
        }
      }
    }
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
  for (std::size_t r = 0; r < rows; ++r) {
    const auto id = first + static_cast<std::int64_t>(r);
    if (options.format == "csv") {
      out << id;
      if (keys.paths) out << "," << csv_field(keys.paths[r]);  // a file name may hold commas
      if (keys.kept)
        for (const auto& v : keys.kept[r]) out << "," << csv_field(v);
      for (const auto& cell : cells[r]) out << "," << csv_field(cell);  // class names may hold commas
      for (double v : scores[r]) out << "," << format_number(v);
      for (const auto& [name, p] : top[r]) out << "," << csv_field(name) << "," << format_number(p);
      out << "\n";
    } else {
      nlohmann::ordered_json line{{"id", id}};
      if (keys.paths) line["path"] = keys.paths[r];
      if (keys.kept)
        for (std::size_t k = 0; k < keys.kept[r].size(); ++k) line[options.keep[k]] = keys.kept[r][k];
      for (std::size_t k = 0; k < model.heads.size(); ++k) line[model.heads[k].task()] = cells[r][k];
      for (std::size_t k = 0; k < scores[r].size(); ++k) line[columns.scores[k]] = scores[r][k];
      for (std::size_t k = 0; k < top[r].size(); ++k) {
        line[columns.top[2 * k]] = top[r][k].first;
        line[columns.top[2 * k + 1]] = top[r][k].second;
      }
      out << line.dump() << "\n";
    }
  }
  // Standard output on a full disk, say: stopped here, not reported as written.
  CANOPY_CHECK(out, IoError, "writing the predictions failed after ", first, " of ", n,
               " rows: ", describe_write_error(errno));
}

// The columns beyond the tasks' (the --keep values not read yet).
AnswerColumns answer_columns(const ExportedModel& model, const JobConfig& config,
                             const PredictOptions& options) {
  AnswerColumns columns;
  // Image files: each answer's file beside its id (a folder's are listed in sorted order, which
  // a reader should not have to redo).
  columns.paths = reads_image_files(config.data);
  for (const auto& h : model.heads) {
    if (options.scores && h.kind != tasks::TaskKind::kRegression) {
      for (const auto& c : h.class_names) columns.scores.push_back(h.task() + ":" + c);
    }
  }
  for (const auto& h : model.heads) {
    if (h.kind != tasks::TaskKind::kMulticlass) continue;
    for (std::int64_t j = 1; j <= std::min(options.top, h.out_features); ++j) {
      columns.top.push_back(detail::str_cat(h.task(), ":top", j));
      columns.top.push_back(detail::str_cat(h.task(), ":top", j, "_p"));
    }
  }
  return columns;
}

// Every column of the answers, in order: id, path, --keep's, one per task, scores, top classes.
std::vector<std::string> column_names(const ExportedModel& model, const PredictOptions& options,
                                      const AnswerColumns& columns) {
  std::vector<std::string> names{"id"};
  if (columns.paths) names.push_back("path");
  names.insert(names.end(), options.keep.begin(), options.keep.end());
  for (const auto& h : model.heads) names.push_back(h.task());
  names.insert(names.end(), columns.scores.begin(), columns.scores.end());
  names.insert(names.end(), columns.top.begin(), columns.top.end());
  return names;
}

// Each column once, none empty: a --keep column already among the answers (or repeated), a task
// named path over image files, or one named as another column, is refused.
void check_column_names(const std::vector<std::string>& names, const PredictOptions& options) {
  for (auto it = names.begin(); it != names.end(); ++it) {
    if (!it->empty() && std::find(names.begin(), it, *it) == it) continue;
    const std::string& c = *it;
    CANOPY_CHECK(std::find(options.keep.begin(), options.keep.end(), c) == options.keep.end(), ConfigError,
                 "--keep ", join(options.keep, ","), ": '", c,
                 "' is empty, repeated or already a column of the answers (", join(names, ","), ")");
    CANOPY_CHECK(c != "path", ConfigError,
                 "task 'path' would share its column with the image files' paths: rename the task");
    throw ConfigError(detail::str_cat("task '", c, "' would write a second column '", c, "' (",
                                      join(names, ","), "): rename the task"));
  }
}

// --input -: each chunk of lines as it comes (up to a trunk batch, at most --limit in all),
// answered and flushed before the next is waited for. Returns the rows answered.
std::int64_t predict_lines(PredictLines& lines, ExportedModel& model, const JobConfig& config,
                           const PredictOptions& options, const AnswerColumns& columns,
                           const std::string& unit, std::ostream& out) {
  const std::int64_t batch = std::max<std::int64_t>(1, config.cache.batch_size);
  out.flush();  // the header, before the first line is waited for
  for (;;) {
    const std::int64_t left = options.limit > 0 ? options.limit - lines.rows_so_far() : batch;
    if (left <= 0) break;
    const InputSplit chunk = lines.next(std::min(batch, left));
    if (chunk.rows == 0) break;
    const std::int64_t offset = lines.rows_so_far() - chunk.rows;  // the chunk's first id
    Progress quiet("predict", chunk.rows, unit, ProgressStyle::kQuiet);
    run_model_pass(model, chunk, config, quiet, "predicting", "predicted",
                   [&](std::int64_t first, const std::vector<at::Tensor>& outputs) {
                     write_predictions(offset + first, row_keys(columns, chunk, first), outputs, model,
                                       options, columns, offset + chunk.rows, out);
                   });
    out.flush();
    CANOPY_CHECK(out, IoError, "writing the predictions failed after ", lines.rows_so_far(),
                 " rows: ", describe_write_error(errno));
  }
  return lines.rows_so_far();
}

// --input FILE: read whole (its first --limit rows), then answered batch by batch.
std::int64_t predict_file(ExportedModel& model, const JobConfig& config, const PredictOptions& options,
                          const AnswerColumns& columns, const std::string& unit, std::ostream& out,
                          ProgressStyle style) {
  const InputSplit input = load_predict_input(config, options.input, options.limit);
  const std::int64_t n = input.rows;
  CANOPY_CHECK(columns.kept.empty() || static_cast<std::int64_t>(columns.kept.size()) == n, Error,
               "--keep: '", options.input, "' gave ", columns.kept.size(), " rows of its columns but ", n,
               " inputs");
  Progress progress("predict", n, unit, style);
  run_model_pass(model, input, config, progress, "predicting", "predicted",
                 [&](std::int64_t first, const std::vector<at::Tensor>& outputs) {
                   write_predictions(first, row_keys(columns, input, first), outputs, model, options, columns,
                                     n, out);
                 });
  out.flush();
  CANOPY_CHECK(out, IoError, "writing the predictions failed at the end: ", describe_write_error(errno));
  progress.finish();
  return n;
}

}  // namespace

std::int64_t run_predict(const JobConfig& config, const tasks::HeadRegistry& registry,
                         const PredictOptions& options, std::ostream& out, ProgressStyle style) {
  CANOPY_CHECK(options.format == "csv" || options.format == "jsonl", ConfigError,
               "--format: expected csv or jsonl, got '", options.format, "'");
  CANOPY_CHECK(options.top >= 0, ConfigError, "--top: expected the number of classes to list (0: none), got ",
               options.top);
  // --input -: standard input, read as it comes (refused before the model loads where the
  // config's inputs are not lines).
  std::optional<PredictLines> lines;
  if (options.input == "-") lines.emplace(config);
  ExportedModel model = load_exported_model(config, registry);
  AnswerColumns columns = answer_columns(model, config, options);
  const std::vector<std::string> names = column_names(model, options, columns);
  check_column_names(names, options);
  if (!options.keep.empty())
    columns.kept = read_kept_columns(config, options.input, options.keep, options.limit);
  if (options.format == "csv") {
    for (std::size_t k = 0; k < names.size(); ++k) out << (k ? "," : "") << csv_field(names[k]);
    out << "\n";
  }
  const std::string unit = reads_text_data(config.data) ? "doc" : "img";
  return lines ? predict_lines(*lines, model, config, options, columns, unit, out)
               : predict_file(model, config, options, columns, unit, out, style);
}

}  // namespace canopy::runners
