#include "graph_rewrite.h"

#include <memory>

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>

namespace canopy::trunk::graph {
namespace {

bool is_zero(torch::jit::Value* v) {
  const auto iv = torch::jit::toIValue(v);
  return iv &&
         (iv->isNone() || (iv->isDouble() && iv->toDouble() == 0.0) || (iv->isInt() && iv->toInt() == 0));
}

}  // namespace

std::optional<std::vector<std::int64_t>> constant_ints(torch::jit::Value* v) {
  if (const auto iv = torch::jit::toIValue(v); iv && iv->isIntList()) return iv->toIntVector();
  if (v->node()->kind() != c10::prim::ListConstruct) return std::nullopt;
  std::vector<std::int64_t> out;
  for (torch::jit::Value* e : v->node()->inputs()) {
    const auto iv = torch::jit::toIValue(e);
    if (!iv || !iv->isInt()) return std::nullopt;
    out.push_back(iv->toInt());
  }
  return out;
}

std::optional<std::size_t> convolution_groups_input(torch::jit::Node* n) {
  if (n->kind() == c10::Symbol::aten("conv2d") && n->inputs().size() == 7 &&
      n->input(4)->type()->kind() == c10::TypeKind::ListType)
    return 6;
  if (n->kind() != c10::Symbol::aten("_convolution") || n->inputs().size() != 13) return std::nullopt;
  const auto transposed = torch::jit::toIValue(n->input(6));
  if (!transposed || !transposed->isBool() || transposed->toBool()) return std::nullopt;
  return 8;
}

std::optional<ZeroPad> zero_pad(torch::jit::Node* n) {
  if (n->kind() == c10::Symbol::aten("pad") && n->inputs().size() == 4) {
    const auto mode = torch::jit::toIValue(n->input(2));
    if (!mode || !mode->isString() || mode->toStringRef() != "constant" || !is_zero(n->input(3)))
      return std::nullopt;
  } else if (n->kind() != c10::Symbol::aten("constant_pad_nd") || n->inputs().size() != 3 ||
             !is_zero(n->input(2))) {
    return std::nullopt;
  }
  const auto pad = constant_ints(n->input(1));
  if (!pad || pad->size() != 4) return std::nullopt;
  for (const std::int64_t p : *pad) {
    if (p < 0) return std::nullopt;  // a negative pad crops
  }
  return ZeroPad{(*pad)[0], (*pad)[1], (*pad)[2], (*pad)[3]};
}

std::optional<PaddedInput> padded_input(torch::jit::Value* x) {
  if (x->uses().size() != 1) return std::nullopt;
  torch::jit::Node* n = x->node();
  if (const auto p = zero_pad(n)) return PaddedInput{n->input(0), *p, n};
  if (n->kind() != c10::prim::CallMethod || n->s(c10::attr::name) != "forward" || n->inputs().size() != 2)
    return std::nullopt;
  const auto type = n->input(0)->type()->cast<c10::ClassType>();
  torch::jit::Function* fn = type ? type->findMethod("forward") : nullptr;
  if (!fn || !fn->isGraphFunction()) return std::nullopt;
  const std::shared_ptr<torch::jit::Graph> callee = torch::jit::toGraphFunction(*fn).graph();
  if (callee->inputs().size() != 2 || callee->outputs().size() != 1) return std::nullopt;
  torch::jit::Node* pad = callee->outputs()[0]->node();
  const auto p = zero_pad(pad);
  if (!p || pad->input(0) != callee->inputs()[1]) return std::nullopt;
  return PaddedInput{n->input(1), *p, n};
}

}  // namespace canopy::trunk::graph
