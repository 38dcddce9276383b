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

// 32-byte vectors (8 floats, 4 doubles) as GCC vector extensions: each target
// clone lowers them to its own registers (ymm, or pairs of xmm on baseline
// x86-64). Forward keeps 4 rows x 2 batch rows = 8 independent FMA chains in
// flight, enough to hide FMA latency within AVX2's 16 registers; backward
// updates 4 weight-gradient chains and one grad_x row per batch row.
typedef float vec_f32 __attribute__((vector_size(32)));
typedef float vec_f32_unaligned __attribute__((vector_size(32), aligned(4)));
typedef double vec_f64 __attribute__((vector_size(32)));
typedef double vec_f64_unaligned __attribute__((vector_size(32), aligned(8)));

// Micro-kernels per element type (target_clones does not apply to templates).
#define GIBLET_DEFINE_ROW_KERNELS(T, V, VU, SUFFIX)                                                                \
  __attribute__((always_inline)) inline V load_##SUFFIX(const T* p) { return *reinterpret_cast<const VU*>(p); }    \
  __attribute__((always_inline)) inline void store_##SUFFIX(T* p, V v) { *reinterpret_cast<VU*>(p) = v; }          \
  __attribute__((always_inline)) inline T sum_##SUFFIX(V v) {                                                      \
    T s = 0;                                                                                                       \
    for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(T)); ++i) s += v[i];                                   \
    return s;                                                                                                      \
  }                                                                                                                \
  /* out[b * 4 + r] = dot(x[b], w_r) for four weight rows w_r. */                                                  \
  GIBLET_SIMD_CLONES void dot4_##SUFFIX(const T* x, int64_t ld, int64_t B, int64_t K, const T* const* w, T* out) {             \
    constexpr int64_t L = sizeof(V) / sizeof(T);                                                                   \
    const int64_t k_vec = K / L * L;                                                                               \
    const T *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];                                                        \
    for (int64_t b = 0; b < B; b += 2) {                                                                           \
      const bool pair = b + 1 < B;                                                                                 \
      const T* xa = x + b * ld;                                                                                    \
      const T* xb = pair ? xa + ld : xa; /* an odd last row is computed twice, stored once */                     \
      V a0 = {}, a1 = {}, a2 = {}, a3 = {}, c0 = {}, c1 = {}, c2 = {}, c3 = {};                                    \
      for (int64_t k = 0; k < k_vec; k += L) {                                                                     \
        const V u = load_##SUFFIX(xa + k), v = load_##SUFFIX(xb + k);                                              \
        const V r0 = load_##SUFFIX(w0 + k), r1 = load_##SUFFIX(w1 + k);                                            \
        const V r2 = load_##SUFFIX(w2 + k), r3 = load_##SUFFIX(w3 + k);                                            \
        a0 += u * r0;                                                                                              \
        a1 += u * r1;                                                                                              \
        a2 += u * r2;                                                                                              \
        a3 += u * r3;                                                                                              \
        c0 += v * r0;                                                                                              \
        c1 += v * r1;                                                                                              \
        c2 += v * r2;                                                                                              \
        c3 += v * r3;                                                                                              \
      }                                                                                                            \
      T sa[4] = {sum_##SUFFIX(a0), sum_##SUFFIX(a1), sum_##SUFFIX(a2), sum_##SUFFIX(a3)};                          \
      T sc[4] = {sum_##SUFFIX(c0), sum_##SUFFIX(c1), sum_##SUFFIX(c2), sum_##SUFFIX(c3)};                          \
      for (int64_t k = k_vec; k < K; ++k) {                                                                        \
        for (int r = 0; r < 4; ++r) {                                                                              \
          sa[r] += xa[k] * w[r][k];                                                                                \
          sc[r] += xb[k] * w[r][k];                                                                                \
        }                                                                                                          \
      }                                                                                                            \
      for (int r = 0; r < 4; ++r) {                                                                                \
        out[b * 4 + r] = sa[r];                                                                                    \
        if (pair) out[(b + 1) * 4 + r] = sc[r];                                                                    \
      }                                                                                                            \
    }                                                                                                              \
  }                                                                                                                \
  /* For four weight rows with grad_pre g[b * 4 + r]: gw_r = sum_b g * x[b], gx[b] += sum_r g * w_r. */            \
  GIBLET_SIMD_CLONES void grad4_##SUFFIX(const T* x, int64_t ld, int64_t B, int64_t K, const T* const* w,         \
                                         const T* g, T* const* gw, T* gx) {                                        \
    constexpr int64_t L = sizeof(V) / sizeof(T);                                                                   \
    const int64_t k_vec = K / L * L;                                                                               \
    for (int64_t k = 0; k < k_vec; k += L) {                                                                       \
      const V r0 = load_##SUFFIX(w[0] + k), r1 = load_##SUFFIX(w[1] + k);                                          \
      const V r2 = load_##SUFFIX(w[2] + k), r3 = load_##SUFFIX(w[3] + k);                                          \
      V s0 = {}, s1 = {}, s2 = {}, s3 = {};                                                                        \
      for (int64_t b = 0; b < B; ++b) {                                                                            \
        const T* gb = g + b * 4;                                                                                   \
        const V u = load_##SUFFIX(x + b * ld + k);                                                                 \
        s0 += gb[0] * u;                                                                                           \
        s1 += gb[1] * u;                                                                                           \
        s2 += gb[2] * u;                                                                                           \
        s3 += gb[3] * u;                                                                                           \
        T* gxb = gx + b * ld + k;                                                                                  \
        store_##SUFFIX(gxb, load_##SUFFIX(gxb) + gb[0] * r0 + gb[1] * r1 + gb[2] * r2 + gb[3] * r3);               \
      }                                                                                                            \
      store_##SUFFIX(gw[0] + k, s0);                                                                               \
      store_##SUFFIX(gw[1] + k, s1);                                                                               \
      store_##SUFFIX(gw[2] + k, s2);                                                                               \
      store_##SUFFIX(gw[3] + k, s3);                                                                               \
    }                                                                                                              \
    for (int64_t k = k_vec; k < K; ++k) {                                                                          \
      T s[4] = {0, 0, 0, 0};                                                                                       \
      for (int64_t b = 0; b < B; ++b) {                                                                            \
        const T* gb = g + b * 4;                                                                                   \
        const T u = x[b * ld + k];                                                                                 \
        for (int r = 0; r < 4; ++r) s[r] += gb[r] * u;                                                             \
        gx[b * ld + k] += gb[0] * w[0][k] + gb[1] * w[1][k] + gb[2] * w[2][k] + gb[3] * w[3][k];                   \
      }                                                                                                            \
      for (int r = 0; r < 4; ++r) gw[r][k] = s[r];                                                                 \
    }                                                                                                              \
  }

