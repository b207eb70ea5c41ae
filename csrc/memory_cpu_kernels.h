// The CPU kernels of the memory op, compiled once per instruction set and chosen at run time.
//
// As ATen's CPU_CAPABILITY dispatch: the kernels are written once (memory_cpu_kernels.inc) and
// compiled three times, by memory_cpu_default.cpp (x86-64 baseline: SSE2, or any other CPU),
// memory_cpu_avx2.cpp (AVX2 + FMA) and memory_cpu_avx512.cpp (AVX-512 F/BW/VL/DQ), each into a
// namespace named after its capability. Each file raises the compiler's target for the kernels'
// code only (`#pragma GCC target`), not for the whole file: the headers above the kernels, and every
// inline function of torch or the standard library that the kernels call, stay baseline code, so
// that no copy of them that the linker might keep uses an instruction the CPU lacks. The build
// passes no -march flag; memory_cpu.cpp reads the CPU's features and an override (see
// selected_capability) once and calls that namespace's kernels.
#pragma once

// Everything the kernels use is included here, outside any target region.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "memory.h"

#if defined(__x86_64__) || defined(_M_X64)
#define DMGAN_CPU_X86 1
#else
#define DMGAN_CPU_X86 0
#endif

namespace dmgan::cpu {

// The entry points every instruction set's namespace defines. Outputs are allocated (and
// checked) by the caller, memory_cpu.cpp.
#define DMGAN_DECLARE_CPU_KERNELS(ISA)                                                                         \
  namespace ISA {                                                                                              \
  void read_forward(const at::Tensor& img, const at::Tensor& keys, const at::Tensor& values,                   \
                    const at::Tensor& pad_mask, const at::Tensor& gate_w, const at::Tensor& gate_b, bool legacy, \
                    at::Tensor& out, at::Tensor* attention);                                                   \
  void read_backward(const at::Tensor& grad_out, const at::Tensor& img, const at::Tensor& keys,                \
                     const at::Tensor& values, const at::Tensor& pad_mask, const at::Tensor& gate_w,           \
                     const at::Tensor& gate_b, bool legacy, at::Tensor& grad_img, at::Tensor& grad_keys,       \
                     at::Tensor& grad_values, at::Tensor& grad_gate_w, at::Tensor& grad_gate_b);               \
  void write_forward(const at::Tensor& words, const at::Tensor& rbar, at::TensorList weights, at::Tensor& keys, \
                     at::Tensor& values);                                                                      \
  void write_backward(const at::Tensor& grad_keys, const at::Tensor& grad_values, const at::Tensor& words,     \
                      const at::Tensor& rbar, at::TensorList weights, std::vector<at::Tensor>& grads);         \
  }

DMGAN_DECLARE_CPU_KERNELS(DEFAULT)
#if DMGAN_CPU_X86
DMGAN_DECLARE_CPU_KERNELS(AVX2)
DMGAN_DECLARE_CPU_KERNELS(AVX512)
#endif

}  // namespace dmgan::cpu
