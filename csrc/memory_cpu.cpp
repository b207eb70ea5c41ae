// CPU kernels for the dynamic memory: memory_write and memory_read, forward and backward.
//
// Reading works on tiles of kTile pixels of one sample: their C x kTile features, the T x kTile
// scores and the C x kTile memory output stay in L1, and every inner loop runs over contiguous
// pixels, on 64-byte vector values (GCC / Clang vector extensions) that stay in registers: up to
// four accumulators of 16 pixels for the products over channels or words, per-lane partial sums
// for the products over pixels, and an exponential without a call. Work is split over (sample,
// pixel chunk) with at::parallel_for (OpenMP). Backward reductions (dK, dV, gate, weight
// gradients) go through per-chunk partials with a split that does not depend on the thread count,
// summed in a fixed order: gradients are bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "memory.h"

namespace dmgan {
namespace {

constexpr int64_t kTile = 64;    // pixels computed together
constexpr int64_t kVec = 16;     // pixels a buffer row is padded to (a multiple of every Vec's lanes)
constexpr int64_t kChunk = 1024; // pixels per partial-sum slot in the backward (a multiple of kTile)

// Width of a tile's buffers: P pixels rounded up to kVec. Pixels past P are zero-filled on load,
// so they add nothing to any sum, and are never stored.
inline int64_t padded(int64_t P) { return (P + kVec - 1) / kVec * kVec; }

// 64 bytes of acc_t (16 floats, 8 doubles) as one value: the compiler keeps these in vector
// registers (zmm, or pairs of ymm without AVX-512), where an array of acc_t under `omp simd` went
// through the stack on every multiply-add.
// (GCC ignores vector_size on a dependent type, hence one typedef per accumulation type.)
typedef float VecFloat __attribute__((vector_size(64)));
typedef double VecDouble __attribute__((vector_size(64)));
template <typename acc_t>
struct VecOf;
template <>
struct VecOf<float> {
  using type = VecFloat;
};
template <>
struct VecOf<double> {
  using type = VecDouble;
};
template <typename acc_t>
using Vec = typename VecOf<acc_t>::type;
template <typename acc_t>
constexpr int64_t kLanes = sizeof(Vec<acc_t>) / sizeof(acc_t);
static_assert(kLanes<float> == 16 && kLanes<double> == 8 && kVec % kLanes<float> == 0);

template <typename acc_t>
inline Vec<acc_t> load_vec(const acc_t* p) {
  Vec<acc_t> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename acc_t>
inline void store_vec(acc_t* p, Vec<acc_t> v) {
  std::memcpy(p, &v, sizeof v);
}

// out[j] (+)= sum_i coef[i * coef_stride] * rows[i * row_stride + j] for j < kBlock lanes-wide
// vectors: kBlock independent accumulators in registers, the reduction index outside.
template <int kBlock, typename acc_t>
inline void combine_block(const acc_t* coef, int64_t coef_stride, const acc_t* rows, int64_t row_stride,
                          int64_t count, acc_t* out, bool accumulate) {
  constexpr int64_t L = kLanes<acc_t>;
  Vec<acc_t> acc[kBlock];
#pragma GCC unroll 4
  for (int b = 0; b < kBlock; ++b) acc[b] = accumulate ? load_vec(out + b * L) : Vec<acc_t>{};
  for (int64_t i = 0; i < count; ++i) {
    const acc_t w = coef[i * coef_stride];
    const acc_t* row = rows + i * row_stride;
#pragma GCC unroll 4
    for (int b = 0; b < kBlock; ++b) acc[b] += w * load_vec(row + b * L);
  }
#pragma GCC unroll 4
  for (int b = 0; b < kBlock; ++b) store_vec(out + b * L, acc[b]);
}

// out[j] (+)= sum_i coef[i * coef_stride] * rows[i * row_stride + j] for j < width (a multiple
// of kVec): up to four vectors of j at a time.
template <typename acc_t>
inline void combine_rows(const acc_t* coef, int64_t coef_stride, const acc_t* rows, int64_t row_stride,
                         int64_t count, int64_t width, acc_t* out, bool accumulate) {
  constexpr int64_t L = kLanes<acc_t>;
  int64_t j = 0;
  for (; j + 4 * L <= width; j += 4 * L)
    combine_block<4>(coef, coef_stride, rows + j, row_stride, count, out + j, accumulate);
  switch ((width - j) / L) {
    case 3: combine_block<3>(coef, coef_stride, rows + j, row_stride, count, out + j, accumulate); break;
    case 2: combine_block<2>(coef, coef_stride, rows + j, row_stride, count, out + j, accumulate); break;
    case 1: combine_block<1>(coef, coef_stride, rows + j, row_stride, count, out + j, accumulate); break;
    default: break;
  }
}

// lanes[t] += x[j] * rows[t * width + j] lane by lane over the width / L vectors j, for t < count:
// dot products over pixels kept as per-lane partial sums, so that a chunk of tiles adds into them
// and sums across lanes (lane_sum) once at its end, not once per tile.
template <typename acc_t>
inline void dot_rows_lanes(const acc_t* x, const acc_t* rows, int64_t width, int64_t count, Vec<acc_t>* lanes) {
  constexpr int64_t L = kLanes<acc_t>;
  for (int64_t t = 0; t < count; ++t) {
    const acc_t* row = rows + t * width;
    Vec<acc_t> acc = lanes[t];
    for (int64_t j = 0; j < width; j += L) acc += load_vec(x + j) * load_vec(row + j);
    lanes[t] = acc;
  }
}

template <typename acc_t>
inline acc_t lane_sum(const Vec<acc_t>& v) {
  acc_t sum = 0;
  for (int64_t l = 0; l < kLanes<acc_t>; ++l) sum += v[l];
  return sum;
}

// e^x the compiler can vectorise (no call, no branch) for the softmax's T x kTile exponentials,
// which a call to expf per element would dominate: x = n ln2 + r with |r| <= ln2 / 2, e^r from
// Cephes' degree-6 polynomial, 2^n from exponent bits; within 1 ulp of e^x from -87.3 to 88.3.
// Below -87.3 (e^x < 1.2e-38) it gives about 1e-38, not 0, which no softmax term or sum can tell
// apart; from 88.38 on it gives inf (expf does from 88.72): the softmax's inputs are <= 0.
// Double keeps std::exp.
inline float exp_vectorisable(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;  // ln 2 in two parts (Cody-Waite), so r is exact
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // __builtin_bit_cast is what std::bit_cast (C++20) is made of; the extension is C++17 for torch
  // 2.11, whose cpp_extension passes -std=c++17 (GCC 11+, Clang 9+ have the builtin).
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

inline double exp_vectorisable(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename acc_t, typename scalar_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const scalar_t* p = t.data_ptr<scalar_t>();
  return std::vector<acc_t>(p, p + t.numel());
}

// ---------------------------------------------------------------------------------------------
// Memory reading

// dst (C x S, S = padded(P)) = pixels [n0, n0 + P) of one sample's image, zeros past P. The loops
// walk the image's memory in order, whichever its layout.
template <typename scalar_t, typename acc_t>
void load_pixels(const scalar_t* img_b, PixelStrides ps, int64_t C, int64_t n0, int64_t P, acc_t* dst) {
  const int64_t S = padded(P);
  if (ps.pixel == 1) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* src = img_b + c * ps.channel + n0;
      acc_t* row = dst + c * S;
      for (int64_t p = 0; p < P; ++p) row[p] = static_cast<acc_t>(src[p]);
      for (int64_t p = P; p < S; ++p) row[p] = acc_t(0);
    }
    return;
  }
  for (int64_t p = 0; p < P; ++p) {
    const scalar_t* src = img_b + (n0 + p) * ps.pixel;
    for (int64_t c = 0; c < C; ++c) dst[c * S + p] = static_cast<acc_t>(src[c * ps.channel]);
  }
  for (int64_t c = 0; c < C; ++c) std::fill(dst + c * S + P, dst + (c + 1) * S, acc_t(0));
}

// Pixels [n0, n0 + P) of one sample's image = src (C x S); the inverse of load_pixels.
template <typename scalar_t, typename acc_t>
void store_pixels(const acc_t* src, PixelStrides ps, int64_t C, int64_t n0, int64_t P, scalar_t* img_b) {
  const int64_t S = padded(P);
  if (ps.pixel == 1) {
    for (int64_t c = 0; c < C; ++c) {
      scalar_t* dst = img_b + c * ps.channel + n0;
      for (int64_t p = 0; p < P; ++p) dst[p] = static_cast<scalar_t>(src[c * S + p]);
    }
    return;
  }
  for (int64_t p = 0; p < P; ++p) {
    scalar_t* dst = img_b + (n0 + p) * ps.pixel;
    for (int64_t c = 0; c < C; ++c) dst[c * ps.channel] = static_cast<scalar_t>(src[c * S + p]);
  }
}

template <typename acc_t>
struct ReadScratch {
  std::vector<acc_t> r, alpha, o, z, aux;
  ReadScratch(int64_t C, int64_t T) : r(C * kTile), alpha(T * kTile), o(C * kTile), z(kTile), aux(T * kTile) {}
};

// The forward for pixels [n0, n0 + P) of sample b: r (C x P), alpha (T x P), o (C x P), gate in z.
template <typename scalar_t, typename acc_t>
void read_tile(const scalar_t* img_b, PixelStrides ps, const acc_t* keys_b, const acc_t* values_b, const bool* mask,
               int64_t b, int64_t batch, bool legacy, const acc_t* gate_w, acc_t gate_b, int64_t C, int64_t T,
               int64_t N, int64_t n0, int64_t P, ReadScratch<acc_t>& s) {
  const int64_t S = padded(P);  // buffer width
  acc_t* r = s.r.data();
  acc_t* alpha = s.alpha.data();
  acc_t* o = s.o.data();
  acc_t* z = s.z.data();
  load_pixels(img_b, ps, C, n0, P, r);
  // Key addressing: scores[t][p] = sum_c k[c][t] r[c][p].
  for (int64_t t = 0; t < T; ++t) combine_rows(keys_b + t, T, r, S, C, S, alpha + t * S, false);
  // Padding: 1 where the word is masked for that pixel. The reference's legacy broadcast gives
  // batch-major row b N + q the mask of sample (b N + q) mod B.
  acc_t* masked = s.aux.data();
  if (legacy) {
    for (int64_t p = 0; p < S; ++p) {
      const bool* row = mask + ((b * N + n0 + p) % batch) * T;
      for (int64_t t = 0; t < T; ++t) masked[t * S + p] = row[t] ? acc_t(1) : acc_t(0);
    }
  } else {  // one mask for the sample's every pixel
    for (int64_t t = 0; t < T; ++t)
      std::fill(masked + t * S, masked + (t + 1) * S, mask[b * T + t] ? acc_t(1) : acc_t(0));
  }
  // Softmax over words; a pixel with every word masked reads nothing (alpha = 0).
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t p = 0; p < S; ++p) z[p] = kNegInf;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t p = 0; p < S; ++p)
      if (masked[t * S + p] == acc_t(0)) z[p] = std::max(z[p], alpha[t * S + p]);
  acc_t* total = o;  // o is free until value reading: borrow S entries as sums
  std::fill(total, total + S, acc_t(0));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t p = 0; p < S; ++p) {
      const acc_t e = masked[t * S + p] != acc_t(0) ? acc_t(0) : exp_vectorisable(alpha[t * S + p] - z[p]);
      alpha[t * S + p] = e;
      total[p] += e;
    }
  }
  for (int64_t p = 0; p < S; ++p) z[p] = total[p] > acc_t(0) ? acc_t(1) / total[p] : acc_t(0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t p = 0; p < S; ++p) alpha[t * S + p] *= z[p];
  // Value reading: o[c][p] = sum_t v[c][t] alpha[t][p].
  for (int64_t c = 0; c < C; ++c) combine_rows(values_b + c * T, 1, alpha, S, T, S, o + c * S, false);
  // Response gate g = sigmoid(w_r . r + w_o . o + b).
  for (int64_t p = 0; p < S; ++p) z[p] = gate_b;
  combine_rows(gate_w, 1, r, S, C, S, z, true);
  combine_rows(gate_w + C, 1, o, S, C, S, z, true);
  for (int64_t p = 0; p < S; ++p) z[p] = sigmoid(z[p]);
}

