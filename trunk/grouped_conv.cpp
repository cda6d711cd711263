#include "canopy/trunk/grouped_conv.h"

#include <algorithm>
#include <optional>
#include <vector>

#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/runtime/graph_iterator.h>
#include <torch/library.h>

#include "canopy/core/torch_team.h"
#include "depthwise_kernel.h"
#include "graph_rewrite.h"

namespace canopy::trunk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// canopy::grouped_conv2d: at::convolution forward; backward by at::convolution_backward, the
// weight gradient of a depthwise convolution by depthwise_weight_grad.
struct GroupedConv2d : torch::autograd::Function<GroupedConv2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, std::vector<std::int64_t> stride,
                            std::vector<std::int64_t> padding, std::vector<std::int64_t> dilation,
                            std::int64_t groups) {
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({input, weight});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = has_bias;
    return at::convolution(input, weight, has_bias ? *bias : at::Tensor(), stride, padding, dilation, false,
                           {0, 0}, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& grad = grad_outputs[0];
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const std::int64_t groups = ctx->saved_data["groups"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the tensors given: no bias, no third.
    const bool want_input = ctx->needs_input_grad(0);
    const bool want_weight = ctx->needs_input_grad(1);
    const bool want_bias = has_bias && ctx->needs_input_grad(2);
    const bool own = want_weight && depthwise_kernel_serves(input, weight, groups);
    at::Tensor grad_input, grad_weight, grad_bias;
    if (want_input || (want_weight && !own) || want_bias) {
      const std::vector<std::int64_t> bias_sizes{weight.size(0)};
      std::tie(grad_input, grad_weight, grad_bias) = at::convolution_backward(
          grad, input, weight, has_bias ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, stride, padding,
          dilation, false, {0, 0}, groups, {want_input, want_weight && !own, want_bias});
    }
    if (own) grad_weight = depthwise_weight_grad(grad, input, weight, stride, padding, dilation);
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor grouped_conv2d(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, std::int64_t groups) {
  return GroupedConv2d::apply(input, weight, bias, stride.vec(), padding.vec(), dilation.vec(), groups);
}

void define_grouped_conv(torch::Library& m) {
  m.def(
      "grouped_conv2d(Tensor input, Tensor weight, Tensor? bias, "
      "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  m.impl("grouped_conv2d", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(grouped_conv2d));
}

// TORCH_LIBRARY(canopy, m), but never destroyed: its destructor would unregister the op at
// exit, reaching LibTorch's dispatcher after LibTorch's own static destructors ran
// (ThreadSanitizer: "unlock of an unlocked mutex ... already destroyed", from every process).
const auto* const kGroupedConvOps = new torch::detail::TorchLibraryInit(
    torch::Library::DEF, &define_grouped_conv, "canopy", std::nullopt, __FILE__, __LINE__);

}  // namespace

bool depthwise_kernel_serves(const at::Tensor& input, const at::Tensor& weight, std::int64_t groups) {
  return input.defined() && weight.defined() && input.device().is_cpu() && weight.device().is_cpu() &&
         input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && input.dim() == 4 &&
         weight.dim() == 4 && groups > 1 && input.size(1) == groups && weight.size(0) == groups &&
         weight.size(1) == 1;
}

at::Tensor depthwise_weight_grad(const at::Tensor& grad_output, const at::Tensor& input,
                                 const at::Tensor& weight_like, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(depthwise_kernel_serves(input, weight_like, input.size(1)),
              "depthwise_weight_grad: a float32 CPU depthwise convolution, got input ", input.sizes(), " ",
              input.scalar_type(), ", weight ", weight_like.sizes(), " ", weight_like.scalar_type());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "depthwise_weight_grad: 2-D stride, padding and dilation");
  // [N, H, W, C] dense: a channels-last tensor's permutation is a view of it, no copy.
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).contiguous();
  const at::Tensor g =
      grad_output.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).contiguous();
  detail::DepthwiseShape s{};
  s.batch = input.size(0);
  s.channels = input.size(1);
  s.height = input.size(2);
  s.width = input.size(3);
  s.out_height = grad_output.size(2);
  s.out_width = grad_output.size(3);
  s.kernel_h = weight_like.size(2);
  s.kernel_w = weight_like.size(3);
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dilation_h = dilation[0];
  s.dilation_w = dilation[1];
  TORCH_CHECK(grad_output.scalar_type() == at::kFloat && grad_output.size(0) == s.batch &&
                  grad_output.size(1) == s.channels,
              "depthwise_weight_grad: gradient ", grad_output.sizes(), " ", grad_output.scalar_type(),
              " for input ", input.sizes());
  // acc[kh][kw][c]: taps outer, channels inner, so that a channel range is one stretch per tap.
  at::Tensor acc = at::zeros({s.kernel_h, s.kernel_w, s.channels}, input.options());
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* ap = acc.data_ptr<float>();
  // Threads take channel ranges of whole blocks: each channel's sum in one fixed order.
  on_every_torch_thread([&](int i, int n) {
    constexpr std::int64_t b = detail::kChannelBlock;
    const std::int64_t blocks = (s.channels + b - 1) / b;
    const std::int64_t begin = std::min(s.channels, blocks * i / n * b);
    const std::int64_t end = std::min(s.channels, blocks * (i + 1) / n * b);
    detail::depthwise_weight_grad_nhwc(s, xp, gp, ap, begin, end);
  });
  // [KH, KW, C] -> [C, 1, KH, KW]
  return acc.permute({2, 0, 1}).unsqueeze(1).contiguous(weight_like.suggest_memory_format());
}

