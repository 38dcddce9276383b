// Native test of giblet's CPU operators, without Python.
//
// Every op is called through the dispatcher (as torch.ops.giblet.* does) and
// compared with the straightforward ATen formula of giblet/ops_reference.py,
// computed in float64. Bad inputs must raise c10::Error with a message that
// names the problem. One line per check; the last line is "N passed, M failed"
// and the exit code is 1 when M > 0.
//
// Build and run: see tests/native/README.md (CMake target giblet_test_ops, ctest).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

// --------------------------------------------------------------------------- reporting

int g_passed = 0;
int g_failed = 0;

void report(const std::string& name, bool ok, const std::string& detail = "") {
  if (ok) {
    ++g_passed;
    std::printf("PASS  %s\n", name.c_str());
  } else {
    ++g_failed;
    std::printf("FAIL  %s%s%s\n", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  }
  std::fflush(stdout);
}

std::string shape(const Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// Where got and want differ most, as text.
std::string worst(const Tensor& got, const Tensor& want) {
  auto g = got.to(at::kDouble).reshape(-1), w = want.to(at::kDouble).reshape(-1);
  if (g.numel() == 0) return "empty";
  auto diff = (g - w).abs();
  const int64_t i = diff.argmax().item<int64_t>();
  std::ostringstream s;
  s.precision(10);
  s << "max |got - expected| = " << diff[i].item<double>() << " at flat index " << i << " (got " << g[i].item<double>()
    << ", expected " << w[i].item<double>() << ")";
  return s.str();
}

// got (of dtype `dtype`) against a float64 reference: |got - want| <= atol + rtol * |want|.
void check_close(const std::string& name, const Tensor& got, const Tensor& want, at::ScalarType dtype, double rtol,
                 double atol) {
  if (got.scalar_type() != dtype) {
    std::ostringstream s;
    s << "dtype " << got.scalar_type() << ", expected " << dtype;
    return report(name, false, s.str());
  }
  if (got.sizes() != want.sizes()) return report(name, false, "shape " + shape(got) + ", expected " + shape(want));
  const bool ok = at::allclose(got.to(at::kDouble), want.to(at::kDouble), rtol, atol, /*equal_nan=*/false);
  report(name, ok, ok ? "" : worst(got, want));
}

// The first values of t, flattened: "[6, 18, 31, ...]".
std::string values(const Tensor& t, int64_t limit = 12) {
  auto flat = t.to(at::kDouble).reshape(-1);
  std::ostringstream s;
  s.precision(10);
  s << "[";
  for (int64_t i = 0; i < std::min<int64_t>(flat.numel(), limit); ++i) s << (i ? ", " : "") << flat[i].item<double>();
  s << (flat.numel() > limit ? ", ...]" : "]");
  return s.str();
}

// Exact equality, dtype included.
void check_equal(const std::string& name, const Tensor& got, const Tensor& want) {
  if (got.scalar_type() != want.scalar_type()) {
    std::ostringstream s;
    s << "dtype " << got.scalar_type() << ", expected " << want.scalar_type();
    return report(name, false, s.str());
  }
  if (got.sizes() != want.sizes()) return report(name, false, "shape " + shape(got) + ", expected " + shape(want));
  const bool ok = at::equal(got, want);
  std::ostringstream s;
  if (!ok) s << worst(got, want) << "\n      got:      " << values(got) << "\n      expected: " << values(want);
  report(name, ok, s.str());
}

// Every element of t is exactly zero (-0.0 counts).
void check_zero(const std::string& name, const Tensor& t) {
  const bool ok = t.numel() == 0 || t.eq(0).all().item<bool>();
  report(name, ok, ok ? "" : "nonzero entries, max |x| = " + std::to_string(t.abs().max().to(at::kDouble).item<double>()));
}

// f() must raise c10::Error whose message holds every needle.
void expect_error(const std::string& name, const std::function<void()>& f, std::initializer_list<const char*> needles) {
  try {
    f();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const char* needle : needles)
      if (msg.find(needle) == std::string::npos)
        return report(name, false, std::string("message lacks '") + needle + "': " + msg);
    return report(name, true);
  } catch (const std::exception& e) {
    return report(name, false, std::string("raised a non-c10::Error: ") + e.what());
  }
  report(name, false, "no error raised");
}

// Runs one group of checks; an exception that escapes it is one failure.
void section(const char* name, const std::function<void()>& f) {
  std::printf("-- %s\n", name);
  try {
    f();
  } catch (const std::exception& e) {
    report(std::string(name) + ": unexpected exception", false, e.what());
  }
}

// --------------------------------------------------------------------------- the operators

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// (out, rows, slot_to_row): the projection and the plan it used.
Tensor3 gather_project_planned(const Tensor& table, const Tensor& index, const Tensor& weight, const OptTensor& bias,
                               double scale, double shift) {
  static auto h = op<Tensor3(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double, double)>(
      "giblet::gather_project");
  return h.call(table, index, weight, bias, scale, shift);
}

Tensor gather_project(const Tensor& table, const Tensor& index, const Tensor& weight, const OptTensor& bias,
                      double scale, double shift) {
  return std::get<0>(gather_project_planned(table, index, weight, bias, scale, shift));
}

Tensor3 gather_project_backward_planned(const Tensor& grad_out, const Tensor& table, const Tensor& rows,
                                        const Tensor& slot_to_row, const Tensor& weight, double scale, double shift,
                                        bool table_requires_grad) {
  static auto h = op<Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double,
                             bool)>("giblet::gather_project_backward");
  return h.call(grad_out, table, rows, slot_to_row, weight, scale, shift, table_requires_grad);
}

