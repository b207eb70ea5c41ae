// Dynamic memory of DM-GAN: op schemas shared by the CPU and CUDA kernels.
//
// Notation: B batch, N_w word-feature size, N_r image-feature size (C), N_m = 2 N_r, T words,
// N = H W pixels. The math is the docstring of dmgan/ops/reference.py; every kernel here computes
// exactly that, with deterministic reductions: the CPU kernels in the input's op-math type (fp32
// for 16-bit inputs, fp64 for double), the CUDA kernels in fp32 (float64 is refused there).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace dmgan {

// The four ops' schemas, for TORCH_LIBRARY(dmgan, m) and for the CUDA kernels emulated on the CPU
// in the tests (their own namespace). Autograd and fake shapes: dmgan/ops/library.py.
inline void define_memory_ops(torch::Library& m) {
  m.def(
      "memory_write(Tensor words, Tensor rbar, Tensor A, Tensor B, Tensor M_w, Tensor M_w_b, Tensor M_r, "
      "Tensor M_r_b, Tensor key_w, Tensor key_b, Tensor value_w, Tensor value_b) -> (Tensor, Tensor)");
  m.def(
      "memory_write_backward(Tensor grad_keys, Tensor grad_values, Tensor words, Tensor rbar, Tensor A, "
      "Tensor B, Tensor M_w, Tensor M_w_b, Tensor M_r, Tensor M_r_b, Tensor key_w, Tensor key_b, "
      "Tensor value_w, Tensor value_b) -> Tensor[]");
  m.def(
      "memory_read(Tensor img, Tensor keys, Tensor values, Tensor pad_mask, Tensor gate_w, Tensor gate_b, "
      "bool return_attention, bool legacy_mask) -> (Tensor, Tensor)");
  m.def(
      "memory_read_backward(Tensor grad_out, Tensor img, Tensor keys, Tensor values, Tensor pad_mask, "
      "Tensor gate_w, Tensor gate_b, bool legacy_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// Every buffer a kernel writes: uninitialised, or NaN-filled when DMGAN_POISON_OUTPUTS=1 (the
// tests set it, so an element a kernel forgets to write shows up instead of passing by luck).
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const char* poison = std::getenv("DMGAN_POISON_OUTPUTS");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) {
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  }
  return at::empty(sizes, options);
}

