// CUDA kernels for the dynamic memory: memory_write and memory_read, forward and backward.
//
// Reading: one thread per pixel; the sample's keys, values and response-gate weights sit in
// shared memory as fp32, a pixel's T scores live in registers (T padded to 16, 32 or 64 at
// compile time), the softmax runs in registers. Backward reductions over pixels (dK, dV, gate)
// go through fixed-order warp shuffles and per-block partials summed afterwards, and weight
// gradients of the writing through per-sample partials: no atomics, so gradients are
// bitwise reproducible. Half and bfloat16 inputs are computed in fp32.
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
  bool legacy;
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
    const float rc = static_cast<float>(r[(size_t)c * a.N]);
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
  const int b = blockIdx.y, n = blockIdx.x * kThreads + threadIdx.x;
  load_sample(keys, values, gate_w, b, a, k_s, v_s, gw_s);
  if (n >= a.N) return;
  const scalar_t* r = img + (size_t)b * a.C * a.N + n;
  float alpha[MAX_T];
  addressing<scalar_t, MAX_T>(r, k_s, mask, b, n, a, alpha);
  float z = static_cast<float>(gate_b[0]);
  for (int c = 0; c < a.C; ++c)
    z += gw_s[c] * static_cast<float>(r[(size_t)c * a.N]) + gw_s[a.C + c] * read_value(alpha, v_s, c, a.T);
  const float g = sigmoidf_(z);
  scalar_t* dst = out + (size_t)b * a.C * a.N + n;
  for (int c = 0; c < a.C; ++c) {
    const float rc = static_cast<float>(r[(size_t)c * a.N]);
    dst[(size_t)c * a.N] = static_cast<scalar_t>(rc + (read_value(alpha, v_s, c, a.T) - rc) * g);
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
  const int b = blockIdx.y, n = blockIdx.x * kThreads + threadIdx.x;
  const bool active = n < a.N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  load_sample(keys, values, gate_w, b, a, k_s, v_s, gw_s);
  float* part = partials + ((size_t)b * gridDim.x + blockIdx.x) * (2 * a.C * a.T + 2 * a.C + 1);
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

  const size_t offset = (size_t)b * a.C * a.N + (active ? n : 0);
  const scalar_t* r = img + offset;
  const scalar_t* dy = grad_out + offset;
  float alpha[MAX_T];
  addressing<scalar_t, MAX_T>(r, k_s, mask, b, active ? n : 0, a, alpha);
  float z = static_cast<float>(gate_b[0]);
  for (int c = 0; c < a.C; ++c)
    z += gw_s[c] * static_cast<float>(r[(size_t)c * a.N]) + gw_s[a.C + c] * read_value(alpha, v_s, c, a.T);
  const float g = sigmoidf_(z);
  // Response gate r' = r + (o - r) g. Inactive threads carry dy = 0 and add nothing.
  float d_pre_gate = 0.f;
  for (int c = 0; c < a.C; ++c) {
    const float dyc = active ? static_cast<float>(dy[(size_t)c * a.N]) : 0.f;
    d_pre_gate += dyc * (read_value(alpha, v_s, c, a.T) - static_cast<float>(r[(size_t)c * a.N]));
  }
  d_pre_gate *= g * (1.f - g);
  const float dgb = block_sum(d_pre_gate, scratch);
  if (threadIdx.x == 0) dgate_part[2 * a.C] = dgb;
  // Value reading o = V alpha^T: dV and d_alpha; gate weight partials.
  float d_alpha[MAX_T], contrib[MAX_T];
#pragma unroll
  for (int t = 0; t < MAX_T; ++t) d_alpha[t] = 0.f;
  for (int c = 0; c < a.C; ++c) {
    const float rc = static_cast<float>(r[(size_t)c * a.N]);
    const float oc = read_value(alpha, v_s, c, a.T);
    const float dyc = active ? static_cast<float>(dy[(size_t)c * a.N]) : 0.f;
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
    const float rc = active ? static_cast<float>(r[(size_t)c * a.N]) : 0.f;
    const float dyc = active ? static_cast<float>(dy[(size_t)c * a.N]) : 0.f;
    float dr = dyc * (1.f - g) + gw_s[c] * d_pre_gate;
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) {
      dr += (t < a.T ? k_s[c * a.T + t] : 0.f) * d_alpha[t];
      contrib[t] = rc * d_alpha[t];
    }
    if (active) grad_img[offset + (size_t)c * a.N] = static_cast<scalar_t>(dr);
    block_vector_sum(contrib, dk_part + c * a.T);
  }
}

