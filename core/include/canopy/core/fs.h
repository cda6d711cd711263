// Crash-safe file helpers: write to a temporary name, fsync, rename into place.
#pragma once

#include <string>
#include <string_view>

namespace canopy {

// Writes `contents` to `path` atomically: readers see the old file or the new one, never
// a partial one, even if the process is killed mid-write.
void write_file_atomic(const std::string& path, std::string_view contents);

// The temporary name used while `path` is being written (same directory, so rename is atomic).
std::string temp_path_for(const std::string& path);

// fsync a file (by path) and then its directory; throws IoError on failure.
void fsync_path(const std::string& path);

// Renames `from` over `to` and fsyncs the directory.
void rename_durable(const std::string& from, const std::string& to);

// Creates a directory and its parents; no error if it exists.
void make_dirs(const std::string& path);

std::string read_file(const std::string& path);

}  // namespace canopy