// The backward as autograd runs it: with the plan of a forward call on the same index.
Tensor3 gather_project_backward(const Tensor& grad_out, const Tensor& table, const Tensor& index, const Tensor& weight,
                                double scale, double shift, bool table_requires_grad) {
  auto planned = gather_project_planned(table, index, weight, std::nullopt, scale, shift);
  return gather_project_backward_planned(grad_out, table, std::get<1>(planned), std::get<2>(planned), weight, scale,
                                         shift, table_requires_grad);
}

Tensor grid_index(int64_t n_samples, double rate, const Tensor& onsets, double window, int64_t n_out) {
  static auto h = op<Tensor(int64_t, double, const Tensor&, double, int64_t)>("giblet::grid_index");
  return h.call(n_samples, rate, onsets, window, n_out);
}

Tensor resample_codes(const Tensor& codes, double rate, const Tensor& onsets, double window, int64_t n_out,
                      int64_t pad) {
  static auto h =
      op<Tensor(const Tensor&, double, const Tensor&, double, int64_t, int64_t)>("giblet::resample_codes");
  return h.call(codes, rate, onsets, window, n_out, pad);
}

Tensor grid_average(const Tensor& values, double rate, const Tensor& onsets, double window, int64_t n_out) {
  static auto h = op<Tensor(const Tensor&, double, const Tensor&, double, int64_t)>("giblet::grid_average");
  return h.call(values, rate, onsets, window, n_out);
}

Tensor grid_average_backward(const Tensor& grad_out, int64_t n_samples, double rate, const Tensor& onsets,
                             double window, int64_t n_out) {
  static auto h =
      op<Tensor(const Tensor&, int64_t, double, const Tensor&, double, int64_t)>("giblet::grid_average_backward");
  return h.call(grad_out, n_samples, rate, onsets, window, n_out);
}

std::tuple<Tensor, Tensor> bottleneck(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                      const OptTensor& mask, c10::string_view activation) {
  static auto h = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                                c10::string_view)>("giblet::bottleneck");
  return h.call(x, weight, bias, mask, activation);
}

Tensor3 bottleneck_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& pre,
                            const OptTensor& mask, c10::string_view activation, bool bias_requires_grad) {
  static auto h = op<Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                             c10::string_view, bool)>("giblet::bottleneck_backward");
  return h.call(grad_out, x, weight, pre, mask, activation, bias_requires_grad);
}

// --------------------------------------------------------------------------- float64 references

const auto kF64 = at::TensorOptions().dtype(at::kDouble);
const auto kI64 = at::TensorOptions().dtype(at::kLong);

Tensor longs(std::vector<int64_t> v, std::vector<int64_t> sizes) { return at::tensor(v, kI64).reshape(sizes); }
Tensor doubles(std::vector<double> v) { return at::tensor(v, kF64); }

// (B*S, D) dequantized rows named by index (row 0 for empty slots).
Tensor ref_rows(const Tensor& table, const Tensor& index, double scale, double shift) {
  return table.index_select(0, index.clamp_min(0).reshape(-1)).to(at::kDouble) * scale + shift;
}

Tensor ref_gather_project(const Tensor& table, const Tensor& index, const Tensor& weight, const OptTensor& bias,
                          double scale, double shift) {
  auto out = at::mm(ref_rows(table, index, scale, shift), weight.to(at::kDouble).t());
  if (bias) out = out + bias->to(at::kDouble);
  out = out.view({index.size(0), index.size(1), weight.size(0)});
  return at::where(index.ge(0).unsqueeze(-1), out, at::zeros({}, kF64));
}

// (grad_table, grad_weight, grad_bias) of ref_gather_project.
Tensor3 ref_gather_project_backward(const Tensor& grad_out, const Tensor& table, const Tensor& index,
                                    const Tensor& weight, double scale, double shift) {
  const int64_t P = weight.size(0);
  auto valid = index.ge(0).reshape({-1, 1});
  auto g = grad_out.reshape({-1, P}).to(at::kDouble) * valid;  // empty slots get no gradient
  auto rows = ref_rows(table, index, scale, shift);
  auto grad_weight = g.t().mm(rows);
  auto grad_bias = g.sum(0);
  // Repeated rows accumulate; empty slots add g = 0 to row 0.
  auto grad_table = at::zeros({table.size(0), table.size(1)}, kF64)
                        .index_add_(0, index.clamp_min(0).reshape(-1), g.mm(weight.to(at::kDouble)) * scale);
  return {grad_table, grad_weight, grad_bias};
}

Tensor ref_grid_index(int64_t n_samples, double rate, const Tensor& onsets, double window, int64_t n_out) {
  auto k = at::arange(n_out, kF64);
  auto position = at::floor((onsets.unsqueeze(1) + (k + 0.5) * window / n_out) * rate);
  auto inside = position.ge(0) & position.lt(static_cast<double>(n_samples));
  return at::where(inside, position, at::full_like(position, -1)).to(at::kLong);
}