int word_block(int T) { return T <= 16 ? 16 : T <= 32 ? 32 : 64; }

template <typename Kernel>
void set_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  }
}

std::tuple<at::Tensor, at::Tensor> memory_read_cuda(const at::Tensor& img, const at::Tensor& keys,
                                                    const at::Tensor& values, const at::Tensor& pad_mask,
                                                    const at::Tensor& gate_w, const at::Tensor& gate_b,
                                                    bool return_attention, bool legacy_mask) {
  check_read_inputs(img, keys, values, pad_mask, gate_w, gate_b);
  TORCH_CHECK(img.is_cuda(), "memory_read (cuda kernel): inputs must be on a CUDA device");
  TORCH_CHECK(keys.size(2) <= 64, "memory_read (cuda kernel): at most 64 words, got ", keys.size(2));
  TORCH_CHECK(img.numel() < (1LL << 31) && img.size(0) * keys.size(2) * img.size(2) * img.size(3) < (1LL << 31),
              "memory_read (cuda kernel): tensors must have fewer than 2^31 elements");
  const c10::cuda::CUDAGuard guard(img.device());
  const ReadArgs a{(int)img.size(0), (int)img.size(1), (int)(img.size(2) * img.size(3)), (int)keys.size(2),
                   legacy_mask};
  at::Tensor out = new_output_like(img);
  at::Tensor attention = return_attention ? new_output({a.batch, a.T, img.size(2), img.size(3)}, img.options())
                                          : new_output({0}, img.options());
  const dim3 grid((a.N + kThreads - 1) / kThreads, a.batch);
  const size_t shared = (2 * a.C * a.T + 2 * a.C) * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, img.scalar_type(), "memory_read_cuda", [&] {
    auto launch = [&](auto kernel) {
      set_shared_memory(kernel, shared);
      kernel<<<grid, kThreads, shared, stream>>>(
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
  TORCH_CHECK(img.is_cuda() && keys.size(2) <= 64, "memory_read_backward (cuda kernel): CUDA inputs, T <= 64");
  check_read_grad(grad_out, img);
  const c10::cuda::CUDAGuard guard(img.device());
  const ReadArgs a{(int)img.size(0), (int)img.size(1), (int)(img.size(2) * img.size(3)), (int)keys.size(2),
                   legacy_mask};
  const int max_t = word_block(a.T);
  const dim3 grid((a.N + kThreads - 1) / kThreads, a.batch);
  const int64_t slot = 2 * a.C * a.T + 2 * a.C + 1;
  at::Tensor partials = new_output({a.batch, (int64_t)grid.x, slot}, img.options().dtype(at::kFloat));
  at::Tensor grad_img = new_output_like(img);
  const size_t shared = (2 * a.C * a.T + 2 * a.C + kWarps * max_t) * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, img.scalar_type(), "memory_read_backward_cuda", [&] {
    auto launch = [&](auto kernel) {
      set_shared_memory(kernel, shared);
      kernel<<<grid, kThreads, shared, stream>>>(
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

// Partial layout per sample (fp32): A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b.
struct WriteOffsets {
  int64_t A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b, total;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kWriteThreads) write_backward_kernel(
    const scalar_t* grad_keys, const scalar_t* grad_values, const scalar_t* words, const scalar_t* rbar,
    WriteWeights w, scalar_t* grad_words, scalar_t* grad_rbar, float* partials, WriteOffsets off, WriteArgs a) {
  extern __shared__ float smem[];
  const int NM = 2 * a.NR, b = blockIdx.x;
  const WriteShared sh(smem, a, /*backward=*/true);
  float *rbar_s = sh.rbar, *image_pre = sh.image_pre, *words_s = sh.words, *words_pre = sh.words_pre;
  float *memory = sh.memory, *d_key = sh.d_key, *d_value = sh.d_value, *d_words_pre = sh.d_words_pre;
  float *d_image_acc = sh.d_image, *scratch = sh.scratch;
  float* part = partials + (size_t)b * off.total;
  for (int64_t i = threadIdx.x; i < off.total; i += blockDim.x) part[i] = 0.f;
  for (int m = threadIdx.x; m < NM; m += blockDim.x) d_image_acc[m] = 0.f;
  const float gate_r = image_side<scalar_t>(rbar, w, a, b, rbar_s, image_pre, scratch);
  float d_gate_total = 0.f;
  for (int t = 0; t < a.T; ++t) {
    const float gate = word_side<scalar_t>(words, w, a, b, t, gate_r, image_pre, words_s, words_pre, memory, scratch);
    // Key and value projections Y = ReLU(W M + b).
    for (int r = threadIdx.x; r < a.NR; r += blockDim.x) {
      const size_t io = ((size_t)b * a.NR + r) * a.T + t;
      const float dk = project<scalar_t>(w.key_w, w.key_b, memory, r, NM) > 0.f ? static_cast<float>(grad_keys[io]) : 0.f;
      const float dv =
          project<scalar_t>(w.value_w, w.value_b, memory, r, NM) > 0.f ? static_cast<float>(grad_values[io]) : 0.f;
      d_key[r] = dk;
      d_value[r] = dv;
      part[off.key_b + r] += dk;
      part[off.value_b + r] += dv;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < a.NR * NM; i += blockDim.x) {
      const int r = i / NM, m = i % NM;
      part[off.key_w + i] += d_key[r] * memory[m];
      part[off.value_w + i] += d_value[r] * memory[m];
    }
    // Mixing and the gate: this thread's memory rows.
    float d_gate_part = 0.f;
    for (int m = threadIdx.x; m < NM; m += blockDim.x) {
      float dm = 0.f;
      for (int r = 0; r < a.NR; ++r)
        dm += ld<scalar_t>(w.key_w, (size_t)r * NM + m) * d_key[r] + ld<scalar_t>(w.value_w, (size_t)r * NM + m) * d_value[r];
      d_words_pre[m] = words_pre[m] > 0.f ? dm * gate : 0.f;
      d_image_acc[m] += dm * (1.f - gate);
      d_gate_part += dm * (fmaxf(words_pre[m], 0.f) - fmaxf(image_pre[m], 0.f));
      part[off.M_w_b + m] += d_words_pre[m];
    }
    const float d_gate = block_sum(d_gate_part, scratch) * gate * (1.f - gate);  // also syncs d_words_pre
    d_gate_total += d_gate;
    for (int i = threadIdx.x; i < NM * a.NW; i += blockDim.x) part[off.M_w + i] += d_words_pre[i / a.NW] * words_s[i % a.NW];
    for (int k = threadIdx.x; k < a.NW; k += blockDim.x) {
      float d = ld<scalar_t>(w.A, k) * d_gate;
      for (int m = 0; m < NM; ++m) d += ld<scalar_t>(w.M_w, (size_t)m * a.NW + k) * d_words_pre[m];
      grad_words[((size_t)b * a.NW + k) * a.T + t] = static_cast<scalar_t>(d);
      part[off.A + k] += words_s[k] * d_gate;
    }
    __syncthreads();
  }
  for (int m = threadIdx.x; m < NM; m += blockDim.x) {
    d_image_acc[m] = image_pre[m] > 0.f ? d_image_acc[m] : 0.f;
    part[off.M_r_b + m] = d_image_acc[m];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < NM * a.NR; i += blockDim.x) part[off.M_r + i] = d_image_acc[i / a.NR] * rbar_s[i % a.NR];
  for (int r = threadIdx.x; r < a.NR; r += blockDim.x) {
    float d = d_gate_total * ld<scalar_t>(w.B, r);
    for (int m = 0; m < NM; ++m) d += ld<scalar_t>(w.M_r, (size_t)m * a.NR + r) * d_image_acc[m];
    grad_rbar[(size_t)b * a.NR + r] = static_cast<scalar_t>(d);
    part[off.B + r] = d_gate_total * rbar_s[r];
  }
}

WriteWeights weight_pointers(at::TensorList ws) {
  return {ws[0].data_ptr(), ws[1].data_ptr(), ws[2].data_ptr(), ws[3].data_ptr(), ws[4].data_ptr(),
          ws[5].data_ptr(), ws[6].data_ptr(), ws[7].data_ptr(), ws[8].data_ptr(), ws[9].data_ptr()};
}

std::tuple<at::Tensor, at::Tensor> memory_write_cuda(const at::Tensor& words, const at::Tensor& rbar,
                                                     const at::Tensor& A, const at::Tensor& B, const at::Tensor& M_w,
                                                     const at::Tensor& M_w_b, const at::Tensor& M_r,
                                                     const at::Tensor& M_r_b, const at::Tensor& key_w,
                                                     const at::Tensor& key_b, const at::Tensor& value_w,
                                                     const at::Tensor& value_b) {
  const std::vector<at::Tensor> weights = {A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b};
  check_write_inputs(words, rbar, weights);
  TORCH_CHECK(words.is_cuda(), "memory_write (cuda kernel): inputs must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(words.device());
  const WriteArgs a{(int)words.size(1), (int)rbar.size(1), (int)words.size(2)};
  at::Tensor keys = new_output({words.size(0), a.NR, a.T}, words.options()), values = new_output_like(keys);
  const size_t shared = WriteShared::floats(a, /*backward=*/false) * sizeof(float);
  TORCH_CHECK(shared <= 48 * 1024, "memory_write (cuda kernel): N_w and N_r too large for shared memory");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, words.scalar_type(), "memory_write_cuda", [&] {
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
  TORCH_CHECK(words.is_cuda(), "memory_write_backward (cuda kernel): inputs must be on a CUDA device");
  check_write_grads(grad_keys, grad_values, words, rbar);
  const c10::cuda::CUDAGuard guard(words.device());
  const WriteArgs a{(int)words.size(1), (int)rbar.size(1), (int)words.size(2)};
  WriteOffsets off{};
  int64_t* fields[] = {&off.A, &off.B, &off.M_w, &off.M_w_b, &off.M_r, &off.M_r_b, &off.key_w, &off.key_b, &off.value_w, &off.value_b};
  int64_t total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    *fields[i] = total;
    total += weights[i].numel();
  }
  off.total = total;
  at::Tensor partials = new_output({words.size(0), total}, words.options().dtype(at::kFloat));
  at::Tensor grad_words = new_output_like(words), grad_rbar = new_output_like(rbar);
  const size_t shared = WriteShared::floats(a, /*backward=*/true) * sizeof(float);
  TORCH_CHECK(shared <= 48 * 1024, "memory_write_backward (cuda kernel): N_w and N_r too large for shared memory");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, words.scalar_type(), "memory_write_backward_cuda", [&] {
    write_backward_kernel<scalar_t><<<words.size(0), kWriteThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
        grad_keys.data_ptr<scalar_t>(), grad_values.data_ptr<scalar_t>(), words.data_ptr<scalar_t>(),
        rbar.data_ptr<scalar_t>(), weight_pointers(weights), grad_words.data_ptr<scalar_t>(),
        grad_rbar.data_ptr<scalar_t>(), partials.data_ptr<float>(), off, a);
  });
  DMGAN_CUDA_CHECK();
  at::Tensor summed = partials.sum(0);  // deterministic reduction over samples
  std::vector<at::Tensor> grads = {grad_words, grad_rbar};
  for (size_t i = 0; i < weights.size(); ++i) {
    grads.push_back(summed.narrow(0, *fields[i], weights[i].numel()).reshape(weights[i].sizes()).to(weights[i].scalar_type()).contiguous());
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
