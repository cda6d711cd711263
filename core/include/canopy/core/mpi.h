// The processes of one job launched by `mpirun` (or `srun --mpi=pmix`): canopy's only
// distributed layer, over MPI's world communicator. A process started without a launcher is
// a world of one, never calls MPI and behaves exactly as it would in a build without it.
//
// Only the thread that made the Session calls MPI (MPI_THREAD_FUNNELED); every call below is
// collective (every rank makes it, in the same order) unless it says otherwise.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace canopy::mpi {

// Joins the launcher's job for the process's lifetime (MPI_Init_thread .. MPI_Finalize) when
// it was started by one; a no-op otherwise, and in a build without MPI.
class Session {
 public:
  Session();
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

 private:
  bool initialized_ = false;
};

// Whether this build has MPI at all (CANOPY_WITH_MPI).
bool built_with_mpi();
// The MPI library, e.g. "Open MPI v4.1.4" ("none" without MPI). Local; needs no Session.
std::string library_version();
// This process's rank and the number of ranks (0 and 1 outside a launched job). Local.
int rank();
int size();
// The ranks on this machine (Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE), 1 outside a launched
// job: they share its memory.
int local_size();
// More than one rank.
inline bool distributed() { return size() > 1; }
// "rank 1 of 3" (empty outside a job), for messages. Local.
std::string describe_rank();

void barrier();
// Rank 0's `s` on every rank.
std::string broadcast(const std::string& s);
// On rank 0: every rank's string, in rank order; elsewhere: empty.
std::vector<std::string> gather(const std::string& mine);
// Every rank's string, in rank order, on every rank.
std::vector<std::string> all_gather(const std::string& mine);
// Every rank's `counts[rank]` floats, concatenated in rank order, on every rank (`out` holds
// the sum of counts).
void all_gather(const float* mine, const std::vector<int>& counts, float* out);
// In place: the element-wise sum over ranks.
void all_reduce_sum(float* data, std::int64_t n);
void all_reduce_sum(double* data, std::int64_t n);
// Whether every rank passed the same value.
bool all_equal(std::uint64_t value);
// The largest value any rank passed.
int all_max(int value);
// For ranks that do not go in step (a cache's, each through its own shards) to hear of an
// event on another rank, such as a stop, at a point of their own choosing:
// tell_others(value) sends `value` to every other rank without waiting (the first call only,
// until settle_told); told() returns a value another rank sent and this one had not yet
// received, or 0, without waiting (not collective); settle_told(), collective, once every
// rank is past its last told(), receives what is left and completes the sends.
void tell_others(int value);
int told();
void settle_told();
// Ends every rank of the job at once with `code` (MPI_Abort); exits the process outside one.
[[noreturn]] void abort_job(int code);

}  // namespace canopy::mpi
