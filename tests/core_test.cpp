#include <gtest/gtest.h>

#include <dlfcn.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/ones.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner.h>
#include <nlohmann/json.hpp>

#include "canopy/core/cgroup.h"
#include "canopy/core/child.h"
#include "canopy/core/crc32c.h"
#include "canopy/core/device.h"
#include "canopy/core/dir_lock.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/json_checksum.h"
#include "canopy/core/memory.h"
#include "canopy/core/memory_fence.h"
#include "canopy/core/progress.h"
#include "canopy/core/sanitizers.h"
#include "canopy/core/sha256.h"
#include "canopy/core/stop.h"
#include "canopy/core/strings.h"
#include "support/test_support.h"

namespace canopy {
namespace {

// canopy links LibTorch's CPU half only (a faster start) and loads the CUDA half when a
// device is chosen on a machine with a driver: before the load nothing of CUDA is there;
// after it, the CUDA device guard and AOTInductor's CUDA runner are registered as when linked.
TEST(Device, LibTorchCudaIsLoadedAtRunTime) {
  EXPECT_FALSE(c10::impl::hasDeviceGuardImpl(c10::kCUDA));
  EXPECT_EQ(torch::inductor::getAOTIModelRunnerRegistry().count("cuda"), 0u);
  ASSERT_EQ(detail::load_torch_cuda_library(), "");
  EXPECT_TRUE(c10::impl::hasDeviceGuardImpl(c10::kCUDA));
  EXPECT_EQ(torch::inductor::getAOTIModelRunnerRegistry().count("cuda"), 1u);
  // Without a driver no GPU is reported and the reason names it; with one, the load succeeded.
  if (dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD) == nullptr &&
      dlopen("libcuda.so.1", RTLD_LAZY) == nullptr) {
    EXPECT_FALSE(cuda_available());
    EXPECT_NE(cuda_backend_status().find("libcuda.so.1"), std::string::npos) << cuda_backend_status();
  } else {
    EXPECT_EQ(cuda_backend_status(), "");
  }
}

// CRC-32C one bit at a time, straight from the definition: the reference canopy's crc32c must
// equal (with SSE4.2: three interleaved streams, then one, then bytes; without: the table).
std::uint32_t crc32c_by_bits(const std::uint8_t* p, std::size_t n, std::uint32_t crc) {
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc & 1) ? (crc >> 1) ^ 0x82f63b78u : crc >> 1;
  }
  return ~crc;
}

