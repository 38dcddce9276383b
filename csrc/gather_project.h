// gather_project: out[b, s] = weight @ (table[index[b, s]] * scale + shift) + bias,
// exactly 0 where index is -1.
//
// The algorithm is the same on every device; only the gather of a block of
// rows differs (csrc/cpu/gather_project.cpp, csrc/cuda/gather_project.cu):
//   1. Slots that name the same table row are projected once: windows of
//      consecutive TRs share most of their frames, so the unique rows U are
//      usually several times fewer than the B*S slots.
//   2. The projection runs over blocks of D columns: a block of the unique rows
//      is gathered and dequantized into a small buffer (U x cols) and
//      multiplied by the matching block of weight columns. The gathered
//      (B, S, D) input is never materialized, and the GEMMs stay large.
//   3. Backward regathers the same blocks: grad_weight[:, block] =
//      G^T @ rows[:, block], where G sums grad_out over the slots of each row
//      (the scatter-add over repeated rows).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"

namespace giblet {

// Fills buf (U, cols), contiguous, in the compute dtype with
// table[rows[u], col0 + j] * scale + shift.
using GatherRowsFn = void (*)(const at::Tensor& table, const at::Tensor& rows, int64_t col0, int64_t cols,
                              double scale, double shift, at::Tensor& buf);

struct GatherPlan {
  at::Tensor rows;         // (U,) sorted unique table rows named by index
  at::Tensor slot_to_row;  // (B*S,) position in rows, or U for an empty slot
};

inline GatherPlan plan_gather(const at::Tensor& index, int64_t n_rows) {
  auto flat = index.reshape({-1});
  at::Tensor unique_rows, inverse, counts;
  std::tie(unique_rows, inverse, counts) = at::_unique2(flat, /*sorted=*/true, /*return_inverse=*/true,
                                                        /*return_counts=*/false);
  const int64_t lowest = check_index_range(index, unique_rows, n_rows);
  GatherPlan plan;
  if (lowest == -1) {
    int64_t n_unique = unique_rows.numel() - 1;
    plan.rows = unique_rows.slice(0, 1);
    // -1 was the first unique value: shift positions down, send empty slots to U.
    plan.slot_to_row = (inverse - 1).masked_fill_(inverse == 0, n_unique);
  } else {
    plan.rows = unique_rows;
    plan.slot_to_row = inverse.reshape({-1});
  }
  return plan;
}

// Runs body(first, last) over the column blocks [0, n_blocks). With `parallel`
// (the CPU), the blocks are shared out in ONE parallel region, each thread
// gathering into its own buffer and running its GEMMs single-threaded: one
// fork-join per call instead of two per block (a gather, then a threaded GEMM),
// which with ~60 blocks per call stalled whenever another process held a core.
template <typename Body>
inline void for_column_blocks(int64_t n_blocks, bool parallel, const Body& body) {
  if (parallel && n_blocks > 1 && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, n_blocks, 1, body);
  } else {
    body(0, n_blocks);
  }
}

// Columns per block so that the (U, cols) buffer stays near `budget_elems`.
inline int64_t block_columns(int64_t n_unique, int64_t D, int64_t budget_elems) {
  int64_t cols = budget_elems / std::max<int64_t>(n_unique, 1);
  cols = std::max<int64_t>(64, cols / 64 * 64);
  return std::min(cols, D);
}

