// Host/device qualifiers shared by every kernel core: the same arithmetic is compiled by
// nvcc for the CUDA kernels and by the host compiler for the CPU kernels and ctest.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#define LK_UNROLL _Pragma("unroll")
#else
#define LK_HD inline
#define LK_UNROLL  // host compilers unroll these fixed-size loops at -O3 on their own
#endif

namespace lowrank {
using index_t = std::int64_t;  // every element offset is 64-bit: B*d passes 2^31 at real sizes
}  // namespace lowrank
