// CUDA kernel of gather_project: the blocked gather-dequantize; the projection
// itself (unique rows, blocked GEMMs, backward) is in csrc/gather_project.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../gather_project.h"
#include "launch.cuh"

namespace giblet {
namespace {

// Elements per buffer block: 32 M (128 MB in float32) keeps each addmm large
// enough to fill the GPU while the buffer stays small next to the table.
constexpr int64_t kCudaBlockElems = int64_t(1) << 25;
constexpr int64_t kMaxGridY = 65535;


// buf[u, j] = table[rows[u], col0 + j] * scale + shift. blockIdx.y walks the
// rows, blockIdx.x and the threads the columns, so reads of a row are
// coalesced whenever the table is row-major. One element per thread: the
// path of every table that gather_rows_u8_kernel does not take.
template <typename in_t, typename acc_t>
__global__ void gather_rows_kernel(const in_t* __restrict__ table, int64_t row_stride, int64_t col_stride,
                                   const int64_t* __restrict__ rows, int64_t n_rows, int64_t n_table_rows,
                                   int64_t col0, int64_t cols, acc_t scale, acc_t shift, acc_t* __restrict__ buf) {
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = blockIdx.y; u < n_rows; u += gridDim.y) {
    const int64_t row = rows[u];
    CUDA_KERNEL_ASSERT(row >= 0 && row < n_table_rows);
    const in_t* in = table + row * row_stride + col0 * col_stride;
    acc_t* out = buf + u * cols;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols; j += col_step)
      out[j] = mul_rn(static_cast<acc_t>(in[j * col_stride]), scale) + shift;
  }
}

// 16 bytes of acc_t at p (16-byte aligned): one vector store.
__device__ __forceinline__ void store16(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store16(double* p, const double* v) {
  *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
}

// The uint8 gather with VEC (4 or 16) bytes per thread: one 32-bit or 128-bit
// load of VEC consecutive columns, and 16-byte stores when aligned_out. Needs
// every row's first column (table + row * row_stride + col0) aligned to VEC
// bytes and unit column stride; the last cols % VEC columns take one element
// per thread. Each value is computed as in gather_rows_kernel (a rounded
// multiply, then an add): the buffer is bit-identical to the scalar path's.
template <int VEC, typename acc_t>
__global__ void gather_rows_u8_kernel(const uint8_t* __restrict__ table, int64_t row_stride,
                                      const int64_t* __restrict__ rows, int64_t n_rows, int64_t n_table_rows,
                                      int64_t col0, int64_t cols, acc_t scale, acc_t shift, bool aligned_out,
                                      acc_t* __restrict__ buf) {
  static_assert(VEC == 4 || VEC == 16, "VEC is 4 or 16 bytes");
  using word_t = std::conditional_t<VEC == 16, uint4, uint32_t>;
  constexpr int kWords = VEC / 4;
  constexpr int kPerStore = 16 / static_cast<int>(sizeof(acc_t));
  const int64_t n_vec = cols / VEC;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = blockIdx.y; u < n_rows; u += gridDim.y) {
    const int64_t row = rows[u];
    CUDA_KERNEL_ASSERT(row >= 0 && row < n_table_rows);
    const uint8_t* in = table + row * row_stride + col0;
    acc_t* out = buf + u * cols;
    for (int64_t v = first; v < n_vec; v += col_step) {
      const word_t loaded = *reinterpret_cast<const word_t*>(in + v * VEC);
      uint32_t words[kWords];
      static_assert(sizeof(words) == sizeof(word_t), "one load fills the words");
      memcpy(words, &loaded, sizeof(words));
      acc_t values[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k)  // little-endian: byte k of the load is column v * VEC + k
        values[k] = mul_rn(static_cast<acc_t>((words[k / 4] >> (8 * (k % 4))) & 0xFFu), scale) + shift;
      acc_t* dst = out + v * VEC;
      if (aligned_out) {
#pragma unroll
        for (int q = 0; q < VEC / kPerStore; ++q) store16(dst + q * kPerStore, values + q * kPerStore);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dst[k] = values[k];
      }
    }
    for (int64_t j = n_vec * VEC + first; j < cols; j += col_step)
      out[j] = mul_rn(static_cast<acc_t>(in[j]), scale) + shift;
  }
}

