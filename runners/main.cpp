// The canopy command line: the built-in heads and the shared CLI entry point.
#include "canopy/runners/cli.h"
#include "canopy/tasks/registry.h"

int main(int argc, char** argv) {
  canopy::tasks::HeadRegistry registry;
  canopy::tasks::register_builtin_heads(registry);
  canopy::runners::exit_process(canopy::runners::run_cli(argc, argv, registry));
}
