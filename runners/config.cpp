#include "canopy/runners/config.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <optional>
#include <set>
#include <sstream>

#include <boost/program_options/options_description.hpp>
#include <boost/program_options/parsers.hpp>

#include "canopy/core/device.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/feature_cache.h"

namespace canopy::runners {
namespace po = boost::program_options;

namespace {

// --- values as strings --------------------------------------------------------------------

std::string format_value(const std::string& v) { return v; }
std::string format_value(std::int64_t v) { return std::to_string(v); }
std::string format_value(std::uint64_t v) { return std::to_string(v); }
std::string format_value(bool v) { return v ? "true" : "false"; }
std::string format_value(double v) {
  std::ostringstream o;
  o.precision(10);
  o << v;
  return o.str();
}
template <typename T>
std::string format_value(const std::vector<T>& xs) {
  std::string out;
  for (std::size_t i = 0; i < xs.size(); ++i) out += (i ? "," : "") + format_value(xs[i]);
  return out;
}

void parse_value(const std::string& s, const std::string& where, std::string& out) { out = s; }
void parse_value(const std::string& s, const std::string& where, std::int64_t& out) {
  out = parse_int(s, where);
}
void parse_value(const std::string& s, const std::string& where, std::uint64_t& out) {
  const auto v = parse_int(s, where);
  CANOPY_CHECK(v >= 0, ConfigError, where, ": expected a non-negative integer, got ", v);
  out = static_cast<std::uint64_t>(v);
}
void parse_value(const std::string& s, const std::string& where, double& out) {
  out = parse_double(s, where);
}
void parse_value(const std::string& s, const std::string& where, bool& out) { out = parse_bool(s, where); }
void parse_value(const std::string& s, const std::string& where, std::vector<std::string>& out) {
  out = split(s, ',');
}
void parse_value(const std::string& s, const std::string& where, std::vector<std::int64_t>& out) {
  out = parse_int_list(s, where);
}
void parse_value(const std::string& s, const std::string& where, std::vector<double>& out) {
  out = parse_double_list(s, where);
}

template <typename T>
const char* type_name();
template <>
const char* type_name<std::string>() {
  return "string";
}
template <>
const char* type_name<std::int64_t>() {
  return "integer";
}
template <>
const char* type_name<std::uint64_t>() {
  return "integer";
}
template <>
const char* type_name<double>() {
  return "number";
}
template <>
const char* type_name<bool>() {
  return "bool";
}
template <>
const char* type_name<std::vector<std::string>>() {
  return "list";
}
template <>
const char* type_name<std::vector<std::int64_t>>() {
  return "integer list";
}
template <>
const char* type_name<std::vector<double>>() {
  return "number list";
}

template <typename T>
std::vector<double> numbers_of(const T&) {
  return {};
}
std::vector<double> numbers_of(std::int64_t v) { return {static_cast<double>(v)}; }
std::vector<double> numbers_of(double v) { return {v}; }
std::vector<double> numbers_of(const std::vector<double>& v) { return v; }
std::vector<double> numbers_of(const std::vector<std::int64_t>& v) { return {v.begin(), v.end()}; }

// --- the table ----------------------------------------------------------------------------

// One config key: what parsing, validation, --dump-config and the key reference all use.
// `Cfg` is JobConfig (keys section.name) or tasks::TaskConfig (keys task.<task>.name).
template <typename Cfg>
struct Key {
  std::string section;
  std::string name;
  std::string type;
  std::string help;
  std::function<void(Cfg&, const std::string&, const std::string&)> set;  // value, where
  std::function<std::string(const Cfg&)> get;
  std::function<std::vector<double>(const Cfg&)> numbers;  // for range checks
  std::optional<double> min, max;
  bool min_open = false;                    // min itself is refused
  std::vector<std::string> choices;         // for strings: the accepted values
  bool path = false;                        // ${VAR} expanded; must not be empty when `required`
  bool required = false;                    // must not be empty
  bool omit_empty = false;                  // dumped only when set
  std::function<bool(const Cfg&)> applies;  // dumped only when it applies (unset: always)

