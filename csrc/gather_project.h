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
//   4. The forward pass returns its plan (the unique rows, each slot's row)
//      next to the projection, and the backward pass takes it: the index is
//      sorted once per step, and the host waits for the device once, in the
//      forward pass (plan_gather), never in the backward pass.
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

// Which table row each slot reads, worked out once by the forward pass and
// handed to the backward pass (the op returns it next to the projection).
struct GatherPlan {
  at::Tensor rows;         // (U,) sorted unique table rows named by index
  at::Tensor slot_to_row;  // (B, S) int64: 1 + position in rows, or 0 for an empty slot
};

// The sorted unique rows of index without at::unique, whose CUDA kernel waits
// for the device to learn U: the values are sorted and numbered by a scan
// (empty slots, -1, sort first and take number 0), and the smallest value, the
// largest and U come back together in ONE device-to-host copy, which is all
// the host waits for. The range check uses the same two ends, so that bad
// indices still raise check_index_range's error.
inline GatherPlan plan_gather(const at::Tensor& index, int64_t n_rows) {
  const auto flat = index.reshape({-1});
  const int64_t N = flat.numel();
  const auto opts = index.options().dtype(at::kLong);
  GatherPlan plan;
  if (N == 0) {
    plan.rows = at::empty({0}, opts);
    plan.slot_to_row = at::empty(index.sizes(), opts);
    return plan;
  }
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(flat);
  // first[i]: sorted[i] starts a new row (the -1 of empty slots never does), so
  // that the inclusive scan numbers the rows 1..U and leaves empty slots at 0.
  auto first = at::empty({N}, opts.dtype(at::kBool));
  auto head = first.narrow(0, 0, 1), rest = first.narrow(0, 1, N - 1);
  at::ne_out(head, sorted.narrow(0, 0, 1), -1);
  if (N > 1) at::ne_out(rest, sorted.narrow(0, 1, N - 1), sorted.narrow(0, 0, N - 1));
  const auto number = at::cumsum(first, 0, at::kLong);
  // lowest, highest and U in one copy.
  const auto ends = at::stack({sorted[0], sorted[N - 1], number[N - 1]}).cpu();
  const int64_t* e = ends.const_data_ptr<int64_t>();
  check_index_range(index, e[0], e[1], n_rows);
  const int64_t U = e[2];
  // Slot i of the sorted order names row number[i]; equal values write equal numbers.
  // (Copied out of the view: rows is returned by the op, whose fake kernel promises a fresh tensor.)
  auto numbered = at::empty({U + 1}, opts).scatter_(0, number, sorted);
  plan.rows = numbered.narrow(0, 1, U).clone();
  plan.slot_to_row = at::empty({N}, opts).scatter_(0, order, number).view(index.sizes());
  return plan;
}

