// Device choice: "auto" picks CUDA when a GPU is present, else CPU.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>

namespace canopy {

// Parses "auto", "cpu", "cuda", "cuda:N". "cuda" without a GPU is a ConfigError.
c10::Device choose_device(const std::string& spec);
// Whether a CUDA GPU can be used. The first call loads LibTorch's CUDA libraries when the
// machine has an NVIDIA driver (canopy does not link them: see device.cpp).
bool cuda_available();
// Empty once LibTorch's CUDA libraries are loaded; otherwise why they are not.
const std::string& cuda_backend_status();

namespace detail {
// Loads libtorch_cuda.so from LibTorch's directory whether or not a driver is present
// (cuda_available checks first); empty on success, else why not. For tests.
std::string load_torch_cuda_library();
// Loads `file` (e.g. "libtorch.so") from LibTorch's directory, RTLD_GLOBAL; "" or why not.
std::string load_torch_library(const std::string& file);
}  // namespace detail
// A CFS quota on this process's CPU time (a container's CPU limit: cgroup v1
// cpu.cfs_quota_us, v2 cpu.max), as the CPUs it grants, rounded up, and the cgroup that sets
// the smallest; nullopt when none does. `share`: this process's part of them, the ranks
// mpirun put on the machine sharing them (at least 1).
struct CpuQuota {
  std::int64_t cpus = 0;
  std::int64_t share = 0;
  std::string cgroup;
};
std::optional<CpuQuota> cpu_quota();

// The CPU cores this process may use: its affinity mask, as nproc counts them (taskset, a
// container's cpuset, mpirun's binding), std::thread::hardware_concurrency when the mask
// cannot be read, and no more than a CPU quota grants; at least 1.
std::int64_t machine_cores();

// The cores in this process's affinity mask alone (no quota).
std::int64_t affinity_cores();

// The CPU's model name (/proc/cpuinfo), "unknown CPU" when it cannot be read.
std::string cpu_model();
// Where a time was measured, to tell whether two times can be compared: "Intel(R) Xeon(R)
// Processor (family 6 model 167), 2 cores" (the cores this process may use), ", a CUDA GPU"
// added where the work ran on one (`gpu`).
std::string machine_description(bool gpu);
// Where a job of several MPI ranks ran, from every rank's machine_description() in rank
// order: "<machine>, 3 MPI ranks" where all are alike, else each machine once, in the order
// of the ranks, with how many ran there: "<a> (2 ranks) and <b> (1 rank), 3 MPI ranks".
std::string describe_rank_machines(const std::vector<std::string>& per_rank);
// Whether the CPU has an instruction set extension, by its /proc/cpuinfo flag name
// (e.g. "avx512_bf16", "amx_bf16"); false when it cannot be read.
bool cpu_has_flag(const std::string& flag);

}  // namespace canopy
