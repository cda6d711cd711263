#include "canopy/datasets/holdout.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randperm.h>
#include <ATen/ops/sort.h>

#include "canopy/core/error.h"
#include "canopy/core/label_lists.h"

namespace canopy::datasets {

namespace {

void check_fraction(double fraction) {
  CANOPY_CHECK(fraction > 0 && fraction < 1, ConfigError,
               "train.validation_fraction must lie in (0, 1), got ", fraction);
}

// The holdout of `validation_rows` (int64, ascending) out of `rows`; `how` says how each side's
// share was drawn, for the errors.
Holdout holdout_of(at::Tensor validation_rows, std::int64_t rows, double fraction, const char* how) {
  Holdout out;
  out.validation_rows = std::move(validation_rows);
  const std::int64_t v = out.validation_rows.numel();
  CANOPY_CHECK(v > 0, DataError, "train.validation_fraction = ", fraction, " of ", rows,
               " training rows holds out none (", how, "); raise it");
  CANOPY_CHECK(v < rows, DataError, "train.validation_fraction = ", fraction, " of ", rows,
               " training rows leaves none to train on; lower it");
  at::Tensor keep = at::ones({rows}, at::TensorOptions().dtype(at::kBool));
  keep.index_fill_(0, out.validation_rows, false);
  out.train_rows = keep.nonzero().flatten();
  return out;
}

}  // namespace

Holdout stratified_holdout(const at::Tensor& classes, std::int64_t rows, double fraction,
                           std::uint64_t seed) {
  check_fraction(fraction);
  CANOPY_CHECK(!classes.defined() || classes.numel() == rows, DataError, "holdout: ", classes.numel(),
               " labels for ", rows, " rows");
  const auto longs = at::TensorOptions().dtype(at::kLong);
  // Strata: each class's rows (ascending), or every row as one.
  std::vector<at::Tensor> strata;
  if (classes.defined() && rows > 0) {
    const at::Tensor c = classes.to(at::kLong);
    const std::int64_t lo = c.min().item<std::int64_t>(), hi = c.max().item<std::int64_t>();
    for (std::int64_t k = lo; k <= hi; ++k) {
      const at::Tensor members = c.eq(k).nonzero().flatten();
      if (members.numel() > 0) strata.push_back(members);
    }
  } else {
    strata.push_back(at::arange(rows, longs));
  }
  std::vector<at::Tensor> held;
  for (std::size_t s = 0; s < strata.size(); ++s) {
    const std::int64_t n = strata[s].numel();
    const auto k = static_cast<std::int64_t>(std::llround(fraction * static_cast<double>(n)));
    if (k == 0) continue;
    auto gen = at::detail::createCPUGenerator(seed * 1000003ULL + 0x7a11da7eULL + s);
    held.push_back(strata[s].index_select(0, at::randperm(n, gen, longs).slice(0, 0, k)));
  }
  return holdout_of(held.empty() ? at::empty({0}, longs) : std::get<0>(at::sort(at::cat(held))), rows,
                    fraction, "each class gives round(fraction x its rows)");
}

namespace {

// A seeded coin for ties, the same for a row on every machine.
bool coin(std::uint64_t seed, std::int64_t row) {
  std::uint64_t z = seed * 0x9e3779b97f4a7c15ULL + static_cast<std::uint64_t>(row) + 0x6a09e667f3bcc908ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return ((z ^ (z >> 31)) & 1) != 0;
}

}  // namespace

Holdout multilabel_holdout(const at::Tensor& labels, double fraction, std::uint64_t seed) {
  check_fraction(fraction);
  CANOPY_CHECK(labels.dim() == 2, DataError, "holdout: lists of labels must be [rows, labels], got ",
               labels.dim(), " dimensions");
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const std::int64_t rows = y.size(0), k = y.size(1);
  const std::int64_t* v = y.data_ptr<std::int64_t>();
  // Each row's labels and each label's rows, the rows in a seeded order (ties between rows
  // go to the first in it).
  auto gen = at::detail::createCPUGenerator(seed * 1000003ULL + 0x5eC5107ULL);
  const at::Tensor order = at::randperm(rows, gen, at::TensorOptions().dtype(at::kLong));
  const std::int64_t* ord = order.data_ptr<std::int64_t>();
  std::vector<std::int64_t> first(static_cast<std::size_t>(rows) + 1, 0), of_row;
  std::vector<std::vector<std::int64_t>> of_label(static_cast<std::size_t>(k));
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t j = 0; j < k; ++j)
      if (v[r * k + j] != 0) of_row.push_back(j);
    first[r + 1] = static_cast<std::int64_t>(of_row.size());
  }
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t p = first[ord[i]]; p < first[ord[i] + 1]; ++p) of_label[of_row[p]].push_back(ord[i]);
  // What each side still wants: rows, and rows of each label (side 0 validation, 1 training).
  const double share[2] = {fraction, 1 - fraction};
  double want_rows[2];
  std::vector<double> want[2];
  std::vector<std::int64_t> left(static_cast<std::size_t>(k));
  for (int s = 0; s < 2; ++s) {
    want_rows[s] = share[s] * static_cast<double>(rows);
    want[s].resize(static_cast<std::size_t>(k));
    for (std::int64_t j = 0; j < k; ++j) want[s][j] = share[s] * static_cast<double>(of_label[j].size());
  }
  for (std::int64_t j = 0; j < k; ++j) left[j] = static_cast<std::int64_t>(of_label[j].size());
  std::vector<int> side(static_cast<std::size_t>(rows), -1);
  const auto place = [&](std::int64_t r, int s) {
    side[r] = s;
    want_rows[s] -= 1;
    for (std::int64_t p = first[r]; p < first[r + 1]; ++p) {
      want[s][of_row[p]] -= 1;
      --left[of_row[p]];
    }
  };
  // The side that wants more rows of `label` (-1: none) unless it has all the rows it wants and
  // the other does not, then the side that wants more rows, then the coin. (Without the first
  // unless, rows of many labels overfill the validation side: 11 114 rows of 100 000 at 0.1.)
  const auto choose = [&](std::int64_t r, std::int64_t label) {
    if (label >= 0 && want[0][label] != want[1][label]) {
      const int s = want[0][label] > want[1][label] ? 0 : 1;
      return want_rows[s] > 0 || want_rows[1 - s] <= 0 ? s : 1 - s;
    }
    if (want_rows[0] != want_rows[1]) return want_rows[0] > want_rows[1] ? 0 : 1;
    return coin(seed, r) ? 0 : 1;
  };
  // The label of fewest rows left first: its rows go where that label is wanted most.
  for (;;) {
    std::int64_t label = -1;
    for (std::int64_t j = 0; j < k; ++j)
      if (left[j] > 0 && (label < 0 || left[j] < left[label])) label = j;
    if (label < 0) break;
    for (const std::int64_t r : of_label[label])
      if (side[r] < 0) place(r, choose(r, label));
  }
  for (std::int64_t i = 0; i < rows; ++i)  // rows of no label
    if (side[ord[i]] < 0) place(ord[i], choose(ord[i], -1));
  std::vector<std::int64_t> held;
  for (std::int64_t r = 0; r < rows; ++r)
    if (side[r] == 0) held.push_back(r);
  at::Tensor validation =
      at::empty({static_cast<std::int64_t>(held.size())}, at::TensorOptions().dtype(at::kLong));
  if (!held.empty())
    std::memcpy(validation.data_ptr<std::int64_t>(), held.data(), held.size() * sizeof(std::int64_t));
  Holdout out = holdout_of(std::move(validation), rows, fraction,
                           "label by label, each label gives about round(fraction x its rows)");
  for (std::int64_t j = 0; j < k; ++j) {
    const auto& of = of_label[static_cast<std::size_t>(j)];
    if (!of.empty() && std::none_of(of.begin(), of.end(), [&](std::int64_t r) { return side[r] == 0; }))
      out.unheld_labels.push_back(j);
  }
  return out;
}

at::Tensor multi_hot_of_bitmasks(const at::Tensor& masks, std::int64_t labels) {
  CANOPY_CHECK(labels > 0 && labels <= static_cast<std::int64_t>(kMaxBits), DataError, "holdout: ", labels,
               " labels as bitmasks (1 to ", kMaxBits, ")");
  const at::Tensor bits = at::arange(labels, at::TensorOptions().dtype(at::kLong));
  return masks.to(at::kLong).unsqueeze(1).bitwise_right_shift(bits).bitwise_and(1);
}

SplitData select_rows(const SplitData& data, const at::Tensor& rows) {
  SplitData out;
  out.features = data.features.index_select(0, rows);
  out.ids = data.ids.index_select(0, rows);
  if (data.positions.defined()) out.positions = data.positions.index_select(0, rows);
  for (const auto& [src, t] : data.labels) out.labels[src] = t.index_select(0, rows);
  return out;
}

}  // namespace canopy::datasets
