// Files that may be gzip-compressed, read as they are or through zlib (gzopen reads a plain
// file as it is): idx files, and tables and texts saved as FILE.csv.gz, FILE.jsonl.gz.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <istream>
#include <streambuf>
#include <string>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"

namespace canopy::datasets {

class GzFile {
 public:
  // `what` names the file in messages ("table of texts"); a folder is refused (it would open
  // and read as nothing).
  explicit GzFile(const std::string& path, const std::string& what = "") : path_(path) {
    const std::string named = what.empty() ? "'" + path + "'" : what + " '" + path + "'";
    CANOPY_CHECK(!is_directory(path), DataError, named, " is a folder: name the file");
    f_ = gzopen(path.c_str(), "rb");
    CANOPY_CHECK(f_ != nullptr, DataError, "cannot open ", named, ": ", std::strerror(errno));
    gzbuffer(f_, 1 << 17);
  }
  ~GzFile() { gzclose(f_); }
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;
  // Reads up to n bytes; returns how many were read (fewer only at the end). A damaged or cut
  // compressed stream is a DataError naming the file, before the bytes of its last part.
  std::size_t read(char* dst, std::size_t n) {
    std::size_t got = 0;
    while (got < n) {
      const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(n - got, 1u << 30));
      const int r = gzread(f_, dst + got, chunk);
      int err = Z_OK;
      if (r < 0) {
        const std::string why = reason(err);
        throw DataError(detail::str_cat("error reading '", path_, "': ", why,
                                        gzdirect(f_) ? "" : " (the gzip stream is damaged)"));
      }
      if (r == 0) {
        // The input ended: where it ended inside a gzip stream (a cut file), zlib says so only
        // through gzerror, after handing over what it could decompress.
        const std::string why = reason(err);
        CANOPY_CHECK(err != Z_BUF_ERROR, DataError, "error reading '", path_, "': ", why,
                     " (the gzip stream is cut short)");
        break;
      }
      got += static_cast<std::size_t>(r);
    }
    return got;
  }
  // Whether the file is gzip-compressed (not read as it is).
  bool compressed() { return gzdirect(f_) == 0; }
  // Decompresses the whole file once, keeping nothing, then starts again from its first byte:
  // a damaged stream is found by its check value only at its end, and a reader taking rows as
  // they come would otherwise report a garbled row (or keep it) before zlib reports the damage.
  void check_whole() {
    char scratch[1 << 16];
    while (read(scratch, sizeof scratch) == sizeof scratch) {
    }
    CANOPY_CHECK(gzrewind(f_) == 0, DataError, "cannot read '", path_, "' again after checking it");
  }
  bool at_end() {
    char c;
    return gzread(f_, &c, 1) == 0;
  }

 private:
  // zlib's message for the last error (without the path it starts with); `err` its code.
  std::string reason(int& err) {
    const char* msg = gzerror(f_, &err);
    std::string out = msg ? msg : "?";
    if (out.rfind(path_ + ": ", 0) == 0) out.erase(0, path_.size() + 2);
    return out;
  }

  std::string path_;
  gzFile f_ = nullptr;
};

// A GzFile as an std::istream (getline and the like), decompressed as it is read, after one
// pass that checks the whole compressed stream (GzFile::check_whole).
class GzStream : public std::istream {
 public:
  explicit GzStream(const std::string& path, const std::string& what = "")
      : std::istream(nullptr), buf_(path, what) {
    rdbuf(&buf_);
    exceptions(std::ios::badbit);  // a damaged stream's DataError reaches the reader, not a short read
  }

 private:
  class Buf : public std::streambuf {
   public:
    Buf(const std::string& path, const std::string& what) : file_(path, what) {
      if (file_.compressed()) file_.check_whole();
    }

   protected:
    int_type underflow() override {
      if (gptr() < egptr()) return traits_type::to_int_type(*gptr());
      const std::size_t got = file_.read(data_, sizeof data_);
      if (got == 0) return traits_type::eof();
      setg(data_, data_, data_ + got);
      return traits_type::to_int_type(*gptr());
    }

   private:
    GzFile file_;
    char data_[1 << 16];
  };
  Buf buf_;
};

}  // namespace canopy::datasets
