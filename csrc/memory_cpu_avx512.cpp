// The CPU kernels for x86-64 CPUs with AVX-512 F, BW, VL and DQ (Intel Skylake-X, AMD Zen 4 and
// later; ATen's AVX512 capability asks for the same): 64-byte vectors in the zmm registers. Only
// the kernels' code is compiled for that target (see memory_cpu_kernels.h); memory_cpu.cpp calls it
// only where the CPU has all four.
#include "memory_cpu_kernels.h"

#if DMGAN_CPU_X86
#define DMGAN_CPU_CAPABILITY AVX512
#define DMGAN_CPU_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#define DMGAN_VECTOR_BYTES 64
#include "memory_cpu_kernels.inc"
#endif
