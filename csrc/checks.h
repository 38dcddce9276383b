// Input validation shared by the CPU and CUDA kernels: every op checks its
// arguments here, so a bad input gets the same message on every device.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <type_traits>

namespace giblet {

// Error messages are assembled here without iostreams. TORCH_CHECK with several
// arguments formats them through a std::ostringstream compiled into this library;
// with a g++ that links parts of libstdc++ into the extension while torch uses
// the shared libstdc++, writing an integer to that stream crashed the process
// (SIGSEGV in the num_put facet) instead of raising the error. GIBLET_CHECK hands
// TORCH_CHECK one finished std::string, which it passes through untouched.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);  // what an ostream prints by default
  s += buf;
}
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}
}  // namespace detail

template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

#define GIBLET_CHECK(cond, ...) TORCH_CHECK(cond, ::giblet::cat(__VA_ARGS__))

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

inline std::string shape_str(const at::Tensor& t) { return shape_str(t.sizes()); }

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* expected) {
  GIBLET_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", expected, ", got shape ", shape_str(t));
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  auto st = t.scalar_type();
  GIBLET_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                              const char* ref_name) {
  GIBLET_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; expected both on one device");
}

// Weights of the projections: same dtype and device as `ref`.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name) {
  check_same_device(op, name, t, ref, ref_name);
  GIBLET_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type(), "; expected the same dtype");
}

// table (T, D) and weight (P, D) of gather_project and its backward.
inline void check_gather_table_weight(const char* op, const at::Tensor& table, const at::Tensor& weight) {
  check_dim(op, "table", table, 2, "(T, D)");
  auto tt = table.scalar_type();
  GIBLET_CHECK(tt == at::kByte || tt == at::kFloat || tt == at::kDouble || tt == at::kHalf || tt == at::kBFloat16, op,
              ": table must be uint8, float16, bfloat16, float32 or float64, got ", tt);
  check_dim(op, "weight", weight, 2, "(P, D)");
  check_float_dtype(op, "weight", weight);
  GIBLET_CHECK(weight.size(1) == table.size(1), op, ": weight has shape ", shape_str(weight), " but table has D=",
              table.size(1), " columns; expected weight (P, ", table.size(1), ")");
  check_same_device(op, "weight", weight, table, "table");
}

inline void check_gather_project(const at::Tensor& table, const at::Tensor& index, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias) {
  const char* op = "gather_project";
  check_dim(op, "table", table, 2, "(T, D)");
  auto tt = table.scalar_type();
  GIBLET_CHECK(tt == at::kByte || tt == at::kFloat || tt == at::kDouble || tt == at::kHalf || tt == at::kBFloat16, op,
              ": table must be uint8, float16, bfloat16, float32 or float64, got ", tt);
  check_dim(op, "index", index, 2, "(B, S) of row numbers");
  GIBLET_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  check_dim(op, "weight", weight, 2, "(P, D)");
  check_float_dtype(op, "weight", weight);
  GIBLET_CHECK(weight.size(1) == table.size(1), op, ": weight has shape ", shape_str(weight), " but table has D=",
              table.size(1), " columns; expected weight (P, ", table.size(1), ")");
  check_same_device(op, "index", index, table, "table");
  check_same_device(op, "weight", weight, table, "table");
  if (bias.has_value() && bias->defined()) {
    check_like(op, "bias", *bias, weight, "weight");
    GIBLET_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias has shape ", shape_str(*bias),
                "; expected (", weight.size(0), ",) to match weight (P, D)");
  }
}

// Range check of the row numbers, given the smallest and the largest (read by
// the caller in one device-to-host copy). Only on a failure does it search
// `index` for the position of the offending value.
inline void check_index_range(const at::Tensor& index, int64_t lo, int64_t hi, int64_t n_rows) {
  if (lo >= -1 && hi < n_rows) return;
  int64_t bad = lo < -1 ? lo : hi;
  auto pos = (index == bad).nonzero()[0].cpu();
  GIBLET_CHECK(false, "gather_project: index holds ", bad, " at position (", pos[0].item<int64_t>(), ", ",
              pos[1].item<int64_t>(), ") but table has T=", n_rows, " rows; expected -1 (empty slot) or 0..",
              n_rows - 1);
}

inline void check_grid(const char* op, double rate, const at::Tensor& onsets, double window, int64_t n_out) {
  GIBLET_CHECK(std::isfinite(rate) && rate > 0, op, ": rate must be a positive number of samples per second, got ",
              rate);
  GIBLET_CHECK(std::isfinite(window) && window > 0, op, ": window must be a positive duration in seconds, got ",
              window);
  GIBLET_CHECK(n_out > 0, op, ": n_out must be at least 1, got ", n_out);
  check_dim(op, "onsets", onsets, 1, "(N,) of window onsets in seconds");
  GIBLET_CHECK(onsets.scalar_type() == at::kDouble, op, ": onsets must be float64 seconds, got ",
              onsets.scalar_type());
  auto finite = at::isfinite(onsets);
  if (!finite.all().item<bool>()) {
    const int64_t i = (~finite).nonzero()[0][0].item<int64_t>();
    GIBLET_CHECK(false, op, ": onsets must be finite seconds, got onsets[", i, "] = ", onsets[i].item<double>());
  }
}