// A sample's small operands in the accumulation type, shared by every tile.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct ReadOperands {
  std::vector<acc_t> keys, values, gate_w;
  acc_t gate_b;
  ReadOperands(const at::Tensor& k, const at::Tensor& v, const at::Tensor& gw, const at::Tensor& gb)
      : keys(to_acc<acc_t, scalar_t>(k)),
        values(to_acc<acc_t, scalar_t>(v)),
        gate_w(to_acc<acc_t, scalar_t>(gw)),
        gate_b(static_cast<acc_t>(gb.data_ptr<scalar_t>()[0])) {}
};

template <typename scalar_t>
void read_forward_impl(const at::Tensor& img, const at::Tensor& keys, const at::Tensor& values,
                       const at::Tensor& pad_mask, const at::Tensor& gate_w, const at::Tensor& gate_b, bool legacy,
                       at::Tensor& out, at::Tensor* attention) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = img.size(0), C = img.size(1), N = img.size(2) * img.size(3), T = keys.size(2);
  const PixelStrides ps = pixel_strides(img);  // out has img's layout
  const ReadOperands<scalar_t> ops(keys, values, gate_w, gate_b);
  const auto &keys_acc = ops.keys, &values_acc = ops.values, &gw = ops.gate_w;
  const acc_t gb = ops.gate_b;
  const scalar_t* img_p = img.data_ptr<scalar_t>();
  const bool* mask = pad_mask.data_ptr<bool>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* att_p = attention ? attention->data_ptr<scalar_t>() : nullptr;
  const int64_t tiles = (N + kTile - 1) / kTile;
  at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    ReadScratch<acc_t> s(C, T);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / tiles, n0 = (i % tiles) * kTile, P = std::min(kTile, N - n0);
      read_tile<scalar_t, acc_t>(img_p + b * C * N, ps, keys_acc.data() + b * C * T,
                                 values_acc.data() + b * C * T, mask, b, batch, legacy, gw.data(), gb, C, T, N, n0,
                                 P, s);
      const int64_t S = padded(P);
      for (int64_t c = 0; c < C; ++c) {  // r' = r + (o - r) g, into o
        const acc_t* r = s.r.data() + c * S;
        acc_t* o = s.o.data() + c * S;
        for (int64_t p = 0; p < S; ++p) o[p] = r[p] + (o[p] - r[p]) * s.z[p];
      }
      store_pixels(s.o.data(), ps, C, n0, P, out_p + b * C * N);
      if (att_p) {
        for (int64_t t = 0; t < T; ++t) {
          scalar_t* dst = att_p + (b * T + t) * N + n0;
          for (int64_t p = 0; p < P; ++p) dst[p] = static_cast<scalar_t>(s.alpha[t * S + p]);
        }
      }
    }
  });
}

