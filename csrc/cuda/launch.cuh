// Launch geometry and device helpers shared by the CUDA kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace giblet {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

// Blocks of kThreads for n elements, at most kMaxBlocks.
inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

// Products that nvcc may not fuse into an FMA, so that sums and dequantized
// values round as in the CPU kernels (a multiply, then an add).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

}  // namespace giblet