inline at::Tensor gather_project_forward_impl(const at::Tensor& table, const at::Tensor& index,
                                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                              double scale, double shift, GatherRowsFn gather_rows,
                                              int64_t budget_elems, bool parallel_blocks = false) {
  check_gather_project(table, index, weight, bias);
  const int64_t B = index.size(0), S = index.size(1), P = weight.size(0), D = table.size(1);
  const auto ct = compute_dtype(weight.scalar_type());
  auto plan = plan_gather(index, table.size(0));
  const int64_t U = plan.rows.numel();

  // One spare zero row at position U serves every empty slot.
  auto acc = at::zeros({U + 1, P}, weight.options().dtype(ct));
  if (U > 0) {
    auto projected = acc.narrow(0, 0, U);
    const int64_t cols = block_columns(U, D, budget_elems);
    const int64_t n_blocks = (D + cols - 1) / cols;
    // The chunk of blocks that starts at 0 sums into `projected`; every other chunk into its own
    // partial sum, added after the parallel region (no two threads write the same memory).
    std::vector<at::Tensor> partials(n_blocks);
    for_column_blocks(n_blocks, parallel_blocks, [&](int64_t first, int64_t last) {
      auto buffer = at::empty({U, cols}, weight.options().dtype(ct));
      auto sum = first == 0 ? projected : at::zeros({U, P}, weight.options().dtype(ct));
      for (int64_t b = first; b < last; ++b) {
        const int64_t col0 = b * cols, n = std::min(cols, D - col0);
        auto block = buffer.view({-1}).narrow(0, 0, U * n).view({U, n});
        gather_rows(table, plan.rows, col0, n, scale, shift, block);
        sum.addmm_(block, weight.narrow(1, col0, n).to(ct).t());
      }
      if (first != 0) partials[first] = sum;
    });
    for (const auto& partial : partials) {
      if (partial.defined()) projected.add_(partial);
    }
    if (bias.has_value() && bias->defined()) projected.add_(bias->to(ct));
  }
  return acc.index_select(0, plan.slot_to_row).view({B, S, P}).to(weight.scalar_type());
}

// Returns (grad_table, grad_weight, grad_bias); grad_table is (0,) unless
// table_requires_grad.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_project_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& table, const at::Tensor& index, const at::Tensor& weight,
    double scale, double shift, bool table_requires_grad, GatherRowsFn gather_rows, int64_t budget_elems,
    bool parallel_blocks = false) {
  check_gather_project(table, index, weight, c10::nullopt);
  const int64_t P = weight.size(0), D = table.size(1);
  GIBLET_CHECK(grad_out.dim() == 3 && grad_out.size(0) == index.size(0) && grad_out.size(1) == index.size(1) &&
                  grad_out.size(2) == P,
              "gather_project_backward: grad_out has shape ", shape_str(grad_out), "; expected (", index.size(0), ", ",
              index.size(1), ", ", P, ")");
  GIBLET_CHECK(!table_requires_grad || at::isFloatingType(table.scalar_type()),
              "gather_project_backward: table of dtype ", table.scalar_type(), " cannot take a gradient");
  const auto ct = compute_dtype(weight.scalar_type());
  auto plan = plan_gather(index, table.size(0));
  const int64_t U = plan.rows.numel();

  // Per unique row, the sum of grad_out over its slots; row U collects the
  // empty slots and is dropped.
  auto g = grad_out.reshape({-1, P}).to(ct);
  auto row_grad = at::zeros({U + 1, P}, g.options()).index_add_(0, plan.slot_to_row, g).narrow(0, 0, U);

  auto grad_bias = row_grad.sum(0).to(weight.scalar_type());
  // Every column block is written below; zeros only when nothing is.
  auto grad_weight = U > 0 ? at::empty({P, D}, weight.options().dtype(ct)) : at::zeros({P, D}, weight.options().dtype(ct));
  // Contiguous whatever the table's strides, as the fake kernel promises.
  auto grad_table = table_requires_grad ? at::zeros(table.sizes(), table.options()) : at::empty({0}, table.options());
  if (U > 0) {
    const int64_t cols = block_columns(U, D, budget_elems);
    const int64_t n_blocks = (D + cols - 1) / cols;
    auto row_grad_t = row_grad.t();
    // Each block writes only its own columns of grad_weight and grad_table.
    for_column_blocks(n_blocks, parallel_blocks, [&](int64_t first, int64_t last) {
      auto buffer = at::empty({U, cols}, weight.options().dtype(ct));
      for (int64_t b = first; b < last; ++b) {
        const int64_t col0 = b * cols, n = std::min(cols, D - col0);
        auto block = buffer.view({-1}).narrow(0, 0, U * n).view({U, n});
        gather_rows(table, plan.rows, col0, n, scale, shift, block);
        // Straight into the column block: a GEMM output with row stride D.
        auto grad_block = grad_weight.narrow(1, col0, n);
        at::mm_out(grad_block, row_grad_t, block);
        if (table_requires_grad) {
          auto grad_rows = at::mm(row_grad, weight.narrow(1, col0, n).to(ct)).mul_(scale);
          grad_table.narrow(1, col0, n).index_copy_(0, plan.rows, grad_rows.to(table.scalar_type()));
        }
      }
    });
  }
  return {grad_table, grad_weight.to(weight.scalar_type()), grad_bias};
}

}  // namespace giblet
