// CUDA kernels for the dynamic memory: memory_write and memory_read, forward and backward.
//
// Reading: one thread per pixel; the sample's keys, values and response-gate weights sit in
// shared memory as fp32, a pixel's T scores live in registers (T padded to 16, 32 or 64 at
// compile time), the softmax runs in registers. Images may be contiguous or channels-last
// (PixelStrides); a warp's image loads coalesce only for contiguous ones (the Triton kernels load
// tiles that coalesce in both). Backward reductions over pixels (dK, dV, gate) go through
// fixed-order warp shuffles and per-block partials summed afterwards. The writing's backward
// stores each word's gradients and its weight gradients come from matrix products after the
// kernel. No atomics, so gradients are bitwise reproducible. Inputs are float32, float16 or
// bfloat16, computed in fp32; float64 is refused with an error (the CPU kernels compute it in
// fp64, and dmgan.ops sends it there or to the eager reference).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "memory.h"

namespace dmgan {
namespace {

constexpr int kThreads = 128;  // pixels per block of the reading kernels
constexpr int kWarps = kThreads / 32;
constexpr int kWriteThreads = 256;

#define DMGAN_CUDA_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

// The dtypes the kernels are built for: no float64 (they compute in fp32).
#define DMGAN_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void check_kernel_dtype(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() != at::kDouble, op,
              " (cuda kernel): float64 is not supported on CUDA (the kernels compute in fp32); use "
              "backend='eager', or backend='auto', which falls back to it");
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + __expf(-x)); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;  // lane 0 holds the sum, always added in the same order
}

// Sum of x over the block, in a fixed order; every thread gets the result. scratch: kWarps floats.
__device__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------------
// Memory reading

struct ReadArgs {
  int batch, C, N, T;
  int tiles;  // blocks of kThreads pixels per sample; a flat grid of batch x tiles blocks
  bool legacy;
  int channel, pixel;  // strides of the images (img, r', grad_out, grad_img): PixelStrides
};

// Loads keys, values, gate weights of sample b into shared memory.
template <typename scalar_t>
__device__ void load_sample(const scalar_t* keys, const scalar_t* values, const scalar_t* gate_w, int b,
                            const ReadArgs& a, float* k_s, float* v_s, float* gw_s) {
  const size_t base = (size_t)b * a.C * a.T;
  for (int i = threadIdx.x; i < a.C * a.T; i += blockDim.x) {
    k_s[i] = static_cast<float>(keys[base + i]);
    v_s[i] = static_cast<float>(values[base + i]);
  }
  for (int i = threadIdx.x; i < 2 * a.C; i += blockDim.x) gw_s[i] = static_cast<float>(gate_w[i]);
  __syncthreads();
}