// run_in_child with real children: one that returns, ones that throw each kind, and ones that
// die by a real signal after saying what they read.
TEST(RunInChild, ReturnsRethrowsAndTurnsACrashIntoADataErrorNamingTheLastMark) {
  int touched = 0;
  run_in_child(
      "check",
      [&](const ChildMark& mark) {
        mark("a.h5");
        touched = 1;  // the child's copy
      },
      "advice");
  EXPECT_EQ(touched, 0) << "the check ran in this process, not in a child";

  const auto message = [](const std::function<void(const ChildMark&)>& check) -> std::string {
    try {
      run_in_child("HDF5", check, "delete it");
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_THROW(run_in_child(
                   "HDF5", [](const ChildMark&) { throw DataError("bad header in a.h5"); }, ""),
               DataError);
  EXPECT_THROW(run_in_child(
                   "HDF5", [](const ChildMark&) { throw IoError("read failed"); }, ""),
               IoError);
  EXPECT_THROW(run_in_child(
                   "HDF5", [](const ChildMark&) { throw ConfigError("no such key"); }, ""),
               ConfigError);
  EXPECT_EQ(message([](const ChildMark&) { throw DataError("bad header in a.h5"); }), "bad header in a.h5");
  EXPECT_EQ(message([](const ChildMark&) { throw std::runtime_error("other"); }), "other");

  const std::string aborted = message([](const ChildMark& mark) {
    mark("shard 'a.h5'");
    mark("the view 'cache.h5'");
    std::abort();
  });
  EXPECT_EQ(
      aborted,
      "HDF5 crashed (signal 6, SIGABRT) while reading the view 'cache.h5': the file is corrupt in a way "
      "the library does not catch; delete it");
  EXPECT_THROW(run_in_child(
                   "HDF5", [](const ChildMark&) { std::abort(); }, ""),
               DataError);
  const std::string killed = message([](const ChildMark& mark) {
    mark("shard 'b.h5'");
    std::raise(SIGKILL);
  });
  EXPECT_EQ(killed,
            "HDF5 crashed (signal 9, SIGKILL) while reading shard 'b.h5': the file is corrupt in a way the "
            "library does not catch; delete it");
#if !defined(CANOPY_ASAN) && !defined(CANOPY_TSAN)  // a sanitizer's SEGV handler would report it
  const std::string segv = message([](const ChildMark&) { std::raise(SIGSEGV); });
  EXPECT_EQ(segv,
            "HDF5 crashed (signal 11, SIGSEGV): the file is corrupt in a way the library does not "
            "catch; delete it");
#endif
  // A long report arrives whole (more than a pipe's buffer).
  const std::string big(200000, 'x');
  EXPECT_EQ(message([&](const ChildMark&) { throw DataError(big); }), big);
}

TEST(StopOnSignal, TheFirstSignalAsksForAStopTheSecondEndsTheProcessAndIgnoredStaysIgnored) {
  const auto outcome = [](const std::function<void()>& body) -> std::string {
    try {
      run_in_child(
          "stop", [&](const ChildMark&) { body(); }, "");
    } catch (const Error& e) {
      return e.what();
    }
    return "returned";
  };
  // In a child each, since the signals are real and the second one ends the process.
  EXPECT_EQ(
      outcome([] {
        const StopOnSignal stop;
        CANOPY_CHECK(stop_signal() == 0, Error, "a stop before any signal");
        std::raise(SIGTERM);
        CANOPY_CHECK(stop_signal() == SIGTERM, Error, "stop_signal() is ", stop_signal(), " after SIGTERM");
        std::raise(SIGINT);  // a different signal: its first one, only asks again
        CANOPY_CHECK(stop_signal() == SIGINT, Error, "stop_signal() is ", stop_signal(), " after SIGINT");
        std::raise(SIGHUP);  // the terminal gone
        CANOPY_CHECK(stop_signal() == SIGHUP, Error, "stop_signal() is ", stop_signal(), " after SIGHUP");
        std::raise(SIGUSR1);  // what mpirun passes on to its ranks
        CANOPY_CHECK(stop_signal() == SIGUSR1, Error, "stop_signal() is ", stop_signal(), " after SIGUSR1");
        // In one process the agreement is this process's own stop, and no ranks stopped together.
        CANOPY_CHECK(agree_on_stop() == SIGUSR1 && agree_on_stop(0) == 0 && !stopped_together(), Error,
                     "agree_on_stop() in one process");
      }),
      "returned");
  EXPECT_NE(outcome([] {
              const StopOnSignal stop;
              std::raise(SIGTERM);
              std::raise(SIGTERM);
            }).find("SIGTERM"),
            std::string::npos)
      << "the second SIGTERM ends the process";
  EXPECT_EQ(outcome([] {
              std::signal(SIGINT, SIG_IGN);
              const StopOnSignal stop;
              std::raise(SIGINT);
              CANOPY_CHECK(stop_signal() == 0, Error, "an ignored SIGINT asked for a stop");
            }),
            "returned");
  EXPECT_NE(outcome([] {
              { const StopOnSignal stop; }
              std::raise(SIGTERM);  // handed back as it was: the default ends the process
            }).find("SIGTERM"),
            std::string::npos);
  EXPECT_EQ(signal_name(SIGINT), "SIGINT");
  EXPECT_EQ(signal_name(SIGHUP), "SIGHUP");
  EXPECT_EQ(signal_name(SIGUSR1), "SIGUSR1");  // named by the C library
  EXPECT_TRUE(is_stop_status(128 + SIGTERM) && is_stop_status(128 + SIGUSR1) && is_stop_status(130));
  EXPECT_FALSE(is_stop_status(128 + SIGKILL) || is_stop_status(128 + SIGUSR2) || is_stop_status(SIGTERM));
  const Stopped stopped(SIGTERM, "kept");
  EXPECT_EQ(stopped.signal(), SIGTERM);
}

TEST(Crc32c, KnownVectorsAndTheDefinitionAtEveryLengthAndAlignment) {
  EXPECT_EQ(crc32c("123456789", 9), 0xe3069283u);  // the check value of CRC-32C
  EXPECT_EQ(crc32c("", 0), 0u);
  const std::vector<std::uint8_t> zeros(32, 0);
  EXPECT_EQ(crc32c(zeros.data(), 32), 0x8a9136aau);  // RFC 3720 (iSCSI), B.4
  std::mt19937 gen(20261202);
  std::vector<std::uint8_t> buf(3 * 3 * 8192 + 3 * 256 + 64);
  for (auto& b : buf) b = static_cast<std::uint8_t>(gen());
  // Around every boundary of the three-way blocks (3 x 8192, 3 x 256 bytes) and the 8-byte
  // steps, at every alignment of the start.
  std::vector<std::size_t> lengths;
  for (std::size_t base : {std::size_t{0}, std::size_t{768}, std::size_t{24576}, std::size_t{2 * 24576}})
    for (std::size_t d = 0; d < 20; ++d) {
      lengths.push_back(base + d);
      if (base >= d) lengths.push_back(base - d);
    }
  lengths.push_back(3 * 8192 + 2 * 768 + 37);
  for (std::size_t offset = 0; offset < 8; ++offset)
    for (std::size_t n : lengths) {
      ASSERT_LE(offset + n, buf.size());
      ASSERT_EQ(crc32c(buf.data() + offset, n), crc32c_by_bits(buf.data() + offset, n, 0))
          << "length " << n << " at offset " << offset;
    }
  // Extending a checksum equals the checksum of the whole, wherever it is split.
  const std::uint32_t whole = crc32c(buf.data(), buf.size());
  EXPECT_EQ(whole, crc32c_by_bits(buf.data(), buf.size(), 0));
  for (std::size_t cut :
       {std::size_t{1}, std::size_t{7}, std::size_t{1000}, std::size_t{24577}, buf.size() - 3})
    EXPECT_EQ(crc32c(buf.data() + cut, buf.size() - cut, crc32c(buf.data(), cut)), whole)
        << "split at " << cut;
  // One flipped bit anywhere changes it.
  for (std::size_t at : {std::size_t{0}, std::size_t{8191}, std::size_t{24576 + 5}, buf.size() - 1}) {
    buf[at] ^= 0x10;
    EXPECT_NE(crc32c(buf.data(), buf.size()), whole) << "bit flipped at byte " << at;
    buf[at] ^= 0x10;
  }
}

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  Sha256 h;  // a million 'a' fed in uneven pieces
  const std::string chunk(997, 'a');
  std::size_t left = 1000000;
  while (left) {
    const std::size_t n = std::min(left, chunk.size());
    h.update(chunk.data(), n);
    left -= n;
  }
  EXPECT_EQ(h.hex_digest(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, FileMatchesString) {
  testing::TempDir dir;
  const std::string text = "canopy hashes trunk files\n";
  write_file_atomic(dir.file("f.txt"), text);
  EXPECT_EQ(sha256_file(dir.file("f.txt")), sha256_hex(text));
  EXPECT_TRUE(testing::throws_with<IoError>([&] { sha256_file(dir.file("missing")); }, {"missing"}));
}

TEST(Fs, AtomicWriteReplacesAndLeavesNoTemp) {
  testing::TempDir dir;
  const std::string p = dir.file("a.json");
  write_file_atomic(p, "one");
  write_file_atomic(p, "two");
  EXPECT_EQ(read_file(p), "two");
  EXPECT_FALSE(std::ifstream(temp_path_for(p)).good());
}

// flock locks belong to open files, so a second DirLock in this process meets the first
// exactly as a second process would (tests/python/test_faults.py runs two processes).
TEST(DirLock, OneWriterOrManyReaders) {
  testing::TempDir dir;
  {
    const DirLock writer(dir.file("cache"), DirLock::Mode::kWrite, "canopy cache");
    EXPECT_NE(read_file(DirLock::lock_path(dir.file("cache"))).find("canopy cache, pid "), std::string::npos);
    EXPECT_TRUE(testing::throws_with<DataError>(
        [&] { DirLock(dir.file("cache"), DirLock::Mode::kWrite, "canopy train"); },
        {"in use by another canopy process", "canopy cache, pid", "canopy train needs it alone"}));
    EXPECT_TRUE(testing::throws_with<DataError>(
        [&] { DirLock(dir.file("cache"), DirLock::Mode::kRead, "canopy train"); },
        {"while it is being written"}));
  }
  EXPECT_EQ(read_file(DirLock::lock_path(dir.file("cache"))), "") << "a released lock names no holder";
  {
    const DirLock a(dir.file("cache"), DirLock::Mode::kRead, "canopy train");
    const DirLock b(dir.file("cache"), DirLock::Mode::kRead, "canopy inspect");
    EXPECT_THROW(DirLock(dir.file("cache"), DirLock::Mode::kWrite, "canopy cache"), DataError);
  }
  const DirLock again(dir.file("cache"), DirLock::Mode::kWrite, "canopy cache");
  EXPECT_NO_THROW(DirLock(dir.file("never-written"), DirLock::Mode::kRead, "canopy train"));
  EXPECT_FALSE(path_exists(dir.file("never-written"))) << "a reader creates nothing";
  // A read-only filesystem (tests/python/test_faults.py mounts one) is the other answer.
  EXPECT_EQ(why_not_writable(dir.file("cache")), "");
  EXPECT_EQ(why_not_writable(dir.file("never-written")), "") << "what does not exist can be created";
}

// A failed write leaves the old file and no temporary (the disk-full case is in test_faults.py).
TEST(Fs, AFailedAtomicWriteKeepsTheOldFileAndNoTemporary) {
  testing::TempDir dir;
  write_file_atomic(dir.file("f"), "old");
  make_dirs(dir.file("f.tmp." + std::to_string(::getpid())));  // the temporary name is taken by a directory
  EXPECT_THROW(write_file_atomic(dir.file("f"), "new"), IoError);
  EXPECT_EQ(read_file(dir.file("f")), "old");
  remove_tree(dir.file("f.tmp." + std::to_string(::getpid())));
  write_file_atomic(dir.file("g.tmp.123"), "left by a killed writer");
  remove_temporaries(dir.path());
  EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{"f"}));
  EXPECT_NE(describe_errno(ENOSPC).find("the disk is full (ENOSPC"), std::string::npos);
}

// A file the user names for output: a FIFO is written in place (a reader gets the bytes, the
// FIFO stays), a symbolic link keeps pointing at the file it names, /dev/full is an IoError
// saying the disk is full and stays the device.
TEST(Fs, AnOutputFileIsWrittenThroughFifosAndLinksAndNeverReplacesADevice) {
  testing::TempDir dir;
  ASSERT_EQ(::mkfifo(dir.file("pipe").c_str(), 0600), 0);
  std::string got;
  std::thread reader([&] { got = read_file(dir.file("pipe")); });
  write_output_file(dir.file("pipe"), "through the pipe\n");
  reader.join();
  EXPECT_EQ(got, "through the pipe\n");
  struct stat st {};
  ASSERT_EQ(::lstat(dir.file("pipe").c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode)) << "the FIFO was replaced";

  write_file_atomic(dir.file("real.csv"), "old");
  ASSERT_EQ(::symlink("real.csv", dir.file("link.csv").c_str()), 0);
  write_output_file(dir.file("link.csv"), "new");
  ASSERT_EQ(::lstat(dir.file("link.csv").c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode)) << "the link was replaced by a file";
  EXPECT_EQ(read_file(dir.file("real.csv")), "new");
  write_output_file(dir.file("new.csv"), "fresh");
  EXPECT_EQ(read_file(dir.file("new.csv")), "fresh");

  if (::access("/dev/full", W_OK) == 0) {
    EXPECT_TRUE(testing::throws_with<IoError>([] { write_output_file("/dev/full", "x"); },
                                              {"'/dev/full'", "the disk is full"}));
    ASSERT_EQ(::stat("/dev/full", &st), 0);
    EXPECT_TRUE(S_ISCHR(st.st_mode));
  }
}

// The cores a process may use are its affinity mask's (taskset, a cpuset, mpirun's binding),
// not the machine's: a thread pinned to one CPU counts one. (And no more than a CPU quota
// grants: tests/python/test_faults.py.)
TEST(Device, MachineCoresCountsTheAffinityMask) {
  cpu_set_t all;
  ASSERT_EQ(::sched_getaffinity(0, sizeof all, &all), 0);
  EXPECT_EQ(affinity_cores(), CPU_COUNT(&all));
  const auto quota = cpu_quota();
  EXPECT_EQ(machine_cores(), quota ? std::min<std::int64_t>(quota->cpus, CPU_COUNT(&all)) : CPU_COUNT(&all));
  std::int64_t pinned = 0;
  std::thread([&] {
    cpu_set_t one;
    CPU_ZERO(&one);
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &all)) {
        CPU_SET(c, &one);
        break;
      }
    }
    if (::sched_setaffinity(0, sizeof one, &one) == 0) pinned = machine_cores();
  }).join();
  EXPECT_EQ(pinned, 1);
}