template <typename scalar_t>
void read_backward_impl(const at::Tensor& grad_out, const at::Tensor& img, const at::Tensor& keys,
                        const at::Tensor& values, const at::Tensor& pad_mask, const at::Tensor& gate_w,
                        const at::Tensor& gate_b, bool legacy, at::Tensor& grad_img, at::Tensor& grad_keys,
                        at::Tensor& grad_values, at::Tensor& grad_gate_w, at::Tensor& grad_gate_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = img.size(0), C = img.size(1), N = img.size(2) * img.size(3), T = keys.size(2);
  const PixelStrides ps = pixel_strides(img);  // grad_out and grad_img have img's layout
  const ReadOperands<scalar_t> ops(keys, values, gate_w, gate_b);
  const auto &keys_acc = ops.keys, &values_acc = ops.values, &gw = ops.gate_w;
  const acc_t gb = ops.gate_b;
  const scalar_t* img_p = img.data_ptr<scalar_t>();
  const scalar_t* dy_p = grad_out.data_ptr<scalar_t>();
  const bool* mask = pad_mask.data_ptr<bool>();
  scalar_t* dimg_p = grad_img.data_ptr<scalar_t>();
  // Partials per (sample, chunk): dK (C x T), dV (C x T), d gate_w (2C), d gate_b (1).
  const int64_t chunks = (N + kChunk - 1) / kChunk, slot = 2 * C * T + 2 * C + 1;
  std::vector<acc_t> partials(batch * chunks * slot, acc_t(0));
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    ReadScratch<acc_t> s(C, T);
    std::vector<acc_t> dy(C * kTile), d_alpha(T * kTile), d_pre_gate(kTile);
    std::vector<Vec<acc_t>> lanes(slot - 1);  // the chunk's dK, dV, d gate_w as per-lane sums
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / chunks, chunk = i % chunks;
      const acc_t* k = keys_acc.data() + b * C * T;
      const acc_t* v = values_acc.data() + b * C * T;
      std::fill(lanes.begin(), lanes.end(), Vec<acc_t>{});
      Vec<acc_t>* dk = lanes.data();
      Vec<acc_t>* dv = dk + C * T;
      Vec<acc_t>* dgw = dv + C * T;
      acc_t* dgb = partials.data() + i * slot + slot - 1;
      for (int64_t n0 = chunk * kChunk; n0 < std::min(N, (chunk + 1) * kChunk); n0 += kTile) {
        const int64_t P = std::min(kTile, N - n0), S = padded(P);
        read_tile<scalar_t, acc_t>(img_p + b * C * N, ps, k, v, mask, b, batch, legacy, gw.data(), gb, C, T, N, n0, P,
                                   s);
        const acc_t* r = s.r.data();
        const acc_t* alpha = s.alpha.data();
        acc_t* o = s.o.data();
        const acc_t* g = s.z.data();
        load_pixels(dy_p + b * C * N, ps, C, n0, P, dy.data());
        // Response gate: r' = r + (o - r) g. Padded pixels have dy = 0 and add nothing below.
        std::fill(d_pre_gate.begin(), d_pre_gate.end(), acc_t(0));
        for (int64_t c = 0; c < C; ++c)
          for (int64_t p = 0; p < S; ++p) d_pre_gate[p] += dy[c * S + p] * (o[c * S + p] - r[c * S + p]);
        for (int64_t p = 0; p < S; ++p) {
          d_pre_gate[p] *= g[p] * (acc_t(1) - g[p]);
          *dgb += d_pre_gate[p];
        }
        dot_rows_lanes(d_pre_gate.data(), r, S, C, dgw);
        dot_rows_lanes(d_pre_gate.data(), o, S, C, dgw + C);
        // dr (kept in dy) and do (kept in o).
        for (int64_t c = 0; c < C; ++c) {
          const acc_t wr = gw[c], wo = gw[C + c];
          for (int64_t p = 0; p < S; ++p) {
            const acc_t d = dy[c * S + p];
            o[c * S + p] = d * g[p] + wo * d_pre_gate[p];
            dy[c * S + p] = d * (acc_t(1) - g[p]) + wr * d_pre_gate[p];
          }
        }
        // Value reading o = V alpha^T: dV[c][t] = sum_p do[c][p] alpha[t][p], d_alpha = V^T do.
        for (int64_t c = 0; c < C; ++c) dot_rows_lanes(o + c * S, alpha, S, T, dv + c * T);
        for (int64_t t = 0; t < T; ++t) combine_rows(v + t, T, o, S, C, S, d_alpha.data() + t * S, false);
        // Softmax: d_scores = alpha (d_alpha - sum_t alpha d_alpha), into d_alpha.
        acc_t* dot = s.z.data();  // the gate is no longer needed
        std::fill(dot, dot + S, acc_t(0));
        for (int64_t t = 0; t < T; ++t)
          for (int64_t p = 0; p < S; ++p) dot[p] += alpha[t * S + p] * d_alpha[t * S + p];
        for (int64_t t = 0; t < T; ++t)
          for (int64_t p = 0; p < S; ++p) d_alpha[t * S + p] = alpha[t * S + p] * (d_alpha[t * S + p] - dot[p]);
        // Key addressing s = r^T K: dr += K ds, dK[c][t] = sum_p r[c][p] ds[t][p].
        for (int64_t c = 0; c < C; ++c) {
          combine_rows(k + c * T, 1, d_alpha.data(), S, T, S, dy.data() + c * S, true);
          dot_rows_lanes(r + c * S, d_alpha.data(), S, T, dk + c * T);
        }
        store_pixels(dy.data(), ps, C, n0, P, dimg_p + b * C * N);
      }
      acc_t* part = partials.data() + i * slot;
      for (int64_t j = 0; j < slot - 1; ++j) part[j] = lane_sum<acc_t>(lanes[j]);
    }
  });
  // Fixed-order reduction of the partials.
  scalar_t* dk_p = grad_keys.data_ptr<scalar_t>();
  scalar_t* dv_p = grad_values.data_ptr<scalar_t>();
  std::vector<acc_t> dgate(2 * C + 1, acc_t(0));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < C * T; ++j) {
      acc_t sk = 0, sv = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const acc_t* part = partials.data() + (b * chunks + chunk) * slot;
        sk += part[j];
        sv += part[C * T + j];
      }
      dk_p[b * C * T + j] = static_cast<scalar_t>(sk);
      dv_p[b * C * T + j] = static_cast<scalar_t>(sv);
    }
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const acc_t* part = partials.data() + (b * chunks + chunk) * slot + 2 * C * T;
      for (int64_t j = 0; j < 2 * C + 1; ++j) dgate[j] += part[j];
    }
  }
  scalar_t* dgw_p = grad_gate_w.data_ptr<scalar_t>();
  for (int64_t j = 0; j < 2 * C; ++j) dgw_p[j] = static_cast<scalar_t>(dgate[j]);
  grad_gate_b.data_ptr<scalar_t>()[0] = static_cast<scalar_t>(dgate[2 * C]);
}