// Key addressing + softmax for one pixel: alpha (registers). Returns nothing read -> all zeros.
template <typename scalar_t, int MAX_T>
__device__ void addressing(const scalar_t* r, const float* k_s, const bool* mask, int b, int n, const ReadArgs& a,
                           float (&alpha)[MAX_T]) {
#pragma unroll
  for (int t = 0; t < MAX_T; ++t) alpha[t] = 0.f;
  for (int c = 0; c < a.C; ++c) {
    const float rc = static_cast<float>(r[(size_t)c * a.channel]);
#pragma unroll
    for (int t = 0; t < MAX_T; ++t)
      if (t < a.T) alpha[t] += rc * k_s[c * a.T + t];
  }
  const bool* row = mask + (size_t)(a.legacy ? (((long long)b * a.N + n) % a.batch) : b) * a.T;
  float mx = -INFINITY;
#pragma unroll
  for (int t = 0; t < MAX_T; ++t)
    if (t < a.T && !row[t]) mx = fmaxf(mx, alpha[t]);
  float total = 0.f;
#pragma unroll
  for (int t = 0; t < MAX_T; ++t) {
    const float e = (t < a.T && !row[t]) ? __expf(alpha[t] - mx) : 0.f;
    alpha[t] = e;
    total += e;
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
  for (int t = 0; t < MAX_T; ++t) alpha[t] *= inv;
}

template <int MAX_T>
__device__ __forceinline__ float read_value(const float (&alpha)[MAX_T], const float* v_s, int c, int T) {
  float o = 0.f;
#pragma unroll
  for (int t = 0; t < MAX_T; ++t)
    if (t < T) o += alpha[t] * v_s[c * T + t];
  return o;
}

template <typename scalar_t, int MAX_T>
__global__ void __launch_bounds__(kThreads) read_forward_kernel(const scalar_t* img, const scalar_t* keys,
                                                                const scalar_t* values, const bool* mask,
                                                                const scalar_t* gate_w, const scalar_t* gate_b,
                                                                scalar_t* out, scalar_t* attention, ReadArgs a) {
  extern __shared__ float smem[];
  float* k_s = smem;
  float* v_s = k_s + a.C * a.T;
  float* gw_s = v_s + a.C * a.T;
  const int b = blockIdx.x / a.tiles, n = (blockIdx.x % a.tiles) * kThreads + threadIdx.x;
  load_sample(keys, values, gate_w, b, a, k_s, v_s, gw_s);
  if (n >= a.N) return;
  const scalar_t* r = img + (size_t)b * a.C * a.N + (size_t)n * a.pixel;
  float alpha[MAX_T];
  addressing<scalar_t, MAX_T>(r, k_s, mask, b, n, a, alpha);
  float z = static_cast<float>(gate_b[0]);
  for (int c = 0; c < a.C; ++c)
    z += gw_s[c] * static_cast<float>(r[(size_t)c * a.channel]) + gw_s[a.C + c] * read_value(alpha, v_s, c, a.T);
  const float g = sigmoidf_(z);
  scalar_t* dst = out + (size_t)b * a.C * a.N + (size_t)n * a.pixel;
  for (int c = 0; c < a.C; ++c) {
    const float rc = static_cast<float>(r[(size_t)c * a.channel]);
    dst[(size_t)c * a.channel] = static_cast<scalar_t>(rc + (read_value(alpha, v_s, c, a.T) - rc) * g);
  }
  if (attention != nullptr) {
#pragma unroll
    for (int t = 0; t < MAX_T; ++t)
      if (t < a.T) attention[((size_t)b * a.T + t) * a.N + n] = static_cast<scalar_t>(alpha[t]);
  }
}

// Per block: dK and dV partials (C x T each) and gate partials (2C + 1), written once, no atomics.
template <typename scalar_t, int MAX_T>
__global__ void __launch_bounds__(kThreads) read_backward_kernel(const scalar_t* grad_out, const scalar_t* img,
                                                                 const scalar_t* keys, const scalar_t* values,
                                                                 const bool* mask, const scalar_t* gate_w,
                                                                 const scalar_t* gate_b, scalar_t* grad_img,
                                                                 float* partials, ReadArgs a) {
  extern __shared__ float smem[];
  float* k_s = smem;
  float* v_s = k_s + a.C * a.T;
  float* gw_s = v_s + a.C * a.T;
  float* scratch = gw_s + 2 * a.C;  // kWarps x MAX_T
  const int b = blockIdx.x / a.tiles, n = (blockIdx.x % a.tiles) * kThreads + threadIdx.x;
  const bool active = n < a.N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  load_sample(keys, values, gate_w, b, a, k_s, v_s, gw_s);
  float* part = partials + (size_t)blockIdx.x * (2 * a.C * a.T + 2 * a.C + 1);  // sample-major
  float* dk_part = part;
  float* dv_part = part + a.C * a.T;
  float* dgate_part = part + 2 * a.C * a.T;

  // Sums a per-thread vector over the block's pixels into dst[0..T), fixed order.
  auto block_vector_sum = [&](const float (&x)[MAX_T], float* dst) {
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) {
      if (t < a.T) {
        const float s = warp_sum(x[t]);
        if (lane == 0) scratch[warp * MAX_T + t] = s;
      }
    }
    __syncthreads();
    if ((int)threadIdx.x < a.T) {
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += scratch[w * MAX_T + threadIdx.x];
      dst[threadIdx.x] = s;
    }
    __syncthreads();
  };

  const size_t offset = (size_t)b * a.C * a.N + (size_t)(active ? n : 0) * a.pixel;
  const scalar_t* r = img + offset;
  const scalar_t* dy = grad_out + offset;
  float alpha[MAX_T];
  addressing<scalar_t, MAX_T>(r, k_s, mask, b, active ? n : 0, a, alpha);
  float z = static_cast<float>(gate_b[0]);
  for (int c = 0; c < a.C; ++c)
    z += gw_s[c] * static_cast<float>(r[(size_t)c * a.channel]) + gw_s[a.C + c] * read_value(alpha, v_s, c, a.T);
  const float g = sigmoidf_(z);
  // Response gate r' = r + (o - r) g. Inactive threads carry dy = 0 and add nothing.
  float d_pre_gate = 0.f;
  for (int c = 0; c < a.C; ++c) {
    const float dyc = active ? static_cast<float>(dy[(size_t)c * a.channel]) : 0.f;
    d_pre_gate += dyc * (read_value(alpha, v_s, c, a.T) - static_cast<float>(r[(size_t)c * a.channel]));
  }
  d_pre_gate *= g * (1.f - g);
  const float dgb = block_sum(d_pre_gate, scratch);
  if (threadIdx.x == 0) dgate_part[2 * a.C] = dgb;
  // Value reading o = V alpha^T: dV and d_alpha; gate weight partials.
  float d_alpha[MAX_T], contrib[MAX_T];
#pragma unroll
  for (int t = 0; t < MAX_T; ++t) d_alpha[t] = 0.f;
  for (int c = 0; c < a.C; ++c) {
    const float rc = static_cast<float>(r[(size_t)c * a.channel]);
    const float oc = read_value(alpha, v_s, c, a.T);
    const float dyc = active ? static_cast<float>(dy[(size_t)c * a.channel]) : 0.f;
    const float doc = dyc * g + gw_s[a.C + c] * d_pre_gate;
    const float sr = block_sum(rc * d_pre_gate, scratch), so = block_sum(oc * d_pre_gate, scratch);
    if (threadIdx.x == 0) {
      dgate_part[c] = sr;
      dgate_part[a.C + c] = so;
    }
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) {
      d_alpha[t] += doc * (t < a.T ? v_s[c * a.T + t] : 0.f);
      contrib[t] = doc * alpha[t];
    }
    block_vector_sum(contrib, dv_part + c * a.T);
  }
  // Softmax: d_scores = alpha (d_alpha - sum_t alpha d_alpha), into d_alpha.
  float dot = 0.f;