Tensor ref_resample_codes(const Tensor& codes, double rate, const Tensor& onsets, double window, int64_t n_out,
                          int64_t pad) {
  const int64_t n_q = codes.size(0), N = onsets.size(0);
  auto position = ref_grid_index(codes.size(1), rate, onsets, window, n_out);  // (N, n_out)
  auto gathered = codes.to(at::kLong).index_select(1, position.clamp_min(0).reshape(-1)).view({n_q, N, n_out});
  gathered = gathered.masked_fill(position.lt(0).unsqueeze(0), pad);
  return gathered.permute({1, 0, 2}).contiguous();
}

// Dense (N * n_out, T) overlap weights, rows normalised to sum 1 (or all 0):
// giblet.ops_reference.grid_weights.
Tensor ref_grid_weights(int64_t T, double rate, const Tensor& onsets, double window, int64_t n_out) {
  auto k = at::arange(n_out, kF64);
  auto start = (onsets.unsqueeze(1) + k * window / n_out).reshape({-1, 1});
  auto stop = (onsets.unsqueeze(1) + (k + 1) * window / n_out).reshape({-1, 1});
  auto t = at::arange(T, kF64).unsqueeze(0);
  auto overlap = (at::minimum(stop, (t + 1) / rate) - at::maximum(start, t / rate)).clamp_min(0);
  auto total = overlap.sum(1, /*keepdim=*/true);
  return at::where(total.gt(0), overlap / total.clamp_min(1e-300), at::zeros_like(overlap));
}

Tensor ref_activation(const Tensor& z, const std::string& act) {
  if (act == "gelu") return at::gelu(z);
  if (act == "tanh") return at::tanh(z);
  return z;
}

// grad of the pre-activation z = x @ w^T + b.
Tensor ref_activation_grad(const Tensor& grad, const Tensor& z, const std::string& act) {
  if (act == "gelu") return at::gelu_backward(grad, z);
  if (act == "tanh") return at::tanh_backward(grad, at::tanh(z));
  return grad;
}

// --------------------------------------------------------------------------- checks

void test_registration() {
  const char* names[] = {"giblet::gather_project", "giblet::gather_project_backward", "giblet::grid_index",
                         "giblet::resample_codes", "giblet::grid_average", "giblet::grid_average_backward",
                         "giblet::bottleneck", "giblet::bottleneck_backward"};
  for (const char* name : names) {
    auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    const bool ok = handle.has_value() && handle->hasKernelForDispatchKey(c10::DispatchKey::CPU);
    report(std::string("registered with a CPU kernel: ") + name, ok,
           handle ? "schema found but no CPU kernel" : "schema missing (static registrations dropped by the linker?)");
  }
}