std::tuple<at::Tensor, at::Tensor> memory_read_cpu(const at::Tensor& img, const at::Tensor& keys,
                                                   const at::Tensor& values, const at::Tensor& pad_mask,
                                                   const at::Tensor& gate_w, const at::Tensor& gate_b,
                                                   bool return_attention, bool legacy_mask) {
  check_read_inputs(img, keys, values, pad_mask, gate_w, gate_b);
  TORCH_CHECK(img.device().is_cpu(), "memory_read (cpu kernel): inputs must be on the CPU, got ", img.device());
  at::Tensor out = new_output_like(img);
  at::Tensor attention = return_attention
                             ? new_output({img.size(0), keys.size(2), img.size(2), img.size(3)}, img.options())
                             : new_output({0}, img.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, img.scalar_type(), "memory_read_cpu", [&] {
    read_forward_impl<scalar_t>(img, keys, values, pad_mask, gate_w, gate_b, legacy_mask, out,
                                return_attention ? &attention : nullptr);
  });
  return {out, attention};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_read_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& img, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& pad_mask, const at::Tensor& gate_w, const at::Tensor& gate_b, bool legacy_mask) {
  check_read_inputs(img, keys, values, pad_mask, gate_w, gate_b);
  check_read_grad(grad_out, img);
  at::Tensor grad_img = new_output_like(img), grad_keys = new_output_like(keys), grad_values = new_output_like(values);
  at::Tensor grad_gate_w = new_output_like(gate_w), grad_gate_b = new_output_like(gate_b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, img.scalar_type(), "memory_read_backward_cpu", [&] {
    read_backward_impl<scalar_t>(grad_out, img, keys, values, pad_mask, gate_w, gate_b, legacy_mask, grad_img,
                                 grad_keys, grad_values, grad_gate_w, grad_gate_b);
  });
  return {grad_img, grad_keys, grad_values, grad_gate_w, grad_gate_b};
}