  std::string full_name() const { return section + "." + name; }
  Key& at_least(double v) {
    min = v;
    return *this;
  }
  Key& above(double v) {
    min = v;
    min_open = true;
    return *this;
  }
  Key& at_most(double v) {
    max = v;
    return *this;
  }
  Key& one_of(std::vector<std::string> c) {
    choices = std::move(c);
    return *this;
  }
  Key& not_empty() {
    required = true;
    return *this;
  }
  Key& optional_in_dump() {
    omit_empty = true;
    return *this;
  }
  Key& only_when(std::function<bool(const Cfg&)> f) {
    applies = std::move(f);
    return *this;
  }
  bool dumped(const Cfg& c) const { return (!omit_empty || !get(c).empty()) && (!applies || applies(c)); }
  std::string range() const {
    if (!choices.empty()) return join(choices, " \\| ");
    std::string r;
    if (min) r += (min_open ? "> " : ">= ") + format_value(*min);
    if (max) r += (r.empty() ? "<= " : ", <= ") + format_value(*max);
    if (required) r += r.empty() ? "not empty" : ", not empty";
    return r;
  }
};

// A key bound to a member: `ref` maps a config to the member it sets.
template <typename Cfg, typename Ref>
Key<Cfg> member_key(std::string section, std::string name, Ref ref, std::string help, bool path = false) {
  using T = std::decay_t<decltype(ref(std::declval<Cfg&>()))>;
  Key<Cfg> k;
  k.section = std::move(section);
  k.name = std::move(name);
  k.type = path ? (std::is_same_v<T, std::string> ? "path" : "path list") : type_name<T>();
  k.help = std::move(help);
  k.path = path;
  k.set = [ref, path](Cfg& c, const std::string& value, const std::string& where) {
    parse_value(value, where, ref(c));
    if constexpr (std::is_same_v<T, std::string>) {
      if (path) ref(c) = expand_env(ref(c));
    } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
      if (path) {
        for (auto& item : ref(c)) item = expand_env(item);
      }
    }
  };
  k.get = [ref](const Cfg& c) { return format_value(ref(const_cast<Cfg&>(c))); };
  k.numbers = [ref](const Cfg& c) { return numbers_of(ref(const_cast<Cfg&>(c))); };
  return k;
}

// A key whose value is one of a set of names held as an enum (parsed once, here).
template <typename Cfg, typename Ref, typename Parse, typename Name>
Key<Cfg> choice(std::string section, std::string name, Ref ref, Parse parse, Name to_name,
                std::vector<std::string> choices, std::string help) {
  Key<Cfg> k;
  k.section = std::move(section);
  k.name = std::move(name);
  k.type = "choice";
  k.help = std::move(help);
  k.set = [ref, parse, choices](Cfg& c, const std::string& value, const std::string& where) {
    try {
      ref(c) = parse(value, where);
    } catch (const ConfigError& e) {
      const std::string hint = did_you_mean(value, choices);
      if (hint.empty()) throw;
      throw ConfigError(e.what() + hint);
    }
  };
  k.get = [ref, to_name](const Cfg& c) { return std::string(to_name(ref(const_cast<Cfg&>(c)))); };
  k.numbers = [](const Cfg&) { return std::vector<double>{}; };
  k.choices = std::move(choices);
  return k;
}

// A number-list key that also takes `balanced` (weights computed from the training rows when
// the run starts), which sets `flag` and leaves the list empty.
template <typename Cfg, typename Flag>
Key<Cfg> or_balanced(Key<Cfg> k, Flag flag) {
  k.type += " \\| balanced";
  k.set = [set = k.set, flag](Cfg& c, const std::string& value, const std::string& where) {
    flag(c) = trim(value) == "balanced";
    if (flag(c)) return;
    try {
      set(c, value, where);
    } catch (const ConfigError& e) {
      throw ConfigError(e.what() + std::string(" (or balanced)") + did_you_mean(trim(value), {"balanced"}));
    }
  };
  k.get = [get = k.get, flag](const Cfg& c) { return flag(const_cast<Cfg&>(c)) ? "balanced" : get(c); };
  return k;
}

#define CANOPY_JOB(member) \
  [](JobConfig & c) -> auto& { return c.member; }
#define CANOPY_TASK(member) \
  [](tasks::TaskConfig & t) -> auto& { return t.member; }

bool reads_idx(const JobConfig& c) { return c.data.source == "fashion-mnist" || c.data.source == "mnist"; }
bool reads_texts(const JobConfig& c) { return reads_text_data(c.data); }

// [data]: where the samples come from and how tables and images are read.
void add_data_keys(std::vector<Key<JobConfig>>& v) {
  using K = JobConfig;
  v.push_back(member_key<K>("data", "source", CANOPY_JOB(data.source), "where the samples come from")
                  .one_of({"fashion-mnist", "mnist", "arff", "text-csv", "text-json", "image-csv",
                           "image-json", "image-folders"}));
  v.push_back(member_key<K>("data", "dir", CANOPY_JOB(data.dir),
                            "fashion-mnist / mnist: the folder of idx files", true)
                  .only_when(reads_idx));
  v.push_back(
      member_key<K>("data", "train_limit", CANOPY_JOB(data.train_limit),
                    "keep the first N training samples (class folders: from each class in turn); 0: all")
          .at_least(0));
  v.push_back(
      member_key<K>("data", "test_limit", CANOPY_JOB(data.test_limit), "the same for the test split; 0: all")
          .at_least(0));
  v.push_back(member_key<K>(
                  "data", "max_image_pixels", CANOPY_JOB(data.max_image_pixels),
                  "image-csv / image-json / image-folders: refuse an image of more pixels (width x height), "
                  "from its header, before decoding it (PIL's decompression-bomb limit); 0: no limit")
                  .at_least(0)
                  .only_when([](const JobConfig& c) { return reads_image_files(c.data); }));
  v.push_back(
      member_key<K>(
          "data", "exif_orientation", CANOPY_JOB(data.exif_orientation),
          "image-csv / image-json / image-folders: ignore (the pixels as stored, as torchvision's "
          "ImageFolder reads them) or apply (turned as the image's EXIF orientation says, as PIL's "
          "ImageOps.exif_transpose turns a photo taken sideways); a TIFF is turned as its Orientation tag "
          "says either way, as PIL loads it")
          .one_of({"ignore", "apply"})
          .only_when([](const JobConfig& c) { return reads_image_files(c.data); }));
  v.push_back(member_key<K>(
                  "data", "train", CANOPY_JOB(data.train),
                  "image-csv, image-json: the training manifest (CSV; JSON lines or an array of records), or "
                  "the folder holding it as metadata.csv / metadata.jsonl; "
                  "image-folders: the training folder; text-csv, text-json: the training table of texts",
                  true)
                  .optional_in_dump());
  v.push_back(member_key<K>("data", "test", CANOPY_JOB(data.test), "the same for the test split", true)
                  .optional_in_dump());
  v.push_back(member_key<K>("data", "train_files", CANOPY_JOB(data.train_files),
                            "arff: label_name:path entries, one ARFF file per label, same documents", true)
                  .optional_in_dump());
  v.push_back(
      member_key<K>("data", "test_files", CANOPY_JOB(data.test_files), "the same for the test split", true)
          .optional_in_dump());
  v.push_back(
      member_key<K>("data", "text_attribute", CANOPY_JOB(data.text_attribute),
                    "arff: the string attribute holding the text; text-csv, text-json: the column holding "
                    "it (its name exactly, else ignoring case)")
          .only_when(reads_texts));
  v.push_back(member_key<K>(
      "data", "positive_value", CANOPY_JOB(data.positive_value),
      "arff, text-csv, text-json: the label value that sets its bit in all_labels; empty: yes, 1 or "
      "true"));
  v.push_back(
      member_key<K>("data", "list_columns", CANOPY_JOB(data.list_columns),
                    "text-csv, text-json, image-csv, image-json: label columns whose fields are lists of "
                    "labels (tags as Kaggle's and MovieLens' CSVs write them: \"haze primary\", "
                    "\"Action|Comedy\"), each read as a JSON list of labels is")
          .optional_in_dump());
  v.push_back(member_key<K>("data", "list_separator", CANOPY_JOB(data.list_separator),
                            "what separates the labels in a field of data.list_columns: space (any run of "
                            "blanks) or one character, such as | ; ,")
                  .only_when([](const JobConfig& c) { return !c.data.list_columns.empty(); }));
}

// [text]: the tokenizer.
void add_text_keys(std::vector<Key<JobConfig>>& v) {
  using K = JobConfig;
  v.push_back(
      member_key<K>("text", "tokenizer", CANOPY_JOB(text.tokenizer),
                    "the trunk's Hugging Face tokenizer.json (WordPiece: BERT, MiniLM, MPNet, bge, e5; "
                    "byte-level BPE: RoBERTa, GPT-2; SentencePiece Unigram: XLM-R, multilingual-e5, T5): its "
                    "normalizer, special tokens, added tokens and padding token as the file says",
                    true)
          .optional_in_dump()
          .only_when(reads_texts));
  v.push_back(member_key<K>("text", "vocab", CANOPY_JOB(text.vocab),
                            "or: a WordPiece vocabulary (vocab.txt), texts wrapped in [CLS] ... [SEP]", true)
                  .optional_in_dump()
                  .only_when(reads_texts));
  Key<K> lowercase =
      member_key<K>("text", "lowercase", CANOPY_JOB(text.lowercase),
                    "text.vocab: lowercase and strip accents (uncased models); a tokenizer.json "
                    "says it itself")
          .only_when([](const JobConfig& c) { return reads_texts(c) && c.text.tokenizer.empty(); });
  lowercase.set = [set = lowercase.set](JobConfig& c, const std::string& value, const std::string& where) {
    set(c, value, where);
    c.text.lowercase_given = true;
  };
  v.push_back(std::move(lowercase));
  v.push_back(member_key<K>("text", "max_length", CANOPY_JOB(text.max_length),
                            "most tokens per text, the special tokens around it ([CLS], [SEP]) included")
                  .only_when(reads_texts));
  Key<K> prompt = member_key<K>("text", "prompt", CANOPY_JOB(text.prompt),
                                "put before every text, as sentence-transformers' encode(prompt=...) puts "
                                "it: the prompt a model was trained with (e5's \"query: \" or \"passage: \", "
                                "nomic-embed's \"classification: \"), in double quotes to keep its blanks; "
                                "empty: none")
                      .optional_in_dump()
                      .only_when(reads_texts);
  prompt.set = [set = prompt.set](JobConfig& c, const std::string& value, const std::string& where) {
    // An INI value loses its blanks at the ends; in double quotes it keeps them.
    const bool quoted = value.size() >= 2 && value.front() == '"' && value.back() == '"';
    set(c, quoted ? value.substr(1, value.size() - 2) : value, where);
  };
  v.push_back(std::move(prompt));
}

// [preprocess]: what is done to an image before the trunk sees it.
void add_preprocess_keys(std::vector<Key<JobConfig>>& v) {
  using K = JobConfig;
  v.push_back(
      member_key<K>("preprocess", "resize", CANOPY_JOB(preprocess.resize),
                    "images resized (bilinear, align_corners=false) to this height and width; 0: as they are")
          .at_least(0));
  v.push_back(member_key<K>("preprocess", "resize_shorter", CANOPY_JOB(preprocess.resize_shorter),
                            "or: the shorter side resized to this, the longer in proportion (int(S x long / "
                            "short)), as torchvision's Resize(S); 0: off. With center_crop, the ImageNet "
                            "evaluation's Resize(256) + CenterCrop(224)")
                  .at_least(0));
  v.push_back(member_key<K>("preprocess", "center_crop", CANOPY_JOB(preprocess.center_crop),
                            "then the centre S x S kept, as torchvision's CenterCrop(S) keeps it (an image "
                            "smaller than S padded with zeros); 0: off")
                  .at_least(0));
  v.push_back(
      member_key<K>("preprocess", "antialias", CANOPY_JOB(preprocess.antialias),
                    "resize with antialiasing (F.interpolate(..., antialias=True), as torchvision's Resize "
                    "and PIL do); set it when images are shrunk (photos to 224): without it, each output "
                    "pixel reads only the 2x2 input pixels nearest it"));
  v.push_back(member_key<K>("preprocess", "channels", CANOPY_JOB(preprocess.channels),
                            "channels the trunk expects; 1-channel images are replicated")
                  .at_least(1));
  v.push_back(member_key<K>("preprocess", "mean", CANOPY_JOB(preprocess.mean),
                            "subtracted after scaling pixels to [0, 1]: one value or one per channel"));
  v.push_back(member_key<K>("preprocess", "std", CANOPY_JOB(preprocess.std),
                            "then divided by: one value or one per channel"));
}

// [data], [text], [preprocess]: what the samples are and how they are prepared.
void add_input_keys(std::vector<Key<JobConfig>>& v) {
  add_data_keys(v);
  add_text_keys(v);
  add_preprocess_keys(v);
}

void add_top_keys(std::vector<Key<JobConfig>>& v);
void add_schedule_keys(std::vector<Key<JobConfig>>& v);

// [trunk]: the encoder, its pin, freezing, taps, pooling and precision; then the top's keys.
void add_trunk_keys(std::vector<Key<JobConfig>>& v) {
  using K = JobConfig;
  v.push_back(member_key<K>("trunk", "path", CANOPY_JOB(trunk.path), "the TorchScript trunk file", true));
  v.push_back(member_key<K>("trunk", "sha256", CANOPY_JOB(trunk.sha256),
                            "the trunk file's pinned SHA-256, checked before it is loaded"));
  v.push_back(member_key<K>("trunk", "allow_unpinned", CANOPY_JOB(trunk.allow_unpinned),
                            "load a trunk without sha256 (the hash to pin is printed)"));
  v.push_back(member_key<K>("trunk", "device", CANOPY_JOB(trunk.device),
                            "where the trunk runs: auto (a GPU if present), cpu, cuda, cuda:N"));
  v.push_back(member_key<K>("trunk", "pooling", CANOPY_JOB(trunk.pooling),
                            "how tapped outputs become feature vectors")
                  .one_of({"avg", "avg_channels_last", "flatten", "none", "first_token", "masked_mean"}));
  v.push_back(member_key<K>("trunk", "taps", CANOPY_JOB(trunk.taps),
                            "blocks whose outputs are cached, concatenated; empty: the output"));
  v.push_back(
      member_key<K>("trunk", "expand", CANOPY_JOB(trunk.expand),
                    "modules whose children are blocks and tap points in their place (their forward "
                    "inlined into the trunk's), such as torchvision's features; in order, so a module "
                    "inside one listed before it can follow (docs/trunk.md)"));
  v.push_back(member_key<K>(
      "trunk", "optimize", CANOPY_JOB(trunk.optimize),
      "inference passes run a frozen (torch::jit::freeze), channels-last copy of the trunk, "
      "whose CPU convolutions (float32 or bfloat16) run as oneDNN's with their activations and zero "
      "pads fused (the demo trunk's pass 1.79x at 64x64, 2.04x at 224x224 on a Xeon; docs/trunk.md); a trunk "
      "that trains runs channels-last too (its 4-D weights and inputs: the demo's top trains ~2x faster) "
      "and, on the CPU, takes its depthwise convolutions' weight gradient "
      "from canopy's kernel (3-29x oneDNN's) and their symmetric zero pads as their padding "
      "(the demo's top-2 epoch 5.7 -> 2.1 s on a Xeon); false: the trunk runs as saved"));
  v.push_back(
      member_key<K>("trunk", "precision", CANOPY_JOB(trunk.precision),
                    "the trunk's inference passes (caching, predict, a tuned trunk's cached prefix) "
                    "under autocast to this dtype, as torch.autocast: convolutions and matrix "
                    "multiplies in 16 bits, normalisations and reductions in float32, features kept "
                    "in float32; faster where the CPU has 16-bit instructions (AVX512-BF16, AMX) and "
                    "on GPUs; the features a few percent off float32 (docs/trunk.md); TorchScript trunks "
                    "only")
          .one_of({"float32", "bfloat16", "float16"}));
  v.push_back(
      member_key<K>("trunk", "top_precision", CANOPY_JOB(trunk.top_precision),
                    "the trainable top's passes (training, evaluation, cache levels, predict) under "
                    "autocast to this dtype, parameters, gradients and optimizer state kept in float32 "
                    "(mixed precision, as torch.autocast in a training loop; on the CPU its grouped, "
                    "depthwise, convolutions stay float32, faster there); faster where the CPU has "
                    "bfloat16 instructions, the more so the larger the images (docs/fine-tuning.md)")
          .one_of({"float32", "bfloat16"}));
  v.push_back(member_key<K>("trunk", "freeze", CANOPY_JOB(trunk.freeze.freeze),
                            "all | none | first:N | match:REGEX | modules:A B ... (docs/trunk.md)"));
  v.push_back(member_key<K>("trunk", "train_only", CANOPY_JOB(trunk.freeze.train_only),
                            "the inverse of freeze: freeze everything except these"));
  v.push_back(member_key<K>("trunk", "batchnorm_affine_trainable",
                            CANOPY_JOB(trunk.freeze.batchnorm_affine_trainable),
                            "BatchNorm weight and bias keep learning while their statistics stay fixed"));
  add_top_keys(v);
  add_schedule_keys(v);
}

// [trunk], the trainable top: its optimizer, learning rates, warm-up and clipping.
void add_top_keys(std::vector<Key<JobConfig>>& v) {
  using K = JobConfig;
  v.push_back(choice<K>(
      "trunk", "optimizer", CANOPY_JOB(top.optimizer), tasks::parse_optimizer,
      [](tasks::OptimizerKind o) { return tasks::to_string(o); }, tasks::optimizer_names(),
      "the trainable top's optimizer (when the freeze policy leaves a top over a cached prefix)"));
  v.push_back(member_key<K>("trunk", "lr", CANOPY_JOB(top.lr),
                            "the top block's learning rate; 0: 0.1 x the mean of the tasks' lr")
                  .at_least(0));
  v.push_back(member_key<K>("trunk", "lr_decay", CANOPY_JOB(top.lr_decay),
                            "each block further down learns at lr / lr_decay^depth (1: one rate)")
                  .at_least(1));
  v.push_back(member_key<K>("trunk", "weight_decay", CANOPY_JOB(top.weight_decay),
                            "the top's L2 penalty (adamw: decoupled)")
                  .at_least(0));
  v.push_back(choice<K>(
      "trunk", "lr_schedule", CANOPY_JOB(top.lr_schedule),
      [](const std::string& value, const std::string& where) {
        const tasks::LrSchedule s = tasks::parse_schedule(value, where);
        CANOPY_CHECK(s != tasks::LrSchedule::kStep, ConfigError, where,
                     ": the top takes constant or cosine (step is a task schedule, with its step_size and "
                     "gamma), got 'step'");
        return s;
      },
      [](tasks::LrSchedule s) { return tasks::to_string(s); }, std::vector<std::string>{"constant", "cosine"},
      "the top's learning rate per epoch, over train.epochs"));
  v.push_back(member_key<K>("trunk", "lr_warmup_steps", CANOPY_JOB(top.lr_warmup_steps),
                            "the top's learning rate rises linearly over its first N training steps (step k "
                            "at (k+1)/N of the scheduled rate), as fine-tuning recipes warm up; 0: none")
                  .at_least(0));
  v.push_back(member_key<K>("trunk", "max_grad_norm", CANOPY_JOB(top.max_grad_norm),
                            "the top's gradient scaled down to this total L2 norm when above it, as "
                            "torch.nn.utils.clip_grad_norm_ (under mpirun: of the summed gradient); 0: "
                            "not clipped")
                  .at_least(0));
}

// [trunk], which of the top's blocks train when: gradual unfreezing and autofreeze.
void add_schedule_keys(std::vector<Key<JobConfig>>& v) {
  using K = JobConfig;
  v.push_back(choice<K>(
      "trunk", "schedule", CANOPY_JOB(top.schedule), parse_freeze_schedule,
      [](FreezeSchedule s) { return std::string(to_string(s)); },
      std::vector<std::string>{"static", "gradual", "autofreeze"},
      "which of the top's blocks train when (docs/fine-tuning.md)"));
  v.push_back(member_key<K>("trunk", "unfreeze_to", CANOPY_JOB(trunk.freeze.unfreeze_to),
                            "the lowest block that ever trains: every block before it is frozen and cached "
                            "(instead of freeze)"));
  v.push_back(member_key<K>("trunk", "warmup_epochs", CANOPY_JOB(top.warmup_epochs),
                            "gradual: epochs with only the heads training")
                  .at_least(0));
  v.push_back(member_key<K>("trunk", "unfreeze_every", CANOPY_JOB(top.unfreeze_every),
                            "gradual: epochs between unfreezing one more block, from the top down")
                  .at_least(1));
  v.push_back(member_key<K>("trunk", "freeze_interval", CANOPY_JOB(top.freeze_interval),
                            "autofreeze: steps between freezing decisions; 0: one epoch's steps")
                  .at_least(0));
  v.push_back(member_key<K>("trunk", "percentile", CANOPY_JOB(top.percentile),
                            "autofreeze: blocks whose gradient-norm change rate is below this percentile "
                            "freeze (from the lowest up)")
                  .at_least(0)
                  .at_most(100));
  v.push_back(member_key<K>("trunk", "min_trainable", CANOPY_JOB(top.min_trainable),
                            "autofreeze: blocks that never freeze")
                  .at_least(1));
  v.push_back(
      member_key<K>("trunk", "level_on_disk", CANOPY_JOB(top.level_on_disk),
                    "autofreeze: a cache level over a train split that streams, or too large to "
                    "hold beside one in memory, kept on disk (train.out_dir/levels, float32: rows x "
                    "the block's output values) and read by row; false: no level over a streamed "
                    "split (the frozen blocks computed in every step), and one in memory always held"));
}

// [cache].
void add_cache_keys(std::vector<Key<JobConfig>>& v) {
  using K = JobConfig;
  v.push_back(member_key<K>("cache", "path", CANOPY_JOB(cache.path),
                            "the cache directory (docs/cache-format.md)", true)
                  .not_empty());
  v.push_back(member_key<K>("cache", "batch_size", CANOPY_JOB(cache.batch_size),
                            "trunk batch size; one whose passes need more memory than the process may take "
                            "is stopped with a size that fits")
                  .at_least(1));
  v.push_back(member_key<K>("cache", "shard_rows", CANOPY_JOB(cache.shard_rows),
                            "rows per shard file; a multiple of cache.batch_size")
                  .at_least(1));
  v.push_back(member_key<K>("cache", "dtype", CANOPY_JOB(cache.dtype), "storage dtype of the features")
                  .one_of({"float32", "float16", "bfloat16"}));
  v.push_back(
      member_key<K>(
          "cache", "memory_cap_mb", CANOPY_JOB(cache.memory_cap_mb),
          "the train split is read whole when it fits under this cap, else streamed; 0: whole when it "
          "takes at most 3/4 of the memory the process may take (the machine's available memory, a "
          "container's cgroup limit), else streamed under half of that")
          .at_least(0)
          .at_most(1LL << 40));  // 1 EiB: its bytes fit an unsigned 64-bit count
  v.push_back(member_key<K>("cache", "read_method", CANOPY_JOB(cache.read_method), "how features are read")
                  .one_of({"pread", "hdf5"}));
  v.push_back(
      member_key<K>("cache", "views", CANOPY_JOB(cache.views),
                    "views cached per training image (its features, or under a trained top the frozen "
                    "prefix's output): the plain one, then views-1 augmented ([augment], seeded by "
                    "sample and view); each epoch trains on one per sample, evaluation on the plain "
                    "one (images only)")
          .at_least(1)
          .at_most(64));
}

// [augment]: read only when the cache holds augmented views.
void add_augment_keys(std::vector<Key<JobConfig>>& v) {
  using K = JobConfig;
  auto with_views = [](const JobConfig& c) { return c.cache.views > 1; };
  v.push_back(member_key<K>("augment", "crop_scale", CANOPY_JOB(augment.crop_scale),
                            "random resized crop: the area fraction kept, min,max (aspect ratio 3/4 to 4/3)")
                  .above(0)
                  .at_most(1)
                  .only_when(with_views));
  v.push_back(member_key<K>("augment", "flip", CANOPY_JOB(augment.flip), "horizontal flip, half of the views")
                  .only_when(with_views));
  v.push_back(member_key<K>("augment", "jitter", CANOPY_JOB(augment.jitter),
                            "brightness and contrast each scaled by a factor in [1 - jitter, 1 + jitter]")
                  .at_least(0)
                  .at_most(0.99)
                  .only_when(with_views));
}

// [train].
void add_train_keys(std::vector<Key<JobConfig>>& v) {
  using K = JobConfig;
  v.push_back(member_key<K>("train", "out_dir", CANOPY_JOB(train.out_dir),
                            "heads, metrics, checkpoints and the resolved config go here", true)
                  .not_empty());
  v.push_back(
      member_key<K>("train", "train_split", CANOPY_JOB(train.train_split), "the cache split heads train on"));
  v.push_back(member_key<K>("train", "eval_split", CANOPY_JOB(train.eval_split),
                            "the cache split heads are evaluated on"));
  v.push_back(member_key<K>("train", "validation_fraction", CANOPY_JOB(train.validation_fraction),
                            "held out of train_split at training time (stratified by class, or label by "
                            "label over a list of labels; seeded by train.seed) to choose epochs and grid "
                            "winners on; the test split is then used once, for the exported heads; 0: none")
                  .at_least(0)
                  .at_most(0.9));
  v.push_back(choice<K>(
      "train", "export", CANOPY_JOB(train.export_mode), parse_export_mode,
      [](ExportMode m) { return std::string(to_string(m)); },
      std::vector<std::string>{"auto", "best", "last"},
      "the epoch each head exports: best (on the validation split; with a trainable top, the one epoch "
      "whose top and heads had the best mean over the tasks), last; auto: best when there is a validation "
      "split and no trainable top, else last"));
  v.push_back(member_key<K>("train", "export_monitor", CANOPY_JOB(train.export_monitor),
                            "with a trainable top and export = best: the task (or grid, by its best "
                            "member) whose validation score chooses the epoch exported; empty: the mean "
                            "over the tasks"));
  v.push_back(member_key<K>("train", "grid_halving", CANOPY_JOB(train.grid_halving),
                            "successive halving of every grid: after this many epochs, and again after "
                            "each multiple of it by grid_halving_factor, the members still training keep "
                            "on only when among the best 1 / grid_halving_factor of them on the validation "
                            "split (the others stop, keeping their exported epoch); 0: every member trains "
                            "every epoch")
                  .at_least(0));
  v.push_back(member_key<K>("train", "grid_halving_factor", CANOPY_JOB(train.grid_halving_factor),
                            "with grid_halving: each cut keeps the best ceil(n / factor) of n members "
                            "training; the cuts come after grid_halving x factor^k epochs")
                  .at_least(2));
  v.push_back(member_key<K>("train", "bootstrap_resamples", CANOPY_JOB(train.bootstrap_resamples),
                            "resamples of the eval split (rows drawn with replacement, seeded by train.seed) "
                            "behind each head's metric intervals and the paired comparison of heads on the "
                            "same labels, in the summary, the cards and canopy evaluate; 0: none")
                  .at_least(0)
                  .at_most(1000000));
  v.push_back(member_key<K>("train", "interval_level", CANOPY_JOB(train.interval_level),
                            "the share of the resampled values an interval holds (percentile bootstrap)")
                  .above(0)
                  .at_most(0.999));
  v.push_back(member_key<K>("train", "batch_size", CANOPY_JOB(train.batch_size),
                            "rows per step; the last batch of an epoch may be smaller (it is kept)")
                  .at_least(1));
  v.push_back(
      member_key<K>("train", "epochs", CANOPY_JOB(train.epochs), "epochs of every task without its own")
          .at_least(1));
  v.push_back(member_key<K>("train", "seed", CANOPY_JOB(train.seed),
                            "data order and (with the task's name) each head's initial weights"));
  v.push_back(
      member_key<K>(
          "train", "workers", CANOPY_JOB(train.workers),
          "TBB workers training heads concurrently; 0: one per core this process may use (its affinity: "
          "taskset, cpuset, mpirun binding; no more than a cgroup's CPU quota grants); more than the cores "
          "is "
          "honoured; at most 4x the cores")
          .at_least(0));
  v.push_back(member_key<K>(
                  "train", "intra_op_threads", CANOPY_JOB(train.intra_op_threads),
                  "LibTorch threads inside each head's work; at most 4x the cores (a trainable top's passes, "
                  "which nothing runs beside, take LibTorch's own count: OMP_NUM_THREADS, else its "
                  "default, the machine's cores)")
                  .at_least(1));
  v.push_back(member_key<K>(
      "train", "flush_denormals", CANOPY_JOB(train.flush_denormals),
      "treat float values below 1.2e-38 as 0 while training (x86 FTZ/DAZ): a head whose "
      "outputs saturate otherwise trains on them, on some CPUs at half the speed or less; false: "
      "IEEE gradual underflow, PyTorch's default"));
  v.push_back(member_key<K>("train", "check_fingerprint", CANOPY_JOB(train.check_fingerprint),
                            "refuse a cache whose fingerprint does not match the config"));
  v.push_back(member_key<K>("train", "checkpoint_steps", CANOPY_JOB(train.checkpoint_steps),
                            "also checkpoint every N steps; 0: at epoch ends only")
                  .at_least(0));
  v.push_back(
      member_key<K>("train", "fail_fast", CANOPY_JOB(train.fail_fast), "stop every head when one fails"));
  v.push_back(member_key<K>("train", "tensorboard", CANOPY_JOB(train.tensorboard),
                            "write TensorBoard event files per head"));
  v.push_back(choice<K>(
      "train", "fuse", CANOPY_JOB(train.fuse), parse_fuse_mode,
      [](FuseMode m) { return std::string(to_string(m)); },
      std::vector<std::string>{"auto", "always", "never"},
      "same-input built-in heads in batched operations: auto (where timed faster on this machine, "
      "recorded in ~/.cache/canopy/calibration), always, never"));
  v.push_back(choice<K>(
      "train", "weighting", CANOPY_JOB(train.weighting), parse_weighting,
      [](Weighting w) { return std::string(to_string(w)); },
      std::vector<std::string>{"sum", "static", "uncertainty", "dwa", "famo", "pcgrad"},
      "how the tasks' losses combine in the gradient reaching a trainable top (docs/fine-tuning.md)"));
  v.push_back(member_key<K>("train", "weighting_lr", CANOPY_JOB(train.weighting_lr),
                            "the learning rate of uncertainty's log-variances and famo's logits")
                  .above(0));
  v.push_back(member_key<K>("train", "fuse_kib", CANOPY_JOB(train.fuse_kib),
                            "most fused first-layer activations per group (batch x widths x 4 bytes), KiB")
                  .at_least(0));
}

const std::vector<Key<JobConfig>>& job_keys() {
  static const std::vector<Key<JobConfig>> keys = [] {
    std::vector<Key<JobConfig>> v;
    add_input_keys(v);
    add_trunk_keys(v);
    add_cache_keys(v);
    add_augment_keys(v);
    add_train_keys(v);
    return v;
  }();
  return keys;
}

const std::vector<Key<tasks::TaskConfig>>& task_keys() {
  using T = tasks::TaskConfig;
  static const std::vector<Key<T>> keys = [] {
    std::vector<Key<T>> v;
    v.push_back(choice<T>(
        "task", "kind", CANOPY_TASK(kind), tasks::parse_task_kind,
        [](tasks::TaskKind k) { return tasks::to_string(k); }, tasks::task_kind_names(),
        "multiclass (cross-entropy), multilabel (BCE over bitmasks of labels: the source's own, such as "
        "all_labels', or label_map's; or a multi-hot source's rows), regression"));
    v.push_back(member_key<T>("task", "head", CANOPY_TASK(head),
                              "a registered head type (canopy heads); its options go in "
                              "[task.<name>.head]")
                    .not_empty());
    v.push_back(member_key<T>("task", "labels", CANOPY_TASK(labels), "the label source in the cache"));
    v.push_back(
        member_key<T>(
            "task", "label_map", CANOPY_TASK(label_map),
            "source class -> task class (multilabel: -> bitmask of labels); empty: identity (multilabel: "
            "the source's values are the bitmasks, or its multi-hot rows)")
            .optional_in_dump()
            .at_least(0));
    v.push_back(
        member_key<T>(
            "task", "class_names", CANOPY_TASK(class_names),
            "names of the task's classes (labels); multilabel on a source whose labels the cache names "
            "(all_labels, a JSON list of labels): those by default")
            .optional_in_dump());
    v.push_back(choice<T>(
        "task", "optimizer", CANOPY_TASK(optimizer), tasks::parse_optimizer,
        [](tasks::OptimizerKind o) { return tasks::to_string(o); }, tasks::optimizer_names(),
        "the head's optimizer"));
    v.push_back(member_key<T>("task", "lr", CANOPY_TASK(lr), "learning rate").above(0));
    v.push_back(member_key<T>("task", "loss_weight", CANOPY_TASK(loss_weight),
                              "the loss's weight in the gradient reaching a trainable top (and the head)")
                    .at_least(0));
    v.push_back(
        member_key<T>("task", "weight_decay", CANOPY_TASK(weight_decay), "L2 penalty (adamw: decoupled)")
            .at_least(0));
    v.push_back(
        member_key<T>("task", "momentum", CANOPY_TASK(momentum), "sgd only").at_least(0).at_most(0.999999));
    v.push_back(member_key<T>("task", "epochs", CANOPY_TASK(epochs), "this task's epochs; 0: train.epochs")
                    .at_least(0));
    v.push_back(choice<T>(
        "task", "schedule", CANOPY_TASK(schedule), tasks::parse_schedule,
        [](tasks::LrSchedule s) { return tasks::to_string(s); }, tasks::schedule_names(),
        "learning rate per epoch"));
    v.push_back(member_key<T>("task", "step_size", CANOPY_TASK(step_size),
                              "step schedule: multiply by gamma every N epochs")
                    .at_least(1));
    v.push_back(member_key<T>("task", "gamma", CANOPY_TASK(gamma), "step schedule factor").above(0));
    v.push_back(member_key<T>(
                    "task", "early_stop_patience", CANOPY_TASK(early_stop_patience),
                    "stop after N epochs without a better eval score (task.NAME.monitor's: accuracy, R^2 for "
                    "regression); 0: never")
                    .at_least(0));
    v.push_back(member_key<T>("task", "label_smoothing", CANOPY_TASK(label_smoothing), "multiclass only")
                    .at_least(0)
                    .at_most(0.999999));
    v.push_back(or_balanced(member_key<T>("task", "class_weights", CANOPY_TASK(class_weights),
                                          "one loss weight per class, or balanced: rows / (classes x the "
                                          "class's training rows), as scikit-learn's; empty: equal")
                                .optional_in_dump()
                                .at_least(0),
                            CANOPY_TASK(balanced_class_weights)));
    v.push_back(or_balanced(member_key<T>("task", "positive_weights", CANOPY_TASK(positive_weights),
                                          "multilabel: per label, the weight of its positive rows in the "
                                          "loss (BCE's pos_weight), or balanced: its negative / positive "
                                          "training rows; empty: 1")
                                .optional_in_dump()
                                .above(0),
                            CANOPY_TASK(balanced_positive_weights)));
    v.push_back(
        choice<T>(
            "task", "loss", CANOPY_TASK(loss),
            [](const std::string& s, const std::string& where) {
              return std::optional(tasks::parse_regression_loss(s, where));
            },
            [](const std::optional<tasks::RegressionLoss>& l) { return l ? tasks::to_string(*l) : ""; },
            tasks::regression_loss_names(), "regression only; default mse")
            .optional_in_dump());
    v.push_back(member_key<T>("task", "threshold", CANOPY_TASK(threshold),
                              "multilabel: a label is given where its probability is over this; tune: per "
                              "label, the F1-best on the validation split"));
    v.push_back(choice<T>(
        "task", "monitor", CANOPY_TASK(monitor), tasks::parse_monitor,
        [](tasks::Monitor m) { return tasks::to_string(m); }, tasks::monitor_names(),
        "what the head's epochs and a grid's winner are chosen by (early stopping, train.export = best, "
        "successive halving), on the validation split (else the eval split): auto (accuracy; mean AP for "
        "multilabel, R^2 for a regression), accuracy, macro_f1, mean_ap (multilabel), nll (multiclass; "
        "lowest wins)"));
    v.push_back(
        member_key<T>("task", "calibrate", CANOPY_TASK(calibrate),
                      "multiclass: temperature: the probabilities are softmax(logits / T), T fitted on "
                      "the validation split (temperature scaling; the classes given do not change); "
                      "none: softmax(logits)")
            .one_of({"none", "temperature"}));
    return v;
  }();
  return keys;
}

// Range and choice checks of one key on a parsed config.
template <typename Cfg>
void check_range(const Key<Cfg>& k, const Cfg& c, const std::string& where) {
  if (k.required) {
    CANOPY_CHECK(!k.get(c).empty(), ConfigError, where, " is empty; it must name ",
                 k.path ? "a path" : "a value", " (", k.help, ")");
  }
  if (!k.choices.empty() && k.type != "choice") {
    const std::string v = k.get(c);
    CANOPY_CHECK(std::find(k.choices.begin(), k.choices.end(), v) != k.choices.end(), ConfigError, where,
                 ": expected ", join(k.choices, ", "), ", got '", v, "'", did_you_mean(v, k.choices));
  }
  for (double x : k.numbers(c)) {
    // Values as written, to 10 digits (0.9999999 is not "1").
    const std::string got = ", got " + format_value(x);
    CANOPY_CHECK(std::isfinite(x), ConfigError, where, " must be finite", got);
    if (k.min) {
      CANOPY_CHECK(k.min_open ? x > *k.min : x >= *k.min, ConfigError, where, " must be ",
                   k.min_open ? "> " : ">= ", format_value(*k.min), got);
    }
    if (k.max) CANOPY_CHECK(x <= *k.max, ConfigError, where, " must be <= ", format_value(*k.max), got);
    // A key's own range says more; past it, rates, weights and factors reach float32 tensors,
    // where a larger one is no setting, only a failure deep in a step.
    CANOPY_CHECK(k.type != "number" || std::fabs(x) <= std::numeric_limits<float>::max(), ConfigError, where,
                 " must be within float32's range (at most ",
                 format_value(double{std::numeric_limits<float>::max()}),
                 " in magnitude: training computes in float32)", got);
  }
}

// The head options of `name`: task.<name>.head.<option> keys.
constexpr std::string_view kHeadPrefix = "head.";

// One task's configuration from its keys (`subs`: key within the task -> value), named
// `name`; messages name the keys as the file spells them, under `section`.
tasks::TaskConfig task_from_keys(const std::string& name, const std::string& section,
                                 const std::map<std::string, std::string>& subs, const std::string& source) {
  tasks::TaskConfig t;
  t.name = name;
  const auto& keys = task_keys();
  for (const auto& [sub, value] : subs) {
    const std::string key = "task." + section + "." + sub;
    if (sub.size() > kHeadPrefix.size() && sub.compare(0, kHeadPrefix.size(), kHeadPrefix) == 0) {
      t.head_params[sub.substr(kHeadPrefix.size())] = value;  // validated by the head's factory
      continue;
    }
    const auto k = std::find_if(keys.begin(), keys.end(), [&](const auto& x) { return x.name == sub; });
    if (k == keys.end()) {
      std::vector<std::string> names;
      for (const auto& x : keys) names.push_back(x.name);
      throw ConfigError(detail::str_cat("unknown key '", key, "'", did_you_mean(sub, names), " (in ", source,
                                        "): a task has the keys ", join(names, ", "),
                                        "; a head option is written head.", sub, " = ", value, " (or ", sub,
                                        " = ", value, " in a [task.", section, ".head] section)"));
    }
    k->set(t, value, key + " (in " + source + ")");
  }
  return t;
}

// The values a grid key takes: `a | b | c` anywhere, or `a, b, c` where the key takes one
// value (a number, a name); one value otherwise.
std::vector<std::string> grid_values(const std::string& sub, const std::string& value) {
  std::vector<std::string> out;
  if (value.find('|') != std::string::npos) {
    for (auto& v : split(value, '|')) out.push_back(trim(v));
    return out;
  }
  const auto& keys = task_keys();
  const auto k = std::find_if(keys.begin(), keys.end(), [&](const auto& x) { return x.name == sub; });
  const bool single = k != keys.end() && (k->type == "integer" || k->type == "number" ||
                                          k->type == "choice" || k->type == "string" || k->type == "bool");
  if (single && value.find(',') != std::string::npos) {
    for (auto& v : split(value, ',')) out.push_back(trim(v));
    return out;
  }
  return {value};
}

// How a grid member's name spells one of its values: `head.hidden = 512, 256` -> hidden=512,256.
std::string grid_label(const std::string& sub, const std::string& value) {
  std::string name =
      sub.compare(0, kHeadPrefix.size(), kHeadPrefix) == 0 ? sub.substr(kHeadPrefix.size()) : sub;
  std::string v;
  for (char c : value) {
    if (c == ' ' || c == '\t') continue;
    v += c == '/' ? '_' : c;
  }
  return name + "=" + v;
}

constexpr std::size_t kMaxGridMembers = 4096;

// Tasks: task.<name>.<key> and task.<name>.head.<option>; ordered by name. A task whose keys
// hold lists (grid_values) becomes a grid: one task per combination, named
// <name>@<key>=<value>@..., its members in the order of the combinations.
std::vector<tasks::TaskConfig> tasks_from_values(const std::map<std::string, std::string>& values,
                                                 const std::string& source, std::set<std::string>& used) {
  std::map<std::string, std::map<std::string, std::string>> by_name;
  for (const auto& [key, value] : values) {
    if (key.rfind("task.", 0) != 0) continue;
    const auto dot = key.find('.', 5);
    CANOPY_CHECK(dot != std::string::npos && dot > 5 && dot + 1 < key.size(), ConfigError, "config key '",
                 key, "' (in ", source, "): task keys are task.<name>.<key>");
    const std::string name = key.substr(5, dot - 5);
    CANOPY_CHECK(name.find_first_of("@/") == std::string::npos, ConfigError, "task name '", name, "' (in ",
                 source, "): '@' and '/' are not allowed in task names ('@' names a grid's members)");
    by_name[name][key.substr(dot + 1)] = value;
    used.insert(key);
  }
  std::vector<tasks::TaskConfig> out;
  for (const auto& [name, subs] : by_name) {
    std::vector<std::pair<std::string, std::vector<std::string>>> axes;
    for (const auto& [sub, value] : subs) {
      auto vs = grid_values(sub, value);
      if (vs.size() < 2) continue;
      for (const auto& v : vs) {
        CANOPY_CHECK(!v.empty(), ConfigError, "task.", name, ".", sub, " = ", value, " (in ", source,
                     "): a grid's values must not be empty");
      }
      CANOPY_CHECK(sub != "kind" && sub != "labels" && sub != "label_map" && sub != "class_names",
                   ConfigError, "task.", name, ".", sub, " = ", value, " (in ", source,
                   "): a grid's members learn the same labels; vary the head, its options or the optimizer "
                   "(for other labels, write another task)");
      CANOPY_CHECK(sub != "monitor", ConfigError, "task.", name, ".monitor = ", value, " (in ", source,
                   "): a grid's members are compared by one metric; write one value");
      axes.emplace_back(sub, std::move(vs));
    }
    if (axes.empty()) {
      out.push_back(task_from_keys(name, name, subs, source));
      continue;
    }
    std::size_t members = 1;
    for (const auto& a : axes) {
      members *= a.second.size();
      CANOPY_CHECK(members <= kMaxGridMembers, ConfigError, "task.", name, " (in ", source,
                   ") is a grid of more than ", kMaxGridMembers, " heads; split it");
    }
    std::map<std::string, std::string> raw;
    for (const auto& a : axes) raw[a.first] = subs.at(a.first);
    // Every combination, the last key varying fastest.
    std::vector<std::size_t> at(axes.size(), 0);
    for (std::size_t m = 0; m < members; ++m) {
      auto member_subs = subs;
      std::string member = name;
      std::map<std::string, std::string> point;
      for (std::size_t a = 0; a < axes.size(); ++a) {
        const std::string& v = axes[a].second[at[a]];
        member_subs[axes[a].first] = v;
        point[axes[a].first] = v;
        member += "@" + grid_label(axes[a].first, v);
      }
      auto t = task_from_keys(member, name, member_subs, source);
      t.grid = name;
      t.grid_axes = raw;
      t.grid_point = std::move(point);
      out.push_back(std::move(t));
      for (std::size_t a = axes.size(); a-- > 0;) {
        if (++at[a] < axes[a].second.size()) break;
        at[a] = 0;
      }
    }
  }
  return out;
}

}  // namespace