void test_gather_project() {
  // Small float table: repeated rows, empty slots, bias, scale/shift.
  const int64_t T = 7, D = 5, P = 3;
  auto table = at::randn({T, D});
  auto index = longs({2, 2, -1, 5, 5, 2, 0, -1}, {2, 4});
  auto weight = at::randn({P, D});
  auto bias = at::randn({P});
  const double scale = 0.5, shift = 0.25;
  auto out = gather_project(table, index, weight, bias, scale, shift);
  check_close("gather_project float32 table, repeated rows, bias, scale/shift", out,
              ref_gather_project(table, index, weight, bias, scale, shift), at::kFloat, 1e-5, 1e-5);
  check_zero("gather_project empty slots (-1) are exactly 0 despite bias",
             out.masked_select(index.eq(-1).unsqueeze(-1)));
  {
    // The plan returned next to the projection: sorted unique rows, and 1 + each slot's position in them.
    auto planned = gather_project_planned(table, index, weight, bias, scale, shift);
    check_equal("gather_project plan: rows are the sorted unique rows named", std::get<1>(planned),
                longs({0, 2, 5}, {3}));
    check_equal("gather_project plan: slot_to_row is 1 + the position in rows, 0 for an empty slot",
                std::get<2>(planned), longs({2, 2, 0, 3, 3, 2, 1, 0}, {2, 4}));
  }

  auto weight64 = weight.to(at::kDouble);
  auto bias64 = bias.to(at::kDouble);
  check_close("gather_project float64 weight (float64 compute)",
              gather_project(table, index, weight64, bias64, scale, shift),
              ref_gather_project(table, index, weight64, bias64, scale, shift), at::kDouble, 1e-12, 1e-12);
  check_close("gather_project no bias", gather_project(table, index, weight, std::nullopt, 1.0, 0.0),
              ref_gather_project(table, index, weight, std::nullopt, 1.0, 0.0), at::kFloat, 1e-5, 1e-5);

  // Non-contiguous table (column stride != 1).
  auto table_t = at::randn({D, T}).t();
  check_close("gather_project transposed (non-contiguous) table",
              gather_project(table_t, index, weight, bias, scale, shift),
              ref_gather_project(table_t, index, weight, bias, scale, shift), at::kFloat, 1e-5, 1e-5);

  auto table_bf16 = at::randn({T, D}).to(at::kBFloat16);
  check_close("gather_project bfloat16 table, float32 weight",
              gather_project(table_bf16, index, weight, bias, scale, shift),
              ref_gather_project(table_bf16, index, weight, bias, scale, shift), at::kFloat, 1e-5, 1e-5);

  // uint8 frames dequantized on the fly, large enough for several column blocks
  // (U ~ 14k unique rows -> 64-column blocks over D = 200).
  {
    const int64_t T8 = 20000, D8 = 200, P8 = 8;
    auto frames = at::randint(0, 256, {T8, D8}, at::TensorOptions().dtype(at::kByte));
    auto idx = at::randint(-1, T8, {50, 500}, kI64);
    auto w = at::randn({P8, D8}) * 0.1;
    auto b = at::randn({P8});
    auto o = gather_project(frames, idx, w, b, 1.0 / 255, -0.5);
    check_close("gather_project uint8 table (20000x200, multi-block), scale=1/255 shift=-0.5", o,
                ref_gather_project(frames, idx, w, b, 1.0 / 255, -0.5), at::kFloat, 1e-4, 1e-4);
    check_zero("gather_project uint8: empty slots exactly 0", o.masked_select(idx.eq(-1).unsqueeze(-1)));

    auto g = at::randn({50, 500, P8});
    Tensor gt, gw, gb;
    std::tie(gt, gw, gb) = gather_project_backward(g, frames, idx, w, 1.0 / 255, -0.5, false);
    Tensor rt, rw, rb;
    std::tie(rt, rw, rb) = ref_gather_project_backward(g, frames, idx, w, 1.0 / 255, -0.5);
    check_close("gather_project_backward uint8: grad_weight (multi-block)", gw, rw, at::kFloat, 1e-4, 1e-3);
    check_close("gather_project_backward uint8: grad_bias", gb, rb, at::kFloat, 1e-4, 1e-3);
    report("gather_project_backward uint8: grad_table is (0,) when not required", gt.dim() == 1 && gt.numel() == 0,
           "got shape " + shape(gt));
  }

  // Backward on the float table, grad_table accumulated over repeated rows.
  auto grad = at::randn({2, 4, P});
  Tensor gt, gw, gb;
  std::tie(gt, gw, gb) = gather_project_backward(grad, table, index, weight, scale, shift, true);
  Tensor rt, rw, rb;
  std::tie(rt, rw, rb) = ref_gather_project_backward(grad, table, index, weight, scale, shift);
  check_close("gather_project_backward float: grad_table (rows 2 and 5 repeated)", gt, rt, at::kFloat, 1e-5, 1e-5);
  check_close("gather_project_backward float: grad_weight", gw, rw, at::kFloat, 1e-5, 1e-5);
  check_close("gather_project_backward float: grad_bias (empty slots excluded)", gb, rb, at::kFloat, 1e-5, 1e-5);
  check_zero("gather_project_backward: rows never named get exactly 0 grad_table",
             gt.index_select(0, longs({1, 3, 4, 6}, {4})));
  {
    Tensor gt64, gw64, gb64;
    std::tie(gt64, gw64, gb64) =
        gather_project_backward(grad.to(at::kDouble), table.to(at::kDouble), index, weight64, scale, shift, true);
    std::tie(rt, rw, rb) = ref_gather_project_backward(grad, table.to(at::kDouble), index, weight64, scale, shift);
    check_close("gather_project_backward float64: grad_table", gt64, rt, at::kDouble, 1e-12, 1e-12);
    check_close("gather_project_backward float64: grad_weight", gw64, rw, at::kDouble, 1e-12, 1e-12);
  }

  // Every slot empty: U = 0.
  auto empty_index = at::full({3, 2}, -1, kI64);
  check_equal("gather_project all slots empty -> zeros (3, 2, P)",
              gather_project(table, empty_index, weight, bias, scale, shift), at::zeros({3, 2, P}));
  std::tie(gt, gw, gb) = gather_project_backward(at::randn({3, 2, P}), table, empty_index, weight, scale, shift, true);
  check_equal("gather_project_backward all slots empty -> zero grad_weight", gw, at::zeros({P, D}));
  check_equal("gather_project_backward all slots empty -> zero grad_bias", gb, at::zeros({P}));
  check_equal("gather_project_backward all slots empty -> zero grad_table", gt, at::zeros({T, D}));

  // Bad inputs.
  expect_error("gather_project index out of range names the index, its position and T=",
               [&] { gather_project(table, longs({0, 1, 2, 3, 9, -1}, {2, 3}), weight, bias, 1, 0); },
               {"index holds 9", "position (1, 1)", "T=7", "expected -1 (empty slot) or 0..6"});
  expect_error("gather_project index below -1 is rejected",
               [&] { gather_project(table, longs({0, -2}, {1, 2}), weight, bias, 1, 0); },
               {"index holds -2", "position (0, 1)", "T=7"});
  expect_error("gather_project_backward: a plan row out of range",
               [&] {
                 gather_project_backward_planned(at::randn({1, 2, P}), table, longs({0, 7}, {2}), longs({1, 2}, {1, 2}),
                                                 weight, 1, 0, false);
               },
               {"gather_project_backward: rows holds 7", "T=7", "the rows that gather_project returned"});
  expect_error("gather_project_backward: a slot_to_row entry out of range",
               [&] {
                 gather_project_backward_planned(at::randn({1, 2, P}), table, longs({0, 3}, {2}), longs({3, 0}, {1, 2}),
                                                 weight, 1, 0, false);
               },
               {"gather_project_backward: slot_to_row holds 3", "U=2"});
  expect_error("gather_project_backward: grad_out of the wrong shape",
               [&] {
                 gather_project_backward_planned(at::randn({2, 1, P}), table, longs({0, 3}, {2}), longs({1, 2}, {1, 2}),
                                                 weight, 1, 0, false);
               },
               {"grad_out has shape [2, 1, 3]; expected (1, 2, 3)"});
  expect_error("gather_project int32 index", [&] { gather_project(table, index.to(at::kInt), weight, bias, 1, 0); },
               {"index must be int64"});
  expect_error("gather_project 1-D index", [&] { gather_project(table, index.reshape(-1), weight, bias, 1, 0); },
               {"index must be 2-D"});
  expect_error("gather_project 3-D table", [&] { gather_project(table.unsqueeze(0), index, weight, bias, 1, 0); },
               {"table must be 2-D"});
  expect_error("gather_project weight columns != table columns",
               [&] { gather_project(table, index, at::randn({P, D + 1}), bias, 1, 0); }, {"table has D=5"});
  expect_error("gather_project bias of the wrong length",
               [&] { gather_project(table, index, weight, at::randn({P + 1}), 1, 0); }, {"bias has shape"});
  expect_error("gather_project bias dtype != weight dtype",
               [&] { gather_project(table, index, weight, bias64, 1, 0); }, {"bias has dtype"});
  expect_error("gather_project int32 table", [&] { gather_project(table.to(at::kInt), index, weight, bias, 1, 0); },
               {"table must be uint8"});
  expect_error("gather_project_backward grad_out of the wrong shape",
               [&] { gather_project_backward(at::randn({2, 4, P + 1}), table, index, weight, 1, 0, false); },
               {"grad_out has shape"});
  expect_error("gather_project_backward uint8 table cannot take a gradient",
               [&] {
                 gather_project_backward(grad, table.to(at::kByte), index, weight, 1, 0, /*table_requires_grad=*/true);
               },
               {"cannot take a gradient"});
}

