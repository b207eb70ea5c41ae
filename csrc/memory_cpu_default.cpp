// The CPU kernels for any CPU: the compiler's baseline target (SSE2 on x86-64), 16-byte vectors.
#include "memory_cpu_kernels.h"

#define DMGAN_CPU_CAPABILITY DEFAULT
#define DMGAN_VECTOR_BYTES 16
#include "memory_cpu_kernels.inc"
