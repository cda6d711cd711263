#include "canopy/runners/tensorboard.h"

#include <unistd.h>

#include <chrono>
#include <cstring>

#include "canopy/core/crc32c.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"

namespace canopy::runners {

namespace {
double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Protocol-buffer wire format, just what Event needs.
void put_varint(std::string& out, std::uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_tag(std::string& out, int field, int wire) {
  put_varint(out, static_cast<std::uint64_t>(field << 3 | wire));
}
template <typename T>
void put_fixed(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // little endian on every platform canopy builds for
  out.append(b, sizeof(T));
}
void put_bytes(std::string& out, int field, const std::string& bytes) {
  put_tag(out, field, 2);
  put_varint(out, bytes.size());
  out += bytes;
}

// Event { double wall_time = 1; int64 step = 2; oneof { string file_version = 3; Summary summary = 5; } }
std::string event_header(double wall_time, std::int64_t step) {
  std::string e;
  put_tag(e, 1, 1);
  put_fixed(e, wall_time);
  put_tag(e, 2, 0);
  put_varint(e, static_cast<std::uint64_t>(step));
  return e;
}

std::uint32_t masked_crc(const std::string& data) {
  const std::uint32_t crc = crc32c(data.data(), data.size());
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}
}  // namespace

EventWriter::EventWriter(const std::string& dir) {
  make_dirs(dir);
  char host[256] = "localhost";
  ::gethostname(host, sizeof host - 1);
  path_ = join_path(
      dir, "events.out.tfevents." + std::to_string(static_cast<long long>(now_seconds())) + "." + host);
  out_.open(path_, std::ios::binary | std::ios::app);
  CANOPY_CHECK(out_, IoError, "cannot write TensorBoard events '", path_, "'");
  std::string e = event_header(now_seconds(), 0);
  put_bytes(e, 3, "brain.Event:2");
  write_record(e);
}

void EventWriter::add_scalar(const std::string& tag, float value, std::int64_t step, double wall_time) {
  // Summary { repeated Value value = 1; }  Value { string tag = 1; float simple_value = 2; }
  std::string v;
  put_bytes(v, 1, tag);
  put_tag(v, 2, 5);
  put_fixed(v, value);
  std::string summary;
  put_bytes(summary, 1, v);
  std::string e = event_header(wall_time > 0 ? wall_time : now_seconds(), step);
  put_bytes(e, 5, summary);
  write_record(e);
}

void EventWriter::write_record(const std::string& event) {
  std::string len;
  put_fixed(len, static_cast<std::uint64_t>(event.size()));
  std::string rec = len;
  put_fixed(rec, masked_crc(len));
  rec += event;
  put_fixed(rec, masked_crc(event));
  out_.write(rec.data(), static_cast<std::streamsize>(rec.size()));
}

void EventWriter::flush() {
  out_.flush();
  CANOPY_CHECK(out_, IoError, "writing TensorBoard events '", path_, "' failed: ", describe_errno(errno));
}

}  // namespace canopy::runners