int use_canopy_grouped_convolutions(const std::shared_ptr<torch::jit::Graph>& g, bool float32_input) {
  std::vector<std::pair<torch::jit::Node*, std::size_t>> found;  // node, its groups input
  std::shared_ptr<torch::jit::Graph> graph = g;
  for (torch::jit::DepthFirstGraphNodeIterator it(graph); auto* node = it.next();) {
    const auto groups_at = graph::convolution_groups_input(node);
    if (!groups_at) continue;
    const auto groups = torch::jit::toIValue(node->input(*groups_at));
    if (groups && groups->isInt() && groups->toInt() > 1) found.emplace_back(node, *groups_at);
  }
  const auto op = c10::Symbol::fromQualString("canopy::grouped_conv2d");
  for (const auto& [node, groups_at] : found) {
    torch::jit::WithInsertPoint guard(node);
    torch::jit::Graph* owner = node->owningGraph();
    torch::jit::Value* x = node->input(0);
    torch::jit::Value* padding = node->input(4);
    // A zero pad the convolution reads alone becomes its padding: no padded copy to fill and
    // write, and the kernels skip the taps that fall in it (EfficientNet pads every depthwise
    // convolution so; the demo's top-2 computed 25 taps a position where 4 touch the input).
    torch::jit::Node* padder = nullptr;
    const auto own = graph::constant_ints(padding);
    if (const auto fold = graph::padded_input(x);
        fold && fold->pad.symmetric() && own && *own == std::vector<std::int64_t>{0, 0}) {
      padder = fold->padder;
      x = fold->unpadded;
      padding = owner->insertConstant(std::vector<std::int64_t>{fold->pad.top, fold->pad.left});
    }
    if (float32_input) x = owner->insert(c10::Symbol::aten("to"), {x, c10::ScalarType::Float});
    torch::jit::Value* y = owner->insert(op, {x, node->input(1), node->input(2), node->input(3), padding,
                                              node->input(5), node->input(groups_at)});
    node->output()->replaceAllUsesWith(y);
    node->destroy();
    if (padder && !padder->output()->hasUses()) padder->destroy();
  }
  return static_cast<int>(found.size());
}

}  // namespace canopy::trunk