void test_grid_index() {
  const int64_t big = int64_t(1) << 40;
  check_equal("grid_index 25 fps, TR 1.5 s, 3 per TR",
              grid_index(big, 25.0, doubles({0.0, 1.5, 3.0}), 1.5, 3),
              longs({6, 18, 31, 43, 56, 68, 81, 93, 106}, {3, 3}));
  check_equal("grid_index 75 Hz (EnCodec), 4 per TR", grid_index(big, 75.0, doubles({0.0, 1.5}), 1.5, 4),
              longs({14, 42, 70, 98, 126, 154, 182, 210}, {2, 4}));
  check_equal("grid_index 22050 Hz audio, 2 per TR", grid_index(big, 22050.0, doubles({0.0, 1.5}), 1.5, 2),
              longs({8268, 24806, 41343, 57881}, {2, 2}));
  check_equal("grid_index 512 Hz, centres on exact sample boundaries", grid_index(big, 512.0, doubles({0.0}), 1.5, 3),
              longs({128, 384, 640}, {1, 3}));
  check_equal("grid_index 512 Hz, position == n_samples is outside (-1)",
              grid_index(640, 512.0, doubles({0.0}), 1.5, 3), longs({128, 384, -1}, {1, 3}));
  check_equal("grid_index -1 before 0 and past n_samples (25 fps, 40 frames)",
              grid_index(40, 25.0, doubles({-1.5, -0.5, 1.5}), 1.5, 3),
              longs({-1, -1, -1, -1, 6, 18, -1, -1, -1}, {3, 3}));
  check_equal("grid_index n_samples = 0: all -1", grid_index(0, 25.0, doubles({0.0, 1.5}), 1.5, 3),
              at::full({2, 3}, -1, kI64));

  // TR 1999 (onset 2998.5 s): the same exact values as a fresh computation, no drift.
  const auto tr1999 = doubles({1999 * 1.5});
  check_equal("grid_index TR 1999 at 25 fps", grid_index(big, 25.0, tr1999, 1.5, 3), longs({74968, 74981, 74993}, {1, 3}));
  check_equal("grid_index TR 1999 at 75 Hz", grid_index(big, 75.0, tr1999, 1.5, 4),
              longs({224901, 224929, 224957, 224985}, {1, 4}));
  check_equal("grid_index TR 1999 at 22050 Hz", grid_index(big, 22050.0, tr1999, 1.5, 2),
              longs({66125193, 66141731}, {1, 2}));
  check_equal("grid_index TR 1999 at 512 Hz", grid_index(big, 512.0, tr1999, 1.5, 3),
              longs({1535360, 1535616, 1535872}, {1, 3}));

  // Whole 2000-TR grids against the float64 formula, element for element.
  const auto onsets = at::arange(2000, kF64) * 1.5;
  for (double rate : {25.0, 75.0, 22050.0, 512.0, 29.97}) {
    for (int64_t n_out : {1, 3, 7}) {
      const int64_t n_samples = static_cast<int64_t>(2000 * 1.5 * rate) - 5;  // last windows partly outside
      std::ostringstream name;
      name << "grid_index 2000 TRs at " << rate << " Hz, n_out=" << n_out << " == float64 formula";
      check_equal(name.str(), grid_index(n_samples, rate, onsets, 1.5, n_out),
                  ref_grid_index(n_samples, rate, onsets, 1.5, n_out));
    }
  }

  expect_error("grid_index float32 onsets", [] { grid_index(10, 25.0, at::zeros({2}), 1.5, 3); },
               {"onsets must be float64"});
  expect_error("grid_index rate 0", [] { grid_index(10, 0.0, doubles({0.0}), 1.5, 3); }, {"rate must be a positive"});
  expect_error("grid_index window -1", [] { grid_index(10, 25.0, doubles({0.0}), -1.0, 3); },
               {"window must be a positive"});
  expect_error("grid_index n_out 0", [] { grid_index(10, 25.0, doubles({0.0}), 1.5, 0); }, {"n_out must be at least 1"});
  expect_error("grid_index 2-D onsets", [] { grid_index(10, 25.0, at::zeros({2, 1}, kF64), 1.5, 3); },
               {"onsets must be 1-D"});
  expect_error("grid_index negative n_samples", [] { grid_index(-1, 25.0, doubles({0.0}), 1.5, 3); },
               {"n_samples must be >= 0"});
}