TEST(Strings, ParseErrorsNameTheValue) {
  EXPECT_EQ(parse_int(" 42 ", "x"), 42);
  EXPECT_TRUE(
      testing::throws_with<ConfigError>([] { parse_int("4x", "train.epochs"); }, {"train.epochs", "'4x'"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>([] { parse_double("nan", "lr"); }, {"lr", "'nan'"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>([] { parse_bool("maybe", "b"); }, {"'maybe'"}));
  EXPECT_EQ(parse_int_list("1, 2,3", "l"), (std::vector<std::int64_t>{1, 2, 3}));
  EXPECT_EQ(split(" a , b ,c", ','), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(split("  ", ',').empty());
}

TEST(Strings, ClosestMatchSuggestsOnlyAnUnambiguousNearMiss) {
  const std::vector<std::string> keys = {"train.epochs", "train.batch_size", "train.seed", "lr", "lr_decay"};
  EXPECT_EQ(closest_match("train.epoch", keys), "train.epochs");           // a letter missing
  EXPECT_EQ(closest_match("train.batchsize", keys), "train.batch_size");   // the underscore missing
  EXPECT_EQ(closest_match("train.bacth_size", keys), "train.batch_size");  // two letters swapped
  EXPECT_EQ(closest_match("Train.Seed", keys), "train.seed");              // case ignored
  EXPECT_EQ(closest_match("train.speed", keys), "train.seed");
  EXPECT_EQ(closest_match("lt", keys), "lr");
  EXPECT_EQ(closest_match("x", keys), "") << "one letter is never a near miss";
  EXPECT_EQ(closest_match("train.zzzz", keys), "");
  EXPECT_EQ(closest_match("lr_decy", keys), "lr_decay");
  EXPECT_EQ(closest_match("ab", {"aa", "bb"}), "") << "two equally close: no guess";
  EXPECT_EQ(did_you_mean("hiden", {"hidden", "dropout"}), " (did you mean 'hidden'?)");
  EXPECT_EQ(did_you_mean("width", {"hidden", "dropout"}), "");
}

// A job's ranks: one machine said once with the rank count; several each once, in rank order,
// with how many ranks ran there.
TEST(Machines, OfAJobsRanks) {
  EXPECT_EQ(describe_rank_machines({"X, 2 cores", "X, 2 cores", "X, 2 cores"}), "X, 2 cores, 3 MPI ranks");
  EXPECT_EQ(describe_rank_machines({"X, 2 cores", "Y, 1 core", "X, 2 cores"}),
            "X, 2 cores (2 ranks) and Y, 1 core (1 rank), 3 MPI ranks");
  EXPECT_EQ(describe_rank_machines({"Y, 1 core", "X, 2 cores"}),
            "Y, 1 core (1 rank) and X, 2 cores (1 rank), 2 MPI ranks");
}

// Many names in a message: all up to 12, past that the first ten and how many.
TEST(Strings, JoinFirstNamesTheFirstTenOfMany) {
  std::vector<std::string> names;
  for (int i = 0; i < 12; ++i) names.push_back("n" + std::to_string(i));
  EXPECT_EQ(join_first(names, "labels"), join(names, ", "));
  names.push_back("n12");
  EXPECT_EQ(join_first(names, "labels"), "n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, ... 13 labels");
}

TEST(Strings, FormatDurationKeepsTwoDigitsUnderASecond) {
  EXPECT_EQ(format_duration(0.018), "18ms");
  EXPECT_EQ(format_duration(0.0996), "0.10s");
  EXPECT_EQ(format_duration(0.33), "0.33s");
  EXPECT_EQ(format_duration(0.996), "1.0s");
  EXPECT_EQ(format_duration(3.24), "3.2s");
  EXPECT_EQ(format_duration(65), "1m 05s");
  EXPECT_EQ(format_duration(3720), "1h 02m");
}

TEST(Strings, FormatMibKeepsADecimalUnderTen) {
  EXPECT_EQ(format_mib(293.0 * 1024 * 1024), "293 MiB");
  EXPECT_EQ(format_mib(7.5 * 1024 * 1024), "7.5 MiB");
  EXPECT_EQ(format_mib(0), "0.0 MiB");
}

// The files memory_room reads, as the kernel writes them; tests/python/test_faults.py runs
// `canopy train` in a real memory cgroup.
TEST(Memory, RoomFromMeminfoAndCgroupFiles) {
  EXPECT_EQ(
      detail::mem_available("MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   24211872 kB\n"),
      std::uint64_t(24211872) * 1024);
  EXPECT_EQ(detail::mem_available("MemTotal: 1 kB\n"), std::nullopt);
  // v1: no limit is 2^63 rounded to a page; page cache that can be dropped is not use.
  EXPECT_EQ(detail::cgroup_room("9223372036854771712\n", "2185732096\n", "", true), std::nullopt);
  EXPECT_EQ(
      detail::cgroup_room("419430400\n", "150000000\n", "cache 1\ntotal_inactive_file 50000000\n", true),
      std::uint64_t(419430400 - 100000000));
  // v2: "max", or a number; inactive_file under its own name; use above the limit is no room.
  EXPECT_EQ(detail::cgroup_room("max\n", "5\n", "", false), std::nullopt);
  EXPECT_EQ(detail::cgroup_room("1000\n", "400\n", "anon 300\ninactive_file 100\n", false),
            std::uint64_t(700));
  EXPECT_EQ(detail::cgroup_room("1000\n", "1200\n", "", false), std::uint64_t(0));
  EXPECT_EQ(detail::cgroup_room("", "", "", false), std::nullopt) << "no such cgroup file";
  // Page cache counted free: what cannot be reclaimed without swap is anonymous memory and
  // tmpfs, whatever else the usage holds.
  EXPECT_EQ(detail::cgroup_room("1000\n", "900\n", "anon 300\nshmem 50\ninactive_file 100\n", false,
                                PageCache::kFree),
            std::uint64_t(650));
  EXPECT_EQ(detail::cgroup_room("419430400\n", "400000000\n",
                                "rss 1\ntotal_rss 100000000\ntotal_shmem 20000000\ntotal_inactive_file 1\n",
                                true, PageCache::kFree),
            std::uint64_t(419430400 - 120000000));
  EXPECT_EQ(detail::cgroup_room("1000\n", "900\n", "inactive_file 100\n", false, PageCache::kFree),
            std::uint64_t(200))
      << "no anon in memory.stat: counted as in use";
  EXPECT_EQ(detail::meminfo_bytes("SwapTotal:  2048 kB\nSwapFree:   1024 kB\n", "SwapFree"),
            std::uint64_t(1024 * 1024));
  EXPECT_EQ(detail::meminfo_bytes("SwapTotal:  2048 kB\n", "SwapFree"), std::nullopt);
  const auto here = memory_room();
  ASSERT_TRUE(here.has_value()) << "Linux has /proc/meminfo";
  EXPECT_GT(here->bytes, 0u);
  EXPECT_FALSE(here->said.empty());
  const auto halves = memory_room(2);
  ASSERT_TRUE(halves.has_value());
  EXPECT_LE(halves->bytes, here->bytes);
  EXPECT_NE(halves->said.find("shared by the 2 processes"), std::string::npos);
}

// A real RLIMIT_DATA: past the room an allocation fails, LibTorch throws, and the fence says
// how much was asked for; before and after, the same allocation succeeds.
TEST(MemoryFence, RefusesPastTheRoomAndSaysSo) {
  constexpr std::int64_t kMiB = 1 << 20;
  rlimit before{};
  ASSERT_EQ(getrlimit(RLIMIT_DATA, &before), 0);
  c10::Allocator* const allocator = c10::GetCPUAllocator();
  EXPECT_FALSE(MemoryFence(std::nullopt).active()) << "no room, no fence";
  {
    MemoryFence fence(MemoryRoom{256 * kMiB, "a room of 256 MiB"});
    if (!fence.active()) {
      GTEST_SKIP() << "no fence here (a sanitizer's allocator, free swap, or RLIMIT_DATA already below it)";
    }
    at::Tensor small = at::ones({32 * kMiB / 4});  // 32 MiB, touched
    EXPECT_FALSE(fence.refusal());
    EXPECT_FALSE(fence.caused(std::runtime_error("not memory"))) << "nothing refused yet";
    EXPECT_TRUE(fence.caused(std::bad_alloc()));
    try {
      at::Tensor big = at::ones({512 * kMiB / 4});
      ADD_FAILURE() << "512 MiB past a 256 MiB room was allocated";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("allocate"), std::string::npos) << e.what();
      EXPECT_TRUE(fence.caused(e));
    }
    EXPECT_FALSE(fence.caused(IoError("the disk is full"))) << "a failed write says its own";
    const auto refused = fence.refusal();
    ASSERT_TRUE(refused.has_value());
    EXPECT_EQ(refused->asked, std::uint64_t(512 * kMiB));
    EXPECT_GE(refused->grown, std::uint64_t(32 * kMiB));
    EXPECT_LT(refused->grown, std::uint64_t(256 * kMiB));
    EXPECT_NE(c10::GetCPUAllocator(), allocator) << "the allocator is wrapped while the fence lives";
  }
  rlimit after{};
  ASSERT_EQ(getrlimit(RLIMIT_DATA, &after), 0);
  EXPECT_EQ(after.rlim_cur, before.rlim_cur);
  EXPECT_EQ(c10::GetCPUAllocator(), allocator);
  EXPECT_EQ(at::ones({512 * kMiB / 4}).sum().item<float>(), static_cast<float>(512 * kMiB / 4));
}

// v1's cpu.cfs_quota_us over cpu.cfs_period_us, and v2's cpu.max; tests/python/test_faults.py
// runs `canopy train` under a real quota.
TEST(Cgroup, CpusOfAQuotaRoundUp) {
  EXPECT_EQ(cpus_of_quota("100000\n", "100000\n"), 1);
  EXPECT_EQ(cpus_of_quota("150000", "100000"), 2) << "1.5 CPUs";
  EXPECT_EQ(cpus_of_quota("50000", "100000"), 1);
  EXPECT_EQ(cpus_of_quota("-1\n", "100000\n"), std::nullopt) << "v1: no quota";
  EXPECT_EQ(cpus_of_quota("max", "100000"), std::nullopt) << "v2: no quota";
  EXPECT_EQ(cpus_of_quota("", ""), std::nullopt) << "no such file";
  EXPECT_GE(machine_cores(), 1);
  EXPECT_LE(machine_cores(), affinity_cores());
}

TEST(Strings, CountOfAddsAnSUnlessOne) {
  EXPECT_EQ(count_of(1, "epoch"), "1 epoch");
  EXPECT_EQ(count_of(0, "step"), "0 steps");
  EXPECT_EQ(count_of(32, "step"), "32 steps");
}

TEST(Strings, CsvFieldQuotesOnlyWhatNeedsIt) {
  EXPECT_EQ(csv_field("class_linear"), "class_linear");
  EXPECT_EQ(csv_field("probe@hidden=512,256"), "\"probe@hidden=512,256\"");
  EXPECT_EQ(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
  EXPECT_EQ(csv_field("two\nlines"), "\"two\nlines\"");
}

TEST(Strings, PrintableEscapesBytesThatAreNotText) {
  EXPECT_EQ(printable("plain, with\ttab and\nline"), "plain, with\ttab and\nline");
  EXPECT_EQ(printable("caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x8c\xb2"),
            "caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x8c\xb2");
  // The byte a flipped bit made of a space, a lone continuation byte, NUL, CR, DEL and ESC.
  EXPECT_EQ(printable(std::string("8192,\n  \xa0 x\x80y", 13)), "8192,\n  \\xa0 x\\x80y");
  EXPECT_EQ(printable(std::string("a\0b\rc\x7f\x1b", 7)), "a\\x00b\\x0dc\\x7f\\x1b");
  // Overlong forms, a surrogate, past U+10FFFF, and sequences cut short are not UTF-8.
  EXPECT_EQ(printable("\xc0\xaf"), "\\xc0\\xaf");
  EXPECT_EQ(printable("\xe0\x80\xaf"), "\\xe0\\x80\\xaf");
  EXPECT_EQ(printable("\xed\xa0\x80"), "\\xed\\xa0\\x80");
  EXPECT_EQ(printable("\xf4\x90\x80\x80"), "\\xf4\\x90\\x80\\x80");
  EXPECT_EQ(printable("\xe4\xb8"), "\\xe4\\xb8");
  EXPECT_EQ(printable("\xc3"), "\\xc3");
  EXPECT_EQ(printable("\xc3\xa9\xc3"), "\xc3\xa9\\xc3");
}

TEST(Strings, FirstInvalidUtf8FindsTheFirstByteThatIsNotText) {
  EXPECT_EQ(first_invalid_utf8(""), std::nullopt);
  EXPECT_EQ(first_invalid_utf8("caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x8c\xb2"), std::nullopt);
  EXPECT_EQ(first_invalid_utf8(std::string("a\0b", 3)), std::nullopt);  // NUL is a character
  EXPECT_EQ(first_invalid_utf8("caf\xe9"), 3u);                         // Latin-1
  EXPECT_EQ(first_invalid_utf8("\xc3\xa9\xc0\xaf"), 2u);                // an overlong form
  EXPECT_EQ(first_invalid_utf8("ab\xed\xa0\x80"), 2u);                  // a surrogate
  EXPECT_EQ(first_invalid_utf8("ab\xe4\xb8"), 2u);                      // cut short
  EXPECT_EQ(utf8_problem("ok \xc3\xa9"), "");
  EXPECT_EQ(utf8_problem("caf\xe9"), "'caf\\xe9' is not UTF-8 (byte 0xe9 at offset 3)");
  EXPECT_EQ(utf8_problem(std::string(100, 'a') + "\xff" + std::string(100, 'b')),
            "'..." + std::string(24, 'a') + "\\xff" + std::string(23, 'b') +
                "...' is not UTF-8 (byte 0xff at offset 100)");
}

// The manifest, state.json and the head cards carry a CRC-32C of themselves.
TEST(JsonChecksum, SealedDocumentsCheckAndAnyChangeIsFound) {
  nlohmann::ordered_json j{{"task", "fine"}, {"class_names", {"Bag", "Coat"}}, {"target_mean", 0.25}};
  seal_json(j, "crc");
  EXPECT_EQ(j.back(), j.at("crc")) << "the checksum is the last field";
  auto read = nlohmann::ordered_json::parse(j.dump(2));  // as written, then read back
  auto crc = unseal_json(read, "crc");
  ASSERT_TRUE(crc.has_value());
  EXPECT_EQ(crc->first, crc->second);
  EXPECT_FALSE(read.contains("crc"));
  for (const auto& [key, value] :
       {std::pair<std::string, nlohmann::ordered_json>{"class_names", {"BaG", "Coat"}},
        {"target_mean", 0.250001},
        {"task", "fine "}}) {
    auto changed = nlohmann::ordered_json::parse(j.dump());
    changed[key] = value;
    crc = unseal_json(changed, "crc");
    ASSERT_TRUE(crc.has_value());
    EXPECT_NE(crc->first, crc->second) << key;
  }
  auto renamed = nlohmann::ordered_json::parse(j.dump());
  renamed["target_meaN"] = renamed["target_mean"];
  renamed.erase("target_mean");
  crc = unseal_json(renamed, "crc");
  EXPECT_NE(crc->first, crc->second) << "a renamed key";
  auto not_text = nlohmann::ordered_json::parse(j.dump());
  not_text["crc"] = 12;
  crc = unseal_json(not_text, "crc");
  EXPECT_NE(crc->first, crc->second) << "a checksum that is not a string never matches";
  nlohmann::ordered_json older{{"task", "fine"}};
  EXPECT_FALSE(unseal_json(older, "crc").has_value()) << "a document from before the field";
}

TEST(Strings, ExpandEnv) {
  ::setenv("CANOPY_TEST_VAR", "/data", 1);
  ::unsetenv("CANOPY_TEST_UNSET");
  EXPECT_EQ(expand_env("${CANOPY_TEST_VAR}/x"), "/data/x");
  EXPECT_EQ(expand_env("${CANOPY_TEST_UNSET:-/fallback}/x"), "/fallback/x");
  EXPECT_EQ(expand_env("${CANOPY_TEST_UNSET:-${CANOPY_TEST_VAR}/y}/x"), "/data/y/x");
  EXPECT_TRUE(
      testing::throws_with<ConfigError>([] { expand_env("${CANOPY_TEST_UNSET}"); }, {"CANOPY_TEST_UNSET"}));
  EXPECT_TRUE(testing::throws_with<ConfigError>([] { expand_env("${OOPS"); }, {"unterminated"}));
}

TEST(Progress, PlainLinesWhenNotATerminal) {
  testing::TempDir dir;
  std::FILE* f = std::fopen(dir.file("log").c_str(), "w+");
  ASSERT_NE(f, nullptr);
  {
    Progress p("cache", 100, "img", ProgressStyle::kLines, f);
    for (int i = 0; i < 10; ++i) p.advance(10);
    p.message("epoch 1/1: done");
  }
  std::fclose(f);
  const std::string log = read_file(dir.file("log"));
  EXPECT_NE(log.find("cache: 0/100 img"), std::string::npos) << log;
  EXPECT_NE(log.find("cache: 100/100 img (100%)"), std::string::npos) << log;
  EXPECT_NE(log.find("epoch 1/1: done"), std::string::npos) << log;
  EXPECT_EQ(log.find('\r'), std::string::npos) << "no carriage returns in plain-line mode";
}

TEST(Progress, ANoteShowsAtOnceOnTheBarUntilCleared) {
  testing::TempDir dir;
  std::FILE* f = std::fopen(dir.file("log").c_str(), "w+");
  ASSERT_NE(f, nullptr);
  {
    Progress p("train", 100, "steps", ProgressStyle::kBar, f);
    p.advance(50);
    p.set_note("epoch 1: evaluating on 10000 rows");
    p.set_note("");
    p.finish();
  }
  std::fclose(f);
  const std::string log = read_file(dir.file("log"));
  EXPECT_NE(log.find("epoch 1: evaluating on 10000 rows"), std::string::npos)
      << "drawn at once, within the 100 ms between draws: " << log;
  const std::string last = log.substr(log.rfind('\r'));
  EXPECT_NE(last.find("50/100"), std::string::npos) << log;
  EXPECT_EQ(last.find("evaluating"), std::string::npos) << "cleared before the closing line: " << log;
}

TEST(Progress, ALogLineClearsTheBarsLineFirst) {
  ::testing::internal::CaptureStderr();
  {
    Progress p("train", 10, "steps", ProgressStyle::kBar, stderr);
    p.advance(5);
    log_info("autofreeze: freezing blocks.0");
    p.advance(5);
  }
  log_info("after the bar");
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("\r\033[K[canopy] autofreeze: freezing blocks.0\n"), std::string::npos) << err;
  EXPECT_NE(err.find("\n[canopy] after the bar\n"), std::string::npos)
      << "no clearing once it is done: " << err;
}

}  // namespace
}  // namespace canopy
