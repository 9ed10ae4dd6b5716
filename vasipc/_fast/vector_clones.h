/* vector_clones.h: compile a hot loop for AVX2 as well as the x86-64 baseline.
 *
 * The baseline (SSE2) has no 32-bit vector multiply, min/max or blend, so the kernels'
 * integer loops and selects stay scalar there. VAS_VECTOR_CLONES on a function makes
 * the compiler emit an AVX2 copy next to the baseline one and pick at load time (an
 * ifunc), with no build flags and one source. Callees inlined into it are compiled for
 * both. The kernels use integer arithmetic, comparisons and IEEE division only, and
 * "avx2" implies no FMA contraction: both copies compute identical results.
 */
#ifndef VASIPC_VECTOR_CLONES_H
#define VASIPC_VECTOR_CLONES_H

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VAS_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VAS_VECTOR_CLONES
#endif

#endif /* VASIPC_VECTOR_CLONES_H */
