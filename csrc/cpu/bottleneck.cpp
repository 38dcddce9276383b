// CPU kernel of bottleneck: out = act(x @ weight^T + bias) * mask.
//
// Layer 7 has one unit per voxel (85,810 on Sherlock) and a small batch, so
// the op streams weight rows from memory: each active row is read once and
// dotted with every row of x (which stays in cache). A lesioned row is never
// read in the forward pass and only zeroed in the backward pass, so lesions
// make the op cheaper instead of costing a masked multiply on top.
// Backward reads each active weight row once more and writes its gradient
// row in the same pass, accumulating grad_x per thread.
// Batches above kStreamMaxBatch are compute-bound: they take the GEMM path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(GIBLET_NO_CLONES)
// One build runs on any x86-64 and uses AVX-512 or AVX2+FMA where present.
#define GIBLET_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GIBLET_SIMD_CLONES
#endif

namespace giblet {
namespace {

constexpr int64_t kStreamMaxBatch = 64;
constexpr int64_t kRowGroup = 4;  // weight rows per micro-kernel call
constexpr int64_t kChunk = 64;    // columns per backward register block

// Micro-kernels on float/double rows (declared per type: target_clones does
// not apply to templates).
#define GIBLET_DEFINE_ROW_KERNELS(T, SUFFIX)                                                                        \
  /* out[b * 4 + r] = dot(x[b], w_r) for four weight rows. */                                                      \
  GIBLET_SIMD_CLONES void dot4_##SUFFIX(const T* x, int64_t B, int64_t K, const T* w0, const T* w1, const T* w2,   \
                                        const T* w3, T* out) {                                                     \
    for (int64_t b = 0; b < B; ++b) {                                                                              \
      const T* xb = x + b * K;                                                                                     \
      T a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                                                            \
      _Pragma("omp simd reduction(+ : a0, a1, a2, a3)") for (int64_t k = 0; k < K; ++k) {                          \
        const T xv = xb[k];                                                                                        \
        a0 += xv * w0[k];                                                                                          \
        a1 += xv * w1[k];                                                                                          \
        a2 += xv * w2[k];                                                                                          \
        a3 += xv * w3[k];                                                                                          \
      }                                                                                                            \
      out[b * 4 + 0] = a0;                                                                                         \
      out[b * 4 + 1] = a1;                                                                                         \
      out[b * 4 + 2] = a2;                                                                                         \
      out[b * 4 + 3] = a3;                                                                                         \
    }                                                                                                              \
  }                                                                                                                \
  /* For four weight rows with grad_pre g[b * 4 + r]: gw_r = sum_b g * x[b], gx[b] += sum_r g * w_r. */            \
  GIBLET_SIMD_CLONES void grad4_##SUFFIX(const T* x, int64_t B, int64_t K, const T* const* w, const T* g,          \
                                         T* const* gw, T* gx) {                                                    \
    const T *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];                                                        \
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {                                                                   \
      const int64_t n = K - k0 < kChunk ? K - k0 : kChunk;                                                         \
      T s0[kChunk] = {}, s1[kChunk] = {}, s2[kChunk] = {}, s3[kChunk] = {};                                        \
      for (int64_t b = 0; b < B; ++b) {                                                                            \
        const T* xb = x + b * K + k0;                                                                              \
        T* gxb = gx + b * K + k0;                                                                                  \
        const T p0 = g[b * 4 + 0], p1 = g[b * 4 + 1], p2 = g[b * 4 + 2], p3 = g[b * 4 + 3];                        \
        _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                                      \
          const T xv = xb[j];                                                                                      \
          s0[j] += p0 * xv;                                                                                        \
          s1[j] += p1 * xv;                                                                                        \
          s2[j] += p2 * xv;                                                                                        \
          s3[j] += p3 * xv;                                                                                        \
          gxb[j] += p0 * w0[k0 + j] + p1 * w1[k0 + j] + p2 * w2[k0 + j] + p3 * w3[k0 + j];                         \
        }                                                                                                          \
      }                                                                                                            \
      for (int64_t j = 0; j < n; ++j) {                                                                            \
        gw[0][k0 + j] = s0[j];                                                                                     \
        gw[1][k0 + j] = s1[j];                                                                                     \
        gw[2][k0 + j] = s2[j];                                                                                     \
        gw[3][k0 + j] = s3[j];                                                                                     \
      }                                                                                                            \
    }                                                                                                              \
  }