#pragma unroll
  for (int t = 0; t < MAX_T; ++t) dot += alpha[t] * d_alpha[t];
#pragma unroll
  for (int t = 0; t < MAX_T; ++t) d_alpha[t] = alpha[t] * (d_alpha[t] - dot);
  // Key addressing s = r^T K: dr and dK.
  for (int c = 0; c < a.C; ++c) {
    const float rc = active ? static_cast<float>(r[(size_t)c * a.channel]) : 0.f;
    const float dyc = active ? static_cast<float>(dy[(size_t)c * a.channel]) : 0.f;
    float dr = dyc * (1.f - g) + gw_s[c] * d_pre_gate;
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) {
      dr += (t < a.T ? k_s[c * a.T + t] : 0.f) * d_alpha[t];
      contrib[t] = rc * d_alpha[t];
    }
    if (active) grad_img[offset + (size_t)c * a.channel] = static_cast<scalar_t>(dr);
    block_vector_sum(contrib, dk_part + c * a.T);
  }
}

int word_block(int T) { return T <= 16 ? 16 : T <= 32 ? 32 : 64; }

// Kernels that take more than the default 48 KB of dynamic shared memory must opt in, up to the
// device's per-block limit (dmgan.ops._cpp sends larger inputs elsewhere; this names the problem
// when the op is called directly).
template <typename Kernel>
void set_shared_memory(Kernel kernel, size_t bytes, const char* op) {
  if (bytes <= 48 * 1024) return;
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= (size_t)limit, op, " (cuda kernel): needs ", bytes, " bytes of shared memory a block, the device has ",
              limit, " (fewer channels or words)");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

ReadArgs read_args(const at::Tensor& img, const at::Tensor& keys, bool legacy_mask, const char* op) {
  TORCH_CHECK(img.is_cuda(), op, " (cuda kernel): inputs must be on a CUDA device");
  check_kernel_dtype(img, op);
  TORCH_CHECK(keys.size(2) <= 64, op, " (cuda kernel): at most 64 words, got ", keys.size(2));
  const int64_t pixels = img.size(2) * img.size(3);
  const int64_t tiles = (pixels + kThreads - 1) / kThreads;
  TORCH_CHECK(img.numel() < (1LL << 31) && img.size(0) * keys.size(2) * pixels < (1LL << 31) &&
                  img.size(0) * tiles < (1LL << 31),
              op, " (cuda kernel): tensors must have fewer than 2^31 elements");
  const PixelStrides strides = pixel_strides(img);
  return ReadArgs{(int)img.size(0), (int)img.size(1), (int)pixels, (int)keys.size(2), (int)tiles, legacy_mask,
                  (int)strides.channel, (int)strides.pixel};
}

