// A validation split carved out of the training split at training time: the cache stays as
// it is, and which rows are held out depends only on (labels, fraction, seed). Stratified:
// each class gives round(fraction x its rows) of its rows, drawn by a seeded permutation, so
// the validation split has the training split's class balance.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "canopy/datasets/feature_cache.h"

namespace canopy::datasets {

struct Holdout {
  at::Tensor train_rows;       // int64, ascending: the rows that still train
  at::Tensor validation_rows;  // int64, ascending: the rows held out
};

// `classes`: int64 [rows] class of each row (stratifies), or undefined (a plain random draw).
// DataError when the fraction leaves no row on either side.
Holdout stratified_holdout(const at::Tensor& classes, std::int64_t rows, double fraction, std::uint64_t seed);

// The rows `rows` (int64 positions) of `data`, in that order.
SplitData select_rows(const SplitData& data, const at::Tensor& rows);

}  // namespace canopy::datasets
