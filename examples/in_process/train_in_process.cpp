// Caching and training from your own program, without the CLI: copy this file.
//
//   $ canopy_in_process my.ini [section.key=value ...]
//
// Builds the feature cache the config describes (or finds it up to date), trains every
// task's head on it concurrently, and prints each head's score on the eval split and where
// its weights went. The same calls `canopy run` makes; everything the CLI writes (heads,
// cards, metrics, checkpoints) is written the same way.
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "canopy/core/error.h"
#include "canopy/runners/cache_job.h"
#include "canopy/runners/cli.h"
#include "canopy/runners/config.h"
#include "canopy/runners/head_run.h"
#include "canopy/runners/train_job.h"
#include "canopy/tasks/registry.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CONFIG [section.key=value ...]\n", argv[0]);
    return 2;
  }
  namespace runners = canopy::runners;
  try {
    // The INI file and overrides, checked as `canopy` checks them (ConfigError naming the key).
    const runners::JobConfig config =
        runners::load_job_config(argv[1], std::vector<std::string>(argv + 2, argv + argc));

    // Within a container's CPU quota, threads as the CLI sets them (leave this out to keep
    // your program's own TBB and LibTorch settings).
    const std::string quota = runners::fit_threads_to_cpu_quota(config);
    if (!quota.empty()) std::fprintf(stderr, "%s\n", quota.c_str());

    const runners::CacheReport cache =
        runners::run_cache(config, /*force=*/false, /*trunk=*/nullptr, canopy::ProgressStyle::kQuiet);
    std::printf("cache %s: %s, %lld features per sample\n", cache.path.c_str(),
                cache.rebuilt ? "built" : "up to date", static_cast<long long>(cache.feature_dim));

    canopy::tasks::HeadRegistry registry;
    canopy::tasks::register_builtin_heads(registry);  // registry.add(...) your own heads here
    const runners::TrainReport report = runners::run_train(config, registry, canopy::ProgressStyle::kQuiet);
    for (const runners::TaskResult& t : report.tasks) {
      const bool regression = t.eval.regression.has_value();
      std::printf("%s: %s, %s %.4f after %lld epochs -> %s\n", t.name.c_str(), runners::state_name(t.state),
                  regression ? "R^2" : "accuracy", regression ? t.eval.regression->r2 : t.eval.accuracy,
                  static_cast<long long>(t.epochs), t.weights_path.c_str());
    }
    return report.any_failed() ? 3 : 0;  // a head FAILED: the others still trained and exported
  } catch (const canopy::ConfigError& e) {
    std::fprintf(stderr, "config error: %s\n", e.what());
    return 2;
  } catch (const canopy::Error& e) {  // data, I/O: the message names the file and the fix
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