std::tuple<at::Tensor, at::Tensor> memory_read_cuda(const at::Tensor& img, const at::Tensor& keys,
                                                    const at::Tensor& values, const at::Tensor& pad_mask,
                                                    const at::Tensor& gate_w, const at::Tensor& gate_b,
                                                    bool return_attention, bool legacy_mask) {
  check_read_inputs(img, keys, values, pad_mask, gate_w, gate_b);
  const ReadArgs a = read_args(img, keys, legacy_mask, "memory_read");
  const c10::cuda::CUDAGuard guard(img.device());
  at::Tensor out = new_output_like(img);
  at::Tensor attention = return_attention ? new_output({a.batch, a.T, img.size(2), img.size(3)}, img.options())
                                          : new_output({0}, img.options());
  if (out.numel() == 0) return {out, attention};  // no sample or no pixel: nothing to launch
  const size_t shared = (2 * a.C * a.T + 2 * a.C) * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  DMGAN_DISPATCH_KERNEL_TYPES(img.scalar_type(), "memory_read_cuda", [&] {
    auto launch = [&](auto kernel) {
      set_shared_memory(kernel, shared, "memory_read");
      kernel<<<a.batch * a.tiles, kThreads, shared, stream>>>(
          img.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), pad_mask.data_ptr<bool>(),
          gate_w.data_ptr<scalar_t>(), gate_b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          return_attention ? attention.data_ptr<scalar_t>() : nullptr, a);
    };
    switch (word_block(a.T)) {
      case 16: launch(read_forward_kernel<scalar_t, 16>); break;
      case 32: launch(read_forward_kernel<scalar_t, 32>); break;
      default: launch(read_forward_kernel<scalar_t, 64>); break;
    }
  });
  DMGAN_CUDA_CHECK();
  return {out, attention};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_read_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& img, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& pad_mask, const at::Tensor& gate_w, const at::Tensor& gate_b, bool legacy_mask) {
  check_read_inputs(img, keys, values, pad_mask, gate_w, gate_b);
  check_read_grad(grad_out, img);
  const ReadArgs a = read_args(img, keys, legacy_mask, "memory_read_backward");
  const c10::cuda::CUDAGuard guard(img.device());
  const int max_t = word_block(a.T);
  const int64_t slot = 2 * a.C * a.T + 2 * a.C + 1;
  // No pixel: no block runs and every sum is zero (so the partials start at zero).
  at::Tensor partials = a.N == 0 ? at::zeros({a.batch, 1, slot}, img.options().dtype(at::kFloat))
                                 : new_output({a.batch, a.tiles, slot}, img.options().dtype(at::kFloat));
  at::Tensor grad_img = new_output_like(img);
  const size_t shared = (2 * a.C * a.T + 2 * a.C + kWarps * max_t) * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (grad_img.numel() > 0) {
    DMGAN_DISPATCH_KERNEL_TYPES(img.scalar_type(), "memory_read_backward_cuda", [&] {
      auto launch = [&](auto kernel) {
        set_shared_memory(kernel, shared, "memory_read_backward");
        kernel<<<a.batch * a.tiles, kThreads, shared, stream>>>(
            grad_out.data_ptr<scalar_t>(), img.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(),
            values.data_ptr<scalar_t>(), pad_mask.data_ptr<bool>(), gate_w.data_ptr<scalar_t>(),
            gate_b.data_ptr<scalar_t>(), grad_img.data_ptr<scalar_t>(), partials.data_ptr<float>(), a);
      };
      switch (max_t) {
        case 16: launch(read_backward_kernel<scalar_t, 16>); break;
        case 32: launch(read_backward_kernel<scalar_t, 32>); break;
        default: launch(read_backward_kernel<scalar_t, 64>); break;
      }
    });
    DMGAN_CUDA_CHECK();
  }
  const int64_t CT = (int64_t)a.C * a.T;
  at::Tensor per_sample = partials.sum(1);  // B x slot, a deterministic reduction
  at::Tensor grad_keys = per_sample.narrow(1, 0, CT).reshape(keys.sizes()).to(keys.scalar_type());
  at::Tensor grad_values = per_sample.narrow(1, CT, CT).reshape(values.sizes()).to(values.scalar_type());
  at::Tensor grad_gate = per_sample.narrow(1, 2 * CT, 2 * a.C + 1).sum(0);
  at::Tensor grad_gate_w = grad_gate.narrow(0, 0, 2 * a.C).reshape(gate_w.sizes()).to(gate_w.scalar_type());
  at::Tensor grad_gate_b = grad_gate.narrow(0, 2 * a.C, 1).reshape(gate_b.sizes()).to(gate_b.scalar_type());
  return {grad_img, grad_keys.contiguous(), grad_values.contiguous(), grad_gate_w.contiguous(),
          grad_gate_b.contiguous()};
}

