#include "canopy/datasets/holdout.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randperm.h>
#include <ATen/ops/sort.h>

#include "canopy/core/error.h"

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

// Each row's labels and each label's rows, the rows in a seeded order.
struct LabelIndex {
  std::vector<std::int64_t> order;                 // the rows in the seeded order
  std::vector<std::int64_t> first, labels;         // row r's labels: labels[first[r] .. first[r + 1])
  std::vector<std::vector<std::int64_t>> rows_of;  // each label's rows, in `order`

  LabelIndex(const at::Tensor& y, std::uint64_t seed) {
    const std::int64_t rows = y.size(0), k = y.size(1);
    const std::int64_t* v = y.data_ptr<std::int64_t>();
    auto gen = at::detail::createCPUGenerator(seed * 1000003ULL + 0x5eC5107ULL);
    const at::Tensor perm = at::randperm(rows, gen, at::TensorOptions().dtype(at::kLong));
    order.assign(perm.data_ptr<std::int64_t>(), perm.data_ptr<std::int64_t>() + rows);
    first.assign(static_cast<std::size_t>(rows) + 1, 0);
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t j = 0; j < k; ++j)
        if (v[r * k + j] != 0) labels.push_back(j);
      first[r + 1] = static_cast<std::int64_t>(labels.size());
    }
    rows_of.resize(static_cast<std::size_t>(k));
    for (const std::int64_t r : order)
      for (std::int64_t p = first[r]; p < first[r + 1]; ++p) rows_of[labels[p]].push_back(r);
  }
};

// Iterative stratification over two sides, 0 (validation) and 1 (training): what each side
// still wants (rows, and rows of each label) and where each row went.
class LabelByLabel {
 public:
  LabelByLabel(const LabelIndex& index, double fraction, std::uint64_t seed)
      : index_(index), seed_(seed), side_(index.order.size(), -1) {
    const double share[2] = {fraction, 1 - fraction};
    for (int s = 0; s < 2; ++s) {
      want_rows_[s] = share[s] * static_cast<double>(index.order.size());
      for (const auto& of : index.rows_of) want_[s].push_back(share[s] * static_cast<double>(of.size()));
    }
    for (const auto& of : index.rows_of) left_.push_back(static_cast<std::int64_t>(of.size()));
  }

  // The label of fewest rows left first, its rows where that label is wanted most; rows of no
  // label last. Returns each row's side.
  const std::vector<int>& run() {
    for (std::int64_t label = rarest(); label >= 0; label = rarest())
      for (const std::int64_t r : index_.rows_of[label])
        if (side_[r] < 0) place(r, choose(r, label));
    for (const std::int64_t r : index_.order)
      if (side_[r] < 0) place(r, choose(r, -1));
    return side_;
  }

 private:
  // The label with the fewest unplaced rows (the first of a tie), -1 when none has any.
  std::int64_t rarest() const {
    std::int64_t label = -1;
    for (std::size_t j = 0; j < left_.size(); ++j)
      if (left_[j] > 0 && (label < 0 || left_[j] < left_[label])) label = static_cast<std::int64_t>(j);
    return label;
  }

  // The side that wants more rows of `label` (-1: none) unless it has all the rows it wants and
  // the other does not, then the side that wants more rows, then the coin. (Without the first
  // unless, rows of many labels overfill the validation side: 11 114 rows of 100 000 at 0.1.)
  int choose(std::int64_t r, std::int64_t label) const {
    if (label >= 0 && want_[0][label] != want_[1][label]) {
      const int s = want_[0][label] > want_[1][label] ? 0 : 1;
      return want_rows_[s] > 0 || want_rows_[1 - s] <= 0 ? s : 1 - s;
    }
    if (want_rows_[0] != want_rows_[1]) return want_rows_[0] > want_rows_[1] ? 0 : 1;
    return coin(seed_, r) ? 0 : 1;
  }

  void place(std::int64_t r, int s) {
    side_[r] = s;
    want_rows_[s] -= 1;
    for (std::int64_t p = index_.first[r]; p < index_.first[r + 1]; ++p) {
      want_[s][index_.labels[p]] -= 1;
      --left_[index_.labels[p]];
    }
  }

  const LabelIndex& index_;
  std::uint64_t seed_;
  double want_rows_[2] = {0, 0};
  std::vector<double> want_[2];
  std::vector<std::int64_t> left_;  // each label's rows not yet placed
  std::vector<int> side_;           // each row's side, -1 until placed
};

}  // namespace

Holdout multilabel_holdout(const at::Tensor& labels, double fraction, std::uint64_t seed) {
  check_fraction(fraction);
  CANOPY_CHECK(labels.dim() == 2, DataError, "holdout: lists of labels must be [rows, labels], got ",
               labels.dim(), " dimensions");
  const LabelIndex index(labels.to(at::kLong).contiguous(), seed);
  const std::vector<int> side = LabelByLabel(index, fraction, seed).run();
  const at::Tensor sides =
      at::from_blob(const_cast<int*>(side.data()), {static_cast<std::int64_t>(side.size())}, at::kInt);
  at::Tensor validation = sides.eq(0).nonzero().flatten();
  Holdout out = holdout_of(std::move(validation), labels.size(0), fraction,
                           "label by label, each label gives about round(fraction x its rows)");
  for (std::size_t j = 0; j < index.rows_of.size(); ++j) {
    const auto& of = index.rows_of[j];
    if (!of.empty() && std::none_of(of.begin(), of.end(), [&](std::int64_t r) { return side[r] == 0; }))
      out.unheld_labels.push_back(static_cast<std::int64_t>(j));
  }
  return out;
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
