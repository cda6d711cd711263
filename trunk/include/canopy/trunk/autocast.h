// torch.autocast as a scope, for C++: what canopy's trunk passes run under (trunk.precision,
// trunk.top_precision).
#pragma once

#include <ATen/autocast_mode.h>

namespace canopy::trunk {

// torch.autocast around one pass of the trunk or its top (backward runs outside it, as in a
// PyTorch training loop): the ops on autocast's lists run in `dtype` (convolutions and matrix
// multiplies in 16 bits; normalisations, softmax and reductions in float32); what the thread
// had set before is restored. float32: nothing is changed.
class Autocast {
 public:
  Autocast(c10::DeviceType type, at::ScalarType dtype) : type_(type), on_(dtype != at::kFloat) {
    if (!on_) return;
    was_enabled_ = at::autocast::is_autocast_enabled(type_);
    was_dtype_ = at::autocast::get_autocast_dtype(type_);
    at::autocast::set_autocast_enabled(type_, true);
    at::autocast::set_autocast_dtype(type_, dtype);
    at::autocast::increment_nesting();
  }
  ~Autocast() {
    if (!on_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(type_, was_enabled_);
    at::autocast::set_autocast_dtype(type_, was_dtype_);
  }
  Autocast(const Autocast&) = delete;
  Autocast& operator=(const Autocast&) = delete;

 private:
  c10::DeviceType type_;
  bool on_;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kFloat;
};

}  // namespace canopy::trunk