GIBLET_DEFINE_ROW_KERNELS(float, vec_f32, vec_f32_unaligned, f32)
GIBLET_DEFINE_ROW_KERNELS(double, vec_f64, vec_f64_unaligned, f64)
#undef GIBLET_DEFINE_ROW_KERNELS

inline void dot4(const float* x, int64_t ld, int64_t B, int64_t K, const float* const* w, float* out) {
  dot4_f32(x, ld, B, K, w, out);
}
inline void dot4(const double* x, int64_t ld, int64_t B, int64_t K, const double* const* w, double* out) {
  dot4_f64(x, ld, B, K, w, out);
}
inline void grad4(const float* x, int64_t ld, int64_t B, int64_t K, const float* const* w, const float* g,
                  float* const* gw, float* gx) {
  grad4_f32(x, ld, B, K, w, g, gw, gx);
}
inline void grad4(const double* x, int64_t ld, int64_t B, int64_t K, const double* const* w, const double* g,
                  double* const* gw, double* gx) {
  grad4_f64(x, ld, B, K, w, g, gw, gx);
}

// Rows of x (and of the grad_x accumulators) are kept `padded_stride(K)`
// apart: with K = 1024 floats, rows exactly 4 KiB apart would fall into one
// L1 set and stores to grad_x would falsely alias loads of x (4K aliasing).
inline int64_t padded_stride(int64_t K) { return K + 16; }

