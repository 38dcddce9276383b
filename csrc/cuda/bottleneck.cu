// CUDA kernel of bottleneck: out = act(x @ weight^T + bias) * mask.
//
// Unlike the CPU kernel, which streams only the kept weight rows, the GPU runs
// one cuBLAS GEMM over all V rows in the compute dtype, the bias added by the
// GEMM itself (addmm), then one fused epilogue for the activation and the
// lesion mask (none at all for identity without a mask): skipping lesioned
// rows would need a gather of weight that costs more than the multiply it
// saves. The epilogue gives lesioned units exactly 0 in both `out` and `pre`,
// as the CPU streaming kernel does.
// Backward: one fused elementwise kernel for grad_pre, then two GEMMs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../checks.h"
#include "launch.cuh"

namespace giblet {
namespace {


constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

// Math functions by acc type: the float versions must not round through double.
__device__ __forceinline__ float dev_erf(float z) { return erff(z); }
__device__ __forceinline__ double dev_erf(double z) { return erf(z); }
__device__ __forceinline__ float dev_exp(float z) { return expf(z); }
__device__ __forceinline__ double dev_exp(double z) { return exp(z); }
__device__ __forceinline__ float dev_tanh(float z) { return tanhf(z); }
__device__ __forceinline__ double dev_tanh(double z) { return tanh(z); }

// The same formulas as the CPU kernel: exact (erf) gelu, tanh' = 1 - tanh^2.
template <Activation ACT, typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t z) {
  if constexpr (ACT == Activation::gelu) {
    return acc_t(0.5) * z * (acc_t(1) + dev_erf(z * acc_t(kInvSqrt2)));
  } else if constexpr (ACT == Activation::tanh) {
    return dev_tanh(z);
  } else {
    return z;
  }
}

template <Activation ACT, typename acc_t>
__device__ __forceinline__ acc_t activation_slope(acc_t z) {
  if constexpr (ACT == Activation::gelu) {
    return acc_t(0.5) * (acc_t(1) + dev_erf(z * acc_t(kInvSqrt2))) +
           z * acc_t(kInvSqrt2Pi) * dev_exp(acc_t(-0.5) * z * z);
  } else if constexpr (ACT == Activation::tanh) {
    const acc_t t = dev_tanh(z);
    return acc_t(1) - t * t;
  } else {
    return acc_t(1);
  }
}

// Calls f(std::integral_constant<Activation, act>), so that kernels take the
// activation as a template argument.
template <typename F>
void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::gelu: f(std::integral_constant<Activation, Activation::gelu>{}); break;
    case Activation::tanh: f(std::integral_constant<Activation, Activation::tanh>{}); break;
    default: f(std::integral_constant<Activation, Activation::identity>{}); break;
  }
}

// z (B, V) holds pre = x @ weight^T + bias on entry (the bias added by the
// GEMM). Writes out = act(pre) (0 where the unit is lesioned) in the input
// dtype and, unless identity, zeroes pre in place for lesioned units.
template <Activation ACT, typename scalar_t, typename acc_t>
__global__ void bottleneck_epilogue_kernel(acc_t* __restrict__ z, const bool* __restrict__ keep,
                                           scalar_t* __restrict__ out, int64_t n, int64_t V) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (keep != nullptr && !keep[idx % V]) {
      out[idx] = static_cast<scalar_t>(acc_t(0));
      if constexpr (ACT != Activation::identity) z[idx] = acc_t(0);
      continue;
    }
    out[idx] = static_cast<scalar_t>(activate<ACT>(z[idx]));
  }
}

// grad_pre = grad_out * act'(pre), exactly 0 for lesioned units.
template <Activation ACT, typename grad_t, typename acc_t>
__global__ void pre_grad_kernel(const grad_t* __restrict__ grad_out, const acc_t* __restrict__ pre,
                                const bool* __restrict__ keep, acc_t* __restrict__ grad_pre, int64_t n, int64_t V) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (keep != nullptr && !keep[idx % V]) {
      grad_pre[idx] = acc_t(0);
      continue;
    }
    acc_t g = static_cast<acc_t>(grad_out[idx]);
    if constexpr (ACT != Activation::identity) g = g * activation_slope<ACT>(pre[idx]);
    grad_pre[idx] = g;
  }
}

