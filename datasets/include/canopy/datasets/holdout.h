// A validation split carved out of the training split at training time: the cache stays as
// it is, and which rows are held out depends only on (labels, fraction, seed). Stratified:
// each class gives round(fraction x its rows) of its rows, drawn by a seeded permutation, so
// the validation split has the training split's class balance.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "canopy/datasets/feature_cache.h"

namespace canopy::datasets {

struct Holdout {
  at::Tensor train_rows;       // int64, ascending: the rows that still train
  at::Tensor validation_rows;  // int64, ascending: the rows held out
  // multilabel_holdout: the labels (columns) that some row carries but no held-out row does.
  std::vector<std::int64_t> unheld_labels;
};

// `classes`: int64 [rows] class of each row (stratifies), or undefined (a plain random draw).
// DataError when the fraction leaves no row on either side.
Holdout stratified_holdout(const at::Tensor& classes, std::int64_t rows, double fraction, std::uint64_t seed);

// Lists of labels: `labels` int64 [rows, K] of 0 and 1 (row r carries label j when 1; bitmasks
// through multi_hot_of_bitmasks, core/bitmasks.h).
// Stratified label by label (iterative stratification, Sechidis, Tsoumakas and Vlahavas,
// 2011): the label with the fewest rows not yet placed goes first, each of its rows (in a seeded
// order) to the side that still wants more rows of it (unless that side has all the rows it
// wants and the other does not), then to the side that wants more rows, then by a seeded coin;
// rows of no label last. So each label gives about fraction x its rows and the validation side
// fraction x rows to within a row, where a plain draw (or one class per combination of labels)
// leaves rare labels out. DataError as stratified_holdout.
Holdout multilabel_holdout(const at::Tensor& labels, double fraction, std::uint64_t seed);

// The rows `rows` (int64 positions) of `data`, in that order.
SplitData select_rows(const SplitData& data, const at::Tensor& rows);

}  // namespace canopy::datasets