JobConfig job_config_from_values(const std::map<std::string, std::string>& values,
                                 const std::string& source) {
  JobConfig c;
  c.source = source;
  // Keys and values end up in JSON (state.json, cards, metrics), HDF5 and TensorBoard, which
  // hold UTF-8: a Latin-1 byte would otherwise fail the run at its first checkpoint.
  for (const auto& [key, value] : values) {
    const std::string bad = utf8_problem(key).empty() ? utf8_problem(value) : utf8_problem(key);
    CANOPY_CHECK(
        bad.empty(), ConfigError, "config key ", printable(key), " (in ", source, "): ", bad,
        "; canopy reads its configuration as UTF-8 (convert the file, e.g. iconv -f latin1 -t utf-8, "
        "or rename the path)");
  }
  std::set<std::string> used;
  for (const auto& k : job_keys()) {
    const auto it = values.find(k.full_name());
    if (it == values.end()) continue;
    k.set(c, it->second, k.full_name() + " (in " + source + ")");
    used.insert(it->first);
  }
  c.trunk.inputs = reads_texts(c) ? 2 : 1;
  c.tasks = tasks_from_values(values, source, used);
  std::vector<std::string> known;
  for (const auto& k : job_keys()) known.push_back(k.full_name());
  std::vector<std::string> unknown;
  for (const auto& kv : values) {
    if (!used.count(kv.first)) unknown.push_back(kv.first + did_you_mean(kv.first, known));
  }
  CANOPY_CHECK(unknown.empty(), ConfigError, "unknown config key(s) in ", source, ": ", join(unknown, ", "),
               " (`canopy keys` lists every key)");
  validate_job_config(c);
  return c;
}