// ---------------------------------------------------------------------------------------------
// Memory writing: one block per sample, its words one after another (the work is tiny).

struct WriteArgs {
  int NW, NR, T;
};

// Shared memory of the writing kernels, in floats: one definition for both kernels and for the
// launchers that size the allocation. The backward adds the gradient buffers before the scratch.
struct WriteShared {
  float *rbar, *image_pre, *words, *words_pre, *memory;              // NR, NM, NW, NM, NM
  float *d_key, *d_value, *d_words_pre, *d_image, *scratch;          // NR, NR, NM, NM (backward); 32

  __host__ __device__ static size_t floats(const WriteArgs& a, bool backward) {
    const size_t NM = 2 * a.NR;
    return a.NR + 3 * NM + a.NW + (backward ? 2 * a.NR + 2 * NM : 0) + 32;
  }

  __device__ WriteShared(float* smem, const WriteArgs& a, bool backward) {
    const int NM = 2 * a.NR;
    rbar = smem;
    image_pre = rbar + a.NR;
    words = image_pre + NM;
    words_pre = words + a.NW;
    memory = words_pre + NM;
    d_key = memory + NM;
    d_value = d_key + (backward ? a.NR : 0);
    d_words_pre = d_value + (backward ? a.NR : 0);
    d_image = d_words_pre + (backward ? NM : 0);
    scratch = d_image + (backward ? NM : 0);
  }
};

struct WriteWeights {
  const void *A, *B, *M_w, *M_w_b, *M_r, *M_r_b, *key_w, *key_b, *value_w, *value_b;
};

template <typename scalar_t>
__device__ __forceinline__ float ld(const void* p, size_t i) {
  return static_cast<float>(static_cast<const scalar_t*>(p)[i]);
}

// f_r (pre-ReLU, NM) into image_pre and B . rbar; shared: rbar_s (NR).
template <typename scalar_t>
__device__ float image_side(const scalar_t* rbar, const WriteWeights& w, const WriteArgs& a, int b, float* rbar_s,
                            float* image_pre, float* scratch) {
  const int NM = 2 * a.NR;
  for (int r = threadIdx.x; r < a.NR; r += blockDim.x) rbar_s[r] = static_cast<float>(rbar[(size_t)b * a.NR + r]);
  __syncthreads();
  for (int m = threadIdx.x; m < NM; m += blockDim.x) {
    float s = ld<scalar_t>(w.M_r_b, m);
    for (int r = 0; r < a.NR; ++r) s += ld<scalar_t>(w.M_r, (size_t)m * a.NR + r) * rbar_s[r];
    image_pre[m] = s;
  }
  float part = 0.f;
  for (int r = threadIdx.x; r < a.NR; r += blockDim.x) part += ld<scalar_t>(w.B, r) * rbar_s[r];
  return block_sum(part, scratch);  // also syncs image_pre
}

// For word t: words_s (NW), words_pre (NM), memory (NM); returns the gate.
template <typename scalar_t>
__device__ float word_side(const scalar_t* words, const WriteWeights& w, const WriteArgs& a, int b, int t,
                           float gate_r, const float* image_pre, float* words_s, float* words_pre, float* memory,
                           float* scratch) {
  const int NM = 2 * a.NR;
  for (int k = threadIdx.x; k < a.NW; k += blockDim.x)
    words_s[k] = static_cast<float>(words[((size_t)b * a.NW + k) * a.T + t]);
  __syncthreads();
  float part = 0.f;
  for (int k = threadIdx.x; k < a.NW; k += blockDim.x) part += ld<scalar_t>(w.A, k) * words_s[k];
  const float gate = sigmoidf_(block_sum(part, scratch) + gate_r);
  for (int m = threadIdx.x; m < NM; m += blockDim.x) {
    float s = ld<scalar_t>(w.M_w_b, m);
    for (int k = 0; k < a.NW; ++k) s += ld<scalar_t>(w.M_w, (size_t)m * a.NW + k) * words_s[k];
    words_pre[m] = s;
    memory[m] = fmaxf(s, 0.f) * gate + fmaxf(image_pre[m], 0.f) * (1.f - gate);
  }
  __syncthreads();
  return gate;
}

