#include "canopy/datasets/holdout.h"

#include <cmath>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randperm.h>
#include <ATen/ops/sort.h>

#include "canopy/core/error.h"

namespace canopy::datasets {

Holdout stratified_holdout(const at::Tensor& classes, std::int64_t rows, double fraction,
                           std::uint64_t seed) {
  CANOPY_CHECK(fraction > 0 && fraction < 1, ConfigError,
               "train.validation_fraction must lie in (0, 1), got ", fraction);
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
  Holdout out;
  out.validation_rows = held.empty() ? at::empty({0}, longs) : std::get<0>(at::sort(at::cat(held)));
  const std::int64_t v = out.validation_rows.numel();
  CANOPY_CHECK(v > 0, DataError, "train.validation_fraction = ", fraction, " of ", rows,
               " training rows holds out none (each class gives round(fraction x its rows)); raise it");
  CANOPY_CHECK(v < rows, DataError, "train.validation_fraction = ", fraction, " of ", rows,
               " training rows leaves none to train on; lower it");
  at::Tensor keep = at::ones({rows}, at::TensorOptions().dtype(at::kBool));
  keep.index_fill_(0, out.validation_rows, false);
  out.train_rows = keep.nonzero().flatten();
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