// x as acc_t rows with the padded stride: (B, ld), columns K.. are unused.
template <typename acc_t>
at::Tensor padded_rows(const at::Tensor& x) {
  const int64_t K = x.size(1);
  auto padded = at::zeros({x.size(0), padded_stride(K)}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  padded.narrow(1, 0, K).copy_(x);
  return padded;
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
  using acc_t = compute_t<scalar_t>;
  const int64_t B = x_in.size(0), K = x_in.size(1), V = weight_in.size(0);
  auto weight = weight_in.contiguous();
  at::Tensor x = padded_rows<acc_t>(x_in);
  const int64_t ld = x.size(1);
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
      dot4(xs, ld, B, K, w, dots.data());
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
  const auto x_c = x.to(ct);
  const auto w_t = weight.to(ct).t();
  // The bias is added by the GEMM (addmm), not by a second pass over z.
  auto z = bias.has_value() && bias->defined() ? at::addmm(bias->to(ct), x_c, w_t) : at::mm(x_c, w_t);
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

// GEMM path: grad of the pre-activation, grad_out * act'(pre) * mask, in acc dtype.
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

// Returns (grad_x, grad_weight, grad_bias) in acc dtype. The gradient of the
// pre-activation is formed per visited row from grad_out and pre, so no
// (B, V) intermediate is written and lesioned rows are never touched.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bottleneck_stream_backward(const at::Tensor& grad_out_in,
                                                                          const at::Tensor& pre_in,
                                                                          const at::Tensor& x_in,
                                                                          const at::Tensor& weight_in,
                                                                          const c10::optional<at::Tensor>& mask,
                                                                          Activation act) {
  using acc_t = compute_t<scalar_t>;
  const int64_t B = x_in.size(0), K = x_in.size(1), V = weight_in.size(0);
  auto weight = weight_in.contiguous();
  at::Tensor x = padded_rows<acc_t>(x_in);
  const int64_t ld = x.size(1);
  at::Tensor grad_out = grad_out_in.to(x.scalar_type()).contiguous();
  at::Tensor pre = act == Activation::identity ? at::Tensor() : pre_in.contiguous();
  auto grad_weight = at::empty({V, K}, x.options());
  auto grad_bias = at::zeros({V}, x.options());

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
  // grad_x is accumulated per part, one part per thread: parts are the unit
  // of parallel work, so an accumulator never has two writers, even when this
  // runs nested in another parallel region (and so on one thread).
  const int64_t n_parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_groups));
  const int64_t groups_per_part = (n_groups + n_parts - 1) / n_parts;
  auto grad_x_parts = at::zeros({n_parts, B, ld}, x.options());
  const acc_t* xs = x.const_data_ptr<acc_t>();
  const scalar_t* ws = weight.const_data_ptr<scalar_t>();
  const acc_t* go = grad_out.const_data_ptr<acc_t>();
  const acc_t* zs = pre.defined() ? pre.const_data_ptr<acc_t>() : nullptr;
  acc_t* gws = grad_weight.mutable_data_ptr<acc_t>();
  acc_t* gbs = grad_bias.mutable_data_ptr<acc_t>();
  acc_t* gx_parts = grad_x_parts.mutable_data_ptr<acc_t>();

  at::parallel_for(0, n_parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> ? 0 : kRowGroup * K);
    std::vector<acc_t> zeros(K, acc_t(0)), sink(K);
    std::vector<acc_t> g(B * kRowGroup);
    const acc_t* w[kRowGroup];
    acc_t* gw[kRowGroup];
    for (int64_t part = p0; part < p1; ++part) {
      acc_t* gx = gx_parts + part * B * ld;
      const int64_t g_end = std::min(n_groups, (part + 1) * groups_per_part);
      for (int64_t group = part * groups_per_part; group < g_end; ++group) {
        const int64_t first = group * kRowGroup;
        const int64_t count = std::min<int64_t>(kRowGroup, static_cast<int64_t>(rows.size()) - first);
        load_rows<scalar_t, acc_t>(ws, K, rows.data() + first, count, scratch.data(), w, zeros.data());
        for (int64_t r = 0; r < kRowGroup; ++r) {
          if (r >= count) {
            gw[r] = sink.data();
            for (int64_t b = 0; b < B; ++b) g[b * kRowGroup + r] = acc_t(0);
            continue;
          }
          const int64_t v = rows[first + r];
          gw[r] = gws + v * K;
          acc_t bias_sum = 0;
          for (int64_t b = 0; b < B; ++b) {
            acc_t grad = go[b * V + v];
            if (zs) grad *= activation_slope(zs[b * V + v], act);
            g[b * kRowGroup + r] = grad;
            bias_sum += grad;
          }
          gbs[v] = bias_sum;
        }
        grad4(xs, ld, B, K, w, g.data(), gw, gx);
      }
    }
  });
  return {grad_x_parts.sum(0).narrow(1, 0, K).contiguous(), grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bottleneck_backward_cpu(const at::Tensor& grad_out,
                                                                       const at::Tensor& x, const at::Tensor& weight,
                                                                       const at::Tensor& pre,
                                                                       const c10::optional<at::Tensor>& mask,
                                                                       c10::string_view activation,
                                                                       bool bias_requires_grad) {
  const Activation act = check_bottleneck_backward(grad_out, x, weight, pre, mask, activation);
  at::Tensor grad_x, grad_weight, grad_bias;
  if (x.size(0) > kStreamMaxBatch) {
    const auto ct = compute_dtype(x.scalar_type());
    auto grad_pre = pre_activation_grad(grad_out, pre, mask, act, ct);
    grad_x = at::mm(grad_pre, weight.to(ct));
    grad_weight = at::mm(grad_pre.t(), x.to(ct));
    grad_bias = grad_pre.sum(0);
  } else {
    std::tie(grad_x, grad_weight, grad_bias) =
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bottleneck_backward_cpu", [&] {
          return bottleneck_stream_backward<scalar_t>(grad_out, pre, x, weight, mask, act);
        });
  }
  grad_bias = bias_requires_grad ? grad_bias.to(x.scalar_type()) : at::empty({0}, x.options());
  return {grad_x.to(x.scalar_type()), grad_weight.to(x.scalar_type()), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(giblet, CPU, m) {
  m.impl("bottleneck", &bottleneck_cpu);
  m.impl("bottleneck_backward", &bottleneck_backward_cpu);
}

}  // namespace giblet
