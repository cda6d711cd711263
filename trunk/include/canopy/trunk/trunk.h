// The frozen trunk: a pretrained encoder loaded from TorchScript.
//
// Loading verifies the file's SHA-256 against the pinned value (when one is given) before
// the file is opened by TorchScript: a trunk file is executable code.
//
// Freezing is decided once, at load, by a policy (FreezePolicy) and reported (show()):
// a frozen module's parameters have requires_grad = false and the module is in eval mode.
// BatchNorm inside a frozen region is pinned by construction: the only way to change
// training modes is Trunk::train(), which never puts a frozen module (or a pinned
// BatchNorm) in training mode, so its running statistics cannot change, whatever is called
// later. With `batchnorm_affine_trainable` the pinned BatchNorm layers' weight and bias
// still learn while their statistics stay fixed.
//
// Taps: the features can come from the output of any submodule that the trunk's forward
// calls directly (its blocks: `blocks.13`, `layers.4`, ...), several at once from one
// pass; each tap is pooled and the results are concatenated in the order given (BERT's
// feature-based recipe concatenates the last layers this way).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace torch::jit {
struct Module;
}

namespace canopy::trunk {

// What freezes. `freeze` and `train_only` take a selection:
//   all            every module (freeze only; the default)
//   none           nothing (freeze only)
//   first:N        the first N blocks (blocks(): top-level children, a ModuleList's
//                  elements counted one by one)
//   match:REGEX    modules whose qualified name matches (std::regex search, ECMAScript)
//   modules:A B C  these modules (qualified names, separated by spaces or ';')
// A selected module freezes with everything inside it. `train_only` is the inverse:
// everything is frozen except the selection (give one of the two, not both).
struct FreezePolicy {
  std::string freeze = "all";
  std::string train_only;
  bool batchnorm_affine_trainable = false;
  // A block name: freeze exactly the blocks before it (the lowest block that ever trains,
  // e.g. under gradual unfreezing); replaces freeze, which must then be left at all.
  std::string unfreeze_to;
};

// How each tapped output becomes one feature vector per sample.
//   avg          mean over every dimension after the first two ([N, C, ...] -> [N, C])
//   avg_channels_last  mean over every dimension between the first and the last ([N, ..., C]
//                -> [N, C]): Swin's stages [N, H, W, C], a ViT's tokens [N, T, D]
//   flatten      [N, ...] -> [N, prod(...)]
//   none         the output must already be [N, D]
//   first_token  [N, T, D] -> [N, D]: the first position (BERT's [CLS])
//   masked_mean  [N, T, D] -> [N, D]: mean over the positions where the attention mask
//                (the trunk's second input, [N, T]) is non-zero (sentence encoders)
struct TrunkConfig {
  std::string path;
  std::string sha256;           // pinned hash of the file, checked before the file is loaded
  bool allow_unpinned = false;  // load a trunk without sha256 (the hash to pin is logged)
  std::string device = "auto";
  std::string pooling = "avg";
  std::vector<std::string> taps;  // empty: the trunk's output
  // Modules whose forward is inlined into the trunk's, so that their children are blocks and
  // tap points in their place (torchvision's `features`, a BERT's `encoder`), in order: a
  // module inside an expanded one can be expanded after it.
  std::vector<std::string> expand;
  bool optimize = true;  // inference passes on a frozen, channels-last clone; a
                         // trunk that trains holds channels-last weights
  // The inference passes (encode, encode_prefix) under autocast to this dtype, as
  // torch.autocast: float32 (none) | bfloat16 | float16. Features are returned in float32.
  std::string precision = "float32";
  // The trainable top's passes (training, evaluation, cache levels, predict) under autocast:
  // float32 (none) | bfloat16. Parameters, gradients and optimizer state stay float32.
  std::string top_precision = "float32";
  FreezePolicy freeze;
  // How many inputs canopy gives forward: 1 (images) or 2 (token ids, attention mask), from
  // the data source; 0 (a trunk file alone) those forward declares without a default. Its
  // arguments past them take their defaults for good (timm's attn_mask=None, is_causal=False).
  std::size_t inputs = 0;
};

void validate_trunk_config(const TrunkConfig& config);
// How many of `module`'s forward arguments (after self) have no default: what a call must give.
std::size_t required_inputs(const torch::jit::Module& module);
// A policy as logs, `trunk show` and the cache's description name it: "first:13", "all" or,
// for train_only, "all but first:2" (with "; BatchNorm affine trainable" when set).
std::string describe(const FreezePolicy& policy);
// "output" or the taps joined by ',' (for descriptions and fingerprints).
std::string describe_taps(const TrunkConfig& config);

// The SHA-256 of the trunk file, refusing a file that does not match the pinned trunk.sha256
// (DataError) and an unpinned one unless allow_unpinned (ConfigError, giving the hash to
// pin). Reads the file without loading it.
std::string verified_trunk_sha256(const TrunkConfig& config);

// A trunk file ending in .pt2 is an AOTInductor package (scripts/export_trunk.py --format pt2):
// compiled native code for one device, run for inference only, its outputs (taps) fixed at
// export and named in its metadata. Loaded with the same pin check as a TorchScript file.
bool is_compiled_trunk(const std::string& path);

// One module of the trunk as show() reports it.
struct ModuleInfo {
  std::string name;  // qualified ("" for the root)
  std::string type;  // class name, e.g. Conv2d, BatchNorm2d, BertLayer
  int depth = 0;
  std::int64_t parameters = 0;  // including submodules
  std::int64_t trainable = 0;
  bool frozen = true;
  bool batchnorm = false;              // has running_mean and running_var buffers
  bool batchnorm_traced_eval = false;  // traced in eval mode: training is a constant false
  bool block = false;                  // one of blocks() (what first:N counts)
  bool tap = false;                    // can be named in trunk.taps
};

// Where a freeze policy cuts the trunk: blocks [0, prefix_blocks) are frozen whole (the
// prefix a cache stores the output of); the top is every block from there on. A trunk
// with nothing trainable has an empty top (`tunes` false): the cache holds pooled features.
struct TopSplit {
  bool tunes = false;                    // some trunk parameter is trainable
  std::int64_t prefix_blocks = 0;        // leading blocks frozen whole
  std::string boundary;                  // the last prefix block ("" when prefix_blocks == 0)
  std::vector<std::string> top_blocks;   // the blocks the top runs, from the boundary up
  std::vector<std::string> unrun;        // blocks after the last tap: not run, so kept frozen
  std::vector<std::string> below_cut;    // parameters outside the blocks read below the cut only
  std::vector<std::int64_t> top_inputs;  // indices of trunk inputs the top also reads
                                         // (e.g. 1: the attention mask of a text trunk)
  std::string problem;                   // why the top cannot run over a cached prefix
};

class Trunk {
 public:
  static Trunk load(const TrunkConfig& config);
  Trunk(Trunk&&) noexcept;
  Trunk& operator=(Trunk&&) noexcept;
  ~Trunk();

