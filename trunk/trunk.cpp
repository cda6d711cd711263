#include "canopy/trunk/trunk.h"

#include <algorithm>
#include <atomic>
#include <iomanip>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>

#include <ATen/ops/cat.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/autocast.h>
#include <torch/csrc/jit/passes/constant_propagation.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/frozen_graph_optimizations.h>
#include <torch/csrc/jit/passes/graph_rewrite_helper.h>
#include <torch/csrc/jit/runtime/graph_iterator.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/script.h>  // torch::jit::freeze

#include "canopy/core/device.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/progress.h"
#include "canopy/core/sha256.h"
#include "canopy/core/strings.h"
#include "canopy/trunk/autocast.h"
#include "canopy/trunk/conv_fusion.h"
#include "canopy/trunk/grouped_conv.h"

namespace canopy::trunk {

namespace {

constexpr const char* kTapsMethod = "canopy_taps";
constexpr const char* kPrefixMethod = "canopy_prefix";
constexpr const char* kTopMethod = "canopy_top";
const std::set<std::string> kPoolings = {"avg",  "avg_channels_last", "flatten",
                                         "none", "first_token",       "masked_mean"};
const std::map<std::string, at::ScalarType> kPrecisions = {
    {"float32", at::kFloat}, {"bfloat16", at::kBFloat16}, {"float16", at::kHalf}};

std::string qualified(const std::string& parent, const std::string& child) {
  return parent.empty() ? child : parent + "." + child;
}

bool is_within(const std::string& name, const std::string& root) {
  return root.empty() || name == root ||
         (name.size() > root.size() && name.compare(0, root.size(), root) == 0 && name[root.size()] == '.');
}

std::string type_name(const torch::jit::Module& m) {
  const auto n = m.type()->name();
  return n ? n->name() : "?";
}

bool is_batchnorm(const torch::jit::Module& m) {
  bool mean = false, var = false;
  for (const auto& b : m.named_buffers(false)) {
    mean = mean || b.name == "running_mean";
    var = var || b.name == "running_var";
  }
  return mean && var;
}

// Whether a BatchNorm module's forward passes training = false as a constant: a module
// traced in eval mode, whose statistics no training mode can change. A module the trace never
// ran (GoogLeNet's aux1 in eval mode) has no forward.
bool batchnorm_fixed_by_trace(const torch::jit::Module& m) {
  const auto forward = m.find_method("forward");
  if (!forward) return false;
  for (torch::jit::Node* n : forward->graph()->nodes()) {
    if (n->kind() == c10::aten::batch_norm && n->inputs().size() > 5) {
      const torch::jit::Node* training = n->input(5)->node();
      return training->kind() == c10::prim::Constant && training->hasAttribute(c10::attr::value) &&
             training->i(c10::attr::value) == 0;
    }
  }
  return false;
}

// The qualified names of a graph's module values, read node by node: the graph's first input
// (the trunk itself) is "", and each GetAttr of a submodule from a named module is named by
// the chain (self.layers.3 -> "layers.3").
class ModulePaths {
 public:
  explicit ModulePaths(const torch::jit::Graph& g) : path_{{g.inputs()[0], ""}} {}
  // Names the module a GetAttr node gives; true when `n` was a GetAttr.
  bool read(const torch::jit::Node* n) {
    if (n->kind() != c10::prim::GetAttr) return false;
    const auto it = path_.find(n->input(0));
    const auto cls = n->output()->type()->cast<c10::ClassType>();
    if (it != path_.end() && cls && cls->is_module())
      path_[n->output()] = qualified(it->second, n->s(c10::attr::name));
    return true;
  }
  // The module a value is, or nullptr when it is not a named module.
  const std::string* of(const torch::jit::Value* v) const {
    const auto it = path_.find(v);
    return it == path_.end() ? nullptr : &it->second;
  }