trunk::TrunkConfig trunk_config_from_values(const std::map<std::string, std::string>& values,
                                            const std::string& source) {
  JobConfig c;
  const auto& keys = job_keys();
  std::vector<std::string> known;
  for (const auto& k : keys) {
    if (k.full_name().rfind("trunk.", 0) == 0) known.push_back(k.full_name());
  }
  for (const auto& [key, value] : values) {
    CANOPY_CHECK(key.rfind("trunk.", 0) == 0, ConfigError, source, " takes trunk.* keys only, got ", key,
                 " (a job's keys need its config: --config FILE)");
    const auto k =
        std::find_if(keys.begin(), keys.end(), [&](const auto& e) { return e.full_name() == key; });
    CANOPY_CHECK(k != keys.end(), ConfigError, "unknown config key in ", source, ": ", key,
                 did_you_mean(key, known), " (`canopy keys` lists every key)");
    k->set(c, value, key + " (in " + source + ")");
  }
  trunk::validate_trunk_config(c.trunk);
  return c.trunk;
}

namespace {
// data.list_columns: label columns of a table, split at data.list_separator.
void validate_list_columns(const DataConfig& d, const std::string& in) {
  if (d.list_columns.empty()) return;
  CANOPY_CHECK(reads_text_table(d) || reads_image_table(d), ConfigError, "data.list_columns", in,
               " names columns of a table (text-csv, text-json, image-csv, image-json); data.source = ",
               d.source, " has none");
  const std::string& s = d.list_separator;
  CANOPY_CHECK(s == "space" ||
                   (s.size() == 1 && std::ispunct(static_cast<unsigned char>(s[0])) && s != "\"" && s != "'"),
               ConfigError, "data.list_separator", in, " = '", s,
               "': space (labels separated by any run of blanks) or one punctuation character such as | ; , "
               "(a field holding commas must be quoted in a CSV)");
  for (const auto& name : d.list_columns) {
    const bool text = reads_text_table(d) && lower_ascii(name) == lower_ascii(d.text_attribute);
    const bool path = reads_image_table(d) && (name == "path" || name == "file_name");
    CANOPY_CHECK(!name.empty() && !text && !path, ConfigError, "data.list_columns", in, " = ",
                 join(d.list_columns, ","), ": '", name, "' ",
                 text   ? "is the text column (data.text_attribute)"
                 : path ? "is the images' path column"
                        : "is empty",
                 "; list label columns");
  }
}
}  // namespace