template <typename scalar_t>
__device__ __forceinline__ float project(const void* W, const void* bias, const float* memory, int r, int NM) {
  float s = ld<scalar_t>(bias, r);
  for (int m = 0; m < NM; ++m) s += ld<scalar_t>(W, (size_t)r * NM + m) * memory[m];
  return s;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWriteThreads) write_forward_kernel(const scalar_t* words, const scalar_t* rbar,
                                                                      WriteWeights w, scalar_t* keys, scalar_t* values,
                                                                      WriteArgs a) {
  extern __shared__ float smem[];
  const int NM = 2 * a.NR, b = blockIdx.x;
  const WriteShared sh(smem, a, /*backward=*/false);
  float *rbar_s = sh.rbar, *image_pre = sh.image_pre, *words_s = sh.words, *words_pre = sh.words_pre;
  float *memory = sh.memory, *scratch = sh.scratch;
  const float gate_r = image_side<scalar_t>(rbar, w, a, b, rbar_s, image_pre, scratch);
  for (int t = 0; t < a.T; ++t) {
    word_side<scalar_t>(words, w, a, b, t, gate_r, image_pre, words_s, words_pre, memory, scratch);
    for (int r = threadIdx.x; r < a.NR; r += blockDim.x) {
      const size_t out = ((size_t)b * a.NR + r) * a.T + t;
      keys[out] = static_cast<scalar_t>(fmaxf(project<scalar_t>(w.key_w, w.key_b, memory, r, NM), 0.f));
      values[out] = static_cast<scalar_t>(fmaxf(project<scalar_t>(w.value_w, w.value_b, memory, r, NM), 0.f));
    }
    __syncthreads();
  }
}

// What the backward stores for the products after it (fp32): per word, the memory M and the
// gradients of the projections' and the mixing's pre-activations and of the writing gate; per
// sample, the gradient of f_r's pre-activation and the gate's total. Layouts are B x T x ... so
// that each weight gradient is one matrix product over the B T words.
struct WriteGrads {
  float *memory, *d_key, *d_value, *d_words_pre, *d_gate;  // B x T x {NM, NR, NR, NM, 1}
  float *d_image_pre, *d_gate_total;                        // B x NM, B
};

template <typename scalar_t>
__global__ void __launch_bounds__(kWriteThreads) write_backward_kernel(
    const scalar_t* grad_keys, const scalar_t* grad_values, const scalar_t* words, const scalar_t* rbar,
    WriteWeights w, scalar_t* grad_words, scalar_t* grad_rbar, WriteGrads out, WriteArgs a) {
  extern __shared__ float smem[];
  const int NM = 2 * a.NR, b = blockIdx.x;
  const WriteShared sh(smem, a, /*backward=*/true);
  float *rbar_s = sh.rbar, *image_pre = sh.image_pre, *words_s = sh.words, *words_pre = sh.words_pre;
  float *memory = sh.memory, *d_key = sh.d_key, *d_value = sh.d_value, *d_words_pre = sh.d_words_pre;
  float *d_image_acc = sh.d_image, *scratch = sh.scratch;
  for (int m = threadIdx.x; m < NM; m += blockDim.x) d_image_acc[m] = 0.f;
  const float gate_r = image_side<scalar_t>(rbar, w, a, b, rbar_s, image_pre, scratch);
  float d_gate_total = 0.f;
  for (int t = 0; t < a.T; ++t) {
    const size_t word = (size_t)b * a.T + t;
    const float gate = word_side<scalar_t>(words, w, a, b, t, gate_r, image_pre, words_s, words_pre, memory, scratch);
    // Key and value projections Y = ReLU(W M + b).
    for (int r = threadIdx.x; r < a.NR; r += blockDim.x) {
      const size_t io = ((size_t)b * a.NR + r) * a.T + t;
      const float dk = project<scalar_t>(w.key_w, w.key_b, memory, r, NM) > 0.f ? static_cast<float>(grad_keys[io]) : 0.f;
      const float dv =
          project<scalar_t>(w.value_w, w.value_b, memory, r, NM) > 0.f ? static_cast<float>(grad_values[io]) : 0.f;
      d_key[r] = dk;
      d_value[r] = dv;
      out.d_key[word * a.NR + r] = dk;
      out.d_value[word * a.NR + r] = dv;
    }
    __syncthreads();
    // Mixing and the gate: this thread's memory rows.
    float d_gate_part = 0.f;
    for (int m = threadIdx.x; m < NM; m += blockDim.x) {
      float dm = 0.f;
      for (int r = 0; r < a.NR; ++r)
        dm += ld<scalar_t>(w.key_w, (size_t)r * NM + m) * d_key[r] + ld<scalar_t>(w.value_w, (size_t)r * NM + m) * d_value[r];
      d_words_pre[m] = words_pre[m] > 0.f ? dm * gate : 0.f;
      d_image_acc[m] += dm * (1.f - gate);
      d_gate_part += dm * (fmaxf(words_pre[m], 0.f) - fmaxf(image_pre[m], 0.f));
      out.memory[word * NM + m] = memory[m];
      out.d_words_pre[word * NM + m] = d_words_pre[m];
    }
    const float d_gate = block_sum(d_gate_part, scratch) * gate * (1.f - gate);  // also syncs d_words_pre
    d_gate_total += d_gate;
    if (threadIdx.x == 0) out.d_gate[word] = d_gate;
    for (int k = threadIdx.x; k < a.NW; k += blockDim.x) {
      float d = ld<scalar_t>(w.A, k) * d_gate;
      for (int m = 0; m < NM; ++m) d += ld<scalar_t>(w.M_w, (size_t)m * a.NW + k) * d_words_pre[m];
      grad_words[((size_t)b * a.NW + k) * a.T + t] = static_cast<scalar_t>(d);
    }
    __syncthreads();
  }
  for (int m = threadIdx.x; m < NM; m += blockDim.x) {
    d_image_acc[m] = image_pre[m] > 0.f ? d_image_acc[m] : 0.f;
    out.d_image_pre[(size_t)b * NM + m] = d_image_acc[m];
  }
  if (threadIdx.x == 0) out.d_gate_total[b] = d_gate_total;
  __syncthreads();
  for (int r = threadIdx.x; r < a.NR; r += blockDim.x) {
    float d = d_gate_total * ld<scalar_t>(w.B, r);
    for (int m = 0; m < NM; ++m) d += ld<scalar_t>(w.M_r, (size_t)m * a.NR + r) * d_image_acc[m];
    grad_rbar[(size_t)b * a.NR + r] = static_cast<scalar_t>(d);
  }
}

