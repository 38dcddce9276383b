// The giblet operator library: every op is declared here, once. Kernels are
// registered per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta)
// kernels and autograd are registered from giblet/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(giblet, m) {
  // (out, rows, slot_to_row): out (B, S, P) = weight @ (table[index] * scale + shift) + bias, 0 where
  // index == -1; rows (U,) int64, the sorted unique table rows named by index; slot_to_row (B, S) int64,
  // 1 + the position of each slot's row in rows, or 0 for an empty slot. The plan (rows, slot_to_row) is
  // kept for gather_project_backward, which then needs no planning of its own.
  m.def(
      "gather_project(Tensor table, Tensor index, Tensor weight, Tensor? bias, float scale, float shift) "
      "-> (Tensor, Tensor, Tensor)");
  // (grad_table or (0,), grad_weight, grad_bias)
  m.def(
      "gather_project_backward(Tensor grad_out, Tensor table, Tensor rows, Tensor slot_to_row, Tensor weight, "
      "float scale, float shift, bool table_requires_grad) -> (Tensor, Tensor, Tensor)");

  // (N, n_out) int64 sample index at each sub-interval centre of each TR window, -1 outside.
  m.def("grid_index(int n_samples, float rate, Tensor onsets, float window, int n_out) -> Tensor");
  // (N, n_q, n_out) int64 codes at grid_index positions, pad outside.
  m.def("resample_codes(Tensor codes, float rate, Tensor onsets, float window, int n_out, int pad) -> Tensor");
  // (N, n_out, C) overlap-weighted average of (T, C) frames over each sub-interval.
  m.def("grid_average(Tensor values, float rate, Tensor onsets, float window, int n_out) -> Tensor");
  m.def(
      "grid_average_backward(Tensor grad_out, int n_samples, float rate, Tensor onsets, float window, int n_out) "
      "-> Tensor");

  // (out, pre): out = act(x @ weight^T + bias) * mask; pre = x @ weight^T + bias
  // kept for the backward pass ((0,) for identity).
  m.def(
      "bottleneck(Tensor x, Tensor weight, Tensor? bias, Tensor? mask, str activation) -> (Tensor, Tensor)");
  // (grad_x, grad_weight, grad_bias or (0,))
  m.def(
      "bottleneck_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor pre, Tensor? mask, str activation, "
      "bool bias_requires_grad) -> (Tensor, Tensor, Tensor)");
}
