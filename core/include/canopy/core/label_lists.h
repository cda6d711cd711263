#pragma once
// How a list of labels per row (a JSON list column, all_labels over label files or columns) is
// held as one label source: up to kMaxBits labels as one int64 bitmask per row (bit j set when
// the row has label j: a source of 2^K classes, usable as classes, through label_map or by a
// multilabel task); more labels as multi-hot rows, int64 [rows, K] of 0 and 1 (a multilabel
// task's targets as they are). Either way CacheMeta::label_bits names the K labels in order.

#include <cstddef>

namespace canopy {

inline constexpr std::size_t kMaxBits = 62;  // labels in one int64 bitmask (2^62 classes fit int64)
// The most labels one list source holds (multi-hot: 8 bytes per label and row in memory and cache).
inline constexpr std::size_t kMaxListLabels = 4096;
// Whether a list source of `labels` labels is held multi-hot ([rows, labels]) rather than as bitmasks.
inline bool is_multi_hot(std::size_t labels) { return labels > kMaxBits; }
// The values a row holds of a list source of `labels` labels: 1 (its bitmask), or `labels`.
inline std::size_t list_width(std::size_t labels) { return is_multi_hot(labels) ? labels : 1; }

}  // namespace canopy