WriteWeights weight_pointers(at::TensorList ws) {
  return {ws[0].data_ptr(), ws[1].data_ptr(), ws[2].data_ptr(), ws[3].data_ptr(), ws[4].data_ptr(),
          ws[5].data_ptr(), ws[6].data_ptr(), ws[7].data_ptr(), ws[8].data_ptr(), ws[9].data_ptr()};
}

WriteArgs write_args(const at::Tensor& words, const at::Tensor& rbar, const char* op) {
  TORCH_CHECK(words.is_cuda(), op, " (cuda kernel): inputs must be on a CUDA device");
  check_kernel_dtype(words, op);
  TORCH_CHECK(words.numel() < (1LL << 31) && words.size(0) * words.size(2) * 2 * rbar.size(1) < (1LL << 31),
              op, " (cuda kernel): tensors must have fewer than 2^31 elements");
  return WriteArgs{(int)words.size(1), (int)rbar.size(1), (int)words.size(2)};
}

std::tuple<at::Tensor, at::Tensor> memory_write_cuda(const at::Tensor& words, const at::Tensor& rbar,
                                                     const at::Tensor& A, const at::Tensor& B, const at::Tensor& M_w,
                                                     const at::Tensor& M_w_b, const at::Tensor& M_r,
                                                     const at::Tensor& M_r_b, const at::Tensor& key_w,
                                                     const at::Tensor& key_b, const at::Tensor& value_w,
                                                     const at::Tensor& value_b) {
  const std::vector<at::Tensor> weights = {A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b};
  check_write_inputs(words, rbar, weights);
  const WriteArgs a = write_args(words, rbar, "memory_write");
  const c10::cuda::CUDAGuard guard(words.device());
  at::Tensor keys = new_output({words.size(0), a.NR, a.T}, words.options()), values = new_output_like(keys);
  if (keys.numel() == 0) return {keys, values};  // no sample: nothing to launch
  const size_t shared = WriteShared::floats(a, /*backward=*/false) * sizeof(float);
  DMGAN_DISPATCH_KERNEL_TYPES(words.scalar_type(), "memory_write_cuda", [&] {
    set_shared_memory(write_forward_kernel<scalar_t>, shared, "memory_write");
    write_forward_kernel<scalar_t><<<words.size(0), kWriteThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
        words.data_ptr<scalar_t>(), rbar.data_ptr<scalar_t>(), weight_pointers(weights), keys.data_ptr<scalar_t>(),
        values.data_ptr<scalar_t>(), a);
  });
  DMGAN_CUDA_CHECK();
  return {keys, values};
}