void test_resample_codes() {
  const int64_t n_q = 4, T = 300;
  auto codes = at::randint(0, 1024, {n_q, T}, kI64);
  auto onsets = doubles({-0.75, 0.0, 1.5, 3.0, 3.75});  // 300 frames at 75 Hz = 4 s: first and last windows partial
  const int64_t pad = -7;
  auto out = resample_codes(codes, 75.0, onsets, 1.5, 6, pad);
  auto want = ref_resample_codes(codes, 75.0, onsets, 1.5, 6, pad);
  check_equal("resample_codes int64 (75 Hz, 6 per TR) == codes[:, grid_index]", out, want);
  auto position = ref_grid_index(T, 75.0, onsets, 1.5, 6);
  const int64_t n_pad = position.lt(0).sum().item<int64_t>();
  const bool pads_ok = n_pad > 0 && out.permute({1, 0, 2}).masked_select(position.lt(0).unsqueeze(0)).eq(pad).all().item<bool>();
  report("resample_codes outside the codes: exactly pad (" + std::to_string(n_pad) + " positions per codebook)", pads_ok);

  for (auto dtype : {at::kInt, at::kShort}) {
    auto c = codes.to(dtype);
    check_equal(std::string("resample_codes ") + c10::toString(dtype) + " codes -> int64",
                resample_codes(c, 75.0, onsets, 1.5, 6, pad), want);
  }
  auto codes_t = at::randint(0, 1024, {T, n_q}, kI64).t();  // non-contiguous (n_q, T)
  check_equal("resample_codes transposed (non-contiguous) codes", resample_codes(codes_t, 75.0, onsets, 1.5, 6, pad),
              ref_resample_codes(codes_t, 75.0, onsets, 1.5, 6, pad));

  expect_error("resample_codes rejects a 3-D (1, n_q, T) tensor", [&] {
    resample_codes(codes.unsqueeze(0), 75.0, onsets, 1.5, 6, pad);
  }, {"with a batch axis", "drop the batch axis"});
  expect_error("resample_codes 1-D codes", [&] { resample_codes(codes[0], 75.0, onsets, 1.5, 6, pad); },
               {"codes must be 2-D"});
  expect_error("resample_codes float codes", [&] { resample_codes(codes.to(at::kFloat), 75.0, onsets, 1.5, 6, pad); },
               {"codes must be int16, int32 or int64"});
  expect_error("resample_codes float32 onsets",
               [&] { resample_codes(codes, 75.0, onsets.to(at::kFloat), 1.5, 6, pad); }, {"onsets must be float64"});
}

void test_grid_average() {
  const int64_t T = 60, C = 3, n_out = 4;
  const double rate = 25.0, window = 1.5;  // 9.375 frames per sub-interval: partial overlaps
  // 60 frames = 2.4 s: the first window starts before 0, the last ones end past the frames.
  auto onsets = doubles({-1.0, 0.0, 0.7, 1.5, 2.2, 5.0});
  auto W = ref_grid_weights(T, rate, onsets, window, n_out);  // (N * n_out, T)
  const int64_t N = onsets.size(0);

  auto values = at::randn({T, C}, kF64);
  auto out = grid_average(values, rate, onsets, window, n_out);
  check_close("grid_average float64 == dense overlap-weight formula", out,
              W.mm(values).view({N, n_out, C}), at::kDouble, 1e-12, 1e-12);
  auto outside = W.sum(1).eq(0);  // cells that overlap no frame
  check_zero("grid_average cells outside the frames are exactly 0 (" +
                 std::to_string(outside.sum().item<int64_t>()) + " cells)",
             out.reshape({N * n_out, C}).index_select(0, outside.nonzero().reshape(-1)));
  check_close("grid_average of constant frames is the constant where defined",
              grid_average(at::full({T, C}, 3.25, kF64), rate, onsets, window, n_out),
              (W.sum(1) * 3.25).view({N, n_out, 1}).expand({N, n_out, C}), at::kDouble, 1e-12, 1e-12);

  auto values32 = values.to(at::kFloat);
  check_close("grid_average float32", grid_average(values32, rate, onsets, window, n_out),
              W.mm(values32.to(at::kDouble)).view({N, n_out, C}), at::kFloat, 1e-5, 1e-5);
  auto values_bf16 = values.to(at::kBFloat16);
  check_close("grid_average bfloat16", grid_average(values_bf16, rate, onsets, window, n_out),
              W.mm(values_bf16.to(at::kDouble)).view({N, n_out, C}), at::kBFloat16, 1e-2, 1e-2);

  // Many channels (parallel over channel ranges) and a non-contiguous input.
  auto wide = at::randn({C * 40, T}, kF64).t();
  check_close("grid_average 120 channels, transposed input", grid_average(wide, rate, onsets, window, n_out),
              W.mm(wide).view({N, n_out, C * 40}), at::kDouble, 1e-12, 1e-12);

  // Backward: grad_values = W^T @ grad_out.
  auto grad = at::randn({N, n_out, C}, kF64);
  check_close("grid_average_backward float64 == W^T @ grad_out", grid_average_backward(grad, T, rate, onsets, window, n_out),
              W.t().mm(grad.reshape({-1, C})), at::kDouble, 1e-12, 1e-12);
  auto grad_wide = at::randn({N, n_out, 120}, kF64);
  check_close("grid_average_backward 120 channels", grid_average_backward(grad_wide, T, rate, onsets, window, n_out),
              W.t().mm(grad_wide.reshape({-1, 120})), at::kDouble, 1e-12, 1e-12);
  check_close("grid_average_backward float32",
              grid_average_backward(grad.to(at::kFloat), T, rate, onsets, window, n_out),
              W.t().mm(grad.reshape({-1, C})), at::kFloat, 1e-5, 1e-5);

  expect_error("grid_average 1-D values", [&] { grid_average(values[0], rate, onsets, window, n_out); },
               {"values must be 2-D"});
  expect_error("grid_average int64 values", [&] { grid_average(values.to(at::kLong), rate, onsets, window, n_out); },
               {"values must be float32, float64, float16 or bfloat16"});
  expect_error("grid_average_backward grad_out of the wrong shape",
               [&] { grid_average_backward(at::randn({N, n_out + 1, C}, kF64), T, rate, onsets, window, n_out); },
               {"grad_out has shape"});
}