inline void check_grid_index(int64_t n_samples, double rate, const at::Tensor& onsets, double window,
                             int64_t n_out) {
  check_grid("grid_index", rate, onsets, window, n_out);
  GIBLET_CHECK(n_samples >= 0, "grid_index: n_samples must be >= 0, got ", n_samples);
}

inline void check_resample_codes(const at::Tensor& codes, const at::Tensor& onsets) {
  const char* op = "resample_codes";
  GIBLET_CHECK(codes.dim() != 3, op, ": codes has shape ", shape_str(codes),
              " with a batch axis; expected (n_q, T): drop the batch axis first (codes[0] for EnCodec's (1, n_q, T))");
  check_dim(op, "codes", codes, 2, "(n_q, T)");
  auto st = codes.scalar_type();
  GIBLET_CHECK(st == at::kLong || st == at::kInt || st == at::kShort, op, ": codes must be int16, int32 or int64, got ",
              st);
  check_same_device(op, "onsets", onsets, codes, "codes");
}

inline void check_grid_average_backward(const at::Tensor& grad_out, int64_t n_samples, const at::Tensor& onsets,
                                        int64_t n_out) {
  const char* op = "grid_average_backward";
  GIBLET_CHECK(n_samples >= 0, op, ": n_samples must be >= 0, got ", n_samples);
  GIBLET_CHECK(grad_out.dim() == 3 && grad_out.size(0) == onsets.size(0) && grad_out.size(1) == n_out, op,
              ": grad_out has shape ", shape_str(grad_out), "; expected (", onsets.size(0), ", ", n_out, ", C)");
  check_float_dtype(op, "grad_out", grad_out);
  check_same_device(op, "onsets", onsets, grad_out, "grad_out");
}

inline void check_grid_average(const at::Tensor& values, const at::Tensor& onsets) {
  const char* op = "grid_average";
  check_dim(op, "values", values, 2, "(T, C) of feature frames");
  check_float_dtype(op, "values", values);
  check_same_device(op, "onsets", onsets, values, "values");
}

enum class Activation { identity = 0, gelu = 1, tanh = 2 };

inline Activation parse_activation(c10::string_view name) {
  if (name == "identity") return Activation::identity;
  if (name == "gelu") return Activation::gelu;
  if (name == "tanh") return Activation::tanh;
  GIBLET_CHECK(false, "bottleneck: activation must be one of identity, gelu, tanh; got '", std::string(name), "'");
}

inline void check_bottleneck(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& mask) {
  const char* op = "bottleneck";
  check_dim(op, "x", x, 2, "(B, K)");
  check_dim(op, "weight", weight, 2, "(V, K)");
  check_float_dtype(op, "x", x);
  check_like(op, "weight", weight, x, "x");
  GIBLET_CHECK(weight.size(1) == x.size(1), op, ": weight has shape ", shape_str(weight), " but x has K=", x.size(1),
              " features; expected weight (V, ", x.size(1), ")");
  int64_t V = weight.size(0);
  if (bias.has_value() && bias->defined()) {
    check_like(op, "bias", *bias, weight, "weight");
    GIBLET_CHECK(bias->dim() == 1 && bias->size(0) == V, op, ": bias has shape ", shape_str(*bias), "; expected (", V,
                ",)");
  }
  if (mask.has_value() && mask->defined()) {
    check_same_device(op, "mask", *mask, weight, "weight");
    GIBLET_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool (True = unit kept), got ",
                mask->scalar_type());
    GIBLET_CHECK(mask->dim() == 1 && mask->size(0) == V, op, ": mask has shape ", shape_str(*mask), "; expected (", V,
                ",), one entry per unit");
  }
}

// Checks every argument of bottleneck_backward; returns the activation.
inline Activation check_bottleneck_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& pre, const c10::optional<at::Tensor>& mask,
                                            c10::string_view activation) {
  check_bottleneck(x, weight, c10::nullopt, mask);
  const Activation act = parse_activation(activation);
  const int64_t B = x.size(0), V = weight.size(0);
  GIBLET_CHECK(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == V,
              "bottleneck_backward: grad_out has shape ", shape_str(grad_out), "; expected (", B, ", ", V, ")");
  check_same_device("bottleneck_backward", "grad_out", grad_out, x, "x");
  // The kernels read pre elementwise beside grad_out: a wrong one would be
  // read out of bounds, not just give a wrong gradient.
  if (act == Activation::identity) return act;
  GIBLET_CHECK(pre.dim() == 2 && pre.size(0) == B && pre.size(1) == V, "bottleneck_backward: pre has shape ",
              shape_str(pre), "; expected (", B, ", ", V, "), the pre-activation that bottleneck returned");
  const auto expected = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  GIBLET_CHECK(pre.scalar_type() == expected, "bottleneck_backward: pre has dtype ", pre.scalar_type(), "; expected ",
              expected);
  check_same_device("bottleneck_backward", "pre", pre, x, "x");
  return act;
}

// Accumulation type of the projections: double for double, float otherwise.
inline at::ScalarType compute_dtype(at::ScalarType weight_dtype) {
  return weight_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The same, at compile time, for kernels templated on the element type.
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace giblet