// Like new_output, with t's shape, dtype, device and memory layout (an image's r' and gradient keep
// the image's layout).
inline at::Tensor new_output_like(const at::Tensor& t) {
  at::Tensor out = at::empty_like(t);
  const char* poison = std::getenv("DMGAN_POISON_OUTPUTS");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

// Images (img, r', grad_out, the image gradient) are dense in either layout: contiguous
// (B x C x H x W) or channels-last (B x H x W x C in memory). Element (b, c, n) of a B x C x N view,
// n = h W + w, lies at b C N + c channel + n pixel. A tensor that is both (one channel or one pixel)
// counts as contiguous, as in dmgan/ops/library.py (is_channels_last, the same test).
struct PixelStrides {
  int64_t channel, pixel;
};

inline bool is_channels_last(const at::Tensor& img) {
  return !img.is_contiguous() && img.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline PixelStrides pixel_strides(const at::Tensor& img) {
  return is_channels_last(img) ? PixelStrides{1, img.size(1)} : PixelStrides{img.size(2) * img.size(3), 1};
}

// Shapes every implementation checks before launching: named errors instead of crashes.
inline void check_write_inputs(const at::Tensor& words, const at::Tensor& rbar, at::TensorList weights) {
  TORCH_CHECK(words.dim() == 3, "memory_write: words must be B x N_w x T, got ", words.sizes());
  TORCH_CHECK(rbar.dim() == 2 && rbar.size(0) == words.size(0),
              "memory_write: rbar must be B x N_r with B = ", words.size(0), ", got ", rbar.sizes());
  TORCH_CHECK(weights.size() == 10, "memory_write: expected 10 weight tensors, got ", weights.size());
  const int64_t nw = words.size(1), nr = rbar.size(1), nm = 2 * nr;
  const std::vector<std::vector<int64_t>> expected = {
      {1, nw}, {1, nr}, {nm, nw, 1}, {nm}, {nm, nr, 1}, {nm}, {nr, nm, 1}, {nr}, {nr, nm, 1}, {nr}};
  const char* names[] = {"A", "B", "M_w", "M_w_b", "M_r", "M_r_b", "key_w", "key_b", "value_w", "value_b"};
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(weights[i].sizes() == at::IntArrayRef(expected[i]), "memory_write: ", names[i],
                " must have shape ", at::IntArrayRef(expected[i]), ", got ", weights[i].sizes());
  }
  for (const auto& t : weights) {
    TORCH_CHECK(t.device() == words.device() && t.scalar_type() == words.scalar_type() && t.is_contiguous(),
                "memory_write: every tensor must be contiguous, on ", words.device(), " and of dtype ",
                words.scalar_type());
  }
  TORCH_CHECK(words.is_contiguous() && rbar.is_contiguous() && rbar.device() == words.device() &&
                  rbar.scalar_type() == words.scalar_type(),
              "memory_write: words and rbar must be contiguous, on one device and of one dtype");
}

inline void check_read_inputs(const at::Tensor& img, const at::Tensor& keys, const at::Tensor& values,
                              const at::Tensor& pad_mask, const at::Tensor& gate_w, const at::Tensor& gate_b) {
  TORCH_CHECK(img.dim() == 4, "memory_read: img must be B x N_r x H x W, got ", img.sizes());
  const int64_t batch = img.size(0), channels = img.size(1);
  TORCH_CHECK(keys.dim() == 3 && keys.size(0) == batch && keys.size(1) == channels,
              "memory_read: keys must be B x N_r x T = ", batch, " x ", channels, " x T, got ", keys.sizes());
  TORCH_CHECK(values.sizes() == keys.sizes(), "memory_read: values must match keys ", keys.sizes(), ", got ",
              values.sizes());
  TORCH_CHECK(pad_mask.dim() == 2 && pad_mask.size(0) == batch && pad_mask.size(1) == keys.size(2),
              "memory_read: pad_mask must be B x T = ", batch, " x ", keys.size(2), ", got ", pad_mask.sizes());
  TORCH_CHECK(pad_mask.scalar_type() == at::kBool, "memory_read: pad_mask must be bool, got ",
              pad_mask.scalar_type());
  TORCH_CHECK(gate_w.numel() == 2 * channels && gate_b.numel() == 1, "memory_read: gate_w must hold 2 N_r = ",
              2 * channels, " values and gate_b one, got ", gate_w.sizes(), " and ", gate_b.sizes());
  TORCH_CHECK(keys.size(2) >= 1, "memory_read: keys has no word (T = 0)");
  for (const auto& t : {keys, values, gate_w, gate_b}) {
    TORCH_CHECK(t.scalar_type() == img.scalar_type(), "memory_read: every float input must be ",
                img.scalar_type(), ", got ", t.scalar_type());
  }
  TORCH_CHECK(img.is_contiguous() || is_channels_last(img), "memory_read: img must be contiguous or channels-last");
  for (const auto& t : {keys, values, pad_mask, gate_w, gate_b}) {
    TORCH_CHECK(t.device() == img.device(), "memory_read: every input must be on ", img.device(), ", got ",
                t.device());
    TORCH_CHECK(t.is_contiguous(), "memory_read: keys, values, pad_mask and the gate must be contiguous");
  }
}

// Output gradients handed to the backward ops: contiguous, of the inputs' dtype, device and shape.
inline void check_write_grads(const at::Tensor& grad_keys, const at::Tensor& grad_values, const at::Tensor& words,
                              const at::Tensor& rbar) {
  for (const auto& g : {grad_keys, grad_values}) {
    TORCH_CHECK(g.sizes() == at::IntArrayRef({words.size(0), rbar.size(1), words.size(2)}) &&
                    g.scalar_type() == words.scalar_type() && g.is_contiguous() && g.device() == words.device(),
                "memory_write_backward: output gradients must be contiguous B x N_r x T tensors of the inputs' dtype");
  }
}

inline void check_read_grad(const at::Tensor& grad_out, const at::Tensor& img) {
  TORCH_CHECK(grad_out.sizes() == img.sizes() && grad_out.scalar_type() == img.scalar_type() &&
                  grad_out.device() == img.device(),
              "memory_read_backward: grad_out must be a ", img.scalar_type(), " tensor of shape ", img.sizes(),
              " on ", img.device());
  const bool same_layout = is_channels_last(img) ? is_channels_last(grad_out) : grad_out.is_contiguous();
  TORCH_CHECK(same_layout, "memory_read_backward: grad_out must be in img's layout (",
              is_channels_last(img) ? "channels-last" : "contiguous", ")");
}

}  // namespace dmgan