// Checks a plan handed to the backward pass against the table and grad_out
// (B, S, P). Everything but the values is checked on every device; on the CPU
// the values too (the host reads them anyway). On CUDA the range is checked by
// device-side assertions in the kernels that read them, without a sync.
inline void check_gather_plan(const char* op, const at::Tensor& rows, const at::Tensor& slot_to_row,
                              const at::Tensor& table, const at::Tensor& grad_out, int64_t P) {
  check_dim(op, "rows", rows, 1, "(U,) of the table rows gather_project returned");
  check_dim(op, "slot_to_row", slot_to_row, 2, "(B, S) of the plan gather_project returned");
  GIBLET_CHECK(rows.scalar_type() == at::kLong && slot_to_row.scalar_type() == at::kLong, op,
               ": rows and slot_to_row must be int64, got ", rows.scalar_type(), " and ", slot_to_row.scalar_type());
  check_same_device(op, "rows", rows, table, "table");
  check_same_device(op, "slot_to_row", slot_to_row, table, "table");
  check_same_device(op, "grad_out", grad_out, table, "table");
  GIBLET_CHECK(grad_out.dim() == 3 && grad_out.size(0) == slot_to_row.size(0) &&
                   grad_out.size(1) == slot_to_row.size(1) && grad_out.size(2) == P,
               op, ": grad_out has shape ", shape_str(grad_out), "; expected (", slot_to_row.size(0), ", ",
               slot_to_row.size(1), ", ", P, ")");
  if (!table.is_cpu()) return;
  const int64_t T = table.size(0), U = rows.numel();
  if (U > 0) {
    auto range = at::aminmax(rows);
    const int64_t lo = std::get<0>(range).item<int64_t>(), hi = std::get<1>(range).item<int64_t>();
    GIBLET_CHECK(lo >= 0 && hi < T, op, ": rows holds ", lo < 0 ? lo : hi, " but table has T=", T,
                 " rows; expected the rows that gather_project returned");
  }
  if (slot_to_row.numel() > 0) {
    auto range = at::aminmax(slot_to_row);
    const int64_t lo = std::get<0>(range).item<int64_t>(), hi = std::get<1>(range).item<int64_t>();
    GIBLET_CHECK(lo >= 0 && hi <= U, op, ": slot_to_row holds ", lo < 0 ? lo : hi, " but rows has U=", U,
                 " entries; expected 0 (empty slot) or 1..U, the plan that gather_project returned");
  }
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

// Returns (out, rows, slot_to_row): the (B, S, P) projection and the plan it
// used, which the backward pass takes instead of planning again.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_project_forward_impl(
    const at::Tensor& table, const at::Tensor& index, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    double scale, double shift, GatherRowsFn gather_rows, int64_t budget_elems, bool parallel_blocks = false) {
  check_gather_project(table, index, weight, bias);
  const int64_t B = index.size(0), S = index.size(1), P = weight.size(0), D = table.size(1);
  const auto ct = compute_dtype(weight.scalar_type());
  auto plan = plan_gather(index, table.size(0));
  const int64_t U = plan.rows.numel();

  // Row 0 stays zero and serves every empty slot; row 1 + u is rows[u]'s projection.
  auto acc = at::zeros({U + 1, P}, weight.options().dtype(ct));
  if (U > 0) {
    auto projected = acc.narrow(0, 1, U);
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
  auto out = acc.index_select(0, plan.slot_to_row.view({-1})).view({B, S, P}).to(weight.scalar_type());
  return {out, plan.rows, plan.slot_to_row};
}

// Returns (grad_table, grad_weight, grad_bias); grad_table is (0,) unless
// table_requires_grad. rows and slot_to_row are the plan that the forward pass
// returned: nothing is planned again, and the host never waits for the device.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_project_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& table, const at::Tensor& rows, const at::Tensor& slot_to_row,
    const at::Tensor& weight, double scale, double shift, bool table_requires_grad, GatherRowsFn gather_rows,
    int64_t budget_elems, bool parallel_blocks = false) {
  check_gather_table_weight("gather_project_backward", table, weight);
  const int64_t P = weight.size(0), D = table.size(1);
  check_gather_plan("gather_project_backward", rows, slot_to_row, table, grad_out, P);
  GIBLET_CHECK(!table_requires_grad || at::isFloatingType(table.scalar_type()),
              "gather_project_backward: table of dtype ", table.scalar_type(), " cannot take a gradient");
  const auto ct = compute_dtype(weight.scalar_type());
  const int64_t U = rows.numel();

  // Per unique row, the sum of grad_out over its slots; row 0 collects the
  // empty slots and is dropped.
  auto g = grad_out.reshape({-1, P}).to(ct);
  auto row_grad = at::zeros({U + 1, P}, g.options()).index_add_(0, slot_to_row.reshape({-1}), g).narrow(0, 1, U);

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
        gather_rows(table, rows, col0, n, scale, shift, block);
        // Straight into the column block: a GEMM output with row stride D.
        auto grad_block = grad_weight.narrow(1, col0, n);
        at::mm_out(grad_block, row_grad_t, block);
        if (table_requires_grad) {
          auto grad_rows = at::mm(row_grad, weight.narrow(1, col0, n).to(ct)).mul_(scale);
          grad_table.narrow(1, col0, n).index_copy_(0, rows, grad_rows.to(table.scalar_type()));
        }
      }
    });
  }
  return {grad_table, grad_weight.to(weight.scalar_type()), grad_bias};
}

}  // namespace giblet
