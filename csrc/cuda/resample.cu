// CUDA kernels of the TR-grid resampling ops: grid_index, resample_codes,
// grid_average (+ backward). The grid arithmetic is csrc/grid.h, the same
// float64 code as on the CPU, so sample positions agree exactly.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../checks.h"
#include "../grid.h"
#include "launch.cuh"

namespace giblet {
namespace {


unsigned blocks_for_cells(int64_t n_cells) { return static_cast<unsigned>(std::min(n_cells, kMaxBlocks)); }

// Threads per cell of grid_average: one per channel, in whole warps.
int threads_for_channels(int64_t C) { return static_cast<int>(std::min<int64_t>(kThreads, (C + 31) / 32 * 32)); }


// ---------------------------------------------------------------- grid_index

__global__ void grid_index_kernel(const double* __restrict__ onsets, int64_t N, int64_t n_samples, double rate,
                                  double window, int64_t n_out, int64_t* __restrict__ out) {
  const int64_t total = N * n_out;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / n_out, k = idx % n_out;
    out[idx] = grid_sample_index(onsets[i], k, window, n_out, rate, n_samples);
  }
}

at::Tensor grid_index_cuda(int64_t n_samples, double rate, const at::Tensor& onsets, double window, int64_t n_out) {
  check_grid_index(n_samples, rate, onsets, window, n_out);
  const c10::cuda::CUDAGuard guard(onsets.device());
  auto on = onsets.contiguous();
  const int64_t N = on.size(0);
  auto out = at::empty({N, n_out}, on.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  grid_index_kernel<<<blocks_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      on.const_data_ptr<double>(), N, n_samples, rate, window, n_out, out.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------ resample_codes

// out[i, q, k] = codes[q, grid_sample_index(i, k)], pad outside the stream.
template <typename code_t>
__global__ void resample_codes_kernel(const code_t* __restrict__ codes, int64_t s0, int64_t s1, int64_t n_q,
                                      int64_t T, const double* __restrict__ onsets, int64_t N, double rate,
                                      double window, int64_t n_out, int64_t pad, int64_t* __restrict__ out) {
  const int64_t total = N * n_q * n_out;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx % n_out;
    const int64_t q = (idx / n_out) % n_q;
    const int64_t i = idx / (n_out * n_q);
    const int64_t position = grid_sample_index(onsets[i], k, window, n_out, rate, T);
    out[idx] = position < 0 ? pad : static_cast<int64_t>(codes[q * s0 + position * s1]);
  }
}

at::Tensor resample_codes_cuda(const at::Tensor& codes, double rate, const at::Tensor& onsets, double window,
                               int64_t n_out, int64_t pad) {
  check_resample_codes(codes, onsets);
  check_grid("resample_codes", rate, onsets, window, n_out);
  const c10::cuda::CUDAGuard guard(codes.device());
  auto on = onsets.contiguous();
  const int64_t N = on.size(0), n_q = codes.size(0), T = codes.size(1);
  auto out = at::empty({N, n_q, n_out}, codes.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  AT_DISPATCH_INTEGRAL_TYPES(codes.scalar_type(), "resample_codes_cuda", [&] {
    resample_codes_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        codes.const_data_ptr<scalar_t>(), codes.stride(0), codes.stride(1), n_q, T, on.const_data_ptr<double>(), N,
        rate, window, n_out, pad, out.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// -------------------------------------------------------------- grid_average

// One block per cell (window i, sub-interval k), one thread per channel. The
// frames and their weights are walked in the CPU kernel's order, with the
// same float64 total, so each output rounds as on the CPU.
template <typename scalar_t, typename acc_t>
__global__ void grid_average_kernel(const scalar_t* __restrict__ values, int64_t T, int64_t C,
                                    const double* __restrict__ onsets, int64_t n_cells, double rate, double window,
                                    int64_t n_out, scalar_t* __restrict__ out) {
  for (int64_t cell = blockIdx.x; cell < n_cells; cell += gridDim.x) {
    const GridCell g = grid_cell(onsets[cell / n_out], cell % n_out, window, n_out, rate, T);
    const acc_t inv = g.total > 0.0 ? static_cast<acc_t>(1.0 / g.total) : acc_t(0);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      acc_t sum = acc_t(0);
      for (int64_t t = g.first; t < g.last; ++t) {
        const double w = grid_overlap(t, g.start, g.stop, rate);
        if (w <= 0.0) continue;
        sum = sum + mul_rn(static_cast<acc_t>(w), static_cast<acc_t>(values[t * C + c]));
      }
      out[cell * C + c] = static_cast<scalar_t>(mul_rn(sum, inv));
    }
  }
}

at::Tensor grid_average_cuda(const at::Tensor& values, double rate, const at::Tensor& onsets, double window,
                             int64_t n_out) {
  check_grid_average(values, onsets);
  check_grid("grid_average", rate, onsets, window, n_out);
  const c10::cuda::CUDAGuard guard(values.device());
  auto on = onsets.contiguous();
  auto v = values.contiguous();
  const int64_t N = on.size(0), T = v.size(0), C = v.size(1);
  auto out = at::empty({N, n_out, C}, v.options());
  if (out.numel() == 0) return out;
  const int64_t n_cells = N * n_out;
  const int threads = threads_for_channels(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "grid_average_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grid_average_kernel<scalar_t, acc_t>
        <<<blocks_for_cells(n_cells), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            v.const_data_ptr<scalar_t>(), T, C, on.const_data_ptr<double>(), n_cells, rate, window, n_out,
            out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The transpose of grid_average: frame t receives, from every cell that
// overlaps it, grad_out[cell] * overlap / total. Cells share frames (windows
// of consecutive TRs overlap), so instead of a scatter with atomics, whose
// rounding would depend on their order, the contributions are listed as
// (frame, cell, weight) entries, sorted by frame and gathered: each frame sums
// its cells in increasing cell order, as the CPU kernel does, so the result is
// deterministic and rounds as on the CPU.

// Per cell: how many frames it contributes to (0 when it overlaps none).
__global__ void grid_cell_span_kernel(const double* __restrict__ onsets, int64_t n_cells, int64_t n_samples,
                                      double rate, double window, int64_t n_out, int64_t* __restrict__ n_frames) {
  for (int64_t cell = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; cell < n_cells;
       cell += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const GridCell g = grid_cell(onsets[cell / n_out], cell % n_out, window, n_out, rate, n_samples);
    n_frames[cell] = g.total > 0.0 ? g.last - g.first : 0;
  }
}

// Entries of each cell, from position end[cell] - n_frames[cell], in frame
// order: the list is ordered by cell, then frame.
template <typename acc_t>
__global__ void grid_cell_entries_kernel(const double* __restrict__ onsets, int64_t n_cells, int64_t n_samples,
                                         double rate, double window, int64_t n_out, const int64_t* __restrict__ n_frames,
                                         const int64_t* __restrict__ end, int64_t* __restrict__ entry_frame,
                                         int64_t* __restrict__ entry_cell, acc_t* __restrict__ entry_weight) {
  for (int64_t cell = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; cell < n_cells;
       cell += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (n_frames[cell] == 0) continue;
    const GridCell g = grid_cell(onsets[cell / n_out], cell % n_out, window, n_out, rate, n_samples);
    int64_t e = end[cell] - (g.last - g.first);
    for (int64_t t = g.first; t < g.last; ++t, ++e) {
      entry_frame[e] = t;
      entry_cell[e] = cell;
      entry_weight[e] = static_cast<acc_t>(grid_overlap(t, g.start, g.stop, rate) / g.total);
    }
  }
}

// grad_values[t, c] = sum over the entries of frame t (sorted stably by
// frame, so in cell order) of weight * grad_out[cell, c].
template <typename scalar_t, typename acc_t>
__global__ void grid_average_backward_kernel(const scalar_t* __restrict__ grad_out, int64_t n_samples, int64_t C,
                                             const int64_t* __restrict__ frame_begin,
                                             const int64_t* __restrict__ order,
                                             const int64_t* __restrict__ entry_cell,
                                             const acc_t* __restrict__ entry_weight,
                                             scalar_t* __restrict__ grad_values) {
  const int64_t total = n_samples * C;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / C, c = idx % C;
    acc_t sum = acc_t(0);
    for (int64_t s = frame_begin[t]; s < frame_begin[t + 1]; ++s) {
      const int64_t e = order[s];
      const acc_t w = entry_weight[e];
      if (w == acc_t(0)) continue;
      sum = sum + mul_rn(w, static_cast<acc_t>(grad_out[entry_cell[e] * C + c]));
    }
    grad_values[idx] = static_cast<scalar_t>(sum);
  }
}

at::Tensor grid_average_backward_cuda(const at::Tensor& grad_out, int64_t n_samples, double rate,
                                      const at::Tensor& onsets, double window, int64_t n_out) {
  check_grid("grid_average_backward", rate, onsets, window, n_out);
  check_grid_average_backward(grad_out, n_samples, onsets, n_out);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  auto on = onsets.contiguous();
  auto g = grad_out.contiguous();
  const int64_t N = on.size(0), C = g.size(2);
  const int64_t n_cells = N * n_out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto grad_values = at::zeros({n_samples, C}, g.options());
  if (grad_values.numel() == 0 || n_cells == 0) return grad_values;

  const auto long_options = on.options().dtype(at::kLong);
  auto n_frames = at::empty({n_cells}, long_options);
  grid_cell_span_kernel<<<blocks_for(n_cells), kThreads, 0, stream>>>(
      on.const_data_ptr<double>(), n_cells, n_samples, rate, window, n_out, n_frames.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto end = at::cumsum(n_frames, 0);
  const int64_t n_entries = end[-1].item<int64_t>();
  if (n_entries == 0) return grad_values;  // no cell overlaps any frame

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "grid_average_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto entry_frame = at::empty({n_entries}, long_options);
    auto entry_cell = at::empty({n_entries}, long_options);
    auto entry_weight = at::empty({n_entries}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    grid_cell_entries_kernel<acc_t><<<blocks_for(n_cells), kThreads, 0, stream>>>(
        on.const_data_ptr<double>(), n_cells, n_samples, rate, window, n_out, n_frames.const_data_ptr<int64_t>(),
        end.const_data_ptr<int64_t>(), entry_frame.mutable_data_ptr<int64_t>(),
        entry_cell.mutable_data_ptr<int64_t>(), entry_weight.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Stable: the entries of one frame keep their cell order.
    at::Tensor sorted_frame, order;
    std::tie(sorted_frame, order) = at::sort(entry_frame, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    // Entries of frame t are sorted positions [frame_begin[t], frame_begin[t + 1]).
    auto frame_begin = at::searchsorted(sorted_frame, at::arange(n_samples + 1, long_options));
    grid_average_backward_kernel<scalar_t, acc_t><<<blocks_for(grad_values.numel()), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), n_samples, C, frame_begin.const_data_ptr<int64_t>(),
        order.const_data_ptr<int64_t>(), entry_cell.const_data_ptr<int64_t>(), entry_weight.const_data_ptr<acc_t>(),
        grad_values.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_values;
}

}  // namespace

TORCH_LIBRARY_IMPL(giblet, CUDA, m) {
  m.impl("grid_index", &grid_index_cuda);
  m.impl("resample_codes", &resample_codes_cuda);
  m.impl("grid_average", &grid_average_cuda);
  m.impl("grid_average_backward", &grid_average_backward_cuda);
}

}  // namespace giblet
