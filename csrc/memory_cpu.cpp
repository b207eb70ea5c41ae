// The CPU ops: check the inputs, allocate the outputs, and call the kernels of the best instruction
// set this CPU has (memory_cpu_kernels.h), chosen once per process:
//
// - the CPU's own features: AVX-512 (F, BW, VL and DQ), else AVX2 with FMA, else the baseline;
// - lowered, never raised, by DMGAN_CPU_CAPABILITY, or else by ATen's ATEN_CPU_CAPABILITY (which
//   lowers torch's own kernels the same way, so that a comparison with eager stays fair):
//   "default", "avx2" or "avx512", as ATen spells them. A name the CPU cannot run falls back to the
//   best it can, as in ATen; an unknown name is an error that lists the known ones.
//
// torch.ops.dmgan.cpu_capability() says which one runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "memory.h"
#include "memory_cpu_kernels.h"

namespace dmgan::cpu {
namespace {

enum class Capability { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };
constexpr const char* kCapabilityNames[] = {"default", "avx2", "avx512"};

Capability supported_capability() {
#if DMGAN_CPU_X86 && (defined(__GNUC__) || defined(__clang__))
  // libgcc's and compiler-rt's feature checks include the operating system's support (XGETBV).
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Capability::kAVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Capability::kAVX2;
#endif
  return Capability::kDefault;
}

Capability requested_capability(Capability supported) {
  for (const char* variable : {"DMGAN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY"}) {
    const char* value = std::getenv(variable);
    if (value == nullptr || *value == '\0') continue;
    std::string name(value);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
    for (int i = 0; i < 3; ++i) {
      if (name == kCapabilityNames[i]) return std::min(supported, static_cast<Capability>(i));
    }
    TORCH_CHECK(false, variable, "=", value, " is not a CPU capability dmgan knows: use default, avx2 or avx512");
  }
  return supported;
}

Capability selected_capability() {
  static const Capability selected = requested_capability(supported_capability());
  return selected;
}

struct Kernels {
  decltype(&DEFAULT::read_forward) read_forward;
  decltype(&DEFAULT::read_backward) read_backward;
  decltype(&DEFAULT::write_forward) write_forward;
  decltype(&DEFAULT::write_backward) write_backward;
};

#define DMGAN_KERNELS_OF(ISA) Kernels{&ISA::read_forward, &ISA::read_backward, &ISA::write_forward, &ISA::write_backward}

const Kernels& kernels() {
  static const Kernels chosen = [] {
    switch (selected_capability()) {
#if DMGAN_CPU_X86
      case Capability::kAVX512: return DMGAN_KERNELS_OF(AVX512);
      case Capability::kAVX2: return DMGAN_KERNELS_OF(AVX2);
#endif
      default: return DMGAN_KERNELS_OF(DEFAULT);
    }
  }();
  return chosen;
}

std::string cpu_capability() { return kCapabilityNames[static_cast<int>(selected_capability())]; }

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
  kernels().read_forward(img, keys, values, pad_mask, gate_w, gate_b, legacy_mask, out,
                         return_attention ? &attention : nullptr);
  return {out, attention};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_read_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& img, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& pad_mask, const at::Tensor& gate_w, const at::Tensor& gate_b, bool legacy_mask) {
  check_read_inputs(img, keys, values, pad_mask, gate_w, gate_b);
  check_read_grad(grad_out, img);
  at::Tensor grad_img = new_output_like(img), grad_keys = new_output_like(keys), grad_values = new_output_like(values);
  at::Tensor grad_gate_w = new_output_like(gate_w), grad_gate_b = new_output_like(gate_b);
  kernels().read_backward(grad_out, img, keys, values, pad_mask, gate_w, gate_b, legacy_mask, grad_img, grad_keys,
                          grad_values, grad_gate_w, grad_gate_b);
  return {grad_img, grad_keys, grad_values, grad_gate_w, grad_gate_b};
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
  const int64_t batch = words.size(0), T = words.size(2), NR = rbar.size(1);
  at::Tensor keys = new_output({batch, NR, T}, words.options()), values = new_output({batch, NR, T}, words.options());
  kernels().write_forward(words, rbar, weights, keys, values);
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
  check_write_grads(grad_keys, grad_values, words, rbar);
  std::vector<at::Tensor> grads = {new_output_like(words), new_output_like(rbar)};
  for (const auto& w : weights) grads.push_back(new_output_like(w));
  kernels().write_backward(grad_keys, grad_values, words, rbar, weights, grads);
  return grads;
}

}  // namespace
}  // namespace dmgan::cpu

TORCH_LIBRARY(dmgan, m) {
  dmgan::define_memory_ops(m);
  m.def("cpu_capability() -> str", &dmgan::cpu::cpu_capability);
}

TORCH_LIBRARY_IMPL(dmgan, CPU, m) {
  m.impl("memory_write", &dmgan::cpu::memory_write_cpu);
  m.impl("memory_write_backward", &dmgan::cpu::memory_write_backward_cpu);
  m.impl("memory_read", &dmgan::cpu::memory_read_cpu);
  m.impl("memory_read_backward", &dmgan::cpu::memory_read_backward_cpu);
}
