// What csrc/memory_cuda.cu needs from CUDA and c10::cuda, for running it on CPU threads under
// HIP-CPU (tests/hip_cpu/build.py). Torch's headers come first: HIP-CPU defines keywords such as
// __global__ and __shared__ as macros that torch's headers must not see. "Device" memory is host
// memory here, so the tensors handed to the kernels are CPU tensors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>

#include <hip/hip_runtime.h>

// Intrinsics: the fast exponential and the warp shuffles with a lane mask (the kernels always
// pass the full mask, which HIP-CPU's unmasked shuffles match).
inline float __expf(float x) { return std::exp(x); }

template <typename T>
inline T __shfl_down_sync(unsigned /*mask*/, T var, unsigned delta, int width = warpSize) {
  return __shfl_down(var, delta, width);
}

// Runtime calls the launchers make. Shared memory is a std::vector per block here, so any size
// fits; report H100's per-block limit so that the launchers take their usual paths.
using cudaError_t = hipError_t;
constexpr cudaError_t cudaSuccess = hipSuccess;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

inline cudaError_t cudaGetDevice(int* device) { return hipGetDevice(device); }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 232448;
  return cudaSuccess;
}

template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return cudaSuccess;
}

#define C10_CUDA_CHECK(EXPR)                                                          \
  do {                                                                                \
    const hipError_t dmgan_status = (EXPR);                                           \
    TORCH_CHECK(dmgan_status == hipSuccess, "HIP-CPU error ", (int)dmgan_status, " in ", #EXPR); \
  } while (0)

// A launch returns at once; synchronise so that the host code after it (partial sums, output
// checks) sees what the kernel wrote.
#define C10_CUDA_KERNEL_LAUNCH_CHECK()       \
  do {                                       \
    C10_CUDA_CHECK(hipGetLastError());       \
    C10_CUDA_CHECK(hipDeviceSynchronize());  \
  } while (0)

// The device guard and the current stream: one device, the default stream.
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline hipStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda
