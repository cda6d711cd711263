// Registering a head of your own: copy this file.
//
// A head is a torch::nn module deriving from canopy::heads::Head. Register a factory under
// a name, then call the same CLI entry point as canopy's own main(); a config can then say
// `head = residual_mlp` in any [task.*] section:
//
//   [task.category_residual]
//   head = residual_mlp
//   head.width = 128
//
//   $ canopy_custom_head heads
//   $ canopy_custom_head train --config my.ini
#include <sstream>

#include <torch/nn/functional/activation.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include "canopy/core/error.h"
#include "canopy/heads/head.h"
#include "canopy/runners/cli.h"
#include "canopy/tasks/registry.h"

namespace {

// x -> LayerNorm -> Linear(width) -> GELU -> Linear(D) added to x -> Linear(K).
class ResidualMlpHead : public canopy::heads::Head {
 public:
  ResidualMlpHead(std::int64_t in, std::int64_t out, std::int64_t width) : in_(in), out_(out), width_(width) {
    norm_ = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({in})));
    up_ = register_module("up", torch::nn::Linear(in, width));
    down_ = register_module("down", torch::nn::Linear(width, in));
    classify_ = register_module("classify", torch::nn::Linear(in, out));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    const auto h = down_->forward(torch::nn::functional::gelu(up_->forward(norm_->forward(x))));
    return classify_->forward(x + h);
  }
  std::string describe() const override {
    std::ostringstream o;
    o << "residual_mlp " << in_ << "-(" << width_ << ")-" << out_;
    return o.str();
  }

 private:
  std::int64_t in_, out_, width_;
  torch::nn::LayerNorm norm_{nullptr};
  torch::nn::Linear up_{nullptr}, down_{nullptr}, classify_{nullptr};
};

}  // namespace

// Everything a program needs: the built-ins plus its own head, then the shared CLI.
void register_example_heads(canopy::tasks::HeadRegistry& registry) {
  registry.add(
      "residual_mlp",
      [](const canopy::tasks::HeadSpec& spec) {
        const auto width = spec.params.get_int("width", 128);
        CANOPY_CHECK(width > 0, canopy::ConfigError, "task '", spec.params.task(),
                     "': residual_mlp width must be > 0, got ", width);
        return std::make_shared<ResidualMlpHead>(spec.in_features, spec.out_features, width);
      },
      "example: a residual MLP block then a linear classifier; options: head.width = 128");
}

int main(int argc, char** argv) {
  canopy::tasks::HeadRegistry registry;
  canopy::tasks::register_builtin_heads(registry);
  register_example_heads(registry);
  // exit_process: as canopy's own main, the process ends without the libraries' teardown.
  canopy::runners::exit_process(canopy::runners::run_cli(argc, argv, registry));
}
