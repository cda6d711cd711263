// TensorBoard event files, written directly (no TensorFlow or protobuf dependency): a
// TFRecord stream of `Event` protos, each record framed by its length and masked CRC-32C.
// One writer per run directory; TensorBoard shows each directory as a run, so canopy
// writes one per head (`<out_dir>/tensorboard/<task>/`).
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

namespace canopy::runners {

class EventWriter {
 public:
  // Creates `dir` and an events.out.tfevents.<time>.<host> file in it.
  explicit EventWriter(const std::string& dir);
  void add_scalar(const std::string& tag, float value, std::int64_t step, double wall_time = 0.0);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& event);
  std::string path_;
  std::ofstream out_;
};

}  // namespace canopy::runners
