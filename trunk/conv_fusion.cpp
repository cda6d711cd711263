#include "canopy/trunk/conv_fusion.h"

#include <array>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/runtime/graph_iterator.h>
#include <torch/library.h>

#include "graph_rewrite.h"

namespace canopy::trunk {
namespace {

// canopy::crop_padded(y, x, pad, extent, stride, start): the windows of a convolution of `x`
// zero-padded by `pad` ([l, r, t, b]) out of `y`, the same convolution of `x` padded more,
// whose windows in dimension d begin `start[d]` strides earlier. `extent` is the kernel's
// extent, dilation included.
at::Tensor crop_padded(const at::Tensor& y, const at::Tensor& x, at::IntArrayRef pad, at::IntArrayRef extent,
                       at::IntArrayRef stride, at::IntArrayRef start) {
  TORCH_CHECK(x.dim() == 4 && y.dim() == 4 && pad.size() == 4 && extent.size() == 2 && stride.size() == 2 &&
                  start.size() == 2,
              "crop_padded: 4-D tensors, a pad of 4 and 2 of each of the rest");
  at::Tensor out = y;
  for (std::int64_t d = 0; d < 2; ++d) {
    const std::int64_t padded = x.size(2 + d) + pad[2 - 2 * d] + pad[3 - 2 * d];
    TORCH_CHECK(padded >= extent[d], "convolution: padded input size ", padded, " in dimension ", 2 + d,
                " is smaller than the kernel's extent ", extent[d]);
    out = out.narrow(2 + d, start[d], (padded - extent[d]) / stride[d] + 1);
  }
  return out;
}

// oneDNN's name for an activation, and which of its inputs it takes as the post-op's scalars
// or algorithm.
struct Activation {
  std::string attr;
  std::size_t inputs;
  std::vector<std::size_t> scalars;  // input indices
  std::optional<std::size_t> algorithm;
  std::vector<double> fixed;  // scalars of its own
};

const std::map<std::string, Activation>& activations() {
  static const std::map<std::string, Activation> kinds = [] {
    const std::vector<std::pair<std::string, Activation>> base = {
        {"relu", {"relu", 1, {}, {}, {}}},
        {"hardtanh", {"hardtanh", 3, {1, 2}, {}, {}}},
        {"relu6", {"hardtanh", 1, {}, {}, {0.0, 6.0}}},
        {"silu", {"swish", 1, {}, {}, {}}},
        {"sigmoid", {"sigmoid", 1, {}, {}, {}}},
        {"tanh", {"tanh", 1, {}, {}, {}}},
        {"hardswish", {"hardswish", 1, {}, {}, {}}},
        {"hardsigmoid", {"hardsigmoid", 1, {}, {}, {}}},
        {"leaky_relu", {"leaky_relu", 2, {1}, {}, {}}},
        {"gelu", {"gelu", 2, {}, 1, {}}},
    };
    std::map<std::string, Activation> m;
    for (const auto& [name, a] : base) {
      m["aten::" + name] = a;
      m["aten::" + name + "_"] = a;  // in place: the convolution's output has no other reader
    }
    return m;
  }();
  return kinds;
}

// The activation that alone reads `conv`'s output, if oneDNN can apply it as a post-op.
const Activation* fusable_activation(torch::jit::Node* conv, torch::jit::Node*& user) {
  torch::jit::Value* y = conv->output();
  if (y->uses().size() != 1) return nullptr;
  user = y->uses()[0].user;
  const auto it = activations().find(user->kind().toQualString());
  if (it == activations().end() || user->inputs().size() != it->second.inputs || user->input(0) != y)
    return nullptr;
  return &it->second;
}

struct Convolution {
  torch::jit::Node* node;
  std::vector<std::int64_t> kernel, stride, padding, dilation;
  torch::jit::Value* groups;
};

// A 2-D convolution with a constant float32 CPU weight and constant settings.
std::optional<Convolution> cpu_convolution(torch::jit::Node* node) {
  const auto groups_at = graph::convolution_groups_input(node);
  if (!groups_at) return std::nullopt;
  const auto weight = torch::jit::toIValue(node->input(1));
  if (!weight || !weight->isTensor()) return std::nullopt;
  const at::Tensor& w = weight->toTensor();
  if (w.dim() != 4 || !w.device().is_cpu() || w.scalar_type() != at::kFloat) return std::nullopt;
  const auto bias = torch::jit::toIValue(node->input(2));
  if (bias && bias->isTensor() &&
      (!bias->toTensor().device().is_cpu() || bias->toTensor().scalar_type() != at::kFloat))
    return std::nullopt;
  const auto stride = graph::constant_ints(node->input(3));
  const auto padding = graph::constant_ints(node->input(4));
  const auto dilation = graph::constant_ints(node->input(5));
  const auto groups = torch::jit::toIValue(node->input(*groups_at));
  if (!stride || !padding || !dilation || stride->size() != 2 || padding->size() != 2 ||
      dilation->size() != 2 || !groups || !groups->isInt())
    return std::nullopt;
  return Convolution{node, {w.size(2), w.size(3)}, *stride, *padding, *dilation, node->input(*groups_at)};
}

void define_crop_padded(torch::Library& m) {
  m.def("crop_padded(Tensor y, Tensor x, int[] pad, int[] extent, int[] stride, int[] start) -> Tensor");
  m.impl("crop_padded", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(crop_padded));
}

// TORCH_LIBRARY_FRAGMENT(canopy, m), never destroyed, as grouped_conv.cpp's library (its
// destructor would unregister the op at exit, after LibTorch's dispatcher was torn down).
const auto* const kCropPaddedOps = new torch::detail::TorchLibraryInit(
    torch::Library::FRAGMENT, &define_crop_padded, "canopy", std::nullopt, __FILE__, __LINE__);

}  // namespace

FusedConvolutions fuse_cpu_convolutions(const std::shared_ptr<torch::jit::Graph>& g, at::ScalarType dtype) {
  FusedConvolutions done;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "fuse_cpu_convolutions: float32 or bfloat16, got ", dtype);
  if (!at::hasMKLDNN()) return done;
  std::vector<Convolution> found;
  std::shared_ptr<torch::jit::Graph> graph = g;
  for (torch::jit::DepthFirstGraphNodeIterator it(graph); auto* node = it.next();) {
    if (auto c = cpu_convolution(node)) found.push_back(std::move(*c));
  }
  const auto pointwise = c10::Symbol::fromQualString("mkldnn::_convolution_pointwise");
  const auto crop = c10::Symbol::fromQualString("canopy::crop_padded");
  for (Convolution& c : found) {
    torch::jit::Node* act_node = nullptr;
    const Activation* act = fusable_activation(c.node, act_node);
    torch::jit::Node* last = act ? act_node : c.node;
    torch::jit::WithInsertPoint guard(last);
    torch::jit::Graph* owner = c.node->owningGraph();

    // A zero pad before the convolution becomes (part of) its padding.
    torch::jit::Value* x = c.node->input(0);
    std::optional<graph::PaddedInput> fold;
    std::array<std::int64_t, 2> start{0, 0};
    bool cropped = false;
    if (c.padding == std::vector<std::int64_t>{0, 0}) fold = graph::padded_input(x);
    if (fold) {
      x = fold->unpadded;
      const std::array<std::int64_t, 2> lo{fold->pad.top, fold->pad.left},
          hi{fold->pad.bottom, fold->pad.right};
      for (std::size_t d = 0; d < 2; ++d) {
        // Windows begin at s*i - p: with p = lo + s*m (m >= 0, p >= hi) window m + i is the
        // padded convolution's window i, and every element it reads past the input is zero.
        const std::int64_t s = c.stride[d];
        start[d] = hi[d] > lo[d] ? (hi[d] - lo[d] + s - 1) / s : 0;
        c.padding[d] = lo[d] + s * start[d];
        cropped = cropped || start[d] > 0 || lo[d] != hi[d];
      }
    }

    std::vector<torch::jit::Value*> scalars;
    torch::jit::NamedValue algorithm{c10::IValue()};  // None
    if (act) {
      for (std::size_t i : act->scalars) scalars.push_back(act_node->input(i));
      for (double v : act->fixed) scalars.push_back(owner->insertConstant(v));
      if (act->algorithm) algorithm = torch::jit::NamedValue(act_node->input(*act->algorithm));
    }
    torch::jit::Value* list =
        owner->insertNode(owner->createList(c10::OptionalType::create(c10::NumberType::get()), scalars))
            ->output();
    // A bfloat16 pass: the weights as bfloat16 constants, the input cast (a no-op after the
    // first convolution: every later one reads a bfloat16 output), as autocast would.
    torch::jit::Value* weight = c.node->input(1);
    torch::jit::Value* bias = c.node->input(2);
    if (dtype != at::kFloat) {
      weight = owner->insertConstant(torch::jit::toIValue(weight)->toTensor().to(dtype));
      if (const auto b = torch::jit::toIValue(bias); b && b->isTensor())
        bias = owner->insertConstant(b->toTensor().to(dtype));
      x = owner->insert(c10::Symbol::aten("to"), {x, dtype});
    }
    torch::jit::Value* y =
        owner->insert(pointwise, {x, weight, bias, c10::IValue(c.padding), c.node->input(3), c.node->input(5),
                                  c.groups, std::string(act ? act->attr : "none"), list, algorithm});
    if (cropped) {
      std::vector<std::int64_t> extent(2);
      for (std::size_t d = 0; d < 2; ++d) extent[d] = c.dilation[d] * (c.kernel[d] - 1) + 1;
      const std::vector<std::int64_t> pad{fold->pad.left, fold->pad.right, fold->pad.top, fold->pad.bottom};
      y = owner->insert(crop, {y, x, c10::IValue(pad), c10::IValue(extent), c.node->input(3),
                               c10::IValue(std::vector<std::int64_t>(start.begin(), start.end()))});
    }
    last->output()->replaceAllUsesWith(y);
    if (act) act_node->destroy();
    c.node->destroy();
    if (fold && !fold->padder->output()->hasUses()) fold->padder->destroy();
    ++done.convolutions;
    done.activations += act != nullptr;
    done.pads += fold.has_value();
    done.crops += cropped;
  }
  // The float32 weights a bfloat16 pass replaced, and constants nothing reads any more.
  if (done.convolutions > 0) torch::jit::EliminateDeadCode(g);
  return done;
}

}  // namespace canopy::trunk