void validate_job_config(const JobConfig& c) {
  // Every key's range from the table, named as the file spells it.
  const std::string in = c.source.empty() ? "" : " (in " + c.source + ")";
  for (const auto& k : job_keys()) check_range(k, c, k.full_name() + in);
  for (const auto& t : c.tasks) {
    for (const auto& k : task_keys()) check_range(k, t, "task." + t.name + "." + k.name + in);
  }
  if (reads_image_files(c.data)) {
    CANOPY_CHECK(!c.data.train.empty() && !c.data.test.empty(), ConfigError, "data.source = ", c.data.source,
                 " needs data.train and data.test (",
                 c.data.source == "image-folders" ? "class folders"
                 : reads_json_tables(c.data)      ? "JSON manifests"
                                                  : "CSV manifests",
                 ")");
  }
  if (c.data.source == "arff") {
    CANOPY_CHECK(!c.data.train_files.empty() && !c.data.test_files.empty(), ConfigError,
                 "data.source = arff needs data.train_files and data.test_files (label_name:path.arff, ...)");
  }
  if (reads_text_table(c.data)) {
    CANOPY_CHECK(!c.data.train.empty() && !c.data.test.empty(), ConfigError, "data.source = ", c.data.source,
                 " needs data.train and data.test (", reads_json_tables(c.data) ? "JSON" : "CSV",
                 " tables: a text column, then labels)");
  }
  validate_list_columns(c.data, in);
  if (reads_text_data(c.data)) datasets::validate_tokenizer_config(c.text);
  datasets::validate_preprocess_config(c.preprocess);
  if (c.cache.views > 1) {
    CANOPY_CHECK(!reads_text_data(c.data), ConfigError, "cache.views = ", c.cache.views, in,
                 ": augmented views are for images; texts have none yet (set cache.views = 1)");
    datasets::validate_augment_config(c.augment);
  }
  trunk::validate_trunk_config(c.trunk);
  CANOPY_CHECK(c.cache.shard_rows % c.cache.batch_size == 0, ConfigError,
               "cache.shard_rows must be a positive multiple of cache.batch_size (", c.cache.batch_size,
               "), got ", c.cache.shard_rows);
  const std::int64_t limit = 4 * machine_cores();
  CANOPY_CHECK(c.train.workers <= limit && c.train.intra_op_threads <= limit, ConfigError,
               "train.workers and train.intra_op_threads must be at most ", limit,
               " (4x the cores this process may use), got ", c.train.workers, " and ",
               c.train.intra_op_threads);
  std::string grid;  // the first grid, for the message below
  std::size_t grid_size = 0;
  for (const auto& t : c.tasks) {
    if (!t.grid.empty() && (grid.empty() || grid == t.grid)) {
      grid = t.grid;
      ++grid_size;
    }
  }
  CANOPY_CHECK(grid.empty() || has_validation(c.train), ConfigError, "task.", grid, in, " is a grid of ",
               grid_size,
               " heads; its winner is chosen on a validation split held out of the training data, never on "
               "the test split: set train.validation_fraction (e.g. 0.1)");
  for (const auto& t : c.tasks) {
    CANOPY_CHECK(t.threshold != "tune" || has_validation(c.train), ConfigError, "task.", t.written_name(),
                 ".threshold = tune", in,
                 " chooses each label's threshold on a validation split held out of the training data, never "
                 "on the test split: set train.validation_fraction (e.g. 0.1)");
    CANOPY_CHECK(t.calibrate == "none" || has_validation(c.train), ConfigError, "task.", t.written_name(),
                 ".calibrate = ", t.calibrate, in,
                 " fits the head's temperature on a validation split held out of the training data, never on "
                 "the test split it is scored on: set train.validation_fraction (e.g. 0.1)");
  }
  CANOPY_CHECK(c.train.grid_halving == 0 || !grid.empty(), ConfigError,
               "train.grid_halving = ", c.train.grid_halving, in,
               " stops the weaker members of a grid, and no task is a grid (a list of values makes one, "
               "e.g. lr = 1e-3, 1e-2); set train.grid_halving = 0");
  if (c.train.grid_halving > 0) {
    std::int64_t longest = 0;  // the most epochs a grid member trains
    for (const auto& t : c.tasks) {
      if (!t.grid.empty()) longest = std::max(longest, task_epochs(t, c.train));
    }
    CANOPY_CHECK(c.train.grid_halving < longest, ConfigError, "train.grid_halving = ", c.train.grid_halving,
                 in, " would make its first cut after epoch ", c.train.grid_halving,
                 ", and no grid member trains more than ", longest,
                 " epochs: nothing would be cut; set it below ", longest, " (e.g. 1), or 0");
  }
  CANOPY_CHECK(c.train.export_mode != ExportMode::kBest || has_validation(c.train), ConfigError,
               "train.export = best", in,
               " chooses each head's epoch on a validation split: set train.validation_fraction (e.g. 0.1), "
               "or export = last");
  if (!c.train.export_monitor.empty()) {
    CANOPY_CHECK(c.train.export_mode == ExportMode::kBest, ConfigError,
                 "train.export_monitor = ", c.train.export_monitor, in,
                 " chooses the epoch train.export = best exports, and export is ",
                 to_string(c.train.export_mode), ": set export = best, or leave export_monitor out");
    std::vector<std::string> names;
    for (const auto& t : c.tasks) {
      if (names.empty() || names.back() != t.written_name()) names.push_back(t.written_name());
    }
    CANOPY_CHECK(std::find(names.begin(), names.end(), c.train.export_monitor) != names.end(), ConfigError,
                 "train.export_monitor = ", c.train.export_monitor, in, " names no task; the tasks are ",
                 join(names, ", "));
  }
  for (const auto& t : c.tasks) {
    tasks::validate_task_config(t, 0);
    CANOPY_CHECK(t.loss_weight == 1.0 || c.train.weighting == Weighting::kStatic, ConfigError, "task.",
                 t.name, ".loss_weight = ", t.loss_weight,
                 " takes effect with train.weighting = static, not ", to_string(c.train.weighting));
  }
}