  // Runs the trunk on a batch (any device) without gradients and returns pooled features
  // on the CPU, float32, contiguous, [N, D]. Floating inputs are converted to float32;
  // integer inputs (token ids, masks) keep their type. Under trunk.precision's autocast; a
  // trunk with a top over a frozen prefix then runs the top in float32. Thread-compatible,
  // not thread-safe.
  at::Tensor encode(const std::vector<at::Tensor>& inputs);
  at::Tensor encode(const at::Tensor& batch) { return encode(std::vector<at::Tensor>{batch}); }

  // Fine-tuning. features() runs with autograd (gradients reach trainable_parameters())
  // and returns pooled features on the trunk's device. train(true) puts only unfrozen
  // modules in training mode: frozen modules and every BatchNorm (statistics fixed, in a
  // trainable top too) stay in eval.
  at::Tensor features(const std::vector<at::Tensor>& inputs);
  void train(bool on);
  std::vector<at::Tensor> trainable_parameters() const;

  // The frozen prefix and the trainable top a freeze policy leaves (see TopSplit).
  const TopSplit& split() const;
  // Refuses (ConfigError, saying why and what to write) a policy that leaves part of the
  // trunk trainable but no frozen prefix to cache. Fully frozen trunks pass.
  void check_cacheable() const;
  // The boundary parts for a batch, in inference mode, on the CPU, float32, contiguous:
  // the prefix's output, then the trunk inputs the top needs (TopSplit::top_inputs).
  std::vector<at::Tensor> encode_prefix(const std::vector<at::Tensor>& inputs);
  // The top (blocks [prefix_blocks, end), taps, pooling) on boundary parts as encode_prefix
  // returns them: pooled features [N, D] on the trunk's device, with autograd unless the
  // caller turned it off (c10::NoGradGuard: an evaluation records no graph).
  at::Tensor top_features(const std::vector<at::Tensor>& parts);
  // The top from block `from`'s output (a top block or the boundary) on parts laid out as
  // encode_prefix returns them with parts[0] that output: pooled features (autograd as above).
  at::Tensor top_features_from(const std::string& from, const std::vector<at::Tensor>& parts);
  // The output of block `to` from block `from`'s output (parts as for top_features_from).
  at::Tensor span(const std::string& from, const std::string& to, const std::vector<at::Tensor>& parts);
  // Why the trunk cannot be cut at block `block` for the top (empty when it can): a later
  // block or tap still reads an earlier one, or the top would need an uncached input.
  std::string cut_problem(const std::string& block);
  // Holds top blocks frozen for a while (a freezing schedule): their parameters stop
  // requiring gradients and their modules run in eval mode; the others return to the policy.
  void hold_frozen(const std::vector<std::string>& blocks);
  // The trainable parameters inside one module (a block), by qualified name, as the policy
  // left them (whether held or not).
  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters(const std::string& module) const;
  // Writes the trunk with its current weights (the frozen prefix unchanged, the trained top)
  // as one TorchScript file: the original file's code, nothing canopy added. Returns the
  // written file's SHA-256.
  std::string save(const std::string& path) const;
  // The trunk as a TorchScript module on the CPU that loads without canopy (`canopy export`):
  // the pinned file's code with the current weights, as save() writes it, in float32 (none of
  // canopy's rewrites), and with trunk.taps a method canopy_taps returning them as a tuple.
  // A compiled (.pt2) trunk has no such form: ConfigError.
  torch::jit::Module script_module() const;

