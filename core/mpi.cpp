#include "canopy/core/mpi.h"

#include <algorithm>
#include <cstdlib>
#include <numeric>

#include "canopy/core/error.h"

#ifdef CANOPY_WITH_MPI
// The C API only (Open MPI's mpi.h would otherwise pull in its deprecated C++ bindings).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace canopy::mpi {

namespace {
int g_rank = 0;
int g_size = 1;
bool g_active = false;

// Set by the launchers canopy supports: Open MPI's mpirun, and PMIx / PMI (srun --mpi=pmix).
bool launched() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"}) {
    if (std::getenv(v)) return true;
  }
  return false;
}

#ifdef CANOPY_WITH_MPI
void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw Error(detail::str_cat("MPI: ", what, " failed on ", describe_rank(), ": ", std::string(msg, len)));
}
#endif
}  // namespace

Session::Session() {
#ifdef CANOPY_WITH_MPI
  if (!launched()) return;
  int provided = 0;
  check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
  initialized_ = true;
  // Errors come back as codes and become exceptions naming the rank (the default handler
  // would end the job without saying where).
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  g_active = g_size > 1;
#endif
}

Session::~Session() {
#ifdef CANOPY_WITH_MPI
  if (initialized_) MPI_Finalize();
#endif
  g_rank = 0;
  g_size = 1;
  g_active = false;
}

bool built_with_mpi() {
#ifdef CANOPY_WITH_MPI
  return true;
#else
  return false;
#endif
}

std::string library_version() {
#ifdef CANOPY_WITH_MPI
  char text[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(text, &len);
  std::string v(text, static_cast<std::size_t>(len));
  const auto comma = v.find(',');  // "Open MPI v4.1.4, package: ..."
  return comma == std::string::npos ? v : v.substr(0, comma);
#else
  return "none";
#endif
}

int rank() { return g_rank; }
int size() { return g_size; }

int local_size() {
  const char* v = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  const int n = v && g_active ? std::atoi(v) : 1;
  return n > 1 ? n : 1;
}

std::string describe_rank() {
  return g_active ? "rank " + std::to_string(g_rank) + " of " + std::to_string(g_size) : std::string();
}

#ifdef CANOPY_WITH_MPI
void barrier() {
  if (g_active) check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
}

std::string broadcast(const std::string& s) {
  if (!g_active) return s;
  std::uint64_t n = s.size();
  check(MPI_Bcast(&n, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD), "MPI_Bcast");
  std::string out = g_rank == 0 ? s : std::string(n, '\0');
  check(MPI_Bcast(out.data(), static_cast<int>(n), MPI_CHAR, 0, MPI_COMM_WORLD), "MPI_Bcast");
  return out;
}

namespace {
// Every rank's string, on `root` only (root < 0: on every rank).
std::vector<std::string> collect(const std::string& mine, int root) {
  const int n = static_cast<int>(mine.size());
  std::vector<int> sizes(static_cast<std::size_t>(g_size));
  if (root < 0) {
    check(MPI_Allgather(&n, 1, MPI_INT, sizes.data(), 1, MPI_INT, MPI_COMM_WORLD), "MPI_Allgather");
  } else {
    check(MPI_Gather(&n, 1, MPI_INT, sizes.data(), 1, MPI_INT, root, MPI_COMM_WORLD), "MPI_Gather");
  }
  std::vector<int> offsets(sizes.size(), 0);
  std::partial_sum(sizes.begin(), sizes.end() - 1, offsets.begin() + 1);
  std::string all(static_cast<std::size_t>(offsets.back() + sizes.back()), '\0');
  if (root < 0) {
    check(MPI_Allgatherv(mine.data(), n, MPI_CHAR, all.data(), sizes.data(), offsets.data(), MPI_CHAR,
                         MPI_COMM_WORLD),
          "MPI_Allgatherv");
  } else {
    check(MPI_Gatherv(mine.data(), n, MPI_CHAR, all.data(), sizes.data(), offsets.data(), MPI_CHAR, root,
                      MPI_COMM_WORLD),
          "MPI_Gatherv");
    if (g_rank != root) return {};
  }
  std::vector<std::string> out;
  for (std::size_t r = 0; r < sizes.size(); ++r) out.push_back(all.substr(offsets[r], sizes[r]));
  return out;
}
}  // namespace

std::vector<std::string> gather(const std::string& mine) {
  return g_active ? collect(mine, 0) : std::vector{mine};
}
std::vector<std::string> all_gather(const std::string& mine) {
  return g_active ? collect(mine, -1) : std::vector{mine};
}

void all_gather(const float* mine, const std::vector<int>& counts, float* out) {
  if (!g_active) {
    std::copy(mine, mine + counts.at(0), out);
    return;
  }
  std::vector<int> offsets(counts.size(), 0);
  std::partial_sum(counts.begin(), counts.end() - 1, offsets.begin() + 1);
  check(MPI_Allgatherv(mine, counts.at(static_cast<std::size_t>(g_rank)), MPI_FLOAT, out, counts.data(),
                       offsets.data(), MPI_FLOAT, MPI_COMM_WORLD),
        "MPI_Allgatherv");
}

namespace {
// Counts are ints: in pieces of at most 2^30 elements.
template <typename T>
void sum_in_place(T* data, std::int64_t n, MPI_Datatype type) {
  if (!g_active) return;
  for (std::int64_t done = 0; done < n;) {
    const int k = static_cast<int>(std::min<std::int64_t>(n - done, 1 << 30));
    check(MPI_Allreduce(MPI_IN_PLACE, data + done, k, type, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
    done += k;
  }
}
}  // namespace

void all_reduce_sum(float* data, std::int64_t n) { sum_in_place(data, n, MPI_FLOAT); }
void all_reduce_sum(double* data, std::int64_t n) { sum_in_place(data, n, MPI_DOUBLE); }

bool all_equal(std::uint64_t value) {
  if (!g_active) return true;
  std::uint64_t lo = value, hi = value;
  check(MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD), "MPI_Allreduce");
  check(MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD), "MPI_Allreduce");
  return lo == hi;
}

int all_max(int value) {
  if (!g_active) return value;
  check(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD), "MPI_Allreduce");
  return value;
}