std::map<std::string, std::string> read_config_values(std::istream& in, const std::string& source) {
  std::map<std::string, std::string> values;
  // A byte-order mark, as Windows editors write one, would make the first line invalid.
  std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  strip_utf8_bom(text);
  std::istringstream body(text);
  try {
    po::options_description none;
    const auto parsed = po::parse_config_file(body, none, /*allow_unregistered=*/true);
    for (const auto& opt : parsed.options) {
      CANOPY_CHECK(!values.count(opt.string_key), ConfigError, "config key '", opt.string_key,
                   "' appears twice in ", source);
      values[opt.string_key] = opt.value.empty() ? std::string() : trim(opt.value.front());
    }
  } catch (const po::error& e) {
    throw ConfigError(detail::str_cat("cannot parse config file '", source, "': ", e.what()));
  }
  return values;
}

JobConfig load_job_config(const std::string& path, const std::vector<std::string>& overrides) {
  CANOPY_CHECK(!is_directory(path), ConfigError, "config file '", path,
               "' is a directory; give the .ini file");
  std::ifstream in(path);
  CANOPY_CHECK(in, ConfigError, "cannot open config file '", path, "': ", std::strerror(errno));
  std::map<std::string, std::string> values = read_config_values(in, path);
  apply_overrides(values, overrides);
  return job_config_from_values(values, path);
}