GIBLET_DEFINE_ROW_KERNELS(float, f32)
GIBLET_DEFINE_ROW_KERNELS(double, f64)
#undef GIBLET_DEFINE_ROW_KERNELS

inline void dot4(const float* x, int64_t B, int64_t K, const float* const* w, float* out) {
  dot4_f32(x, B, K, w[0], w[1], w[2], w[3], out);
}
inline void dot4(const double* x, int64_t B, int64_t K, const double* const* w, double* out) {
  dot4_f64(x, B, K, w[0], w[1], w[2], w[3], out);
}
inline void grad4(const float* x, int64_t B, int64_t K, const float* const* w, const float* g, float* const* gw,
                  float* gx) {
  grad4_f32(x, B, K, w, g, gw, gx);
}
inline void grad4(const double* x, int64_t B, int64_t K, const double* const* w, const double* g, double* const* gw,
                  double* gx) {
  grad4_f64(x, B, K, w, g, gw, gx);
}

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

template <typename acc_t>
inline acc_t activate(acc_t z, Activation act) {
  switch (act) {
    case Activation::gelu: return acc_t(0.5) * z * (acc_t(1) + std::erf(z * acc_t(kInvSqrt2)));
    case Activation::tanh: return std::tanh(z);
    default: return z;
  }
}

template <typename acc_t>
inline acc_t activation_slope(acc_t z, Activation act) {
  switch (act) {
    case Activation::gelu:
      return acc_t(0.5) * (acc_t(1) + std::erf(z * acc_t(kInvSqrt2))) + z * acc_t(kInvSqrt2Pi) * std::exp(acc_t(-0.5) * z * z);
    case Activation::tanh: {
      const acc_t t = std::tanh(z);
      return acc_t(1) - t * t;
    }
    default: return acc_t(1);
  }
}

// Rows of weight that are not lesioned, in order.
std::vector<int64_t> active_rows(const c10::optional<at::Tensor>& mask, int64_t V) {
  std::vector<int64_t> rows;
  rows.reserve(V);
  if (mask.has_value() && mask->defined()) {
    auto m = mask->contiguous();
    const bool* keep = m.const_data_ptr<bool>();
    for (int64_t v = 0; v < V; ++v)
      if (keep[v]) rows.push_back(v);
  } else {
    for (int64_t v = 0; v < V; ++v) rows.push_back(v);
  }
  return rows;
}

// Weight rows as acc_t pointers: direct for float/double, converted into
// `scratch` (kRowGroup x K) for half types.
template <typename scalar_t, typename acc_t>
inline void load_rows(const scalar_t* weight, int64_t K, const int64_t* rows, int64_t count, acc_t* scratch,
                      const acc_t** out, const acc_t* zeros) {
  for (int64_t r = 0; r < kRowGroup; ++r) {
    if (r >= count) {
      out[r] = zeros;
    } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
      out[r] = weight + rows[r] * K;
    } else {
      const scalar_t* src = weight + rows[r] * K;
      acc_t* dst = scratch + r * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<acc_t>(src[k]);
      out[r] = dst;
    }
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> bottleneck_stream_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                             const c10::optional<at::Tensor>& bias,
                                                             const c10::optional<at::Tensor>& mask, Activation act) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = x_in.size(0), K = x_in.size(1), V = weight_in.size(0);
  auto weight = weight_in.contiguous();
  at::Tensor x = x_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  auto out = at::zeros({B, V}, x_in.options());
  auto pre = act == Activation::identity ? at::empty({0}, x.options()) : at::zeros({B, V}, x.options());
  at::Tensor bias_acc;
  if (bias.has_value() && bias->defined()) bias_acc = bias->to(x.scalar_type()).contiguous();
  const acc_t* b_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;

  const auto rows = active_rows(mask, V);
  const int64_t n_groups = (static_cast<int64_t>(rows.size()) + kRowGroup - 1) / kRowGroup;
  const acc_t* xs = x.const_data_ptr<acc_t>();
  const scalar_t* ws = weight.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  acc_t* pre_ptr = act == Activation::identity ? nullptr : pre.mutable_data_ptr<acc_t>();

  at::parallel_for(0, n_groups, 16, [&](int64_t g0, int64_t g1) {
    std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> ? 0 : kRowGroup * K);
    std::vector<acc_t> zeros(K, acc_t(0));
    std::vector<acc_t> dots(B * kRowGroup);
    const acc_t* w[kRowGroup];
    for (int64_t group = g0; group < g1; ++group) {
      const int64_t first = group * kRowGroup;
      const int64_t count = std::min<int64_t>(kRowGroup, static_cast<int64_t>(rows.size()) - first);
      load_rows<scalar_t, acc_t>(ws, K, rows.data() + first, count, scratch.data(), w, zeros.data());
      dot4(xs, B, K, w, dots.data());
      for (int64_t r = 0; r < count; ++r) {
        const int64_t v = rows[first + r];
        const acc_t b_v = b_ptr ? b_ptr[v] : acc_t(0);
        for (int64_t b = 0; b < B; ++b) {
          const acc_t z = dots[b * kRowGroup + r] + b_v;
          out_ptr[b * V + v] = static_cast<scalar_t>(activate(z, act));
          if (pre_ptr) pre_ptr[b * V + v] = z;
        }
      }
    }
  });
  return {out, pre};
}

