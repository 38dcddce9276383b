// CPU kernels of the TR-grid resampling ops: grid_index, resample_codes,
// grid_average (+ backward). The grid arithmetic is in csrc/grid.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../grid.h"

namespace giblet {
namespace {

std::vector<double> centre_offsets(double window, int64_t n_out) {
  std::vector<double> offsets(n_out);
  for (int64_t k = 0; k < n_out; ++k) offsets[k] = grid_centre_offset(k, window, n_out);
  return offsets;
}

at::Tensor grid_index_cpu(int64_t n_samples, double rate, const at::Tensor& onsets, double window, int64_t n_out) {
  check_grid_index(n_samples, rate, onsets, window, n_out);
  auto on = onsets.contiguous();
  const int64_t N = on.size(0);
  auto out = at::empty({N, n_out}, on.options().dtype(at::kLong));
  const double* o = on.const_data_ptr<double>();
  int64_t* dst = out.mutable_data_ptr<int64_t>();
  const auto offsets = centre_offsets(window, n_out);
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t k = 0; k < n_out; ++k) dst[i * n_out + k] = grid_index_at(o[i], offsets[k], rate, n_samples);
  });
  return out;
}

// Grid positions of one window as runs of consecutive samples: 75 Hz codes
// on a 112-slot grid are runs of ~112 consecutive codes, so each codebook row
// is a few widening copies instead of 112 gathers.
struct Run {
  int64_t first_slot, n_slots, first_sample;  // first_sample -1: pad
};

void position_runs(const int64_t* positions, int64_t n_out, std::vector<Run>& runs) {
  runs.clear();
  for (int64_t k = 0; k < n_out; ++k) {
    const int64_t p = positions[k];
    if (!runs.empty()) {
      Run& last = runs.back();
      const bool pad_run = last.first_sample < 0 && p < 0;
      const bool next_sample = last.first_sample >= 0 && p == last.first_sample + last.n_slots;
      if (pad_run || next_sample) {
        ++last.n_slots;
        continue;
      }
    }
    runs.push_back({k, 1, p < 0 ? -1 : p});
  }
}

template <typename code_t>
void resample_codes_typed(const at::Tensor& codes, const double* onsets, int64_t N, double rate, double window,
                          int64_t n_out, int64_t pad, at::Tensor& out) {
  const int64_t n_q = codes.size(0), T = codes.size(1);
  const int64_t s0 = codes.stride(0), s1 = codes.stride(1);
  const code_t* src = codes.const_data_ptr<code_t>();
  int64_t* dst = out.mutable_data_ptr<int64_t>();
  const auto offsets = centre_offsets(window, n_out);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> positions(n_out);
    std::vector<Run> runs;
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t k = 0; k < n_out; ++k) positions[k] = grid_index_at(onsets[i], offsets[k], rate, T);
      position_runs(positions.data(), n_out, runs);
      for (int64_t q = 0; q < n_q; ++q) {
        int64_t* row = dst + (i * n_q + q) * n_out;
        for (const Run& run : runs) {
          int64_t* out_run = row + run.first_slot;
          if (run.first_sample < 0) {
            std::fill(out_run, out_run + run.n_slots, pad);
          } else if (s1 == 1) {
            const code_t* in = src + q * s0 + run.first_sample;
#pragma omp simd
            for (int64_t j = 0; j < run.n_slots; ++j) out_run[j] = static_cast<int64_t>(in[j]);
          } else {
            const code_t* in = src + q * s0 + run.first_sample * s1;
            for (int64_t j = 0; j < run.n_slots; ++j) out_run[j] = static_cast<int64_t>(in[j * s1]);
          }
        }
      }
    }
  });
}

at::Tensor resample_codes_cpu(const at::Tensor& codes, double rate, const at::Tensor& onsets, double window,
                              int64_t n_out, int64_t pad) {
  check_resample_codes(codes, onsets);
  check_grid("resample_codes", rate, onsets, window, n_out);
  auto on = onsets.contiguous();
  const int64_t N = on.size(0);
  auto out = at::empty({N, codes.size(0), n_out}, codes.options().dtype(at::kLong));
  AT_DISPATCH_INTEGRAL_TYPES(codes.scalar_type(), "resample_codes_cpu", [&] {
    resample_codes_typed<scalar_t>(codes, on.const_data_ptr<double>(), N, rate, window, n_out, pad, out);
  });
  return out;
}

at::Tensor grid_average_cpu(const at::Tensor& values, double rate, const at::Tensor& onsets, double window,
                            int64_t n_out) {
  check_grid_average(values, onsets);
  check_grid("grid_average", rate, onsets, window, n_out);
  auto on = onsets.contiguous();
  auto v = values.contiguous();
  const int64_t N = on.size(0), T = v.size(0), C = v.size(1);
  auto out = at::empty({N, n_out, C}, v.options());
  const double* o = on.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "grid_average_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = v.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * n_out, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(C);
      for (int64_t cell = begin; cell < end; ++cell) {
        const GridCell g = grid_cell(o[cell / n_out], cell % n_out, window, n_out, rate, T);
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t t = g.first; t < g.last; ++t) {
          const double w = grid_overlap(t, g.start, g.stop, rate);
          if (w <= 0.0) continue;
          const scalar_t* frame = src + t * C;
          for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<acc_t>(w) * static_cast<acc_t>(frame[c]);
        }
        const acc_t inv = g.total > 0.0 ? static_cast<acc_t>(1.0 / g.total) : acc_t(0);
        for (int64_t c = 0; c < C; ++c) dst[cell * C + c] = static_cast<scalar_t>(sum[c] * inv);
      }
    });
  });
  return out;
}

at::Tensor grid_average_backward_cpu(const at::Tensor& grad_out, int64_t n_samples, double rate,
                                     const at::Tensor& onsets, double window, int64_t n_out) {
  check_grid("grid_average_backward", rate, onsets, window, n_out);
  check_grid_average_backward(grad_out, n_samples, onsets, n_out);
  auto on = onsets.contiguous();
  auto g = grad_out.contiguous();
  const int64_t N = on.size(0), C = g.size(2);
  auto grad_values = at::zeros({n_samples, C}, g.options());
  const double* o = on.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "grid_average_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = grad_values.mutable_data_ptr<scalar_t>();
    // Threads own disjoint channel ranges, so the scatter needs no atomics.
    at::parallel_for(0, C, 8, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> acc((c1 - c0) * n_samples, acc_t(0));
      for (int64_t cell = 0; cell < N * n_out; ++cell) {
        const GridCell g = grid_cell(o[cell / n_out], cell % n_out, window, n_out, rate, n_samples);
        if (g.total <= 0.0) continue;
        for (int64_t t = g.first; t < g.last; ++t) {
          const acc_t w = static_cast<acc_t>(grid_overlap(t, g.start, g.stop, rate) / g.total);
          if (w == acc_t(0)) continue;
          for (int64_t c = c0; c < c1; ++c)
            acc[(c - c0) * n_samples + t] += w * static_cast<acc_t>(src[cell * C + c]);
        }
      }
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t t = 0; t < n_samples; ++t) dst[t * C + c] = static_cast<scalar_t>(acc[(c - c0) * n_samples + t]);
    });
  });
  return grad_values;
}

}  // namespace

TORCH_LIBRARY_IMPL(giblet, CPU, m) {
  m.impl("grid_index", &grid_index_cpu);
  m.impl("resample_codes", &resample_codes_cpu);
  m.impl("grid_average", &grid_average_cpu);
  m.impl("grid_average_backward", &grid_average_backward_cpu);
}

}  // namespace giblet