// Bytes per thread the uint8 gather can read at once: 16 or 4 when every
// row's first column is aligned to it, else 1 (the scalar kernel).
inline int u8_vector_width(const at::Tensor& table, int64_t col0) {
  if (table.stride(1) != 1 && table.size(1) > 1) return 1;
  const auto base = reinterpret_cast<uintptr_t>(table.const_data_ptr<uint8_t>()) + static_cast<uintptr_t>(col0);
  const int64_t row_stride = table.size(0) > 1 ? table.stride(0) : 0;
  for (int width : {16, 4}) {
    if (base % width == 0 && row_stride % width == 0) return width;
  }
  return 1;
}

template <typename in_t, typename acc_t>
void gather_rows_typed(const at::Tensor& table, const at::Tensor& rows, int64_t col0, int64_t cols, acc_t scale,
                       acc_t shift, at::Tensor& buf) {
  const int64_t n_rows = rows.numel();
  if (n_rows == 0 || cols == 0) return;
  TORCH_INTERNAL_ASSERT(buf.is_contiguous() && buf.numel() == n_rows * cols);
  const auto row_ids = rows.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n_table_rows = table.size(0);
  if constexpr (std::is_same_v<in_t, uint8_t>) {
    const int width = u8_vector_width(table, col0);
    if (width > 1) {
      acc_t* out = buf.mutable_data_ptr<acc_t>();
      const bool aligned_out =
          reinterpret_cast<uintptr_t>(out) % 16 == 0 && (cols * static_cast<int64_t>(sizeof(acc_t))) % 16 == 0;
      const int64_t threads = std::max<int64_t>(cols / width, 1);
      const int64_t col_blocks = std::min<int64_t>((threads + kThreads - 1) / kThreads, 1024);
      const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(std::min(n_rows, kMaxGridY)));
      const int64_t row_stride = table.size(0) > 1 ? table.stride(0) : 0;
      auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(table.const_data_ptr<uint8_t>(), row_stride,
                                              row_ids.const_data_ptr<int64_t>(), n_rows, n_table_rows, col0, cols,
                                              scale, shift, aligned_out, out);
      };
      if (width == 16) {
        launch(gather_rows_u8_kernel<16, acc_t>);
      } else {
        launch(gather_rows_u8_kernel<4, acc_t>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const int64_t col_blocks = std::min<int64_t>((cols + kThreads - 1) / kThreads, 1024);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(std::min(n_rows, kMaxGridY)));
  gather_rows_kernel<in_t, acc_t><<<grid, kThreads, 0, stream>>>(
      table.const_data_ptr<in_t>(), table.stride(0), table.stride(1), row_ids.const_data_ptr<int64_t>(), n_rows,
      n_table_rows, col0, cols, scale, shift, buf.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gather_rows_cuda(const at::Tensor& table, const at::Tensor& rows, int64_t col0, int64_t cols, double scale,
                      double shift, at::Tensor& buf) {
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, table.scalar_type(), "gather_project_cuda", [&] {
    if (buf.scalar_type() == at::kDouble) {
      gather_rows_typed<scalar_t, double>(table, rows, col0, cols, scale, shift, buf);
    } else {
      gather_rows_typed<scalar_t, float>(table, rows, col0, cols, static_cast<float>(scale),
                                         static_cast<float>(shift), buf);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_project_cuda(const at::Tensor& table, const at::Tensor& index,
                                                                   const at::Tensor& weight,
                                                                   const c10::optional<at::Tensor>& bias,
                                                                   double scale, double shift) {
  // Checked before the guard, so that a CPU tensor gets the device message
  // rather than a failed guard.
  check_gather_project(table, index, weight, bias);
  const c10::cuda::CUDAGuard guard(table.device());
  return gather_project_forward_impl(table, index, weight, bias, scale, shift, gather_rows_cuda, kCudaBlockElems);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_project_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& table, const at::Tensor& rows, const at::Tensor& slot_to_row,
    const at::Tensor& weight, double scale, double shift, bool table_requires_grad) {
  check_gather_table_weight("gather_project_backward", table, weight);
  check_gather_plan("gather_project_backward", rows, slot_to_row, table, grad_out, weight.size(0));
  const c10::cuda::CUDAGuard guard(table.device());
  return gather_project_backward_impl(grad_out, table, rows, slot_to_row, weight, scale, shift, table_requires_grad,
                                      gather_rows_cuda, kCudaBlockElems);
}

}  // namespace

TORCH_LIBRARY_IMPL(giblet, CUDA, m) {
  m.impl("gather_project", &gather_project_cuda);
  m.impl("gather_project_backward", &gather_project_backward_cuda);
}

}  // namespace giblet