void apply_overrides(std::map<std::string, std::string>& values, const std::vector<std::string>& overrides) {
  for (const auto& o : overrides) {
    const auto eq = o.find('=');
    CANOPY_CHECK(eq != std::string::npos && eq > 0, ConfigError, "--set expects key=value, got '", o, "'");
    values[trim(o.substr(0, eq))] = trim(o.substr(eq + 1));
  }
}

std::string stops_on_eval_split(const JobConfig& config) {
  if (has_validation(config.train)) return "";
  std::vector<std::string> names;
  for (const auto& t : config.tasks)
    if (t.early_stop_patience > 0) names.push_back("'" + t.name + "'");
  if (names.empty()) return "";
  const bool one = names.size() == 1;
  return detail::str_cat(one ? "task " : "tasks ", join(names, ", "),
                         one ? " stops early by its score" : " stop early by their score",
                         " on the eval split (train.eval_split = ", config.train.eval_split,
                         "; there is no validation split): the epoch ", one ? "it" : "each",
                         " stops at is chosen on those rows, so ", one ? "its" : "their",
                         " numbers on them lean optimistic; train.validation_fraction = 0.1 chooses on rows "
                         "held out of the train split instead");
}

bool is_top_key(const std::string& full_name) {
  static const std::set<std::string> top{"trunk.optimizer",       "trunk.lr",
                                         "trunk.lr_decay",        "trunk.weight_decay",
                                         "trunk.lr_schedule",     "trunk.lr_warmup_steps",
                                         "trunk.max_grad_norm",   "trunk.schedule",
                                         "trunk.warmup_epochs",   "trunk.unfreeze_every",
                                         "trunk.freeze_interval", "trunk.percentile",
                                         "trunk.min_trainable",   "trunk.level_on_disk",
                                         "trunk.top_precision",   "train.export_monitor"};
  return top.count(full_name) > 0;
}