// ---------------------------------------------------------------------------------------------
// Memory writing: per sample, all its words at once (N_m x T and N_r x T tiles).

template <typename acc_t>
struct WriteForward {
  std::vector<acc_t> words_pre, image_pre, gate, memory, keys_pre, values_pre;
};

// Forward for sample b; weights in acc_t, in the order of the op's schema.
template <typename scalar_t, typename acc_t>
void write_sample(const scalar_t* words_b, const scalar_t* rbar_b, const std::vector<std::vector<acc_t>>& w,
                  int64_t NW, int64_t NR, int64_t T, std::vector<acc_t>& words_f, WriteForward<acc_t>& f) {
  const int64_t NM = 2 * NR;
  const auto &A = w[0], &Bw = w[1], &M_w = w[2], &M_w_b = w[3], &M_r = w[4], &M_r_b = w[5];
  const auto &key_w = w[6], &key_b = w[7], &value_w = w[8], &value_b = w[9];
  words_f.assign(words_b, words_b + NW * T);
  std::vector<acc_t> rbar(rbar_b, rbar_b + NR);
  acc_t gate_r = 0;
  for (int64_t r = 0; r < NR; ++r) gate_r += Bw[r] * rbar[r];
  f.gate.assign(T, gate_r);
  for (int64_t k = 0; k < NW; ++k)
    for (int64_t t = 0; t < T; ++t) f.gate[t] += A[k] * words_f[k * T + t];
  for (auto& g : f.gate) g = sigmoid(g);
  f.image_pre.assign(M_r_b.begin(), M_r_b.end());
  for (int64_t m = 0; m < NM; ++m)
    for (int64_t r = 0; r < NR; ++r) f.image_pre[m] += M_r[m * NR + r] * rbar[r];
  f.words_pre.assign(NM * T, acc_t(0));
  f.memory.assign(NM * T, acc_t(0));
  for (int64_t m = 0; m < NM; ++m) {
    acc_t* row = f.words_pre.data() + m * T;
    for (int64_t t = 0; t < T; ++t) row[t] = M_w_b[m];
    for (int64_t k = 0; k < NW; ++k) {
      const acc_t wmk = M_w[m * NW + k];
      const acc_t* wk = words_f.data() + k * T;
      for (int64_t t = 0; t < T; ++t) row[t] += wmk * wk[t];
    }
    const acc_t image = std::max(f.image_pre[m], acc_t(0));
    for (int64_t t = 0; t < T; ++t)
      f.memory[m * T + t] = std::max(row[t], acc_t(0)) * f.gate[t] + image * (acc_t(1) - f.gate[t]);
  }
  auto project = [&](const std::vector<acc_t>& W, const std::vector<acc_t>& bias, std::vector<acc_t>& pre) {
    pre.assign(NR * T, acc_t(0));
    for (int64_t r = 0; r < NR; ++r) {
      acc_t* row = pre.data() + r * T;
      for (int64_t t = 0; t < T; ++t) row[t] = bias[r];
      for (int64_t m = 0; m < NM; ++m) {
        const acc_t wrm = W[r * NM + m];
        const acc_t* mem = f.memory.data() + m * T;
        for (int64_t t = 0; t < T; ++t) row[t] += wrm * mem[t];
      }
    }
  };
  project(key_w, key_b, f.keys_pre);
  project(value_w, value_b, f.values_pre);
}

