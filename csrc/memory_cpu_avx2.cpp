// The CPU kernels for x86-64 CPUs with AVX2 and FMA (Intel Haswell, AMD Zen and later): 32-byte
// vectors in the ymm registers. Only the kernels' code is compiled for that target (see
// memory_cpu_kernels.h); memory_cpu.cpp calls it only where the CPU has both.
#include "memory_cpu_kernels.h"

#if DMGAN_CPU_X86
#define DMGAN_CPU_CAPABILITY AVX2
#define DMGAN_CPU_TARGET "avx2,fma,f16c"
#define DMGAN_VECTOR_BYTES 32
#include "memory_cpu_kernels.inc"
#endif
