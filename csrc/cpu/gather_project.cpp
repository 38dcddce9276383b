// CPU kernel of gather_project: the blocked gather-dequantize; the projection
// itself is in csrc/gather_project.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../gather_project.h"

namespace giblet {
namespace {

// Elements per buffer block: 512 K floats (2 MB) stay in cache between the
// gather and the GEMM (measured: 1, 2 and 4 M elements were no faster).
constexpr int64_t kCpuBlockElems = 1 << 19;

template <typename in_t, typename acc_t>
void gather_rows_typed(const at::Tensor& table, const at::Tensor& rows, int64_t col0, int64_t cols, acc_t scale,
                       acc_t shift, at::Tensor& buf) {
  const in_t* src = table.const_data_ptr<in_t>();
  const int64_t row_stride = table.stride(0), col_stride = table.stride(1);
  const int64_t* row_ids = rows.const_data_ptr<int64_t>();
  acc_t* dst = buf.mutable_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows.numel(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const in_t* in = src + row_ids[u] * row_stride + col0 * col_stride;
      acc_t* out = dst + u * cols;
      if (col_stride == 1) {
        for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<acc_t>(in[j]) * scale + shift;
      } else {
        for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<acc_t>(in[j * col_stride]) * scale + shift;
      }
    }
  });
}

void gather_rows_cpu(const at::Tensor& table, const at::Tensor& rows, int64_t col0, int64_t cols, double scale,
                     double shift, at::Tensor& buf) {
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "gather_project_cpu", [&] {
    if (buf.scalar_type() == at::kDouble) {
      gather_rows_typed<scalar_t, double>(table, rows, col0, cols, scale, shift, buf);
    } else {
      gather_rows_typed<scalar_t, float>(table, rows, col0, cols, static_cast<float>(scale),
                                         static_cast<float>(shift), buf);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_project_cpu(const at::Tensor& table, const at::Tensor& index,
                                                                  const at::Tensor& weight,
                                                                  const c10::optional<at::Tensor>& bias, double scale,
                                                                  double shift) {
  return gather_project_forward_impl(table, index, weight, bias, scale, shift, gather_rows_cpu, kCpuBlockElems,
                                     /*parallel_blocks=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_project_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& table, const at::Tensor& rows, const at::Tensor& slot_to_row,
    const at::Tensor& weight, double scale, double shift, bool table_requires_grad) {
  return gather_project_backward_impl(grad_out, table, rows, slot_to_row, weight, scale, shift, table_requires_grad,
                                      gather_rows_cpu, kCpuBlockElems, /*parallel_blocks=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(giblet, CPU, m) {
  m.impl("gather_project", &gather_project_cpu);
  m.impl("gather_project_backward", &gather_project_backward_cpu);
}

}  // namespace giblet