template <typename scalar_t>
std::vector<std::vector<at::opmath_type<scalar_t>>> weights_acc(at::TensorList weights) {
  std::vector<std::vector<at::opmath_type<scalar_t>>> w;
  for (const auto& t : weights) w.push_back(to_acc<at::opmath_type<scalar_t>, scalar_t>(t));
  return w;
}

std::tuple<at::Tensor, at::Tensor> memory_write_cpu(const at::Tensor& words, const at::Tensor& rbar,
                                                    const at::Tensor& A, const at::Tensor& B, const at::Tensor& M_w,
                                                    const at::Tensor& M_w_b, const at::Tensor& M_r,
                                                    const at::Tensor& M_r_b, const at::Tensor& key_w,
                                                    const at::Tensor& key_b, const at::Tensor& value_w,
                                                    const at::Tensor& value_b) {
  const std::vector<at::Tensor> weights = {A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b};
  check_write_inputs(words, rbar, weights);
  TORCH_CHECK(words.device().is_cpu(), "memory_write (cpu kernel): inputs must be on the CPU");
  const int64_t batch = words.size(0), NW = words.size(1), T = words.size(2), NR = rbar.size(1);
  at::Tensor keys = new_output({batch, NR, T}, words.options()), values = new_output({batch, NR, T}, words.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, words.scalar_type(), "memory_write_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = weights_acc<scalar_t>(weights);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      WriteForward<acc_t> f;
      std::vector<acc_t> words_f;
      for (int64_t b = begin; b < end; ++b) {
        write_sample<scalar_t, acc_t>(words.data_ptr<scalar_t>() + b * NW * T, rbar.data_ptr<scalar_t>() + b * NR, w,
                                      NW, NR, T, words_f, f);
        scalar_t* k = keys.data_ptr<scalar_t>() + b * NR * T;
        scalar_t* v = values.data_ptr<scalar_t>() + b * NR * T;
        for (int64_t j = 0; j < NR * T; ++j) {
          k[j] = static_cast<scalar_t>(std::max(f.keys_pre[j], acc_t(0)));
          v[j] = static_cast<scalar_t>(std::max(f.values_pre[j], acc_t(0)));
        }
      }
    });
  });
  return {keys, values};
}