std::vector<std::string> top_keys_set(const JobConfig& config) {
  const JobConfig defaults;
  std::vector<std::string> set;
  for (const auto& k : job_keys()) {
    if (is_top_key(k.full_name()) && k.get(config) != k.get(defaults))
      set.push_back(k.full_name() + " = " + k.get(config));
  }
  return set;
}

std::vector<std::string> task_keys_unused(const JobConfig& config) {
  const tasks::TaskConfig defaults;
  std::vector<std::string> out;
  std::set<std::string> seen;  // a grid's members say it once
  for (const auto& t : config.tasks) {
    std::vector<std::string> mine;
    if (t.optimizer != tasks::OptimizerKind::kSgd && t.momentum != defaults.momentum) {
      mine.push_back("momentum = " + format_value(t.momentum) + " (sgd only; its optimizer is " +
                     tasks::to_string(t.optimizer) + ")");
    }
    if (t.schedule != tasks::LrSchedule::kStep) {
      const std::string why =
          std::string(" (schedule = step only; its schedule is ") + tasks::to_string(t.schedule) + ")";
      if (t.step_size != defaults.step_size) mine.push_back("step_size = " + format_value(t.step_size) + why);
      if (t.gamma != defaults.gamma) mine.push_back("gamma = " + format_value(t.gamma) + why);
    }
    for (const auto& m : mine) {
      const std::string line = "task." + t.written_name() + "." + m;
      if (seen.insert(line).second) out.push_back(line);
    }
  }
  return out;
}

bool is_epochs_key(const std::string& key) {
  constexpr std::string_view kTask = "task.", kEpochs = ".epochs";
  return key == "train.epochs" ||
         (key.size() > kTask.size() + kEpochs.size() && key.compare(0, kTask.size(), kTask) == 0 &&
          key.find('.', kTask.size()) == key.size() - kEpochs.size() &&
          key.compare(key.size() - kEpochs.size(), kEpochs.size(), kEpochs) == 0);
}

std::string dump_config(const JobConfig& c) {
  std::ostringstream o;
  o << "# resolved canopy configuration (from " << c.source << ")\n";
  std::string section;
  for (const auto& k : job_keys()) {
    if (!k.dumped(c)) continue;
    const std::string value = k.get(c);
    if (k.section != section) {
      o << (section.empty() ? "" : "\n") << "[" << k.section << "]\n";
      section = k.section;
    }
    o << k.name << " = " << value << "\n";
  }
  std::set<std::string> grids_written;
  for (const auto& t : c.tasks) {
    // A grid as written: its first member's keys, with the lists where they vary.
    if (!t.grid.empty() && !grids_written.insert(t.grid).second) continue;
    const auto& axes = t.grid_axes;
    auto value_of = [&](const std::string& key, const std::string& v) {
      const auto a = axes.find(key);
      return a == axes.end() ? v : a->second;
    };
    o << "\n[task." << t.written_name() << "]\n";
    for (const auto& k : task_keys()) {
      if (k.dumped(t) || axes.count(k.name)) o << k.name << " = " << value_of(k.name, k.get(t)) << "\n";
    }
    for (const auto& [name, value] : t.head_params) {
      const std::string key = std::string(kHeadPrefix) + name;
      o << key << " = " << value_of(key, value) << "\n";
    }
  }
  return o.str();
}

std::string config_reference() {
  std::ostringstream o;
  const JobConfig defaults;
  std::string section;
  auto row = [&](const std::string& name, const std::string& type, const std::string& def,
                 const std::string& range, const std::string& help) {
    o << "| `" << name << "` | " << type << " | " << (def.empty() ? "" : "`" + def + "`") << " | " << range
      << " | " << help << " |\n";
  };
  for (const auto& k : job_keys()) {
    if (k.section != section) {
      o << (section.empty() ? "" : "\n") << "### [" << k.section << "]\n\n"
        << "| key | type | default | range | meaning |\n|---|---|---|---|---|\n";
      section = k.section;
    }
    row(k.full_name(), k.type, k.get(defaults), k.range(), k.help);
  }
  o << "\n### [task.NAME]\n\n| key | type | default | range | meaning |\n|---|---|---|---|---|\n";
  const tasks::TaskConfig task_defaults;
  for (const auto& k : task_keys())
    row("task.NAME." + k.name, k.type, k.get(task_defaults), k.range(), k.help);
  o << "\n### task.NAME.head.OPTION\n\nThe head's own options, written `head.OPTION = value` in the task's "
       "section "
       "(or `OPTION = value` in a `[task.NAME.head]` section), read by its factory (`canopy heads` lists the "
       "types): "
       "`linear` takes `bias` (true \\| false); `mlp` takes `hidden` (widths, e.g. `512,256`), `activation` "
       "(relu \\| gelu \\| "
       "tanh \\| "
       "silu) and `dropout` (in [0, 1)). A head of your own reads what it declares "
       "(docs/adding-a-head.md).\n";
  return o.str();
}

ExportMode parse_export_mode(const std::string& name, const std::string& where) {
  if (name == "auto") return ExportMode::kAuto;
  if (name == "best") return ExportMode::kBest;
  if (name == "last") return ExportMode::kLast;
  throw ConfigError(detail::str_cat(where, ": expected auto, best or last, got '", name, "'"));
}

const char* to_string(ExportMode mode) {
  switch (mode) {
    case ExportMode::kBest:
      return "best";
    case ExportMode::kLast:
      return "last";
    case ExportMode::kAuto:
      break;
  }
  return "auto";
}

FuseMode parse_fuse_mode(const std::string& name, const std::string& where) {
  if (name == "auto") return FuseMode::kAuto;
  if (name == "always") return FuseMode::kAlways;
  if (name == "never") return FuseMode::kNever;
  throw ConfigError(
      detail::str_cat(where, ": expected auto, always or never, got '", name, "'",
                      name == "true" || name == "false" ? " (true is now always, false never)" : ""));
}

const char* to_string(FuseMode mode) {
  switch (mode) {
    case FuseMode::kAlways:
      return "always";
    case FuseMode::kNever:
      return "never";
    case FuseMode::kAuto:
      break;
  }
  return "auto";
}

}  // namespace canopy::runners