namespace {
constexpr int kToldTag = 7;        // the only point-to-point messages canopy sends
int g_told_value = 0;              // what this rank told the others (the sends read it)
std::vector<MPI_Request> g_sends;  // those sends, completed by settle_told
int g_heard = 0;                   // the messages received since the last settle_told
}  // namespace

void tell_others(int value) {
  if (!g_active || !g_sends.empty()) return;
  g_told_value = value;
  g_sends.resize(static_cast<std::size_t>(g_size - 1));
  std::size_t k = 0;
  for (int r = 0; r < g_size; ++r) {
    if (r == g_rank) continue;
    check(MPI_Isend(&g_told_value, 1, MPI_INT, r, kToldTag, MPI_COMM_WORLD, &g_sends[k++]), "MPI_Isend");
  }
}

int told() {
  if (!g_active) return 0;
  int arrived = 0;
  MPI_Status status;
  check(MPI_Iprobe(MPI_ANY_SOURCE, kToldTag, MPI_COMM_WORLD, &arrived, &status), "MPI_Iprobe");
  if (!arrived) return 0;
  int value = 0;
  check(MPI_Recv(&value, 1, MPI_INT, status.MPI_SOURCE, kToldTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE),
        "MPI_Recv");
  ++g_heard;
  return value;
}

void settle_told() {
  if (!g_active) return;
  int tellers = g_sends.empty() ? 0 : 1;
  const int mine = tellers;
  check(MPI_Allreduce(MPI_IN_PLACE, &tellers, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
  for (int value = 0; g_heard < tellers - mine; ++g_heard) {
    check(MPI_Recv(&value, 1, MPI_INT, MPI_ANY_SOURCE, kToldTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE),
          "MPI_Recv");
  }
  if (!g_sends.empty()) {
    check(MPI_Waitall(static_cast<int>(g_sends.size()), g_sends.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
  }
  g_sends.clear();
  g_heard = 0;
}

void abort_job(int code) {
  if (g_active) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}
#else
void barrier() {}
std::string broadcast(const std::string& s) { return s; }
std::vector<std::string> gather(const std::string& mine) { return {mine}; }
std::vector<std::string> all_gather(const std::string& mine) { return {mine}; }
void all_gather(const float* mine, const std::vector<int>& counts, float* out) {
  std::copy(mine, mine + counts.at(0), out);
}
void all_reduce_sum(float*, std::int64_t) {}
void all_reduce_sum(double*, std::int64_t) {}
bool all_equal(std::uint64_t) { return true; }
int all_max(int value) { return value; }
void tell_others(int) {}
int told() { return 0; }
void settle_told() {}
void abort_job(int code) { std::_Exit(code); }
#endif

}  // namespace canopy::mpi