std::vector<at::Tensor> memory_write_backward_cpu(const at::Tensor& grad_keys, const at::Tensor& grad_values,
                                                  const at::Tensor& words, const at::Tensor& rbar, const at::Tensor& A,
                                                  const at::Tensor& B, const at::Tensor& M_w, const at::Tensor& M_w_b,
                                                  const at::Tensor& M_r, const at::Tensor& M_r_b,
                                                  const at::Tensor& key_w, const at::Tensor& key_b,
                                                  const at::Tensor& value_w, const at::Tensor& value_b) {
  const std::vector<at::Tensor> weights = {A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b};
  check_write_inputs(words, rbar, weights);
  const int64_t batch = words.size(0), NW = words.size(1), T = words.size(2), NR = rbar.size(1), NM = 2 * NR;
  check_write_grads(grad_keys, grad_values, words, rbar);
  at::Tensor grad_words = new_output_like(words), grad_rbar = new_output_like(rbar);
  std::vector<at::Tensor> grads = {grad_words, grad_rbar};
  for (const auto& w : weights) grads.push_back(new_output_like(w));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, words.scalar_type(), "memory_write_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = weights_acc<scalar_t>(weights);
    const auto &A_ = w[0], &B_ = w[1], &M_w_ = w[2], &M_r_ = w[4], &key_w_ = w[6], &value_w_ = w[8];
    int64_t slot = 0;  // per-sample partials of every weight gradient, reduced in sample order below
    std::vector<int64_t> offset;
    for (const auto& t : weights) {
      offset.push_back(slot);
      slot += t.numel();
    }
    std::vector<acc_t> partials(batch * slot, acc_t(0));
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      WriteForward<acc_t> f;
      std::vector<acc_t> words_f, d_memory(NM * T), d_key_pre(NR * T), d_words_pre(NM * T), d_gate_pre(T), d_image_pre(NM);
      for (int64_t b = begin; b < end; ++b) {
        write_sample<scalar_t, acc_t>(words.data_ptr<scalar_t>() + b * NW * T, rbar.data_ptr<scalar_t>() + b * NR, w,
                                      NW, NR, T, words_f, f);
        acc_t* part = partials.data() + b * slot;
        std::fill(d_memory.begin(), d_memory.end(), acc_t(0));
        // Key and value projections Y = ReLU(W M + b).
        auto project_backward = [&](const at::Tensor& grad, const std::vector<acc_t>& pre, const std::vector<acc_t>& W,
                                    acc_t* dW, acc_t* db) {
          const scalar_t* g = grad.data_ptr<scalar_t>() + b * NR * T;
          for (int64_t j = 0; j < NR * T; ++j) d_key_pre[j] = pre[j] > acc_t(0) ? static_cast<acc_t>(g[j]) : acc_t(0);
          for (int64_t r = 0; r < NR; ++r) {
            const acc_t* dy = d_key_pre.data() + r * T;
            for (int64_t t = 0; t < T; ++t) db[r] += dy[t];
            for (int64_t m = 0; m < NM; ++m) {
              const acc_t* mem = f.memory.data() + m * T;
              acc_t* dm = d_memory.data() + m * T;
              const acc_t wrm = W[r * NM + m];
              acc_t sum = 0;
              for (int64_t t = 0; t < T; ++t) {
                sum += dy[t] * mem[t];
                dm[t] += wrm * dy[t];
              }
              dW[r * NM + m] += sum;
            }
          }
        };
        project_backward(grad_keys, f.keys_pre, key_w_, part + offset[6], part + offset[7]);
        project_backward(grad_values, f.values_pre, value_w_, part + offset[8], part + offset[9]);
        // Mixing M = F_w g + f_r (1 - g) and the gate g = sigmoid(A w + B rbar).
        std::fill(d_gate_pre.begin(), d_gate_pre.end(), acc_t(0));
        for (int64_t m = 0; m < NM; ++m) {
          const acc_t image = std::max(f.image_pre[m], acc_t(0));
          acc_t d_image = 0;
          for (int64_t t = 0; t < T; ++t) {
            const acc_t dm = d_memory[m * T + t], g = f.gate[t], pre = f.words_pre[m * T + t];
            d_words_pre[m * T + t] = pre > acc_t(0) ? dm * g : acc_t(0);
            d_image += dm * (acc_t(1) - g);
            d_gate_pre[t] += dm * (std::max(pre, acc_t(0)) - image);
          }
          d_image_pre[m] = f.image_pre[m] > acc_t(0) ? d_image : acc_t(0);
        }
        acc_t d_gate_total = 0;
        for (int64_t t = 0; t < T; ++t) {
          d_gate_pre[t] *= f.gate[t] * (acc_t(1) - f.gate[t]);
          d_gate_total += d_gate_pre[t];
        }
        const scalar_t* rb = rbar.data_ptr<scalar_t>() + b * NR;
        scalar_t* drb = grad_rbar.data_ptr<scalar_t>() + b * NR;
        for (int64_t r = 0; r < NR; ++r) {
          const acc_t rr = static_cast<acc_t>(rb[r]);
          part[offset[1] + r] += d_gate_total * rr;  // B
          acc_t d = d_gate_total * B_[r];
          for (int64_t m = 0; m < NM; ++m) {
            part[offset[4] + m * NR + r] += d_image_pre[m] * rr;  // M_r
            d += M_r_[m * NR + r] * d_image_pre[m];
          }
          drb[r] = static_cast<scalar_t>(d);
        }
        for (int64_t m = 0; m < NM; ++m) {
          part[offset[5] + m] += d_image_pre[m];  // M_r_b
          acc_t s = 0;
          for (int64_t t = 0; t < T; ++t) s += d_words_pre[m * T + t];
          part[offset[3] + m] += s;  // M_w_b
        }
        scalar_t* dw = grad_words.data_ptr<scalar_t>() + b * NW * T;
        for (int64_t k = 0; k < NW; ++k) {
          const acc_t* wk = words_f.data() + k * T;
          acc_t dA = 0;
          std::vector<acc_t> dwk(T);
          for (int64_t t = 0; t < T; ++t) {
            dA += wk[t] * d_gate_pre[t];
            dwk[t] = A_[k] * d_gate_pre[t];
          }
          part[offset[0] + k] += dA;
          for (int64_t m = 0; m < NM; ++m) {
            const acc_t* dwp = d_words_pre.data() + m * T;
            const acc_t mwk = M_w_[m * NW + k];
            acc_t s = 0;
            for (int64_t t = 0; t < T; ++t) {
              s += dwp[t] * wk[t];
              dwk[t] += mwk * dwp[t];
            }
            part[offset[2] + m * NW + k] += s;  // M_w
          }
          for (int64_t t = 0; t < T; ++t) dw[k * T + t] = static_cast<scalar_t>(dwk[t]);
        }
      }
    });
    for (size_t i = 0; i < weights.size(); ++i) {
      scalar_t* dst = grads[i + 2].data_ptr<scalar_t>();
      for (int64_t j = 0; j < weights[i].numel(); ++j) {
        acc_t s = 0;
        for (int64_t b = 0; b < batch; ++b) s += partials[b * slot + offset[i] + j];
        dst[j] = static_cast<scalar_t>(s);
      }
    }
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY(dmgan, m) { define_memory_ops(m); }

TORCH_LIBRARY_IMPL(dmgan, CPU, m) {
  m.impl("memory_write", &memory_write_cpu);
  m.impl("memory_write_backward", &memory_write_backward_cpu);
  m.impl("memory_read", &memory_read_cpu);
  m.impl("memory_read_backward", &memory_read_backward_cpu);
}

}  // namespace dmgan