  const std::string& sha256() const;
  const TrunkConfig& config() const;
  c10::Device device() const;
  // Copies of every parameter and buffer of the loaded module, by qualified name.
  std::vector<std::pair<std::string, at::Tensor>> state_snapshot() const;
  // Number of parameters, and how many of them require grad.
  std::pair<std::int64_t, std::int64_t> parameter_counts() const;

  std::vector<ModuleInfo> modules() const;      // every module, depth first
  std::vector<std::string> blocks() const;      // what first:N counts, in order
  std::vector<std::string> tap_points() const;  // submodules forward calls directly, in call order
  // A readable report: file, hash, policy, module tree to `max_depth` with parameter counts,
  // frozen/trainable, BatchNorm pinning, blocks and tap points. Runs nothing.
  std::string show(int max_depth = 2) const;
  // What each tap point, and the trunk's output, gives for a batch of two: zero images
  // [2, channels, size, size], or for a text trunk `size` tokens (id 1, none padded). Their
  // shapes and widths under trunk.pooling, with the layout hints the first batch of a cache
  // gives. Runs a copy of the trunk in eval mode, without gradients. ConfigError for a
  // compiled (.pt2) trunk, whose outputs were fixed when it was compiled.
  std::string show_outputs(std::int64_t size, std::int64_t channels) const;

 private:
  struct Impl;
  explicit Trunk(std::unique_ptr<Impl> impl);
  static Trunk load_compiled(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace canopy::trunk