// Large batches: one GEMM over all rows, then the epilogue zeroes lesioned units.
std::tuple<at::Tensor, at::Tensor> bottleneck_gemm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                           const c10::optional<at::Tensor>& bias,
                                                           const c10::optional<at::Tensor>& mask, Activation act) {
  const auto ct = compute_dtype(x.scalar_type());
  auto z = at::mm(x.to(ct), weight.to(ct).t());
  if (bias.has_value() && bias->defined()) z.add_(bias->to(ct));
  at::Tensor y;
  switch (act) {
    case Activation::gelu: y = at::gelu(z); break;
    case Activation::tanh: y = at::tanh(z); break;
    default: y = z;
  }
  // where, not a product: a lesioned unit is 0 even if its weights are not finite.
  if (mask.has_value() && mask->defined()) y = at::where(*mask, y, at::zeros({}, y.options()));
  // Lesioned units keep pre = 0, as on the streaming path and on CUDA.
  auto pre = act == Activation::identity ? at::empty({0}, z.options()) : z;
  if (mask.has_value() && mask->defined() && act != Activation::identity)
    pre = at::where(*mask, z, at::zeros({}, z.options()));
  return {y.to(x.scalar_type()), pre};
}

std::tuple<at::Tensor, at::Tensor> bottleneck_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias,
                                                  const c10::optional<at::Tensor>& mask, c10::string_view activation) {
  check_bottleneck(x, weight, bias, mask);
  const Activation act = parse_activation(activation);
  if (x.size(0) > kStreamMaxBatch) return bottleneck_gemm_forward(x, weight, bias, mask, act);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bottleneck_cpu", [&] {
    return bottleneck_stream_forward<scalar_t>(x, weight, bias, mask, act);
  });
}