std::tuple<at::Tensor, at::Tensor> bottleneck_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias,
                                                   const c10::optional<at::Tensor>& mask,
                                                   c10::string_view activation) {
  check_bottleneck(x, weight, bias, mask);
  const Activation act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto ct = compute_dtype(x.scalar_type());
  const int64_t B = x.size(0), V = weight.size(0);

  // pre (B, V) in the compute dtype, the bias added by the GEMM (cuBLASLt's bias
  // epilogue where torch uses it) instead of by a kernel of its own.
  const auto x_c = x.to(ct);
  const auto w_t = weight.to(ct).t();
  const bool has_bias = bias.has_value() && bias->defined();
  auto z = (has_bias ? at::addmm(bias->to(ct), x_c, w_t) : at::mm(x_c, w_t)).contiguous();
  const bool has_mask = mask.has_value() && mask->defined();
  auto pre = act == Activation::identity ? at::empty({0}, z.options()) : z;
  // Identity, nothing lesioned: the GEMM's result is the output.
  if (act == Activation::identity && !has_mask) return {z.to(x.scalar_type()), pre};

  auto out = at::empty({B, V}, x.options());
  at::Tensor keep;
  if (has_mask) keep = mask->contiguous();
  const int64_t n = B * V;
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bottleneck_cuda", [&] {
      using acc_t = compute_t<scalar_t>;
      with_activation(act, [&](auto tag) {
        constexpr Activation A = decltype(tag)::value;
        bottleneck_epilogue_kernel<A, scalar_t, acc_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            z.mutable_data_ptr<acc_t>(), keep.defined() ? keep.const_data_ptr<bool>() : nullptr,
            out.mutable_data_ptr<scalar_t>(), n, V);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bottleneck_backward_cuda(const at::Tensor& grad_out,
                                                                        const at::Tensor& x, const at::Tensor& weight,
                                                                        const at::Tensor& pre,
                                                                        const c10::optional<at::Tensor>& mask,
                                                                        c10::string_view activation,
                                                                        bool bias_requires_grad) {
  const Activation act = check_bottleneck_backward(grad_out, x, weight, pre, mask, activation);
  const auto ct = compute_dtype(x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), V = weight.size(0);

  auto g = grad_out.contiguous();
  auto z = act == Activation::identity ? at::Tensor() : pre.contiguous();
  at::Tensor keep;
  if (mask.has_value() && mask->defined()) keep = mask->contiguous();
  auto grad_pre = at::empty({B, V}, x.options().dtype(ct));

  const int64_t n = B * V;
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "bottleneck_backward_cuda", [&] {
      using grad_t = scalar_t;
      auto launch = [&](auto acc_zero) {
        using acc_t = decltype(acc_zero);
        with_activation(act, [&](auto tag) {
          constexpr Activation A = decltype(tag)::value;
          pre_grad_kernel<A, grad_t, acc_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              g.const_data_ptr<grad_t>(), z.defined() ? z.const_data_ptr<acc_t>() : nullptr,
              keep.defined() ? keep.const_data_ptr<bool>() : nullptr, grad_pre.mutable_data_ptr<acc_t>(), n, V);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      };
      // The compute dtype follows x (as pre does), whatever grad_out's dtype.
      if (ct == at::kDouble) {
        launch(double(0));
      } else {
        launch(float(0));
      }
    });
  }

  auto grad_x = at::mm(grad_pre, weight.to(ct)).to(x.scalar_type());
  auto grad_weight = at::mm(grad_pre.t(), x.to(ct)).to(x.scalar_type());
  auto grad_bias = bias_requires_grad ? grad_pre.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(giblet, CUDA, m) {
  m.impl("bottleneck", &bottleneck_cuda);
  m.impl("bottleneck_backward", &bottleneck_backward_cuda);
}

}  // namespace giblet
