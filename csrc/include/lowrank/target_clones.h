// LOWRANK_CLONES: a CPU function compiled twice, for AVX2 and for the baseline x86-64, the
// version picked at load time (GCC function multi-versioning, Linux x86-64 only; elsewhere
// the one baseline version). For the plain loops that GCC vectorizes.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LOWRANK_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LOWRANK_CLONES
#endif