// grad of the pre-activation: grad_out * act'(pre) * mask, in acc dtype.
at::Tensor pre_activation_grad(const at::Tensor& grad_out, const at::Tensor& pre, const c10::optional<at::Tensor>& mask,
                               Activation act, at::ScalarType ct) {
  auto g = grad_out.to(ct).contiguous();
  if (act != Activation::identity) {
    auto gp = at::empty_like(g);
    auto z = pre.contiguous();
    AT_DISPATCH_FLOATING_TYPES(ct, "bottleneck_pre_grad", [&] {
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const scalar_t* gi = g.const_data_ptr<scalar_t>();
      scalar_t* go = gp.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, g.numel(), 4096, [&](int64_t a, int64_t b) {
        for (int64_t i = a; i < b; ++i) go[i] = gi[i] * activation_slope(zp[i], act);
      });
    });
    g = gp;
  }
  if (mask.has_value() && mask->defined()) g = at::where(*mask, g, at::zeros({}, g.options()));
  return g;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> bottleneck_stream_backward(const at::Tensor& grad_pre, const at::Tensor& x_in,
                                                              const at::Tensor& weight_in,
                                                              const c10::optional<at::Tensor>& mask) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = x_in.size(0), K = x_in.size(1), V = weight_in.size(0);
  auto weight = weight_in.contiguous();
  auto x = x_in.to(grad_pre.scalar_type()).contiguous();
  // grad_pre transposed so that the B values of one unit are adjacent.
  auto gp_t = grad_pre.t().contiguous();
  auto grad_weight = at::empty({V, K}, weight.options().dtype(grad_pre.scalar_type()));

  const auto rows = active_rows(mask, V);
  if (static_cast<int64_t>(rows.size()) < V) {
    // Lesioned rows: zero gradient, never read.
    auto keep = mask->contiguous();
    const bool* k = keep.const_data_ptr<bool>();
    acc_t* gw = grad_weight.mutable_data_ptr<acc_t>();
    at::parallel_for(0, V, 1024, [&](int64_t a, int64_t b) {
      for (int64_t v = a; v < b; ++v)
        if (!k[v]) std::fill(gw + v * K, gw + (v + 1) * K, acc_t(0));
    });
  }
  const int64_t n_groups = (static_cast<int64_t>(rows.size()) + kRowGroup - 1) / kRowGroup;
  const int n_threads = at::get_num_threads();
  auto grad_x_parts = at::zeros({n_threads, B, K}, x.options());
  const acc_t* xs = x.const_data_ptr<acc_t>();
  const scalar_t* ws = weight.const_data_ptr<scalar_t>();
  const acc_t* gps = gp_t.const_data_ptr<acc_t>();
  acc_t* gws = grad_weight.mutable_data_ptr<acc_t>();
  acc_t* gx_parts = grad_x_parts.mutable_data_ptr<acc_t>();

  at::parallel_for(0, n_groups, 16, [&](int64_t g0, int64_t g1) {
    acc_t* gx = gx_parts + static_cast<int64_t>(at::get_thread_num()) * B * K;
    std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> ? 0 : kRowGroup * K);
    std::vector<acc_t> zeros(K, acc_t(0)), sink(K);
    std::vector<acc_t> g(B * kRowGroup);
    const acc_t* w[kRowGroup];
    acc_t* gw[kRowGroup];
    for (int64_t group = g0; group < g1; ++group) {
      const int64_t first = group * kRowGroup;
      const int64_t count = std::min<int64_t>(kRowGroup, static_cast<int64_t>(rows.size()) - first);
      load_rows<scalar_t, acc_t>(ws, K, rows.data() + first, count, scratch.data(), w, zeros.data());
      for (int64_t r = 0; r < kRowGroup; ++r) {
        const bool real = r < count;
        gw[r] = real ? gws + rows[first + r] * K : sink.data();
        for (int64_t b = 0; b < B; ++b) g[b * kRowGroup + r] = real ? gps[rows[first + r] * B + b] : acc_t(0);
      }
      grad4(xs, B, K, w, g.data(), gw, gx);
    }
  });
  return {grad_x_parts.sum(0), grad_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bottleneck_backward_cpu(const at::Tensor& grad_out,
                                                                       const at::Tensor& x, const at::Tensor& weight,
                                                                       const at::Tensor& pre,
                                                                       const c10::optional<at::Tensor>& mask,
                                                                       c10::string_view activation,
                                                                       bool bias_requires_grad) {
  check_bottleneck(x, weight, c10::nullopt, mask);
  const Activation act = parse_activation(activation);
  check_bottleneck_backward(grad_out, x, weight, pre, act);
  auto grad_pre = pre_activation_grad(grad_out, pre, mask, act, compute_dtype(x.scalar_type()));
  auto grad_bias = bias_requires_grad ? grad_pre.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor grad_x, grad_weight;
  if (x.size(0) > kStreamMaxBatch) {
    const auto ct = grad_pre.scalar_type();
    grad_x = at::mm(grad_pre, weight.to(ct));
    grad_weight = at::mm(grad_pre.t(), x.to(ct));
  } else {
    std::tie(grad_x, grad_weight) =
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bottleneck_backward_cpu", [&] {
          return bottleneck_stream_backward<scalar_t>(grad_pre, x, weight, mask);
        });
  }
  return {grad_x.to(x.scalar_type()), grad_weight.to(x.scalar_type()), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(giblet, CPU, m) {
  m.impl("bottleneck", &bottleneck_cpu);
  m.impl("bottleneck_backward", &bottleneck_backward_cpu);
}

}  // namespace giblet