std::vector<at::Tensor> memory_write_backward_cuda(const at::Tensor& grad_keys, const at::Tensor& grad_values,
                                                   const at::Tensor& words, const at::Tensor& rbar, const at::Tensor& A,
                                                   const at::Tensor& B, const at::Tensor& M_w, const at::Tensor& M_w_b,
                                                   const at::Tensor& M_r, const at::Tensor& M_r_b,
                                                   const at::Tensor& key_w, const at::Tensor& key_b,
                                                   const at::Tensor& value_w, const at::Tensor& value_b) {
  const std::vector<at::Tensor> weights = {A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b};
  check_write_inputs(words, rbar, weights);
  check_write_grads(grad_keys, grad_values, words, rbar);
  const WriteArgs a = write_args(words, rbar, "memory_write_backward");
  const c10::cuda::CUDAGuard guard(words.device());
  const int64_t batch = words.size(0), NM = 2 * a.NR;
  const auto f32 = words.options().dtype(at::kFloat);
  at::Tensor memory = new_output({batch, a.T, NM}, f32), d_key = new_output({batch, a.T, a.NR}, f32);
  at::Tensor d_value = new_output_like(d_key), d_words_pre = new_output_like(memory);
  at::Tensor d_gate = new_output({batch, a.T}, f32), d_image_pre = new_output({batch, NM}, f32);
  at::Tensor d_gate_total = new_output({batch}, f32);
  at::Tensor grad_words = new_output_like(words), grad_rbar = new_output_like(rbar);
  if (batch > 0) {
    const size_t shared = WriteShared::floats(a, /*backward=*/true) * sizeof(float);
    const WriteGrads out{memory.data_ptr<float>(),      d_key.data_ptr<float>(),       d_value.data_ptr<float>(),
                         d_words_pre.data_ptr<float>(), d_gate.data_ptr<float>(),      d_image_pre.data_ptr<float>(),
                         d_gate_total.data_ptr<float>()};
    DMGAN_DISPATCH_KERNEL_TYPES(words.scalar_type(), "memory_write_backward_cuda", [&] {
      set_shared_memory(write_backward_kernel<scalar_t>, shared, "memory_write_backward");
      write_backward_kernel<scalar_t><<<batch, kWriteThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
          grad_keys.data_ptr<scalar_t>(), grad_values.data_ptr<scalar_t>(), words.data_ptr<scalar_t>(),
          rbar.data_ptr<scalar_t>(), weight_pointers(weights), grad_words.data_ptr<scalar_t>(),
          grad_rbar.data_ptr<scalar_t>(), out, a);
    });
    DMGAN_CUDA_CHECK();
  }
  // Each weight gradient is one product over the B T words (or the B samples): deterministic.
  const int64_t words_total = batch * a.T;
  auto per_word = [&](const at::Tensor& t) { return t.reshape({words_total, t.size(-1)}); };
  const at::Tensor words_bt = words.to(at::kFloat).transpose(1, 2).reshape({words_total, a.NW});  // BT x NW
  const at::Tensor rbar_f = rbar.to(at::kFloat);
  const std::vector<at::Tensor> summed = {
      d_gate.reshape({1, words_total}).mm(words_bt),                   // A        1 x NW
      d_gate_total.reshape({1, batch}).mm(rbar_f),                     // B        1 x NR
      per_word(d_words_pre).t().mm(words_bt),                          // M_w      NM x NW
      per_word(d_words_pre).sum(0),                                    // M_w_b    NM
      d_image_pre.t().mm(rbar_f),                                      // M_r      NM x NR
      d_image_pre.sum(0),                                              // M_r_b    NM
      per_word(d_key).t().mm(per_word(memory)),                        // key_w    NR x NM
      per_word(d_key).sum(0),                                          // key_b    NR
      per_word(d_value).t().mm(per_word(memory)),                      // value_w  NR x NM
      per_word(d_value).sum(0),                                        // value_b  NR
  };
  std::vector<at::Tensor> grads = {grad_words, grad_rbar};
  for (size_t i = 0; i < weights.size(); ++i) {
    grads.push_back(summed[i].reshape(weights[i].sizes()).to(weights[i].scalar_type()).contiguous());
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgan, CUDA, m) {
  m.impl("memory_write", &memory_write_cuda);
  m.impl("memory_write_backward", &memory_write_backward_cuda);
  m.impl("memory_read", &memory_read_cuda);
  m.impl("memory_read_backward", &memory_read_backward_cuda);
}

}  // namespace dmgan