 private:
  std::map<const torch::jit::Value*, std::string> path_;
};

// Submodules called directly by `forward`, by qualified name, with the graph value each
// call returns (attribute chains like self.layers.3 are followed).
std::vector<std::pair<std::string, torch::jit::Value*>> forward_calls(
    const std::shared_ptr<torch::jit::Graph>& g) {
  ModulePaths paths(*g);
  std::vector<std::pair<std::string, torch::jit::Value*>> out;
  std::set<std::string> seen;
  for (torch::jit::Node* n : g->nodes()) {
    if (paths.read(n) || n->kind() != c10::prim::CallMethod || n->s(c10::attr::name) != "forward") continue;
    const std::string* name = paths.of(n->input(0));
    if (name && !name->empty() && seen.insert(*name).second) out.emplace_back(*name, n->output());
  }
  return out;
}

// forward's arguments past the first `passed` (0: past those without a default), which canopy
// never gives, take their defaults for good: each becomes a constant of the graph and leaves
// forward's signature, and the branches on them fold (timm's scripted ViT runs its blocks
// behind `if attn_mask is not None or is_causal`, for arguments that default to None and
// False). Returns their names, none when there are none or one of them has no default.
std::vector<std::string> specialize_defaults(torch::jit::Module& module, std::size_t passed) {
  auto& fn = torch::jit::toGraphFunction(module.get_method("forward").function());
  const c10::FunctionSchema schema = fn.getSchema();
  const auto& args = schema.arguments();  // self first
  const std::size_t keep = passed == 0 ? required_inputs(module) : passed;
  if (args.size() <= keep + 1) return {};
  for (std::size_t k = keep + 1; k < args.size(); ++k) {
    if (!args[k].default_value()) return {};
  }
  auto g = fn.graph();
  std::vector<std::string> names;
  {
    torch::jit::WithInsertPoint guard(g->param_node()->next());
    for (std::size_t k = args.size() - 1; k > keep; --k) {
      g->inputs()[k]->replaceAllUsesWith(g->insertConstant(*args[k].default_value()));
      g->eraseInput(k);
      names.insert(names.begin(), args[k].name());
    }
  }
  fn.setSchema(
      schema.cloneWithArguments({args.begin(), args.begin() + static_cast<std::ptrdiff_t>(keep) + 1}));
  torch::jit::ConstantPropagation(g);
  return names;
}

// Inlines into `forward` the calls it makes to other methods of the trunk itself (torchvision's
// scripted models hand their work to self._forward_impl) and to the `forward` of each module
// in `expand`, so that the submodules those call become calls of `forward`: blocks and tap
// points, as in a traced trunk. Repeated until none is left, so a method calling another, or
// a module of `expand` inside another, is reached too; first, forward's arguments past the
// `passed` inputs take their defaults (specialize_defaults), and the inlined code's branches on
// them fold as they come. Returns the names in `expand` that `forward` never called.
std::vector<std::string> inline_calls(torch::jit::Module& module, const std::vector<std::string>& expand,
                                      std::size_t passed) {
  const bool fold = !specialize_defaults(module, passed).empty();
  auto g = module.get_method("forward").graph();
  std::set<std::string> expanded;
  for (bool changed = true; changed;) {
    changed = false;
    ModulePaths paths(*g);
    for (torch::jit::Node* n : g->nodes()) {
      if (paths.read(n) || n->kind() != c10::prim::CallMethod) continue;
      const std::string* name = paths.of(n->input(0));
      if (!name) continue;
      const bool own = name->empty();
      const bool listed = std::find(expand.begin(), expand.end(), *name) != expand.end();
      if (!own && !(listed && n->s(c10::attr::name) == "forward")) continue;
      const auto cls = n->input(0)->type()->expect<c10::ClassType>();
      // The callee's graph as written (its optimized graph has every call inlined).
      auto& callee = torch::jit::toGraphFunction(cls->getMethod(n->s(c10::attr::name)));
      torch::jit::inlineCallTo(n, &callee, callee.graph().get());
      if (fold) torch::jit::ConstantPropagation(g);
      if (listed) expanded.insert(*name);
      changed = true;
      break;
    }
  }
  std::vector<std::string> missed;
  for (const auto& e : expand) {
    if (!expanded.count(e)) missed.push_back(e);
  }
  return missed;
}

// forward_calls as a map from the submodule's name to the value its call returns.
std::map<std::string, torch::jit::Value*> call_values(const std::shared_ptr<torch::jit::Graph>& g) {
  std::map<std::string, torch::jit::Value*> out;
  for (const auto& [name, value] : forward_calls(g)) out[name] = value;
  return out;
}

// Destroys the last submodule call in `b` (or in a block inside it) whose result nobody uses;
// returns whether there was one.
bool drop_unused_call(torch::jit::Block* b) {
  for (auto it = b->nodes().rbegin(); it != b->nodes().rend(); ++it) {
    torch::jit::Node* n = *it;
    if (n->kind() == c10::prim::CallMethod && !n->hasUses()) {
      n->destroy();
      return true;
    }
    for (torch::jit::Block* inner : n->blocks()) {
      if (drop_unused_call(inner)) return true;
    }
  }
  return false;
}

// Dead code elimination that also drops submodule calls whose result nobody uses (the
// default pass keeps every call, as it might have side effects; a trunk's blocks have none),
// inside branches too: an if whose outputs nobody reads once the graph is cut (GoogLeNet's
// auxiliary classifiers, run in training mode on an earlier block's output) goes with its calls.
void eliminate_dead_code(const std::shared_ptr<torch::jit::Graph>& g) {
  do {
    torch::jit::EliminateDeadCode(g);
  } while (drop_unused_call(g->block()));
}

void add_method(torch::jit::Module& module, const char* name, const std::shared_ptr<torch::jit::Graph>& g) {
  auto cu = module._ivalue()->compilation_unit();
  auto* fn = cu->create_function(c10::QualifiedName(*module.type()->name(), name), g);
  module.type()->addMethod(fn);
}

// Replaces the graph's outputs by `values` (one value, or a tuple of several).
void set_outputs(const std::shared_ptr<torch::jit::Graph>& g, const std::vector<torch::jit::Value*>& values,
                 bool tuple) {
  torch::jit::WithInsertPoint guard(g->return_node());
  torch::jit::Value* out = values.front();
  if (tuple) out = g->insertNode(g->createTuple(values))->output();
  while (!g->outputs().empty()) g->eraseOutput(0);
  g->registerOutput(out);
}

// Adds a method returning the tapped outputs as a tuple, computed in one pass; whatever
// comes after the last tap is removed from it.
void add_taps_method(torch::jit::Module& module, const std::vector<std::string>& taps) {
  auto g = module.get_method("forward").graph()->copy();
  const auto calls = call_values(g);
  std::vector<torch::jit::Value*> values;
  for (const auto& t : taps) values.push_back(calls.at(t));
  set_outputs(g, values, true);
  eliminate_dead_code(g);
  add_method(module, kTapsMethod, g);
}

// Whether `n`, or a node inside its blocks, reads one of `values`.
bool reads_any(const torch::jit::Node* n, const std::set<const torch::jit::Value*>& values) {
  for (const torch::jit::Value* v : n->inputs()) {
    if (values.count(v)) return true;
  }
  for (const torch::jit::Block* b : n->blocks()) {
    if (reads_any(b->return_node(), values)) return true;
    for (const torch::jit::Node* m : b->nodes()) {
      if (reads_any(m, values)) return true;
    }
  }
  return false;
}

bool raises(const torch::jit::Node* n) {
  for (const torch::jit::Block* b : n->blocks()) {
    for (const torch::jit::Node* m : b->nodes()) {
      if (m->kind() == c10::prim::RaiseException || raises(m)) return true;
    }
  }
  return false;
}

// Asserts in a cut's graph that read nothing computed from the boundary (torchvision's ViT
// encoder asserts the shape of its input, computed below any cut between its layers) checked
// values of the prefix, and ran when the prefix did; left in, they would keep the prefix's
// blocks in the top. They are removed: an if with no outputs whose branch raises.
void drop_prefix_asserts(const std::shared_ptr<torch::jit::Graph>& g, const torch::jit::Value* boundary) {
  std::set<const torch::jit::Value*> after{boundary};
  std::vector<torch::jit::Node*> asserts;
  for (torch::jit::Node* n : g->nodes()) {
    if (reads_any(n, after)) {
      for (const torch::jit::Value* o : n->outputs()) after.insert(o);
    } else if (n->kind() == c10::prim::If && n->outputs().empty() && raises(n)) {
      asserts.push_back(n);
    }
  }
  for (torch::jit::Node* n : asserts) n->destroy();
}

// The trunk's forward from block `from`'s output (a new last graph input, "boundary") to
// block `to`'s output, or with `to` empty to its end (the taps' tuple, or the output).
// Returns the graph, or fills `problem` when a block up to `from` is still read.
std::shared_ptr<torch::jit::Graph> cut_graph(const torch::jit::Module& module,
                                             const std::vector<std::string>& taps,
                                             const std::vector<std::string>& blocks, const std::string& from,
                                             const std::string& to, std::string& problem) {
  auto g = module.get_method("forward").graph()->copy();
  const auto calls = call_values(g);
  for (const auto& b : {from, to}) {
    if (!b.empty() && !calls.count(b)) {
      problem =
          "block " + b + " is not called by the trunk's forward directly, so its output cannot be cached";
      return nullptr;
    }
  }
  torch::jit::Value* boundary = calls.at(from);
  torch::jit::Value* input = g->addInput("boundary");
  input->setType(boundary->type());
  boundary->replaceAllUsesWith(input);
  drop_prefix_asserts(g, input);
  if (!to.empty()) {
    set_outputs(g, {calls.at(to)}, false);
  } else if (!taps.empty()) {
    std::vector<torch::jit::Value*> values;
    for (const auto& t : taps) values.push_back(t == from ? input : calls.at(t));
    set_outputs(g, values, true);
  }
  eliminate_dead_code(g);
  const auto at = std::find(blocks.begin(), blocks.end(), from);
  const std::set<std::string> upto(blocks.begin(), at == blocks.end() ? at : at + 1);
  // The prefix's blocks the top still needs: the last of them is the one it reads (the others
  // feed it), which is what to name.
  std::string read;
  for (const auto& call : forward_calls(g)) {
    if (upto.count(call.first)) read = call.first;
  }
  if (!read.empty()) {
    problem = "the top still reads the output of block " + read + " (a tap below the boundary, or a " +
              "connection that skips it), so the prefix's output alone cannot feed it";
    return nullptr;
  }
  return g;
}

// Cuts the trunk at the output of block `split.boundary`: canopy_prefix(inputs) returns it;
// canopy_top(inputs..., boundary) computes the rest (the taps' tuple, or the output) from it.
// Fills split.top_inputs, or split.problem when the top would still need a prefix block.
void add_split_methods(torch::jit::Module& module, const std::vector<std::string>& taps, TopSplit& split,
                       const std::vector<std::string>& blocks) {
  {
    auto g = module.get_method("forward").graph()->copy();
    const auto calls = call_values(g);
    if (!calls.count(split.boundary)) {
      split.problem = "block " + split.boundary +
                      " is not called by the trunk's forward directly, so its output cannot be cached";
      return;
    }
    set_outputs(g, {calls.at(split.boundary)}, false);
    eliminate_dead_code(g);
    add_method(module, kPrefixMethod, g);
  }
  const auto g = cut_graph(module, taps, blocks, split.boundary, "", split.problem);
  if (!g) return;
  // Graph inputs: self, the trunk's inputs, then the boundary.
  for (std::size_t i = 1; i + 1 < g->inputs().size(); ++i) {
    if (g->inputs()[i]->hasUses()) split.top_inputs.push_back(static_cast<std::int64_t>(i - 1));
  }
  add_method(module, kTopMethod, g);
}

at::Tensor pool(const at::Tensor& raw, const std::string& pooling, const std::vector<at::Tensor>& inputs,
                const std::string& what) {
  // Outputs of a pass under autocast (trunk.precision) are pooled in float32.
  const bool reduced = raw.scalar_type() == at::kBFloat16 || raw.scalar_type() == at::kHalf;
  const at::Tensor out = reduced ? raw.to(at::kFloat) : raw;
  if (pooling == "avg") {
    CANOPY_CHECK(out.dim() >= 2, DataError, "trunk.pooling = avg needs ", what, " [N, C, ...], got ",
                 out.sizes());
    return out.dim() > 2 ? out.flatten(2).mean(2) : out;
  }
  if (pooling == "avg_channels_last") {
    CANOPY_CHECK(out.dim() >= 2, DataError, "trunk.pooling = avg_channels_last needs ", what,
                 " [N, ..., C], got ", out.sizes());
    return out.dim() > 2 ? out.flatten(1, -2).mean(1) : out;
  }
  if (pooling == "flatten") return out.flatten(1);
  if (pooling == "none") {
    CANOPY_CHECK(out.dim() == 2, DataError, "trunk.pooling = none needs ", what, " [N, D], got ", out.sizes(),
                 "; choose avg or flatten");
    return out;
  }
  CANOPY_CHECK(out.dim() == 3, DataError, "trunk.pooling = ", pooling, " needs ", what, " [N, T, D], got ",
               out.sizes());
  if (pooling == "first_token") return out.select(1, 0);
  CANOPY_CHECK(inputs.size() >= 2 && inputs[1].dim() == 2 && inputs[1].size(0) == out.size(0) &&
                   inputs[1].size(1) == out.size(1),
               DataError,
               "trunk.pooling = masked_mean needs the attention mask [N, T] as the trunk's second input ",
               "matching ", what, " ", out.sizes());
  const at::Tensor mask = inputs[1].to(out.device(), out.scalar_type()).unsqueeze(2);
  return (out * mask).sum(1) / mask.sum(1).clamp_min(1.0);
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// A batch's shape with its first dimension as N: "[N, 2, 2, 768]".
std::string batch_shape(const at::Tensor& t) {
  std::ostringstream o;
  o << "[N";
  for (std::int64_t d = 1; d < t.dim(); ++d) o << ", " << t.size(d);
  o << "]";
  return o.str();
}

// 16-bit passes on a CPU without the instructions for them. LibTorch emulates float16 there
// (caching the demo took 15x as long as float32 on an AMD EPYC Zen 4 without avx512_fp16):
// refused. bfloat16 without avx512_bf16 or AMX is said, not refused (it may still win).
void check_cpu_precision(const std::string& key, const std::string& precision) {
  if (precision == "float16") {
    CANOPY_CHECK(cpu_has_flag("avx512_fp16") || cpu_has_flag("amx_fp16"), ConfigError, key,
                 " = float16 on this CPU (", cpu_model(),
                 "): it has no float16 arithmetic (avx512_fp16, amx_fp16), so LibTorch emulates it, "
                 "many times slower than float32 (15x on the demo, AMD EPYC Zen 4); use bfloat16, the "
                 "16-bit type CPUs compute in, or float32");
  } else if (precision == "bfloat16" && !cpu_has_flag("avx512_bf16") && !cpu_has_flag("amx_bf16")) {
    log_info(key + " = bfloat16 on a CPU without bfloat16 instructions (avx512_bf16, amx_bf16; " +
             cpu_model() + "): the passes may be slower than float32; compare the cache times");
  }
}

// What LibTorch says went wrong in a TorchScript method: a c10::Error's message without its
// C++ backtrace; for the interpreter's own error (torch::jit::JITException, not a c10::Error:
// e.g. a convolution's kernel larger than its input), the last line, below the script's
// traceback ("RuntimeError: Calculated padded input size ...").
std::string torch_error(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  std::string s = e.what();
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s.substr(s.rfind('\n') + 1);
}

// Makes the module's 4-D weights (convolutions) channels-last in place (the parameters stay
// the same tensors); true when there was one.
bool weights_to_channels_last(const torch::jit::Module& module) {
  c10::NoGradGuard no_grad;
  bool any = false;
  for (const auto& p : module.parameters(true)) {
    if (p.dim() != 4) continue;
    at::Tensor w = p;
    w.set_data(p.contiguous(at::MemoryFormat::ChannelsLast));
    any = true;
  }
  return any;
}

// A 4-D input as channels-last weights want it.
at::Tensor channels_last_if(bool on, const at::Tensor& x) {
  return on && x.dim() == 4 ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
}

// Every method graph of the module and its submodules (a graph shared by modules of one type
// comes more than once).
template <typename F>
void for_each_graph(const torch::jit::Module& module, F&& f) {
  for (const auto& sub : module.modules()) {
    for (const auto& method : sub.get_methods()) f(method.graph());
  }
}

// What encode() and encode_prefix() run when trunk.optimize is on: a clone of the module
// with its 4-D weights (convolutions) in channels-last memory format, frozen (weights become
// constants, Conv+BatchNorm fold). Channels-last convolutions are twice as fast on the CPU
// (docs/performance.md); optimize_for_inference (MKL-DNN conversion) is left out: after
// freezing it made both demo trunks slower. Sets `channels_last` when a weight was converted:
// 4-D inputs are then given channels-last too. `fuse`: the dtype of a pass on the CPU (float32
// or bfloat16), whose convolutions then run with their activations and zero pads fused
// (conv_fusion.h; the demo trunk's pass 1.79x at 64x64 and 2.04x at 224x224 in float32 on a
// Xeon, bench/trunk_compare.py).
torch::jit::Module inference_runner(const torch::jit::Module& module, const std::vector<std::string>& methods,
                                    bool& channels_last, std::optional<at::ScalarType> fuse,
                                    FusedConvolutions& fused) {
  torch::jit::Module clone = module.clone();
  channels_last = weights_to_channels_last(clone) || channels_last;
  torch::jit::Module frozen = torch::jit::freeze(clone, methods);
  // torch::jit::freeze optimizes forward alone (Python's freeze does every preserved method):
  // a method run instead of it (taps, the cached prefix) would keep its BatchNorms unfolded,
  // so that no activation follows a convolution directly and none is fused (the demo trunk's
  // prefix up to blocks.9 cached 5 000 images in 3.09 s, the whole trunk in 1.79 s).
  const std::vector<std::string> run = methods.empty() ? std::vector<std::string>{"forward"} : methods;
  for (const auto& name : run) {
    std::shared_ptr<torch::jit::Graph> g = frozen.get_method(name).graph();
    if (name != "forward") torch::jit::OptimizeFrozenGraph(g, true);
    if (fuse) fused += fuse_cpu_convolutions(g, *fuse);
  }
  return frozen;
}

// The modules a selection names (see FreezePolicy), as subtree roots.
std::vector<std::string> select_modules(const std::string& spec, const std::vector<std::string>& names,
                                        const std::vector<std::string>& blocks, const char* key) {
  const auto colon = spec.find(':');
  const std::string kind = spec.substr(0, colon);
  const std::string arg = colon == std::string::npos ? "" : trim(spec.substr(colon + 1));
  if (kind == "first" && colon != std::string::npos) {
    const std::int64_t n = parse_int(arg, key);
    CANOPY_CHECK(n >= 0 && n <= static_cast<std::int64_t>(blocks.size()), ConfigError, key, " = ", spec,
                 ": the trunk has ", blocks.size(), " blocks (", join(blocks, ", "), ")");
    return std::vector<std::string>(blocks.begin(), blocks.begin() + n);
  }
  if (kind == "match" && colon != std::string::npos) {
    std::regex re;
    try {
      re = std::regex(arg, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      throw ConfigError(detail::str_cat(key, " = ", spec, ": not a regular expression (", e.what(), ")"));
    }
    std::vector<std::string> out;
    for (const auto& n : names) {
      if (!n.empty() && std::regex_search(n, re)) out.push_back(n);
    }
    CANOPY_CHECK(!out.empty(), ConfigError, key, " = ", spec,
                 ": matches no module (see `canopy trunk show`)");
    return out;
  }
  if (kind == "modules" && colon != std::string::npos) {
    std::vector<std::string> out;
    std::string cur;
    for (char c : arg + " ") {
      if (c == ' ' || c == ';' || c == ',') {
        if (!cur.empty()) out.push_back(cur);
        cur.clear();
      } else {
        cur += c;
      }
    }
    CANOPY_CHECK(!out.empty(), ConfigError, key, " = ", spec, ": names no module");
    for (const auto& m : out) {
      CANOPY_CHECK(
          std::find(names.begin(), names.end(), m) != names.end() && !m.empty(), ConfigError, key, ": '", m,
          "' is not a module of the trunk (see `canopy trunk show`; blocks: ", join(blocks, ", "), ")");
    }
    return out;
  }
  throw ConfigError(detail::str_cat(
      key, ": expected all, none, first:N, match:REGEX or modules:NAME ..., got '", spec, "'"));
}

// What a compiled package accepts, from its metadata (canopy.inputs): per input a dtype and
// its dimensions, each fixed (a number), any batch (N) or dynamic up to a bound (NAME<=MAX,
// equal wherever NAME appears).
struct CompiledDim {
  std::int64_t size = -1;
  std::string name;  // NAME<=MAX: the name; size holds MAX
  bool any = false;  // N
};
struct CompiledInput {
  at::ScalarType dtype = at::kFloat;
  std::string dtype_name;
  std::vector<CompiledDim> dims;
};

// Parsed once, at load: a package whose metadata says something else is refused then, not at
// its first batch.
std::vector<CompiledInput> parse_compiled_inputs(const std::string& spec, const std::string& path) {
  const auto bad = [&](const std::string& why) {
    return DataError(detail::str_cat("compiled trunk '", path, "': metadata canopy.inputs '", spec,
                                     "' is not `dtype dim,dim,...` per input (", why, ")"));
  };
  std::vector<CompiledInput> out;
  for (const auto& one : canopy::split(spec, ';')) {
    const auto parts = canopy::split(trim(one), ' ');
    if (parts.size() != 2) throw bad("'" + trim(one) + "'");
    CompiledInput in;
    in.dtype_name = parts[0];
    if (parts[0] == "float32") {
      in.dtype = at::kFloat;
    } else if (parts[0] == "int64") {
      in.dtype = at::kLong;
    } else {
      throw bad("dtype '" + parts[0] + "': canopy runs float32 and int64 inputs");
    }
    for (const auto& d : canopy::split(parts[1], ',')) {
      CompiledDim dim;
      const auto le = d.find("<=");
      try {
        if (d == "N") {
          dim.any = true;
        } else if (le == std::string::npos) {
          dim.size = parse_int(d, "canopy.inputs");
        } else {
          dim.name = d.substr(0, le);
          dim.size = parse_int(d.substr(le + 2), "canopy.inputs");
        }
      } catch (const ConfigError&) {
        throw bad("dimension '" + d + "'");
      }
      in.dims.push_back(dim);
    }
    out.push_back(std::move(in));
  }
  return out;
}

}  // namespace

struct Trunk::Impl {
  std::string show_compiled() const;  // `trunk show` of a compiled package
  std::string show_trains() const;    // `trunk show`'s "trains" lines
  TrunkConfig config;
  std::string sha256;
  c10::Device device{c10::kCPU};
  torch::jit::Module module;         // as loaded, with the freeze policy applied
  torch::jit::Module runner;         // what encode() runs: `module` or its frozen, optimised clone
  torch::jit::Module prefix_runner;  // what encode_prefix() runs (idem)
  FusedConvolutions rewritten;       // what fuse_cpu_convolutions did to the runners' passes
  std::vector<std::string> blocks, tap_points;
  std::set<std::string> frozen;  // qualified names of frozen modules
  TopSplit split;
  bool training = false;                      // the mode set_training last set
  std::set<std::string> held;                 // top blocks a schedule holds frozen for now
  std::set<std::string> policy_trainable;     // parameters the policy leaves trainable
  std::map<std::string, std::string> cuts;    // "from>to" -> the method computing it
  bool channels_last = false;                 // the optimised runners hold channels-last weights
  bool module_channels_last = false;          // `module` (the trainable one) holds them too
  at::ScalarType precision = at::kFloat;      // trunk.precision: the inference passes' autocast
  at::ScalarType top_precision = at::kFloat;  // trunk.top_precision: the top's passes' autocast
  // A compiled (AOTInductor, .pt2) trunk: inference only, its outputs fixed when it was
  // exported (metadata canopy.outputs names them).
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> compiled;
  std::unordered_map<std::string, std::string> compiled_meta;
  std::vector<std::string> compiled_outputs;
  std::vector<CompiledInput> compiled_inputs;

  // The module's blocks (what freeze = first:N counts: its children, a ModuleList's items
  // each) and tap points; trunk.taps must name tap points.
  void read_structure() {
    for (const auto& child : module.named_children()) add_block(child.value, child.name);
    // A call returning None is no tap point: a traced nn.Identity (timm's norm_pre) is called
    // with nothing and returns None, its input flowing past it.
    for (const auto& call : forward_calls(module.get_method("forward").graph())) {
      if (call.second->type()->kind() != c10::TypeKind::NoneType) tap_points.push_back(call.first);
    }
    for (const auto& t : config.taps) {
      CANOPY_CHECK(std::find(tap_points.begin(), tap_points.end(), t) != tap_points.end(), ConfigError,
                   "trunk.taps: '", t, "' is not a tap point of '", config.path,
                   "' (tap points: ", join(tap_points, ", "), ")");
    }
  }

  // A child of the trunk is a block, but a ModuleList's items are blocks each, and a module
  // of trunk.expand is its children, by the same rule.
  void add_block(const torch::jit::Module& m, const std::string& name) {
    const auto& expand = config.expand;
    if (type_name(m) != "ModuleList" && std::find(expand.begin(), expand.end(), name) == expand.end()) {
      blocks.push_back(name);
      return;
    }
    for (const auto& child : m.named_children()) add_block(child.value, qualified(name, child.name));
  }

  // trunk.expand: each name a module of the trunk called by its forward (once the modules
  // before it in the list are expanded), not a ModuleList (its items are blocks already).
  void expand_modules() {
    const auto& expand = config.expand;
    std::map<std::string, std::string> types;
    for (const auto& m : module.named_modules()) types[m.name] = type_name(m.value);
    for (const auto& e : expand) {
      const auto it = types.find(e);
      CANOPY_CHECK(!e.empty() && it != types.end(), ConfigError, "trunk.expand: '", e,
                   "' is not a module of '", config.path, "' (`canopy trunk show` lists them)");
      CANOPY_CHECK(it->second != "ModuleList", ConfigError, "trunk.expand: '", e,
                   "' is a ModuleList, whose items are blocks already");
    }
    const auto missed = inline_calls(module, expand, config.inputs);
    if (missed.empty()) return;
    std::vector<std::string> called;
    for (const auto& call : forward_calls(module.get_method("forward").graph())) called.push_back(call.first);
    throw ConfigError(detail::str_cat("trunk.expand: ", join(missed, ", "),
                                      " not called by the trunk's forward, even with the modules before ",
                                      "it expanded (it calls: ", join(called, ", "), ")"));
  }

  // trunk.optimize's inference runners: encode()'s when nothing trains, encode_prefix()'s when
  // a top trains over a cached prefix; on the CPU (float32 or bfloat16; float16 keeps
  // autocast's) with their convolutions fused, which is said.
  void make_inference_runners(bool trains) {
    std::optional<at::ScalarType> fuse;
    if (device.is_cpu() && precision != at::kHalf) fuse = precision;
    if (!trains) {
      std::vector<std::string> methods;
      if (!config.taps.empty()) methods.push_back(kTapsMethod);
      runner = inference_runner(module, methods, channels_last, fuse, rewritten);
    }
    if (split.problem.empty() && split.prefix_blocks > 0)
      prefix_runner = inference_runner(module, {kPrefixMethod}, channels_last, fuse, rewritten);
    if (rewritten.convolutions > 0)
      log_info("trunk: inference passes run " + describe_rewritten() + " (trunk.optimize)");
  }

  std::string describe_rewritten() const {
    return detail::str_cat(rewritten.convolutions, " convolutions as single oneDNN primitives (",
                           precision == at::kBFloat16 ? "bfloat16" : "float32", "): ", rewritten.activations,
                           " with their activation as a post-op, ", rewritten.pads,
                           " zero pads taken as padding, ", rewritten.crops, " of them with a crop");
  }

  // A trunk that trains runs its convolutions channels-last (trunk.optimize), weights and
  // inputs (and so gradients and optimizer state): a step of the demo's top is 2.1-2.6x faster
  // so on the CPU (docs/fine-tuning.md); the values are the same up to rounding, and files get
  // them contiguous. On the CPU its grouped convolutions run as canopy::grouped_conv2d: the
  // depthwise ones' weight gradient by canopy's kernel, 3-29x faster there than oneDNN's, and
  // a symmetric zero pad before one as its padding (grouped_conv.h). Under trunk.top_precision
  // = bfloat16 they run in float32: their bfloat16 backward is slower there than float32's
  // (the demo trunk's 5x5 depthwise convolutions in blocks.10-13, channels-last, batch 256 at
  // 64x64: 500-620 ms against 145-180 ms, so that the whole top trained slower in bfloat16
  // than in float32; docs/fine-tuning.md).
  void prepare_trainable_top() {
    if (config.optimize) module_channels_last = weights_to_channels_last(module);
    const bool bf16_top = config.top_precision == "bfloat16";
    if (!device.is_cpu() || !(config.optimize || bf16_top)) return;
    int grouped = 0;
    for_each_graph(module, [&](const std::shared_ptr<torch::jit::Graph>& g) {
      grouped += use_canopy_grouped_convolutions(g, bf16_top);
    });
    if (grouped > 0 && bf16_top) {
      log_info(
          "trunk.top_precision = bfloat16: the top's grouped (depthwise) convolutions run in float32 "
          "(faster on the CPU)");
    }
  }

  // Where the policy cuts the trunk; adds canopy_prefix and canopy_top when it leaves a top
  // over a frozen prefix.
  void compute_split() {
    std::map<std::string, torch::jit::Module> by_name;
    for (const auto& m : module.named_modules()) by_name.emplace(m.name, m.value);
    for (const auto& p : module.parameters(true)) split.tunes = split.tunes || p.requires_grad();
    if (!split.tunes) return;
    for (const auto& b : blocks) {
      bool whole = frozen.count(b) > 0;
      for (const auto& p : by_name.at(b).parameters(true)) whole = whole && !p.requires_grad();
      if (!whole) break;
      ++split.prefix_blocks;
    }
    const auto k = static_cast<std::size_t>(split.prefix_blocks);
    split.top_blocks.assign(blocks.begin() + k, blocks.end());
    if (k == 0) {
      split.problem =
          blocks.empty() ? "the trunk has no blocks"
          : frozen.count(blocks.front()) && config.freeze.batchnorm_affine_trainable
              ? "trunk.batchnorm_affine_trainable = true makes the BatchNorm weights of the frozen blocks "
                "trainable, and a cached prefix cannot train (set it to false; the top's own BatchNorm "
                "weights train anyway)"
              : "the first block (" + blocks.front() + ") trains, so no frozen prefix is left";
      return;
    }
    // The cut is the output of the last prefix block forward calls for a value: one it never
    // calls (GoogLeNet's aux1, traced) or one returning None (a traced Identity) gives none.
    std::size_t cut = k;
    while (cut > 0 && std::find(tap_points.begin(), tap_points.end(), blocks[cut - 1]) == tap_points.end())
      --cut;
    split.boundary = blocks[(cut == 0 ? k : cut) - 1];
    add_split_methods(module, config.taps, split, blocks);
    if (split.problem.empty()) {
      freeze_unrun_blocks();
      freeze_parameters_read_below_the_cut();
      check_the_top_trains();
    }
    if (split.problem.empty() && config.pooling == "masked_mean" &&
        std::find(split.top_inputs.begin(), split.top_inputs.end(), 1) == split.top_inputs.end()) {
      split.top_inputs.push_back(1);  // the pooling reads the attention mask
      std::sort(split.top_inputs.begin(), split.top_inputs.end());
    }
  }

  // The top's blocks after its last tap (a classifier past the tapped features) are cut from
  // canopy_top: they are frozen, rather than handed to the optimizer with no gradient, and
  // left out of the top's blocks, which a schedule unfreezes from the top down and whose
  // learning rates fall from the top-most down.
  void freeze_unrun_blocks() {
    std::set<std::string> called;
    for (const auto& call : forward_calls(module.get_method(kTopMethod).graph())) called.insert(call.first);
    std::vector<std::string> run;
    for (const auto& b : split.top_blocks) {
      if (called.count(b)) {
        run.push_back(b);
        continue;
      }
      split.unrun.push_back(b);
      for (const auto& m : module.named_modules()) {
        if (!is_within(m.name, b)) continue;
        frozen.insert(m.name);
        for (const auto& p : m.value.named_parameters(false)) {
          p.value.set_requires_grad(false);
          policy_trainable.erase(qualified(m.name, p.name));
        }
      }
    }
    split.top_blocks = run;
  }

  // What the cut left trainable must include something the top runs.
  void check_the_top_trains() const {
    bool trains = false;
    for (const auto& p : module.parameters(true)) trains = trains || p.requires_grad();
    std::vector<std::string> left = split.unrun;
    left.insert(left.end(), split.below_cut.begin(), split.below_cut.end());
    CANOPY_CHECK(trains, ConfigError, "the freeze policy (", describe(config.freeze), ") leaves only ",
                 join(left, ", "), " trainable, which the features never run",
                 config.taps.empty() ? std::string() : " (the last tap is " + config.taps.back() + ")",
                 ": nothing would train; freeze fewer blocks, or freeze = all to train heads on frozen ",
                 "features");
  }

  // Parameters outside every block (a ViT's class token on the trunk itself, its position
  // embedding on an expanded encoder) that the top never reads are read below the cut only:
  // frozen with the prefix, rather than refused as parameters that cannot train over a cache.
  void freeze_parameters_read_below_the_cut() {
    auto g = module.get_method(kTopMethod).graph();
    ModulePaths paths(*g);
    std::set<std::string> read;
    for (torch::jit::DepthFirstGraphNodeIterator it(g); const torch::jit::Node* n = it.next();) {
      if (n->kind() != c10::prim::GetAttr) continue;
      if (const std::string* owner = paths.of(n->input(0)))
        read.insert(qualified(*owner, n->s(c10::attr::name)));
      paths.read(n);
    }
    for (const auto& p : module.named_parameters(true)) {
      if (!p.value.requires_grad() || read.count(p.name)) continue;
      const bool in_block = std::any_of(blocks.begin(), blocks.end(),
                                        [&](const std::string& b) { return is_within(p.name, b); });
      if (in_block) continue;
      p.value.set_requires_grad(false);
      policy_trainable.erase(p.name);
      split.below_cut.push_back(p.name);
    }
  }

  // The tapped outputs of a method's result, pooled and concatenated.
  at::Tensor pooled(const c10::IValue& result, const std::vector<at::Tensor>& inputs) const {
    if (config.taps.empty()) {
      const at::Tensor out = one_tensor(result, "the trunk's output");
      const at::Tensor features = pool(out, config.pooling, inputs, "the trunk's output");
      describe_pooling({out}, {"the output"}, features);
      return features;
    }
    std::vector<at::Tensor> outs;
    const auto& elements = result.toTuple()->elements();
    for (std::size_t i = 0; i < elements.size(); ++i)
      outs.push_back(one_tensor(elements[i], "tap " + config.taps[i]));
    return pool_all(outs, config.taps, "tap ", inputs);
  }

  // What is pooled must be one tensor: a model that returns a tuple (a Hugging Face model
  // traced returns (last_hidden_state, pooler_output)) is refused, saying what it returns.
  at::Tensor one_tensor(const c10::IValue& v, const std::string& what) const {
    CANOPY_CHECK(
        v.isTensor(), ConfigError, "trunk '", config.path, "': ", what, " is a ", v.tagKind(), " (",
        v.type()->str(), "), not one tensor to pool; tap a block whose output is one (trunk.taps; ",
        "`canopy trunk show` lists them), or export a module whose forward returns the features, such as ",
        "a Hugging Face model's output[0] (docs/trunk.md)");
    return v.toTensor();
  }

  // Several outputs (taps), each pooled, concatenated in order.
  at::Tensor pool_all(const std::vector<at::Tensor>& outs, const std::vector<std::string>& names,
                      const char* what, const std::vector<at::Tensor>& inputs) const {
    std::vector<at::Tensor> pooled;
    for (std::size_t i = 0; i < outs.size(); ++i) {
      pooled.push_back(pool(outs[i], config.pooling, inputs, what + names[i]));
    }
    const at::Tensor features = pooled.size() == 1 ? pooled[0] : at::cat(pooled, 1);
    describe_pooling(outs, names, features);
    return features;
  }

  // Said once, at the first batch: each output's shape and what the pooling made of them, with
  // a hint where a shape suggests the other layout (a Swin stage's [N, H, W, C] averaged as if
  // its channels came first gives H numbers per sample, not C), as nothing else would show it.
  void describe_pooling(const std::vector<at::Tensor>& outs, const std::vector<std::string>& names,
                        const at::Tensor& features) const {
    if (described.exchange(true)) return;
    std::ostringstream o;
    o << "trunk: features = " << config.pooling << " of ";
    std::string hints;
    for (std::size_t i = 0; i < outs.size(); ++i) {
      o << (i ? ", " : "") << names[i] << " " << batch_shape(outs[i]);
      hints += pooling_hint(outs[i], names[i]);
    }
    o << ": " << features.size(1) << " per sample" << hints;
    log_info(o.str());
  }

  // `brief`: in trunk show's table of outputs, the layout and what to set only.
  std::string pooling_hint(const at::Tensor& out, const std::string& name, bool brief = false) const {
    const auto s = out.sizes();
    const bool tokens = config.pooling == "avg" && out.dim() == 3;
    const bool last = config.pooling == "avg" && out.dim() == 4 && s[1] == s[2] && s[3] != s[1];
    const bool first =
        config.pooling == "avg_channels_last" && out.dim() == 4 && s[2] == s[3] && s[1] != s[2];
    if (brief) {
      if (tokens)
        return detail::str_cat(" (if tokens [N, T, D]: first_token, masked_mean or avg_channels_last give ",
                               s[2], ")");
      if (last)
        return detail::str_cat(" (looks channels-last [N, H, W, C]: avg_channels_last gives ", s[3], ")");
      if (first) return detail::str_cat(" (looks channels-first [N, C, H, W]: avg gives ", s[1], ")");
      return "";
    }
    if (tokens)
      return detail::str_cat("; avg averaged ", name,
                             " over its last dimension: if it is tokens [N, T, D], as a ",
                             "transformer's, pooling = first_token, masked_mean or avg_channels_last (the ",
                             "mean over the tokens) gives D numbers per sample");
    if (last)
      return detail::str_cat(
          "; ", name, " looks channels-last [N, H, W, C], as Swin's stages are: avg averaged ",
          "it over W and C, leaving H numbers; pooling = avg_channels_last averages over H ",
          "and W, leaving C");
    if (first)
      return detail::str_cat(
          "; ", name, " looks channels-first [N, C, H, W]: avg_channels_last averaged it ",
          "over C and H, leaving W numbers; pooling = avg averages over H and W, leaving C");
    return "";
  }
  mutable std::atomic<bool> described{false};  // describe_pooling has spoken

  std::vector<at::Tensor> prepare(const std::vector<at::Tensor>& inputs, bool optimised = false) const {
    CANOPY_CHECK(!inputs.empty(), DataError, "the trunk needs at least one input tensor, got none");
    CANOPY_CHECK(inputs[0].dim() >= 1 && inputs[0].size(0) > 0, DataError,
                 "trunk input batch must be non-empty, got shape ", inputs[0].sizes());
    std::vector<at::Tensor> out;
    for (const auto& x : inputs) {
      out.push_back(x.is_floating_point() ? x.to(device, at::kFloat) : x.to(device));
      out.back() = channels_last_if(optimised ? channels_last : module_channels_last, out.back());
    }
    return out;
  }

  at::Tensor run(torch::jit::Module& m, const std::vector<at::Tensor>& inputs) const {
    std::vector<c10::IValue> args(inputs.begin(), inputs.end());
    try {
      return pooled(config.taps.empty() ? m.forward(args) : m.get_method(kTapsMethod)(args), inputs);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      std::ostringstream shapes;
      for (const auto& x : inputs) shapes << (&x == &inputs[0] ? "" : " ") << x.sizes();
      const std::string why = torch_error(e);
      // A convolution's window larger than what is left of the image (canopy's cropped
      // convolutions say the first, LibTorch's the second).
      const bool small =
          inputs[0].dim() == 4 && (why.find("smaller than the kernel") != std::string::npos ||
                                   why.find("Kernel size can't be greater") != std::string::npos);
      // Token ids past a transformer's position table (BERT's holds 512).
      const bool long_texts = inputs[0].dim() == 2 && !inputs[0].is_floating_point() &&
                              why.find("index out of range") != std::string::npos;
      throw DataError(detail::str_cat(
          "trunk '", config.path, "' failed on input of shape ", shapes.str(), ": ", why,
          small
              ? " (the images are too small for this trunk's convolutions: preprocess.resize sets their size)"
          : long_texts
              ? detail::str_cat(" (texts of ", inputs[0].size(1),
                                " tokens: a transformer's position table may hold fewer, 512 for BERT-like "
                                "models (max_position_embeddings in the model's config.json; RoBERTa and "
                                "MPNet number from 2, so 514 holds 512); text.max_length cuts texts)")
              : ""));
    }
  }

  // Compiled code does not check what it is given (a wrong size is read out of bounds): the
  // inputs are checked here against what the package says it accepts (canopy.inputs).
  void check_compiled_inputs(const std::vector<at::Tensor>& inputs) const {
    const auto refuse = [&](const std::string& why) {
      std::ostringstream shapes;
      for (const auto& x : inputs) shapes << x.scalar_type() << x.sizes() << " ";
      throw DataError(
          detail::str_cat("compiled trunk '", config.path, "' accepts ", compiled_meta.at("canopy.inputs"),
                          "; got ", shapes.str(), "(", why, "). A .pt2 is compiled for one input size: ",
                          "export it for this one (scripts/export_trunk.py --format pt2 --size), or use ",
                          "the TorchScript trunk"));
    };
    if (compiled_inputs.size() != inputs.size()) refuse(detail::str_cat(inputs.size(), " input(s)"));
    std::map<std::string, std::int64_t> named;
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      const CompiledInput& want = compiled_inputs[i];
      if (inputs[i].scalar_type() != want.dtype)
        refuse(detail::str_cat("input ", i, " is not ", want.dtype_name));
      if (static_cast<std::int64_t>(want.dims.size()) != inputs[i].dim())
        refuse(detail::str_cat("input ", i, " has ", inputs[i].dim(), " dimensions"));
      for (std::size_t d = 0; d < want.dims.size(); ++d) {
        const CompiledDim& dim = want.dims[d];
        const std::int64_t got = inputs[i].size(static_cast<std::int64_t>(d));
        if (dim.any) continue;
        if (dim.name.empty()) {
          if (got != dim.size) refuse(detail::str_cat("dimension ", d, " of input ", i));
          continue;
        }
        if (got < 2 || got > dim.size)
          refuse(detail::str_cat(dim.name, " = ", got, " is outside 2..", dim.size));
        if (named.emplace(dim.name, got).first->second != got) refuse(dim.name + " differs between inputs");
      }
    }
  }

  // A compiled trunk's outputs, pooled and concatenated as taps are.
  at::Tensor run_compiled(const std::vector<at::Tensor>& inputs) const {
    std::vector<at::Tensor> outs;
    // Compiled code assumes the strides it was exported with (contiguous): a sliced input
    // would be read wrongly, not refused.
    check_compiled_inputs(inputs);
    std::vector<at::Tensor> dense;
    for (const auto& x : inputs) dense.push_back(x.contiguous());
    try {
      outs = compiled->run(dense);
    } catch (const std::exception& e) {
      std::ostringstream shapes;
      for (const auto& x : inputs) shapes << (&x == &inputs[0] ? "" : " ") << x.sizes();
      throw DataError(detail::str_cat("compiled trunk '", config.path, "' failed on input of shape ",
                                      shapes.str(), ": ", first_line(e.what())));
    }
    CANOPY_CHECK(outs.size() == compiled_outputs.size(), DataError, "compiled trunk '", config.path,
                 "' returned ", outs.size(), " outputs, its metadata names ", compiled_outputs.size(), " (",
                 join(compiled_outputs, ", "), ")");
    return pool_all(outs, compiled_outputs, "output ", inputs);
  }

  void apply_policy() {
    std::vector<std::string> names;
    for (const auto& m : module.named_modules()) names.push_back(m.name);
    const FreezePolicy& p = config.freeze;
    CANOPY_CHECK(p.train_only.empty() || p.freeze == "all", ConfigError, "trunk.freeze = ", p.freeze,
                 " and trunk.train_only = ", p.train_only,
                 ": give one of them (train_only freezes everything else)");
    std::vector<std::string> roots;
    bool invert = false;
    if (!p.train_only.empty()) {
      CANOPY_CHECK(p.train_only != "all" && p.train_only != "none", ConfigError,
                   "trunk.train_only: expected first:N, match:REGEX or modules:NAME ..., got '", p.train_only,
                   "' (use trunk.freeze = none or all)");
      roots = select_modules(p.train_only, names, blocks, "trunk.train_only");
      invert = true;
    } else if (!p.unfreeze_to.empty()) {
      CANOPY_CHECK(p.freeze == "all", ConfigError, "trunk.freeze = ", p.freeze,
                   " and trunk.unfreeze_to = ", p.unfreeze_to,
                   ": give one of them (unfreeze_to freezes every block before it)");
      const auto at = std::find(blocks.begin(), blocks.end(), p.unfreeze_to);
      CANOPY_CHECK(at != blocks.end(), ConfigError, "trunk.unfreeze_to: '", p.unfreeze_to,
                   "' is not a block of the trunk (blocks: ", join(blocks, ", "), ")");
      roots.assign(blocks.begin(), at);
      if (roots.empty()) roots.push_back("\x01");  // nothing frozen (a name no module has)
    } else if (p.freeze == "all") {
      roots = {""};
    } else if (p.freeze != "none") {
      roots = select_modules(p.freeze, names, blocks, "trunk.freeze");
    }
    for (const auto& m : module.named_modules()) {
      bool inside = false;
      for (const auto& r : roots) inside = inside || is_within(m.name, r);
      const bool is_frozen = inside != invert;
      if (is_frozen) frozen.insert(m.name);
      const bool affine_learns = is_frozen && p.batchnorm_affine_trainable && is_batchnorm(m.value);
      for (const auto& param : m.value.named_parameters(false)) {
        param.value.set_requires_grad(!is_frozen || affine_learns);
        if (!is_frozen || affine_learns) policy_trainable.insert(qualified(m.name, param.name));
      }
    }
  }

  bool is_held(const std::string& name) const {
    for (const auto& b : held) {
      if (is_within(name, b)) return true;
    }
    return false;
  }

  // The method computing block `to`'s output (or, `to` empty, the end) from block `from`'s,
  // added on first use; ConfigError when the trunk cannot be cut there.
  const std::string& cut_method(const std::string& from, const std::string& to) {
    const std::string key = from + ">" + to;
    const auto it = cuts.find(key);
    if (it != cuts.end()) return it->second;
    if (from == split.boundary && to.empty()) return cuts[key] = kTopMethod;
    CANOPY_CHECK(
        std::find(split.top_blocks.begin(), split.top_blocks.end(), from) != split.top_blocks.end() ||
            from == split.boundary,
        Error, "cannot cut the trunk at ", from, ": not the boundary or a block of the top");
    std::string problem;
    const auto g = cut_graph(module, config.taps, blocks, from, to, problem);
    CANOPY_CHECK(g, ConfigError, "cannot cache the output of ", from, ": ", problem);
    for (std::size_t i = 1; i + 1 < g->inputs().size(); ++i) {
      const auto input = static_cast<std::int64_t>(i - 1);
      CANOPY_CHECK(!g->inputs()[i]->hasUses() || std::find(split.top_inputs.begin(), split.top_inputs.end(),
                                                           input) != split.top_inputs.end(),
                   ConfigError, "cannot cache the output of ", from, ": the trunk after it reads input ",
                   input, ", which the cache does not hold");
    }
    std::string name = "canopy_cut_" + from + "_to_" + (to.empty() ? std::string("end") : to);
    std::replace(name.begin(), name.end(), '.', '_');
    add_method(module, name.c_str(), g);
    return cuts[key] = name;
  }

  // Runs a cut method on parts (the cut's input first, then the top's inputs as cached).
  c10::IValue run_cut(const std::string& method, const std::vector<at::Tensor>& parts,
                      std::vector<at::Tensor>& inputs) {
    CANOPY_CHECK(parts.size() == 1 + split.top_inputs.size(), Error, "the top expected ",
                 1 + split.top_inputs.size(), " parts (the boundary and the inputs the top reads), got ",
                 parts.size());
    // The trunk's inputs as the graph takes them: those the top reads from the parts (float,
    // as cached), the others empty.
    inputs.assign(module.get_method("forward").graph()->inputs().size() - 1, at::Tensor());
    for (std::size_t k = 0; k < split.top_inputs.size(); ++k) {
      inputs[static_cast<std::size_t>(split.top_inputs[k])] =
          channels_last_if(module_channels_last, parts[k + 1].to(device));
    }
    std::vector<c10::IValue> args;
    for (auto& x : inputs) args.emplace_back(x.defined() ? x : at::empty({0}));
    args.emplace_back(channels_last_if(module_channels_last, parts[0].to(device, at::kFloat)));
    try {
      return module.get_method(method)(args);
    } catch (const std::exception& e) {
      throw DataError(detail::str_cat("trunk '", config.path, "' failed in its top (",
                                      join(split.top_blocks, ", "), ") on an input of shape ",
                                      parts[0].sizes(), ": ", torch_error(e)));
    }
  }

  // BatchNorm stays in eval mode everywhere: statistics fixed, in the trainable top too.
  void set_training(bool on) {
    training = on;
    for (const auto& m : module.named_modules()) {
      m.value._ivalue()->setAttr("training",
                                 on && !frozen.count(m.name) && !is_held(m.name) && !is_batchnorm(m.value));
    }
  }
};

std::size_t required_inputs(const torch::jit::Module& module) {
  const auto& args = module.get_method("forward").function().getSchema().arguments();  // self first
  std::size_t required = 0;
  while (required + 1 < args.size() && !args[required + 1].default_value()) ++required;
  return required;
}

void validate_trunk_config(const TrunkConfig& c) {
  CANOPY_CHECK(!c.path.empty(), ConfigError,
               "trunk.path is empty: give a TorchScript trunk (.pt) or a compiled one (.pt2); "
               "scripts/export_trunk.py makes both");
  CANOPY_CHECK(
      kPoolings.count(c.pooling), ConfigError,
      "trunk.pooling: expected avg, avg_channels_last, flatten, none, first_token or masked_mean, got '",
      c.pooling, "'");
  CANOPY_CHECK(kPrecisions.count(c.precision), ConfigError,
               "trunk.precision: expected float32, bfloat16 or float16, got '", c.precision, "'");
  CANOPY_CHECK(c.top_precision == "float32" || c.top_precision == "bfloat16", ConfigError,
               "trunk.top_precision: expected float32 or bfloat16, got '", c.top_precision,
               "' (float16 training needs loss scaling, which canopy does not do)");
  CANOPY_CHECK(c.sha256.empty() || c.sha256.size() == 64, ConfigError,
               "trunk.sha256: expected 64 hex digits, got '", c.sha256, "' (", c.sha256.size(),
               " characters)");
  std::set<std::string> seen;
  for (const auto& t : c.taps) {
    CANOPY_CHECK(!t.empty() && seen.insert(t).second, ConfigError, "trunk.taps: '", t,
                 "' is empty or listed twice");
  }
  seen.clear();
  for (const auto& e : c.expand) {
    CANOPY_CHECK(!e.empty() && seen.insert(e).second, ConfigError, "trunk.expand: '", e,
                 "' is empty or listed twice");
  }
}

std::string describe(const FreezePolicy& p) {
  return (!p.unfreeze_to.empty() ? "below " + p.unfreeze_to
          : p.train_only.empty() ? p.freeze
                                 : "all but " + p.train_only) +
         (p.batchnorm_affine_trainable ? "; BatchNorm affine trainable" : "");
}

std::string describe_taps(const TrunkConfig& c) { return c.taps.empty() ? "output" : join(c.taps, ","); }

std::string verified_trunk_sha256(const TrunkConfig& config) {
  CANOPY_CHECK(is_regular_file(config.path), DataError, "trunk file '", config.path,
               "' does not exist (run scripts/setup to export the default trunks)");
  const std::string sha = sha256_file(config.path);
  CANOPY_CHECK(config.sha256.empty() || sha == config.sha256, DataError, "trunk '", config.path,
               "' has SHA-256 ", sha, " but the config pins ", config.sha256, "; refusing to load it");
  CANOPY_CHECK(!config.sha256.empty() || config.allow_unpinned, ConfigError, "trunk '", config.path,
               "' is not pinned, and a trunk file is code that runs: pin it by adding `sha256 = ", sha,
               "` under [trunk] (its hash now), or load it unpinned with trunk.allow_unpinned = true "
               "(--allow-unpinned)");
  return sha;
}

namespace {
// The directory LibTorch's package loader unpacked a package into, as its error `what` names
// it (/tmp/XXXXXX/<archive>/data/aotinductor/...), removed: the loader leaves it behind when
// loading the library fails.
void remove_unpacked_package(const std::string& what) {
  const auto at = what.find("/tmp/");
  if (at == std::string::npos || what.size() < at + 12 || what[at + 11] != '/') return;
  const std::string dir = what.substr(at, 11);  // /tmp/ and mkdtemp's six characters
  const auto inner = what.find("/data/aotinductor/", at + 12);
  if (inner == std::string::npos || what.find('/', at + 12) != inner) return;
  if (!is_directory(what.substr(at, inner + 18 - at))) return;
  try {
    remove_tree(dir);
  } catch (const std::exception&) {
    // the error being reported matters more than the leftover
  }
}
}  // namespace

bool is_compiled_trunk(const std::string& path) { return ends_with(path, ".pt2"); }

Trunk Trunk::load_compiled(std::unique_ptr<Impl> impl) {
  const TrunkConfig& c = impl->config;
  const FreezePolicy& p = c.freeze;
  CANOPY_CHECK(
      p.freeze == "all" && p.train_only.empty() && p.unfreeze_to.empty() && !p.batchnorm_affine_trainable,
      ConfigError, "trunk '", c.path, "' is compiled (AOTInductor .pt2): it runs inference only and ",
      "cannot be fine-tuned (freeze ", describe(p), "); train the top with the TorchScript trunk (.pt)");
  CANOPY_CHECK(c.precision == "float32", ConfigError, "trunk.precision = ", c.precision, ": trunk '", c.path,
               "' is compiled (AOTInductor .pt2) and runs at the precision it was compiled with (float32); "
               "use the TorchScript trunk (.pt) for ",
               c.precision, " passes, or trunk.precision = float32");
  CANOPY_CHECK(c.expand.empty(), ConfigError, "trunk.expand = ", join(c.expand, ","), ": trunk '", c.path,
               "' is compiled (AOTInductor .pt2), its outputs fixed when it was exported; expand the ",
               "TorchScript trunk (.pt) instead, or export the package with those outputs");
  try {
    impl->compiled_meta =
        torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(c.path, "model");
  } catch (const std::exception& e) {
    throw DataError(detail::str_cat("cannot read trunk '", c.path,
                                    "' as an AOTInductor package: ", first_line(e.what())));
  }
  const auto meta = [&](const char* key) {
    const auto it = impl->compiled_meta.find(key);
    return it == impl->compiled_meta.end() ? std::string() : it->second;
  };
  impl->compiled_outputs = canopy::split(meta("canopy.outputs"), ',');
  CANOPY_CHECK(!meta("canopy.outputs").empty() && !meta("canopy.inputs").empty(), DataError,
               "compiled trunk '", c.path,
               "' does not say what it takes and returns (metadata canopy.inputs, canopy.outputs): ",
               "export it with scripts/export_trunk.py --format pt2");
  impl->compiled_inputs = parse_compiled_inputs(meta("canopy.inputs"), c.path);
  CANOPY_CHECK(c.taps.empty() || c.taps == impl->compiled_outputs, ConfigError,
               "trunk.taps = ", join(c.taps, ","), ", but compiled trunk '", c.path,
               "' was exported with the outputs ", join(impl->compiled_outputs, ","),
               " (a .pt2's taps are fixed at export: leave trunk.taps empty, or export it with these taps)");
  const std::string device = meta("AOTI_DEVICE_KEY").empty() ? "cpu" : meta("AOTI_DEVICE_KEY");
  if (impl->device.type() != c10::Device(device).type()) {
    CANOPY_CHECK(c.device == "auto", ConfigError, "trunk.device = ", c.device, ", but compiled trunk '",
                 c.path, "' was compiled for ", device, " (a .pt2 runs where it was compiled for)");
    log_info("trunk '" + c.path + "' was compiled for " + device + ": it runs there");
    impl->device = c10::Device(device);
  }
  // A package's compiled library links libtorch.so unless its exporter linked it to
  // libtorch_cpu alone (canopy.links_libtorch = 0: scripts/export_trunk.py's CPU packages).
  // canopy itself does not link libtorch.so (it pulls in LibTorch's CUDA half,
  // core/device.cpp): loaded here, for the packages that need it.
  if (meta("canopy.links_libtorch") != "0") {
    const std::string not_loaded = detail::load_torch_library("libtorch.so");
    CANOPY_CHECK(not_loaded.empty(), DataError, "cannot load compiled trunk '", c.path, "': ", not_loaded);
  }
  try {
    impl->compiled = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        c.path, "model", false, 1, impl->device.is_cuda() ? impl->device.index() : c10::DeviceIndex(-1));
  } catch (const std::exception& e) {
    // AOTInductor unpacks the package's library into a new directory under /tmp (a fixed
    // path: TMPDIR is not read) and loads it from there, which a /tmp mounted noexec forbids.
    // When loading the library fails it leaves that directory behind; its error names it.
    remove_unpacked_package(e.what());
    throw DataError(
        detail::str_cat("cannot load compiled trunk '", c.path, "': ", first_line(e.what()),
                        mounted_noexec("/tmp")
                            ? ". /tmp is mounted noexec, and LibTorch's package loader unpacks the package's "
                              "library there to load it (at a fixed path: TMPDIR does not move it); use the "
                              "TorchScript trunk (a .pt file) on this machine, or remount /tmp with exec"
                            : ""));
  }
  impl->tap_points = impl->compiled_outputs;
  log_info(detail::str_cat("trunk: compiled (AOTInductor) for ", device, ", inputs ", meta("canopy.inputs"),
                           ", outputs ", join(impl->compiled_outputs, ", "), "; inference only"));
  return Trunk(std::move(impl));
}

Trunk::Trunk(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Trunk::Trunk(Trunk&&) noexcept = default;
Trunk& Trunk::operator=(Trunk&&) noexcept = default;
Trunk::~Trunk() = default;

Trunk Trunk::load(const TrunkConfig& config) {
  validate_trunk_config(config);
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  // Hash before loading: the file is executable code and must be the one that was pinned.
  impl->sha256 = verified_trunk_sha256(config);
  if (config.sha256.empty()) {
    log_info("trunk '" + config.path +
             "' is loaded unpinned (allowed); to pin it add: sha256 = " + impl->sha256);
  }
  impl->device = choose_device(config.device);
  impl->precision = kPrecisions.at(config.precision);
  impl->top_precision = kPrecisions.at(config.top_precision);
  if (impl->device.is_cpu()) {
    check_cpu_precision("trunk.precision", config.precision);
    if (config.top_precision != config.precision)
      check_cpu_precision("trunk.top_precision", config.top_precision);
  }
  if (is_compiled_trunk(config.path)) return load_compiled(std::move(impl));
  // TorchScript's own autocast pass (a prototype, on by default) rewrites graphs when the graph
  // executor optimizes them: in predict, not in training (SharedTop turns that optimizer off).
  // Off, every op is cast by the dispatcher's autocast, as in eager PyTorch, everywhere alike.
  torch::jit::setAutocastMode(false);
  try {
    impl->module = torch::jit::load(config.path, impl->device);
  } catch (const c10::Error& e) {
    throw DataError(detail::str_cat("cannot load trunk '", config.path,
                                    "' as TorchScript: ", e.what_without_backtrace()));
  }
  torch::jit::Module& m = impl->module;
  impl->expand_modules();
  impl->read_structure();
  // A traced trunk calls aten::_convolution, which autocast passes by (its lists name conv2d
  // and the like): spelled as those, its convolutions run at the autocast's dtype. Frozen
  // runners are rewritten so by torch::jit::freeze already; float32 trunks are left as saved.
  if (config.precision != "float32" || config.top_precision != "float32") {
    for_each_graph(m, [](std::shared_ptr<torch::jit::Graph> g) {
      torch::jit::graph_rewrite_helper::replaceConvolutionWithAtenConv(g);
    });
  }
  impl->apply_policy();
  impl->set_training(false);
  if (!config.taps.empty()) add_taps_method(m, config.taps);
  impl->compute_split();
  impl->runner = m;
  impl->prefix_runner = m;
  Trunk trunk(std::move(impl));
  // What is frozen is decided here, once, and said.
  const auto [total, trainable] = trunk.parameter_counts();
  log_info(detail::str_cat("trunk: ", total, " parameters, ", trainable, " trainable (freeze ",
                           describe(config.freeze), "); ", trunk.impl_->frozen.size(), " of ",
                           m.named_modules().size(), " modules frozen"));
  if (config.optimize) trunk.impl_->make_inference_runners(trainable > 0);
  if (trainable > 0) trunk.impl_->prepare_trainable_top();
  return trunk;
}

at::Tensor Trunk::encode(const std::vector<at::Tensor>& inputs) {
  c10::InferenceMode guard;
  if (impl_->compiled)
    return impl_->run_compiled(impl_->prepare(inputs)).to(c10::kCPU, at::kFloat).contiguous();
  // Under autocast, a trunk with a top over a frozen prefix (a fine-tuned trunk, in predict)
  // runs as it trained: the prefix at trunk.precision, as its cache was made; the top at
  // trunk.top_precision.
  const TopSplit& s = impl_->split;
  if ((impl_->precision != at::kFloat || impl_->top_precision != at::kFloat) && s.tunes &&
      s.problem.empty() && s.prefix_blocks > 0) {
    const auto parts = encode_prefix(inputs);
    std::vector<at::Tensor> used;
    const std::string& method = impl_->cut_method(s.boundary, "");
    Autocast autocast(impl_->device.type(), impl_->top_precision);
    const c10::IValue out = impl_->run_cut(method, parts, used);
    return impl_->pooled(out, used).to(c10::kCPU, at::kFloat).contiguous();
  }
  const auto prepared = impl_->prepare(inputs, impl_->runner._ivalue() != impl_->module._ivalue());
  Autocast autocast(impl_->device.type(), impl_->precision);
  return impl_->run(impl_->runner, prepared).to(c10::kCPU, at::kFloat).contiguous();
}

at::Tensor Trunk::features(const std::vector<at::Tensor>& inputs) {
  CANOPY_CHECK(!impl_->compiled, ConfigError, "compiled trunk '", impl_->config.path,
               "' runs inference only");
  c10::AutoGradMode grad(true);
  return impl_->run(impl_->module, impl_->prepare(inputs));
}

void Trunk::train(bool on) {
  if (impl_->compiled) return;                         // nothing in it trains
  if (on != impl_->training) impl_->set_training(on);  // a walk over every module: only on a change
}

const TopSplit& Trunk::split() const { return impl_->split; }

void Trunk::check_cacheable() const {
  const TopSplit& s = impl_->split;
  if (!s.tunes || (s.problem.empty() && s.prefix_blocks > 0)) return;
  const auto& f = impl_->config.freeze;
  throw ConfigError(detail::str_cat(
      "trunk.", f.train_only.empty() ? "freeze = " + f.freeze : "train_only = " + f.train_only,
      " leaves part of the trunk trainable but no frozen prefix to cache: ", s.problem,
      ". A cache stores the output of frozen leading blocks, and the trainable top runs on it; freeze a "
      "prefix with trunk.freeze = first:N (N from 1 to ",
      impl_->blocks.size() - 1, "; blocks: ", join(impl_->blocks, ", "),
      "), or freeze = all to train heads on frozen features"));
}

std::vector<at::Tensor> Trunk::encode_prefix(const std::vector<at::Tensor>& inputs) {
  check_cacheable();
  const TopSplit& s = impl_->split;
  CANOPY_CHECK(s.tunes, Error, "encode_prefix: the trunk is frozen whole; use encode()");
  c10::InferenceMode guard;
  const auto prepared = impl_->prepare(inputs, impl_->prefix_runner._ivalue() != impl_->module._ivalue());
  std::vector<c10::IValue> args(prepared.begin(), prepared.end());
  std::vector<at::Tensor> parts;
  try {
    Autocast autocast(impl_->device.type(), impl_->precision);
    parts.push_back(impl_->prefix_runner.get_method(kPrefixMethod)(args).toTensor());
  } catch (const std::exception& e) {
    throw DataError(detail::str_cat("trunk '", impl_->config.path, "' failed in its prefix (blocks up to ",
                                    s.boundary, ") on an input of shape ", prepared[0].sizes(), ": ",
                                    torch_error(e)));
  }
  for (std::int64_t i : s.top_inputs) {
    CANOPY_CHECK(i < static_cast<std::int64_t>(inputs.size()), DataError, "the trunk's top reads input ", i,
                 " but the batch has ", inputs.size(), " input(s)");
    parts.push_back(prepared[static_cast<std::size_t>(i)]);
  }
  for (auto& p : parts) p = p.to(c10::kCPU, at::kFloat).contiguous();
  return parts;
}

at::Tensor Trunk::top_features(const std::vector<at::Tensor>& parts) {
  check_cacheable();
  CANOPY_CHECK(impl_->split.tunes, Error, "top_features: the trunk is frozen whole");
  return top_features_from(impl_->split.boundary, parts);
}

at::Tensor Trunk::top_features_from(const std::string& from, const std::vector<at::Tensor>& parts) {
  const std::string& method = impl_->cut_method(from, "");
  std::vector<at::Tensor> inputs;
  Autocast autocast(impl_->device.type(), impl_->top_precision);
  const c10::IValue out = impl_->run_cut(method, parts, inputs);
  return impl_->pooled(out, inputs);
}

at::Tensor Trunk::span(const std::string& from, const std::string& to, const std::vector<at::Tensor>& parts) {
  const std::string& method = impl_->cut_method(from, to);
  std::vector<at::Tensor> inputs;
  Autocast autocast(impl_->device.type(), impl_->top_precision);
  return impl_->run_cut(method, parts, inputs).toTensor();
}

std::string Trunk::cut_problem(const std::string& block) {
  try {
    impl_->cut_method(block, "");
    impl_->cut_method(impl_->split.boundary, block);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

void Trunk::hold_frozen(const std::vector<std::string>& blocks) {
  impl_->held = std::set<std::string>(blocks.begin(), blocks.end());
  for (const auto& p : impl_->module.named_parameters(true)) {
    if (impl_->policy_trainable.count(p.name)) p.value.set_requires_grad(!impl_->is_held(p.name));
  }
  impl_->set_training(impl_->training);
}

std::vector<std::pair<std::string, at::Tensor>> Trunk::trainable_parameters(const std::string& module) const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : impl_->module.named_parameters(true)) {
    if (impl_->policy_trainable.count(p.name) && is_within(p.name, module)) out.emplace_back(p.name, p.value);
  }
  return out;
}

std::string Trunk::save(const std::string& path) const {
  try {
    verified_trunk_sha256(impl_->config);  // the file the weights go back into is the pinned one
    torch::jit::Module clean = torch::jit::load(impl_->config.path, c10::kCPU);
    std::map<std::string, at::Tensor> trained;
    for (const auto& p : impl_->module.named_parameters(true)) trained.emplace(p.name, p.value);
    c10::NoGradGuard no_grad;
    for (const auto& p : clean.named_parameters(true)) p.value.copy_(trained.at(p.name));
    std::ostringstream bytes;
    clean.save(bytes);
    const std::string written = bytes.str();
    write_file_atomic(path, written);  // IoError naming the file (a full disk, ...)
    return sha256_hex(written);
  } catch (const c10::Error& e) {
    throw IoError(detail::str_cat("cannot write trunk '", path, "': ", e.what_without_backtrace()));
  }
}

torch::jit::Module Trunk::script_module() const {
  CANOPY_CHECK(
      !impl_->compiled, ConfigError, "trunk '", impl_->config.path,
      "' is a compiled package (.pt2): its code is native, not TorchScript; export the model with the "
      "TorchScript form of the same trunk (scripts/export_trunk.py --format torchscript)");
  verified_trunk_sha256(impl_->config);
  torch::jit::Module clean;
  try {
    clean = torch::jit::load(impl_->config.path, c10::kCPU);
  } catch (const c10::Error& e) {
    throw DataError(detail::str_cat("cannot load trunk '", impl_->config.path,
                                    "' as TorchScript: ", e.what_without_backtrace()));
  }
  std::map<std::string, at::Tensor> current;
  for (const auto& p : impl_->module.named_parameters(true)) current.emplace(p.name, p.value);
  c10::NoGradGuard no_grad;
  for (const auto& p : clean.named_parameters(true)) {
    p.value.copy_(current.at(p.name));
    p.value.set_requires_grad(false);
  }
  clean.eval();
  if (!impl_->config.taps.empty()) {
    inline_calls(clean, impl_->config.expand,
                 impl_->config.inputs);  // as load did: the taps may be inside them
    add_taps_method(clean, impl_->config.taps);
  }
  return clean;
}

std::vector<at::Tensor> Trunk::trainable_parameters() const {
  std::vector<at::Tensor> out;
  if (impl_->compiled) return out;
  for (const auto& p : impl_->module.parameters(true)) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

const std::string& Trunk::sha256() const { return impl_->sha256; }
const TrunkConfig& Trunk::config() const { return impl_->config; }
c10::Device Trunk::device() const { return impl_->device; }

std::vector<std::pair<std::string, at::Tensor>> Trunk::state_snapshot() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  if (impl_->compiled) return out;  // its weights are inside the compiled code
  for (const auto& p : impl_->module.named_parameters(true)) {
    out.emplace_back("param:" + p.name, p.value.detach().clone());
  }
  for (const auto& b : impl_->module.named_buffers(true)) {
    out.emplace_back("buffer:" + b.name, b.value.detach().clone());
  }
  return out;
}

std::pair<std::int64_t, std::int64_t> Trunk::parameter_counts() const {
  std::int64_t total = 0, trainable = 0;
  if (impl_->compiled) return {0, 0};  // its weights are constants of the compiled code
  for (const auto& p : impl_->module.parameters(true)) {
    total += p.numel();
    if (p.requires_grad()) trainable += p.numel();
  }
  return {total, trainable};
}

std::vector<std::string> Trunk::blocks() const { return impl_->blocks; }
std::vector<std::string> Trunk::tap_points() const { return impl_->tap_points; }

std::vector<ModuleInfo> Trunk::modules() const {
  std::vector<ModuleInfo> out;
  if (impl_->compiled) return out;
  const std::set<std::string> blocks(impl_->blocks.begin(), impl_->blocks.end());
  const std::set<std::string> taps(impl_->tap_points.begin(), impl_->tap_points.end());
  for (const auto& m : impl_->module.named_modules()) {
    ModuleInfo info;
    info.name = m.name;
    info.type = type_name(m.value);
    info.depth = m.name.empty() ? 0 : 1 + static_cast<int>(std::count(m.name.begin(), m.name.end(), '.'));
    for (const auto& p : m.value.parameters(true)) {
      info.parameters += p.numel();
      if (p.requires_grad()) info.trainable += p.numel();
    }
    info.frozen = impl_->frozen.count(m.name) > 0;
    info.batchnorm = is_batchnorm(m.value);
    info.batchnorm_traced_eval = info.batchnorm && batchnorm_fixed_by_trace(m.value);
    info.block = blocks.count(m.name) > 0;
    info.tap = taps.count(m.name) > 0;
    out.push_back(info);
  }
  return out;
}

std::string Trunk::show_outputs(std::int64_t size, std::int64_t channels) const {
  const Impl& d = *impl_;
  CANOPY_CHECK(!d.compiled, ConfigError, "canopy trunk show --size: '", d.config.path,
               "' is a compiled package (.pt2): its outputs (", join(d.compiled_outputs, ", "),
               ") were fixed when it was compiled; show its TorchScript source instead");
  CANOPY_CHECK(size > 0 && channels > 0, ConfigError,
               "canopy trunk show: --size and --channels must be > 0, got ", size, " and ", channels);
  torch::jit::Module m = d.module.clone();
  m.eval();
  auto g = m.get_method("forward").graph()->copy();
  std::vector<std::string> names = d.tap_points;
  std::vector<torch::jit::Value*> values;
  const auto calls = call_values(g);
  for (const auto& name : names) values.push_back(calls.at(name));
  names.push_back("(output)");
  values.push_back(g->outputs()[0]);
  set_outputs(g, values, true);
  eliminate_dead_code(g);
  const std::size_t arity = g->inputs().size() - 1;
  CANOPY_CHECK(arity == 1 || arity == 2, ConfigError, "canopy trunk show --size: the trunk's forward takes ",
               arity,
               " inputs; an image trunk takes one (images), a text trunk two (token ids, attention mask)");
  const auto on = at::TensorOptions().device(d.device);
  std::vector<at::Tensor> inputs;
  std::string at;
  if (arity == 1) {
    inputs.push_back(at::zeros({2, channels, size, size}, on));
    at = detail::str_cat(size, "x", size, " (a batch of zero images [2, ", channels, ", ", size, ", ", size,
                         "])");
  } else {
    inputs.push_back(at::ones({2, size}, on.dtype(at::kLong)));
    inputs.push_back(at::ones({2, size}, on.dtype(at::kLong)));
    at = detail::str_cat(size, " tokens (id 1, none padded)");
  }
  torch::jit::GraphFunction fn("canopy_show_outputs", g, nullptr);
  std::vector<c10::IValue> stack{m._ivalue()};
  for (const auto& x : inputs) stack.emplace_back(x);
  c10::IValue result;
  try {
    c10::NoGradGuard no_grad;
    result = fn(stack);
  } catch (const std::exception& e) {
    throw DataError(detail::str_cat("canopy trunk show: the trunk failed at ", at, ": ", torch_error(e)));
  }
  const auto& elements = result.toTupleRef().elements();
  std::size_t width = 0;
  for (const auto& n : names) width = std::max(width, n.size());
  std::ostringstream o;
  o << "\n  outputs     at " << at << ", pooling " << d.config.pooling << ":\n";
  for (std::size_t i = 0; i < names.size(); ++i) {
    o << "    " << std::left << std::setw(static_cast<int>(width) + 2) << names[i];
    if (!elements[i].isTensor()) {
      o << elements[i].type()->str() << ": not one tensor\n";
      continue;
    }
    const at::Tensor& t = elements[i].toTensor();
    o << std::setw(22) << batch_shape(t);
    try {
      o << pool(t, d.config.pooling, inputs, names[i]).size(1) << " per sample"
        << d.pooling_hint(t, names[i], true);
    } catch (const Error& e) {
      o << "not pooled: " << e.what();
    }
    o << "\n";
  }
  return o.str();
}

// `trunk show`'s "trains" lines: heads only, or the top over the cached prefix and what the
// cut keeps frozen.
std::string Trunk::Impl::show_trains() const {
  std::ostringstream o;
  const TopSplit& sp = split;
  if (!sp.tunes) {
    o << "  trains      heads only: the cache holds pooled features of the frozen trunk\n";
  } else if (!sp.problem.empty() || sp.prefix_blocks == 0) {
    o << "  trains      NOT CACHEABLE: " << sp.problem << " (freeze a prefix: first:N)\n";
  } else {
    o << "  trains      the top (" << join(sp.top_blocks, ", ")
      << ", then the pooling) and the heads; the cache "
      << "holds the output of " << sp.boundary << " (the first " << sp.prefix_blocks << " blocks, frozen)";
    std::vector<std::string> extra;
    for (auto i : sp.top_inputs) extra.push_back("input " + std::to_string(i));
    o << (extra.empty() ? "" : " and " + join(extra, ", ")) << "\n";
    if (!sp.below_cut.empty())
      o << "              " << join(sp.below_cut, ", ")
        << ": parameters outside the blocks, read below the cut "
        << "only, kept frozen\n";
    if (!sp.unrun.empty())
      o << "              " << join(sp.unrun, ", ") << ": never run ("
        << (config.taps.empty() ? "not needed for the output" : "after the last tap") << "), kept frozen\n";
  }
  return o.str();
}

// `trunk show` of a compiled package: its metadata and the number of its constants.
std::string Trunk::Impl::show_compiled() const {
  const auto& c = config;
  std::ostringstream o;
  const auto meta = [&](const char* key) {
    const auto it = compiled_meta.find(key);
    return it == compiled_meta.end() ? std::string("(not recorded)") : it->second;
  };
  o << "trunk " << c.path << "\n"
    << "  sha256      " << sha256
    << (c.sha256.empty() ? " (not pinned: add trunk.sha256 to pin it)" : " (pinned, verified)") << "\n"
    << "  format      AOTInductor package (compiled native code), inference only\n"
    << "  compiled    for " << meta("AOTI_DEVICE_KEY") << " by torch " << meta("canopy.torch_version") << "\n"
    << "  inputs      " << meta("canopy.inputs") << " (N: any batch; T<=M: up to M)\n"
    << "  exported    from " << meta("canopy.source") << "\n"
    << "  links       "
    << (meta("canopy.links_libtorch") == "0" ? "libtorch_cpu only (no CUDA libraries loaded for it)"
        : meta("AOTI_DEVICE_KEY") == "(not recorded)" || meta("AOTI_DEVICE_KEY") == "cpu"
            ? "libtorch.so, which loads LibTorch's CUDA half with it (about 0.1 s and 230 MiB); "
              "scripts/export_trunk.py makes CPU packages that need libtorch_cpu only"
            : "libtorch.so (with LibTorch's CUDA half, which it runs on)")
    << "\n"
    << "  constants   " << compiled->get_constant_fqns().size()
    << " (parameters and buffers, frozen into the package)\n"
    << "  freeze      all (a compiled trunk cannot be fine-tuned)\n"
    << "  features    outputs " << join(compiled_outputs, ", ") << ", pooling " << c.pooling << "\n"
    << "  trains      heads only: the cache holds pooled features of the frozen trunk\n";
  return o.str();
}

namespace {

// `trunk show`'s module table (to `max_depth`) and its BatchNorm line.
std::string module_table(const std::vector<ModuleInfo>& mods, int max_depth) {
  std::ostringstream o;
  std::size_t width = 6, type_width = 4;
  for (const auto& m : mods) {
    if (m.depth > max_depth) continue;
    width = std::max(width, m.name.size() + 2 * static_cast<std::size_t>(m.depth));
    type_width = std::max(type_width, m.type.size());
  }
  const int tw = static_cast<int>(type_width);
  o << "\n  " << std::left << std::setw(static_cast<int>(width)) << "module"
    << "  " << std::setw(tw) << "type" << std::right << std::setw(10) << "params"
    << "  " << std::left << "state\n";
  std::int64_t bn = 0, pinned = 0, traced = 0;
  for (const auto& m : mods) {
    if (m.batchnorm) {
      ++bn;
      if (m.frozen) ++pinned;
      if (m.batchnorm_traced_eval) ++traced;
    }
    if (m.depth > max_depth || m.name.empty()) continue;
    std::string state = m.trainable == 0              ? "frozen"
                        : m.trainable == m.parameters ? "trainable"
                                                      : "partly trainable";
    if (m.parameters == 0) state = m.frozen ? "frozen (no parameters)" : "trainable (no parameters)";
    if (m.batchnorm) {
      state += m.frozen                  ? ", BatchNorm pinned (eval, statistics fixed)"
               : m.batchnorm_traced_eval ? ", BatchNorm traced in eval mode (statistics fixed)"
                                         : ", BatchNorm statistics update in train mode";
    }
    std::vector<std::string> tags;
    if (m.block) tags.push_back("block");
    if (m.tap) tags.push_back("tap");
    o << "  " << std::string(2 * (m.depth - 1), ' ') << std::left
      << std::setw(static_cast<int>(width - 2 * (m.depth - 1))) << m.name << "  " << std::setw(tw) << m.type
      << std::right << std::setw(10) << m.parameters << "  " << std::left << state
      << (tags.empty() ? "" : "  [" + join(tags, ", ") + "]") << "\n";
  }
  o << "\n  BatchNorm   " << bn << " layer(s), " << pinned << " pinned in frozen regions"
    << (traced ? detail::str_cat(", ", traced, " traced in eval mode (fixed whatever the policy)") : "");
  return o.str();
}

}  // namespace

std::string Trunk::show(int max_depth) const {
  const auto& c = impl_->config;
  if (impl_->compiled) return impl_->show_compiled();
  const auto [total, trainable] = parameter_counts();
  std::ostringstream o;
  o << "trunk " << c.path << "\n"
    << "  sha256      " << impl_->sha256
    << (c.sha256.empty() ? " (not pinned: add trunk.sha256 to pin it)" : " (pinned, verified)")
    << "\n  parameters  " << total << ", trainable " << trainable << "\n"
    << "  freeze      " << describe(c.freeze) << "\n"
    << "  features    tap " << describe_taps(c) << ", pooling " << c.pooling
    << (c.precision == "float32" ? "" : ", passes under " + c.precision + " autocast")
    << (c.top_precision == "float32" ? "" : ", the top's under " + c.top_precision + " autocast") << "\n";
  o << impl_->show_trains();
  if (impl_->rewritten.convolutions > 0)
    o << "  passes      " << (impl_->split.tunes ? "the cached prefix runs " : "caching runs ")
      << impl_->describe_rewritten() << " (trunk.optimize)\n";
  o << module_table(modules(), max_depth) << "\n  blocks      " << impl_->blocks.size()
    << " (what freeze = first:N counts): " << join(impl_->blocks, ", ") << "\n  tap points  "
    << (impl_->tap_points.empty()
            ? "none: forward calls no submodule (trunk.expand can open one; the output is "
              "the features)"
            : join(impl_->tap_points, ", "))
    << "\n";
  return o.str();
}

}  // namespace canopy::trunk
