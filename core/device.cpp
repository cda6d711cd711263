#include "canopy/core/device.h"

#include <dlfcn.h>
#include <sched.h>

#include <algorithm>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>

#include <ATen/Context.h>
#include <torch/cuda.h>

#include "canopy/core/cgroup.h"
#include "canopy/core/error.h"
#include "canopy/core/mpi.h"
#include "canopy/core/strings.h"

namespace canopy {

namespace {
// LibTorch's CUDA half (libtorch_cuda.so and the CUDA libraries it needs, ~2 GB of them)
// costs a quarter of a second at every start when linked in, on machines that have no GPU
// as much as on those that do. canopy links LibTorch's CPU half only and loads the CUDA
// half here, the first time a device is chosen, when the machine has an NVIDIA driver
// (libcuda.so.1, without which CUDA cannot run). Its static initialisers register the CUDA
// kernels, hooks and AOTInductor runner exactly as when it is linked.
std::string load_cuda_library() {
  void* driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (driver == nullptr) return "no NVIDIA driver (libcuda.so.1) on this machine";
  return detail::load_torch_cuda_library();
}
}  // namespace

namespace detail {
std::string load_torch_cuda_library() { return load_torch_library("libtorch_cuda.so"); }

std::string load_torch_library(const std::string& file) {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&at::globalContext), &info) == 0 || info.dli_fname == nullptr)
    return "cannot locate LibTorch's libraries";
  std::string dir = info.dli_fname;
  dir = dir.substr(0, dir.find_last_of('/') + 1);
  const std::string path = dir + file;
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* why = dlerror();
    return str_cat("loading ", path, " failed: ", why ? why : "(no reason given)");
  }
  return {};
}
}  // namespace detail

const std::string& cuda_backend_status() {
  static std::once_flag once;
  static std::string status;
  std::call_once(once, [] { status = load_cuda_library(); });
  return status;
}

bool cuda_available() { return cuda_backend_status().empty() && torch::cuda::is_available(); }

// As nproc counts: taskset, a container's cpuset or mpirun's binding leave fewer cores than
// the machine has, and more threads than those only wait on each other.
std::int64_t affinity_cores() {
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  if (::sched_getaffinity(0, sizeof cpus, &cpus) == 0 && CPU_COUNT(&cpus) > 0) return CPU_COUNT(&cpus);
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(std::thread::hardware_concurrency()));
}

std::optional<CpuQuota> cpu_quota() {
  std::optional<CpuQuota> out;
  for (const auto& d : cgroup_dirs("cpu")) {
    std::optional<long> cpus;
    if (d.v1) {
      cpus = cpus_of_quota(read_cgroup_file(d, "cpu.cfs_quota_us"), read_cgroup_file(d, "cpu.cfs_period_us"));
    } else {
      std::istringstream max(read_cgroup_file(d, "cpu.max"));  // "150000 100000" or "max 100000"
      std::string quota, period;
      max >> quota >> period;
      cpus = cpus_of_quota(quota, period);
    }
    if (cpus && (!out || *cpus < out->cpus)) out = CpuQuota{std::max<long>(1, *cpus), 0, d.path};
  }
  if (out) out->share = std::max<std::int64_t>(1, out->cpus / mpi::local_size());
  return out;
}

std::int64_t machine_cores() {
  const std::int64_t mask = affinity_cores();
  const auto quota = cpu_quota();
  return quota ? std::min(mask, quota->share) : mask;
}

c10::Device choose_device(const std::string& spec) {
  if (spec == "auto") return cuda_available() ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  if (spec == "cpu") return c10::Device(c10::kCPU);
  if (spec.rfind("cuda", 0) == 0) {
    CANOPY_CHECK(cuda_available(), ConfigError, "device '", spec,
                 "' was asked for but no CUDA GPU is available; use device = auto or cpu");
    c10::Device d(c10::kCPU);
    try {
      d = c10::Device(spec);
    } catch (const std::exception&) {
      throw ConfigError(detail::str_cat("device: expected auto, cpu, cuda or cuda:N, got '", spec, "'"));
    }
    CANOPY_CHECK(d.index() < static_cast<int>(torch::cuda::device_count()), ConfigError, "device '", spec,
                 "': only ", torch::cuda::device_count(), " GPU(s) present");
    return d;
  }
  throw ConfigError(detail::str_cat("device: expected auto, cpu, cuda or cuda:N, got '", spec, "'"));
}

namespace {
// The value of the first /proc/cpuinfo line whose key is `key` ("model" is not "model name"),
// or "".
std::string cpuinfo_value(const std::string& key) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    const auto colon = line.find(':');
    if (colon != std::string::npos && trim(line.substr(0, colon)) == key) return trim(line.substr(colon + 1));
  }
  return "";
}
}  // namespace

std::string cpu_model() {
  const std::string model = cpuinfo_value("model name");
  return model.empty() ? "unknown CPU" : model;
}

std::string machine_description(bool gpu) {
  // Virtual machines often name every generation of a vendor's CPUs alike ("Intel(R) Xeon(R)
  // Processor"): the family and model tell them apart.
  const std::string family = cpuinfo_value("cpu family"), model = cpuinfo_value("model");
  const std::string which =
      family.empty() || model.empty() ? "" : " (family " + family + " model " + model + ")";
  return detail::str_cat(cpu_model(), which, ", ", count_of(machine_cores(), "core"),
                         gpu ? ", a CUDA GPU" : "");
}

std::string describe_rank_machines(const std::vector<std::string>& per_rank) {
  std::vector<std::pair<std::string, std::int64_t>> seen;  // each machine once, in rank order
  for (const auto& m : per_rank) {
    const auto it = std::find_if(seen.begin(), seen.end(), [&](const auto& s) { return s.first == m; });
    if (it == seen.end()) {
      seen.emplace_back(m, 1);
    } else {
      ++it->second;
    }
  }
  const std::string ranks = count_of(static_cast<std::int64_t>(per_rank.size()), "MPI rank");
  if (seen.size() == 1) return seen.front().first + ", " + ranks;
  std::vector<std::string> parts;
  for (const auto& [m, n] : seen) parts.push_back(m + " (" + count_of(n, "rank") + ")");
  return join(parts, " and ") + ", " + ranks;
}

bool cpu_has_flag(const std::string& flag) {
  static const std::string flags = " " + cpuinfo_value("flags") + " ";
  return flags.find(" " + flag + " ") != std::string::npos;
}

}  // namespace canopy