void test_bottleneck_case(const std::string& act, int64_t B, int64_t K, int64_t V) {
  std::ostringstream tag;
  tag << "bottleneck " << act << " B=" << B << " K=" << K << " V=" << V << (B > 64 ? " (GEMM path)" : " (stream path)");
  const std::string name = tag.str();
  auto x = at::randn({B, K});
  auto weight = at::randn({V, K}) * (1.0 / std::sqrt(static_cast<double>(K)));
  auto bias = at::randn({V}) * 0.1;
  auto mask = at::rand({V}).gt(0.3);
  mask[0] = false;  // the first and last units are lesioned, whatever the draw
  mask[V - 1] = false;
  auto lesioned = mask.logical_not().nonzero().reshape(-1);

  Tensor out, pre;
  std::tie(out, pre) = bottleneck(x, weight, bias, mask, act);
  auto z = x.to(at::kDouble).mm(weight.to(at::kDouble).t()) + bias.to(at::kDouble);
  check_close(name + ": forward", out, ref_activation(z, act) * mask, at::kFloat, 1e-4, 1e-5);
  check_zero(name + ": lesioned outputs exactly 0", out.index_select(1, lesioned));
  if (act == "identity") {
    report(name + ": pre is (0,) for identity", pre.dim() == 1 && pre.numel() == 0, "got shape " + shape(pre));
  } else {
    // pre of lesioned units is not used by the backward pass: compare the kept ones.
    check_close(name + ": pre = x @ w^T + b (kept units)", pre * mask, z * mask, at::kFloat, 1e-4, 1e-5);
  }

  auto grad = at::randn({B, V});
  Tensor gx, gw, gb;
  std::tie(gx, gw, gb) = bottleneck_backward(grad, x, weight, pre, mask, act, true);
  auto gz = ref_activation_grad(grad.to(at::kDouble), z, act) * mask;
  check_close(name + ": grad_x", gx, gz.mm(weight.to(at::kDouble)), at::kFloat, 1e-4, 1e-4);
  check_close(name + ": grad_weight", gw, gz.t().mm(x.to(at::kDouble)), at::kFloat, 1e-4, 1e-4);
  check_close(name + ": grad_bias", gb, gz.sum(0), at::kFloat, 1e-4, 1e-4);
  check_zero(name + ": lesioned grad_weight rows and grad_bias exactly 0",
             at::cat({gw.index_select(0, lesioned).reshape(-1), gb.index_select(0, lesioned)}));
}

