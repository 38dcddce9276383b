// Exact sample positions of the TR grid, shared by the CPU and CUDA kernels.
//
// Window i starts at onsets[i] seconds and lasts `window` seconds; it is split
// into n_out equal sub-intervals. Everything is computed in float64 from the
// onset itself, never by accumulating per-window sample counts, so the error at
// TR 2,000 is the same as at TR 0.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace giblet {

// Seconds from a window's onset to the centre of its sub-interval k. The same
// for every window: kernels compute it once per call (the division is the
// costly part) and get bit-identical positions.
C10_HOST_DEVICE inline double grid_centre_offset(int64_t k, double window, int64_t n_out) {
  return (k + 0.5) * window / n_out;
}

// Index of the sample at onset + centre_offset seconds, or -1 outside [0, n_samples).
C10_HOST_DEVICE inline int64_t grid_index_at(double onset, double centre_offset, double rate, int64_t n_samples) {
  const double position = floor((onset + centre_offset) * rate);
  if (!(position >= 0.0) || position >= static_cast<double>(n_samples)) return -1;
  return static_cast<int64_t>(position);
}

// Index of the sample under the centre of sub-interval k of a window:
// floor((onset + (k + 0.5) * window / n_out) * rate), or -1 outside.
C10_HOST_DEVICE inline int64_t grid_sample_index(double onset, int64_t k, double window, int64_t n_out, double rate,
                                                 int64_t n_samples) {
  return grid_index_at(onset, grid_centre_offset(k, window, n_out), rate, n_samples);
}

// Sub-interval k of a window, in seconds: [start, stop).
C10_HOST_DEVICE inline void grid_interval(double onset, int64_t k, double window, int64_t n_out, double* start,
                                          double* stop) {
  *start = onset + k * window / n_out;
  *stop = onset + (k + 1) * window / n_out;
}

// Samples t cover [t / rate, (t + 1) / rate). The first and one past the last
// sample that overlap [start, stop), clipped to [0, n_samples).
C10_HOST_DEVICE inline void grid_overlap_range(double start, double stop, double rate, int64_t n_samples,
                                               int64_t* first, int64_t* last) {
  // Clipped before the integer conversion, which is undefined out of range.
  const double n = static_cast<double>(n_samples);
  double lo = floor(start * rate), hi = ceil(stop * rate);
  lo = lo < 0.0 ? 0.0 : (lo > n ? n : lo);
  hi = hi < 0.0 ? 0.0 : (hi > n ? n : hi);
  *first = static_cast<int64_t>(lo);
  *last = hi > lo ? static_cast<int64_t>(hi) : *first;
}

// Seconds of sample t inside [start, stop).
C10_HOST_DEVICE inline double grid_overlap(int64_t t, double start, double stop, double rate) {
  const double a = t / rate > start ? t / rate : start;
  const double b = (t + 1) / rate < stop ? (t + 1) / rate : stop;
  return b > a ? b - a : 0.0;
}

// Cell (window i, sub-interval k) of the grid: its interval in seconds, the
// samples [first, last) that overlap it, and their total overlap in seconds
// (0 when none does), summed in sample order on every device.
struct GridCell {
  double start, stop;
  int64_t first, last;
  double total;
};

C10_HOST_DEVICE inline GridCell grid_cell(double onset, int64_t k, double window, int64_t n_out, double rate,
                                          int64_t n_samples) {
  GridCell cell;
  grid_interval(onset, k, window, n_out, &cell.start, &cell.stop);
  grid_overlap_range(cell.start, cell.stop, rate, n_samples, &cell.first, &cell.last);
  cell.total = 0.0;
  for (int64_t t = cell.first; t < cell.last; ++t) cell.total += grid_overlap(t, cell.start, cell.stop, rate);
  return cell;
}

}  // namespace giblet
