#include "canopy/runners/model_file.h"

#include <cctype>
#include <sstream>
#include <typeinfo>

#include <torch/csrc/jit/api/module.h>
#include <torch/nn/modules/linear.h>
#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/progress.h"
#include "canopy/core/sha256.h"
#include "canopy/core/strings.h"
#include "canopy/datasets/preprocess.h"
#include "canopy/heads/linear.h"
#include "canopy/heads/mlp.h"
#include "canopy/runners/exported_model.h"
#include "canopy/runners/input_data.h"

namespace canopy::runners {

namespace {

const char* kind_name(tasks::TaskKind k) {
  return k == tasks::TaskKind::kRegression   ? "regression"
         : k == tasks::TaskKind::kMultilabel ? "multilabel"
                                             : "multiclass";
}

// A double as TorchScript source reads it back exactly.
std::string literal(double v) {
  std::ostringstream o;
  o.precision(17);
  o << v;
  std::string s = o.str();
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

// One head as TorchScript: its weights as parameters h<i>_<j> of `model`, and the expression of
// its output (the logits) from `f`. Only the built-in heads have one: a registered C++ head's
// forward is native code.
std::string head_source(torch::jit::Module& model, std::size_t i, const ExportedHead& h) {
  std::vector<torch::nn::Linear> layers;
  std::string activation;
  // The built-in classes exactly: a subclass may forward otherwise.
  const heads::Head& head = *h.head;
  if (typeid(head) == typeid(heads::LinearHead)) {
    layers.push_back(static_cast<const heads::LinearHead&>(head).linear());
  } else if (typeid(head) == typeid(heads::MlpHead)) {
    const auto* mlp = static_cast<const heads::MlpHead*>(h.head.get());
    for (const auto& m : h.head->modules(/*include_self=*/false)) {
      if (auto l = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) layers.emplace_back(l);
    }
    activation = mlp->options().activation();
    CANOPY_CHECK(layers.size() == mlp->options().hidden().size() + 1, DataError, "task '", h.task(),
                 "': its mlp head has ", layers.size(), " linear layers for ", mlp->options().hidden().size(),
                 " hidden sizes");
  } else {
    throw ConfigError(detail::str_cat(
        "task '", h.task(), "': head '", h.config.head,
        "' is registered C++ code, which a TorchScript model file cannot hold; canopy export writes the "
        "built-in heads (linear, mlp) only: drop the task from a copy of the config to export the others"));
  }
  std::string x = "f";
  for (std::size_t j = 0; j < layers.size(); ++j) {
    const std::string w = detail::str_cat("h", i, "_w", j), b = detail::str_cat("h", i, "_b", j);
    model.register_parameter(w, layers[j]->weight.detach().clone(), false);
    std::string bias = "None";
    if (layers[j]->bias.defined()) {
      model.register_parameter(b, layers[j]->bias.detach().clone(), false);
      bias = "self." + b;
    }
    x = detail::str_cat("torch.linear(", x, ", self.", w, ", ", bias, ")");
    if (j + 1 < layers.size())
      x = detail::str_cat("torch.", activation, "(", x, ")");  // relu, gelu, tanh, silu
  }
  return x;
}

// `v` pooled as trunk.pooling says (trunk/trunk.cpp's pool, in TorchScript).
std::string pool_source(const std::string& v, const std::string& pooling) {
  if (pooling == "avg")
    return detail::str_cat("(", v, ".flatten(2).mean(2) if ", v, ".dim() > 2 else ", v, ")");
  if (pooling == "avg_channels_last")
    return detail::str_cat("(", v, ".flatten(1, -2).mean(1) if ", v, ".dim() > 2 else ", v, ")");
  if (pooling == "flatten") return v + ".flatten(1)";
  if (pooling == "none") return v;
  if (pooling == "first_token") return v + ".select(1, 0)";
  // masked_mean
  return detail::str_cat("(", v, " * attention_mask.to(", v,
                         ".dtype).unsqueeze(2)).sum(1) / attention_mask.to(", v,
                         ".dtype).unsqueeze(2).sum(1).clamp_min(1.0)");
}

// The trunk as the file holds it (Trunk::script_module), checked to take what the data source
// gives: images, or token ids and an attention mask.
torch::jit::Module file_trunk(const trunk::Trunk& trunk, bool texts) {
  torch::jit::Module m = trunk.script_module();
  // The arguments past those canopy gives may have defaults (timm's attn_mask=None).
  const auto& args = m.get_method("forward").function().getSchema().arguments();  // self first
  const std::size_t required = trunk::required_inputs(m);
  const std::size_t given = texts ? 2U : 1U;
  CANOPY_CHECK(required <= given && given < args.size(), ConfigError, "trunk '", trunk.config().path,
               "' takes ", args.size() - 1, " inputs (", required,
               " without a default); a model file is written for an image "
               "trunk (one: images) or a text trunk (two: token ids and attention mask)");
  return m;
}

// features(): the preprocessing (images; its mean and std become buffers of `model`) or the
// token inputs (texts), the trunk, its taps and pooling. `inputs` says what it takes.
std::string features_source(torch::jit::Module& model, const JobConfig& config, bool texts,
                            std::string& inputs) {
  std::ostringstream src;
  // With taps, canopy_taps: the tuple of the tapped outputs in place of forward's result.
  const auto& taps = config.trunk.taps;
  const std::string run_trunk = taps.empty() ? "self.trunk.forward(" : "self.trunk.canopy_taps(";
  if (texts) {
    inputs =
        "input_ids: int64 [N, T], attention_mask: int64 [N, T] (canopy tokenize's ids, 1 for each token)";
    src << "def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:\n"
        << "    x = " << run_trunk << "input_ids, attention_mask)\n";
  } else {
    const auto& p = config.preprocess;
    const std::int64_t c = p.channels;
    model.register_buffer("pixel_mean", datasets::channel_values(p.mean, c));
    model.register_buffer("pixel_std", datasets::channel_values(p.std, c));
    inputs = "images: uint8 [N, H, W] or [N, C, H, W] (pixels 0-255";
    inputs += p.resize > 0 ? detail::str_cat(", any size: resized to ", p.resize, "x", p.resize)
              : p.resize_shorter > 0
                  ? detail::str_cat(", any size: the shorter side resized to ", p.resize_shorter)
              : p.center_crop > 0 ? std::string(", any size")
                                  : std::string(", the size the heads were trained at");
    if (p.center_crop > 0)
      inputs += detail::str_cat(", the centre ", p.center_crop, "x", p.center_crop, " kept");
    inputs += ")";
    src << "def features(self, images: Tensor) -> Tensor:\n"
        << "    assert images.dtype == 0, \"images must be uint8 pixels (0-255)\"\n"
        << "    assert images.dim() == 3 or images.dim() == 4, \"images must be [N, H, W] or [N, C, H, W]\"\n"
        << "    x = images.float().div(255.0)\n"
        << "    if x.dim() == 3:\n"
        << "        x = x.unsqueeze(1)\n";
    const std::string resize = p.antialias ? "_upsample_bilinear2d_aa" : "upsample_bilinear2d";
    if (p.resize > 0) {
      src << "    if x.size(2) != " << p.resize << " or x.size(3) != " << p.resize << ":\n"
          << "        x = torch." << resize << "(x, [" << p.resize << ", " << p.resize
          << "], False, None, None)\n";
    }
    if (p.resize_shorter > 0) {  // datasets::shorter_side_size
      const std::int64_t s = p.resize_shorter;
      src << "    h = x.size(2)\n    w = x.size(3)\n"
          << "    longer = int(" << s << " * max(h, w) / min(h, w))\n"
          << "    nh = longer if w <= h else " << s << "\n"
          << "    nw = " << s << " if w <= h else longer\n"
          << "    if nh != h or nw != w:\n"
          << "        x = torch." << resize << "(x, [nh, nw], False, None, None)\n";
    }
    if (p.center_crop > 0) {  // datasets::preprocess_images' center_crop, center_crop_offset
      const std::int64_t k = p.center_crop;
      src << "    ph = max(" << k << " - x.size(2), 0)\n    pw = max(" << k << " - x.size(3), 0)\n"
          << "    if ph > 0 or pw > 0:\n"
          << "        x = torch.constant_pad_nd(x, [pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2], 0.0)\n"
          << "    dh = x.size(2) - " << k << "\n    dw = x.size(3) - " << k << "\n"
          << "    top = dh // 2 + (1 if dh % 2 == 1 and (dh // 2) % 2 == 1 else 0)\n"
          << "    left = dw // 2 + (1 if dw % 2 == 1 and (dw // 2) % 2 == 1 else 0)\n"
          << "    x = x[:, :, top:top + " << k << ", left:left + " << k << "]\n";
    }
    if (c > 1) src << "    if x.size(1) == 1:\n        x = x.expand(-1, " << c << ", -1, -1)\n";
    src << "    assert x.size(1) == " << c << ", \"images must have 1 or " << c << " channels\"\n"
        << "    x = " << run_trunk << "x.sub(self.pixel_mean).div(self.pixel_std))\n";
  }
  if (taps.empty()) {
    src << "    return " << pool_source("x", config.trunk.pooling) << "\n";
    return src.str();
  }
  std::vector<std::string> pooled;
  for (std::size_t k = 0; k < taps.size(); ++k) {
    src << "    t" << k << " = x[" << k << "]\n";
    pooled.push_back(pool_source(detail::str_cat("t", k), config.trunk.pooling));
  }
  src << "    return " << (pooled.size() == 1 ? pooled[0] : "torch.cat([" + join(pooled, ", ") + "], 1)")
      << "\n";
  return src.str();
}

// heads(): every head's output by task (its weights become parameters of `model`), and the
// attributes that name them: tasks, class_names, kinds, thresholds. Returns the tasks in order.
std::string heads_source(torch::jit::Module& model, const std::vector<ExportedHead>& heads,
                         std::vector<std::string>& tasks) {
  std::ostringstream src;
  src << "def heads(self, f: Tensor) -> Dict[str, Tensor]:\n"
      << "    out: Dict[str, Tensor] = {}\n";
  c10::Dict<std::string, c10::List<std::string>> class_names;
  c10::Dict<std::string, std::string> kinds;
  c10::Dict<std::string, c10::List<double>> thresholds;  // multilabel: a label is given over its own
  for (std::size_t i = 0; i < heads.size(); ++i) {
    const ExportedHead& h = heads[i];
    const std::string logits = head_source(model, i, h);
    std::string value;
    if (h.kind == tasks::TaskKind::kRegression)
      value = detail::str_cat(logits, ".select(1, 0).mul(", literal(h.target_std), ").add(",
                              literal(h.target_mean), ")");
    else if (h.kind == tasks::TaskKind::kMultilabel)
      value = "torch.sigmoid(" + logits + ")";
    else if (h.temperature != 1.0)  // calibrate = temperature
      value = detail::str_cat("torch.softmax(", logits, ".div(", literal(h.temperature), "), 1)");
    else
      value = "torch.softmax(" + logits + ", 1)";
    // The name from an attribute, not a literal in the source: a task name may hold any character.
    src << "    out[self.tasks[" << i << "]] = " << value << "\n";
    class_names.insert(h.task(), c10::List<std::string>(h.class_names));
    kinds.insert(h.task(), kind_name(h.kind));
    if (h.kind == tasks::TaskKind::kMultilabel) {
      std::vector<double> p;
      for (double cut : h.cutoffs) p.push_back(tasks::logit_threshold(cut));
      thresholds.insert(h.task(), c10::List<double>(p));
    }
    tasks.push_back(h.task());
  }
  src << "    return out\n";
  const auto by_task = [](const c10::TypePtr& value) {
    return c10::DictType::create(c10::StringType::get(), value);
  };
  model.register_attribute("tasks", c10::ListType::ofStrings(), c10::List<std::string>(tasks));
  model.register_attribute("class_names", by_task(c10::ListType::ofStrings()), class_names);
  model.register_attribute("kinds", by_task(c10::StringType::get()), kinds);
  model.register_attribute("thresholds", by_task(c10::ListType::ofFloats()), thresholds);
  return src.str();
}

// The file: `model` with `source` compiled into it, and `meta` beside as `meta_file`.
std::string model_bytes(torch::jit::Module& model, const std::string& source,
                        const nlohmann::ordered_json& meta,
                        const std::string& meta_file = "canopy/model.json") {
  try {
    model.define(source);
  } catch (const std::exception& e) {
    throw Error(detail::str_cat("the TorchScript of the file to write did not compile: ", e.what()));
  }
  model.eval();
  std::ostringstream bytes;
  // Paths from the command line may not be UTF-8: written as JSON with U+FFFD in their place.
  model.save(bytes, {{meta_file, meta.dump(2, ' ', false, nlohmann::json::error_handler_t::replace)}});
  return bytes.str();
}

}  // namespace

ModelFile export_model_file(const JobConfig& job, const tasks::HeadRegistry& registry,
                            const std::string& path) {
  JobConfig config = job;
  config.trunk.optimize = false;  // the file holds the trunk's own code, not canopy's rewrites
  config.trunk.device = "cpu";
  const ExportedModel loaded = load_exported_model(config, registry);
  const bool texts = reads_text_data(config.data);
  ModelFile out;
  out.path = path;
  if (config.trunk.precision != "float32" || config.trunk.top_precision != "float32") {
    out.notes.push_back(detail::str_cat("the heads were trained on trunk passes at ", config.trunk.precision,
                                        " (top: ", config.trunk.top_precision,
                                        "); the model file runs the trunk in float32, so its outputs differ "
                                        "from canopy predict's by that rounding"));
  }
  torch::jit::Module model(c10::QualifiedName("__torch__.canopy.MultiTaskModel"));
  model.register_module("trunk", file_trunk(loaded.trunk, texts));
  // In this order (operands of + are evaluated in no set order): the preprocessing's buffers,
  // then the heads' weights, as the file lays them out.
  const std::string features = features_source(model, config, texts, out.inputs);
  const std::string heads = heads_source(model, loaded.heads, out.tasks);
  const std::string source = features + "\n" + heads + "\ndef forward(self, " +
                             (texts ? "input_ids: Tensor, attention_mask: Tensor" : "images: Tensor") +
                             ") -> Dict[str, Tensor]:\n    return self.heads(self.features(" +
                             (texts ? "input_ids, attention_mask" : "images") + "))\n";
  nlohmann::ordered_json cards = nlohmann::ordered_json::object();
  for (const auto& h : loaded.heads) cards[h.task()] = h.card;
  const nlohmann::ordered_json meta = {{"format", "canopy multi-task model, TorchScript"},
                                       {"inputs", out.inputs},
                                       {"trunk", loaded.trunk.config().path},
                                       {"trunk_sha256", loaded.trunk.sha256()},
                                       {"preprocessing", describe_preprocessing(config)},
                                       {"taps", trunk::describe_taps(config.trunk)},
                                       {"pooling", config.trunk.pooling},
                                       {"config", config.source},
                                       {"heads", cards}};
  const std::string written = model_bytes(model, source, meta);
  write_output_file(path, written);  // a regular file atomically; /dev/stdout or a pipe in place
  out.sha256 = sha256_hex(written);
  out.bytes = static_cast<std::int64_t>(written.size());
  return out;
}

namespace {

bool is_identifier(const std::string& s) {
  if (s.empty() || std::isdigit(static_cast<unsigned char>(s[0]))) return false;
  for (char ch : s) {
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '_') return false;
  }
  return s != "self";
}

// forward's arguments after self, as TorchScript declares them (a name that cannot be one, such
// as "x.1", becomes input<k>), and the same names as the call passes them on.
std::pair<std::string, std::string> forward_arguments(const torch::jit::Module& m) {
  const auto& args = m.get_method("forward").function().getSchema().arguments();
  std::vector<std::string> declared;
  std::vector<std::string> passed;
  for (std::size_t k = 1; k < args.size(); ++k) {
    const std::string name = is_identifier(args[k].name()) ? args[k].name() : detail::str_cat("input", k - 1);
    declared.push_back(name + ": " + args[k].type()->annotation_str());
    passed.push_back(name);
  }
  return {join(declared, ", "), join(passed, ", ")};
}

// What a trunk's method returns, checked to be one tensor per output canopy pools (as
// trunk/trunk.cpp's pooled() refuses at the first batch, here before anything is written).
void check_tensor_outputs(const torch::jit::Module& m, const std::string& method,
                          const trunk::TrunkConfig& c) {
  const c10::TypePtr out = m.get_method(method).graph()->outputs().at(0)->type();
  std::vector<c10::TypePtr> each{out};
  if (!c.taps.empty()) each = out->expectRef<c10::TupleType>().elements().vec();
  for (std::size_t k = 0; k < each.size(); ++k) {
    CANOPY_CHECK(each[k]->kind() == c10::TypeKind::TensorType, ConfigError, "trunk '", c.path,
                 "': ", c.taps.empty() ? std::string("its output") : "tap " + c.taps[k] + "'s output",
                 " is a ", each[k]->annotation_str(),
                 ", not one tensor: tap a block whose output is one (canopy trunk show lists them)");
  }
}

}  // namespace

TrunkFile export_trunk_file(const trunk::TrunkConfig& c, const std::string& path) {
  trunk::TrunkConfig config = c;
  config.optimize = false;  // the file holds the trunk's own code, not canopy's rewrites
  config.device = "cpu";
  const trunk::Trunk loaded = trunk::Trunk::load(config);
  torch::jit::Module inner = loaded.script_module();  // refuses a compiled .pt2
  const std::string method = config.taps.empty() ? "forward" : "canopy_taps";
  check_tensor_outputs(inner, method, config);
  TrunkFile out;
  out.path = path;
  out.outputs = config.taps.empty() ? std::vector<std::string>{"output"} : config.taps;
  const auto [declared, passed] = forward_arguments(inner);
  out.inputs = declared;
  torch::jit::Module m(c10::QualifiedName("__torch__.canopy.TrunkFeatures"));
  m.register_module("trunk", inner);
  const std::string result =
      detail::str_cat("self.trunk.", method, "(", passed, ")", config.taps.size() == 1 ? "[0]" : "");
  const nlohmann::ordered_json meta = {{"format", "canopy trunk features, TorchScript"},
                                       {"outputs", out.outputs},
                                       {"inputs", out.inputs},
                                       {"source", config.path},
                                       {"source_sha256", loaded.sha256()},
                                       {"expand", config.expand}};
  const std::string written =
      model_bytes(m, detail::str_cat("def forward(self, ", declared, "):\n    return ", result, "\n"), meta,
                  "canopy/trunk.json");
  write_output_file(path, written);
  out.sha256 = sha256_hex(written);
  out.bytes = static_cast<std::int64_t>(written.size());
  return out;
}

std::string format_trunk_file(const TrunkFile& t) {
  std::ostringstream o;
  o << "wrote " << t.path << " (" << format_mib(static_cast<double>(t.bytes)) << ", sha256 " << t.sha256
    << ")\n"
    << "  outputs " << join(t.outputs, ", ") << " (unpooled" << (t.outputs.size() > 1 ? ", a tuple" : "")
    << ")\n"
    << "  input   " << t.inputs << "\n"
    << "  load    torch.jit.load(\"" << t.path << "\") in Python; scripts/export_trunk.py " << t.path
    << " --format pt2 --size S compiles it for this machine\n";
  return o.str();
}

std::string format_model_file(const ModelFile& m) {
  std::ostringstream o;
  o << "wrote " << m.path << " (" << format_mib(static_cast<double>(m.bytes)) << ", sha256 " << m.sha256
    << ")\n"
    << "  heads   " << join(m.tasks, ", ") << "\n"
    << "  input   " << m.inputs << "\n"
    << "  load    torch.jit.load(\"" << m.path << "\") in Python, torch::jit::load in C++; model(x) gives "
    << "{task: output}\n";
  for (const auto& n : m.notes) o << "  note    " << n << "\n";
  return o.str();
}

}  // namespace canopy::runners
