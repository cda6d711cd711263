// Crash-safe file helpers: write to a temporary name, fsync, rename into place.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace canopy {

// Writes `contents` to `path` atomically: readers see the old file or the new one, never
// a partial one, even if the process is killed mid-write. With `sync_dir` false the
// directory is not synced: the new name survives a power loss only once the caller has
// called fsync_dir on it (one sync for many files written together).
void write_file_atomic(const std::string& path, std::string_view contents, bool sync_dir = true);

// Writes a file the user named for output (canopy predict --output): a regular file, or a new
// one, atomically, as write_file_atomic (through a symbolic link, the file it names; the link
// stays); a device, FIFO or socket (/dev/stdout, a named pipe) in place, never replaced.
void write_output_file(const std::string& path, std::string_view contents);

// fsync a directory (the names created or renamed in it); throws IoError on failure.
void fsync_dir(const std::string& dir);

// The temporary name used while `path` is being written (same directory, so rename is atomic).
std::string temp_path_for(const std::string& path);

// Removes the temporary files (temp_path_for names) a failed or killed writer left in `dir`.
// Only for a directory the caller holds the lock of (canopy/core/dir_lock.h).
void remove_temporaries(const std::string& dir);

// strerror, and for ENOSPC/EDQUOT a plain "the disk is full (ENOSPC: ...)".
std::string describe_errno(int err);
// describe_errno for a stream's failed write, whose errno may be gone (0): then what it most
// likely was.
std::string describe_write_error(int err);
// Whether the filesystem holding `path` has fewer than `bytes` bytes free for this user
// (statvfs): what a library error that does not keep errno (HDF5's) most likely meant.
bool short_of_space(const std::string& path, std::uint64_t bytes);
// The bytes free for this user on the filesystem holding `path` (statvfs); nullopt when it
// cannot be read.
std::optional<std::uint64_t> free_space(const std::string& path);
// The same said for an error message: "the disk is full (ENOSPC: fewer than N bytes free under
// 'path')" when it is short, "" when it is not.
std::string lack_of_space(const std::string& path, std::uint64_t bytes);
// Whether the filesystem holding `path` is mounted noexec (statvfs): nothing there can be
// run or loaded as a library.
bool mounted_noexec(const std::string& path);

// Why the existing directory `dir` cannot be written ("Read-only file system", "Permission
// denied"), or "" when it can or does not exist: a cache on a read-only mount, or another
// user's, can still be read.
std::string why_not_writable(const std::string& dir);

// Reads exactly `n` bytes at `offset` of `fd` (pread, EINTR retried): IoError when the read
// fails, DataError when the file ends first ("<what> ends early at byte N (truncated)").
void pread_exact(int fd, void* dst, std::uint64_t n, std::uint64_t offset, const std::string& what);
// Writes exactly `n` bytes at `offset` of `fd` (pwrite, EINTR retried); IoError naming `what`
// and the cause (a full disk said plainly) when it fails.
void pwrite_exact(int fd, const void* src, std::uint64_t n, std::uint64_t offset, const std::string& what);
// fsync a file (by path) and then its directory; throws IoError on failure.
void fsync_path(const std::string& path);

// Renames `from` over `to` and fsyncs the directory.
void rename_durable(const std::string& from, const std::string& to);

// Creates a directory and its parents; no error if it exists.
void make_dirs(const std::string& path);

// Plain POSIX path helpers. canopy does not use std::filesystem: the LibTorch shared
// library exports its own copies of some std::filesystem symbols (remove_all among them)
// that interpose on libstdc++'s and crash (see docs/decisions.md).
bool path_exists(const std::string& path);
bool is_regular_file(const std::string& path);
bool is_directory(const std::string& path);
// Size in bytes; DataError naming the file when it does not exist.
std::uint64_t file_size(const std::string& path);
std::string parent_path(const std::string& path);  // "" for a bare file name
std::string join_path(const std::string& dir, const std::string& name);
// Names of the entries in a directory (no "." or ".."), sorted.
std::vector<std::string> list_dir(const std::string& path);
// Removes a file or a directory tree; no error if it does not exist.
void remove_tree(const std::string& path);
// Whether `path` is a symbolic link, dangling or not.
bool is_symlink(const std::string& path);
// `path` made absolute with every link resolved; "" when it (or what it links to) does not exist.
std::string real_path(const std::string& path);
// Makes `link` a symbolic link to `target`; IoError naming both when it cannot.
void make_symlink(const std::string& target, const std::string& link);
// Removes the link `link` (not what it names); IoError when it cannot.
void remove_symlink(const std::string& link);

std::string read_file(const std::string& path);
// The file's contents, or "" when it cannot be read (a kernel interface that may be absent:
// /proc, /sys/fs/cgroup).
std::string read_file_or_empty(const std::string& path);

}  // namespace canopy