void test_bottleneck() {
  for (const char* act : {"identity", "gelu", "tanh"}) {
    test_bottleneck_case(act, 5, 37, 23);     // tails: K % 64 != 0, V % 4 != 0
    test_bottleneck_case(act, 8, 150, 301);   // several 64-column chunks, several threads
    test_bottleneck_case(act, 70, 40, 50);    // B > 64: GEMM path
  }

  // float64, no bias, no mask, no bias gradient.
  {
    auto x = at::randn({6, 33}, kF64), w = at::randn({19, 33}, kF64);
    Tensor out, pre;
    std::tie(out, pre) = bottleneck(x, w, std::nullopt, std::nullopt, "gelu");
    auto z = x.mm(w.t());
    check_close("bottleneck float64 gelu, no bias, no mask: forward", out, at::gelu(z), at::kDouble, 1e-12, 1e-12);
    auto grad = at::randn({6, 19}, kF64);
    Tensor gx, gw, gb;
    std::tie(gx, gw, gb) = bottleneck_backward(grad, x, w, pre, std::nullopt, "gelu", false);
    auto gz = at::gelu_backward(grad, z);
    check_close("bottleneck float64 gelu: grad_x", gx, gz.mm(w), at::kDouble, 1e-12, 1e-12);
    check_close("bottleneck float64 gelu: grad_weight", gw, gz.t().mm(x), at::kDouble, 1e-12, 1e-12);
    report("bottleneck bias_requires_grad=false: grad_bias is (0,)", gb.dim() == 1 && gb.numel() == 0,
           "got shape " + shape(gb));
  }

  // bfloat16 weights and inputs (converted rows in the stream kernel), tanh, masked.
  {
    auto x = (at::randn({4, 40}) * 0.5).to(at::kBFloat16), w = (at::randn({30, 40}) * 0.2).to(at::kBFloat16);
    auto b = (at::randn({30}) * 0.1).to(at::kBFloat16);
    auto mask = at::arange(30).remainder(3).ne(0);
    Tensor out, pre;
    std::tie(out, pre) = bottleneck(x, w, b, mask, "tanh");
    auto z = x.to(at::kDouble).mm(w.to(at::kDouble).t()) + b.to(at::kDouble);
    check_close("bottleneck bfloat16 tanh masked: forward", out, at::tanh(z) * mask, at::kBFloat16, 1e-2, 1e-2);
    check_zero("bottleneck bfloat16: lesioned outputs exactly 0", out.masked_select(mask.logical_not()));
    auto grad = at::randn({4, 30}).to(at::kBFloat16);
    Tensor gx, gw, gb;
    std::tie(gx, gw, gb) = bottleneck_backward(grad, x, w, pre, mask, "tanh", true);
    auto gz = at::tanh_backward(grad.to(at::kDouble), at::tanh(z)) * mask;
    check_close("bottleneck bfloat16: grad_x", gx, gz.mm(w.to(at::kDouble)), at::kBFloat16, 2e-2, 2e-2);
    check_close("bottleneck bfloat16: grad_weight", gw, gz.t().mm(x.to(at::kDouble)), at::kBFloat16, 2e-2, 2e-2);
    check_zero("bottleneck bfloat16: lesioned grad_weight rows exactly 0",
               gw.index_select(0, mask.logical_not().nonzero().reshape(-1)));
  }

  // Every unit lesioned.
  {
    auto x = at::randn({3, 10}), w = at::randn({6, 10});
    auto none = at::zeros({6}, at::TensorOptions().dtype(at::kBool));
    Tensor out, pre;
    std::tie(out, pre) = bottleneck(x, w, std::nullopt, none, "tanh");
    check_equal("bottleneck all units lesioned: output all 0", out, at::zeros({3, 6}));
    Tensor gx, gw, gb;
    std::tie(gx, gw, gb) = bottleneck_backward(at::randn({3, 6}), x, w, pre, none, "tanh", true);
    check_equal("bottleneck all units lesioned: grad_x all 0", gx, at::zeros({3, 10}));
    check_equal("bottleneck all units lesioned: grad_weight all 0", gw, at::zeros({6, 10}));
  }

  auto x = at::randn({4, 8}), w = at::randn({5, 8});
  expect_error("bottleneck unknown activation", [&] { bottleneck(x, w, std::nullopt, std::nullopt, "relu"); },
               {"activation must be one of identity, gelu, tanh", "'relu'"});
  expect_error("bottleneck weight K != x K", [&] { bottleneck(x, at::randn({5, 9}), std::nullopt, std::nullopt, "tanh"); },
               {"x has K=8"});
  expect_error("bottleneck weight dtype != x dtype",
               [&] { bottleneck(x, w.to(at::kDouble), std::nullopt, std::nullopt, "tanh"); }, {"weight has dtype"});
  expect_error("bottleneck float mask", [&] { bottleneck(x, w, std::nullopt, at::ones({5}), "tanh"); },
               {"mask must be bool"});
  expect_error("bottleneck mask of the wrong length",
               [&] { bottleneck(x, w, std::nullopt, at::ones({4}, at::TensorOptions().dtype(at::kBool)), "tanh"); },
               {"mask has shape", "one entry per unit"});
  expect_error("bottleneck bias of the wrong length", [&] { bottleneck(x, w, at::randn({6}), std::nullopt, "tanh"); },
               {"bias has shape"});
  expect_error("bottleneck int64 x", [&] {
    bottleneck(x.to(at::kLong), w.to(at::kLong), std::nullopt, std::nullopt, "tanh");
  }, {"x must be float32"});
  expect_error("bottleneck_backward grad_out of the wrong shape",
               [&] { bottleneck_backward(at::randn({4, 6}), x, w, at::randn({4, 5}), std::nullopt, "tanh", true); },
               {"grad_out has shape"});
}

}  // namespace

int main() {
  at::manual_seed(0);
  // More threads than this machine may have cores: exercises the parallel_for splits
  // (and the per-thread grad_x buffers of bottleneck_backward).
  at::set_num_threads(4);
  std::printf("giblet native op test: %d threads\n", at::get_num_threads());

  section("registration", test_registration);
  section("gather_project", test_gather_project);
  section("grid_index", test_grid_index);
  section("resample_codes", test_resample_codes);
  section("grid_average", test_grid_average);
  section("bottleneck", test_bottleneck);

  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
