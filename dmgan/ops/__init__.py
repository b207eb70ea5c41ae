"""The dynamic-memory ops as the model sees them: validate once, pick a backend, call it.

Every backend computes what :mod:`dmgan.ops.reference` defines (its docstring has the math):

- ``"eager"``: the reference, everywhere;
- ``"triton"``: fused Triton kernels (:mod:`dmgan.kernels`), CUDA tensors (CPU tensors under
  ``TRITON_INTERPRET=1``, for testing), N_r in {32, 64, 128}, T <= 64, fp32 / fp16 / bf16;
- ``"cpp"``: the C++ / CUDA extension (csrc/, :mod:`dmgan.ops._cpp`), CPU tensors of any float
  dtype, and CUDA tensors where it was built with CUDA (T <= 64, fp32 / fp16 / bf16 there).

``backend="auto"`` takes the first backend of :data:`AUTO_ORDER` for the op and the inputs' device kind that loads
and supports the input, and falls back to eager; naming a backend asks for it and fails with the
reason when it cannot run.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch
from torch import Tensor

from dmgan.checks import ShapeChecker
from dmgan.ops import reference
from dmgan.ops.library import OpInput, dense_image

# Backend name -> module with memory_write / memory_read (the reference's signatures, positional
# arguments; attention may come back as an empty tensor when not asked for), and optionally
# supports(device) -> bool and unsupported_reason(library.OpInput) -> str | None.
BACKEND_MODULES: dict[str, str] = {
    "eager": "dmgan.ops.reference",
    "triton": "dmgan.kernels.backend",
    "cpp": "dmgan.ops._cpp",
}
BACKENDS = ("auto", *BACKEND_MODULES)  # what a model or a command line may ask for
# What backend="auto" tries, per (device kind, op), fastest first, as measured side by side at the
# bird preset's shapes in fp32 and bf16 (benchmarks/RESULTS.md, "Which backend auto picks"). A CPU's
# kind is the instruction set the C++ kernels run with there (:func:`device_kind`): an order holds
# only for the kind it was measured on, and a kind without a measurement gets eager. The C++ reading
# kernels beat eager several times over under every instruction set, including the baseline build
# against eager's AVX2; oneDNN's 1x1 convolutions beat the C++ writing kernel. The GPU order is the
# kernels' design, until a GPU run measures it.
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("cuda", "memory_read"): ("triton", "cpp", "eager"),
    ("cuda", "memory_write"): ("triton", "cpp", "eager"),
    **{(f"cpu-{isa}", "memory_read"): ("cpp", "eager") for isa in ("default", "avx2", "avx512")},
    **{(f"cpu-{isa}", "memory_write"): ("eager", "cpp") for isa in ("default", "avx2", "avx512")},
}

# Backends whose kernels take the inputs as they are (weights in their own dtype, the text
# encoder's transposed words, a sliced padding mask) and round them to the compute dtype in
# registers, so that no cast or copy runs before them; the others take contiguous tensors of one
# dtype.
TAKES_INPUTS_AS_THEY_ARE = ("triton",)

_loaded: dict[str, ModuleType | None] = {"eager": reference}
_load_errors: dict[str, str] = {}


def _load(name: str, warn: bool = False) -> ModuleType | None:
    """The backend's module, imported once; None (and the reason kept) when it cannot import.
    With ``warn``, the first failure is reported once as a warning (auto falls back to eager)."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKEND_MODULES[name])
        except ImportError as e:
            _loaded[name], _load_errors[name] = None, f"{type(e).__name__}: {e}"
            if warn:
                warnings.warn(
                    f"dmgan.ops: the {name!r} backend is unavailable ({_load_errors[name]}); "
                    "backend='auto' uses the next one",
                    RuntimeWarning,
                    stacklevel=4,
                )
    return _loaded[name]


def _runs_on(module: ModuleType, device: torch.device) -> bool:
    supports = getattr(module, "supports", None)
    return supports is None or supports(device)


def _why_not(module: ModuleType, call: OpInput) -> str | None:
    reason = getattr(module, "unsupported_reason", None)
    return None if reason is None else reason(call)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that load and run on ``device``."""
    device = torch.device(device)
    return [name for name in BACKEND_MODULES if (m := _load(name)) is not None and _runs_on(m, device)]


_cpu_capability_found: list[str] = []  # decided once per process


# A constant to torch.compile: tracing the lookup (a custom op that returns a string) would break
# the graph inside every memory op.
@torch.compiler.assume_constant_result
def _cpu_capability() -> str:
    if not _cpu_capability_found:
        module = _load("cpp", warn=True)  # auto considers it on a CPU: its failure is worth the warning
        if module is not None:
            _cpu_capability_found.append(module.cpu_capability())
        else:  # ATen's, when the extension does not load
            _cpu_capability_found.append(torch.backends.cpu.get_cpu_capability().lower())
    return _cpu_capability_found[0]


def device_kind(device: torch.device | str) -> str:
    """The key of :data:`AUTO_ORDER` for ``device``: its type, and for a CPU the instruction set
    the C++ kernels run with there ("cpu-avx2"), decided once per process."""
    device = torch.device(device)
    return f"cpu-{_cpu_capability()}" if device.type == "cpu" else device.type


def _resolve(backend: str, call: OpInput) -> ModuleType:
    if backend == "auto":
        for name in AUTO_ORDER.get((device_kind(call.device), call.op), ("eager",)):
            module = _load(name, warn=True)
            if module is not None and _runs_on(module, call.device) and _why_not(module, call) is None:
                return module
        return reference
    if backend not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKEND_MODULES)}")
    module = _load(backend)
    if module is None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {_load_errors[backend]}")
    if not _runs_on(module, call.device):
        raise RuntimeError(f"backend {backend!r} does not run on {call.device}")
    reason = _why_not(module, call)
    if reason is not None:
        raise ValueError(f"backend {backend!r} does not support this input: {reason}")
    return module


def _kernel_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype fused kernels compute from: the autocast dtype for the tensors autocast would cast
    (floating, not float64), else the tensor's own. They accumulate in fp32 regardless."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type) and tensor.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _as_they_are(impl: ModuleType) -> bool:
    return impl.__name__ in {BACKEND_MODULES[name] for name in TAKES_INPUTS_AS_THEY_ARE}


def _fused_inputs(impl: ModuleType, dtype: torch.dtype, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The C++ kernels take contiguous tensors of one dtype. The eager reference takes the inputs
    as they are, so autocast handles it op by op; so do the Triton kernels (in registers)."""
    if impl is reference or _as_they_are(impl):
        return tensors
    return tuple(t.to(dtype).contiguous() for t in tensors)


def _fused_image(impl: ModuleType, dtype: torch.dtype, img: Tensor) -> Tensor:
    """memory_read's image for a fused backend: in its dtype, and in its own layout when that is
    contiguous or channels-last (a channels-last model's images are not copied per call)."""
    return img if impl is reference else dense_image(img.to(dtype))


def _eager_read_dtypes(img: Tensor, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of (r', attention) that the eager reference returns for kernels run in ``dtype``,
    so that no backend changes them. Under autocast r' = r (1 - g) + o g promotes the image's own
    dtype with the autocast one, and the attention is a softmax, which CUDA autocast runs in fp32
    (CPU autocast in its own dtype)."""
    if not torch.is_autocast_enabled(img.device.type) or img.dtype == torch.float64:
        return dtype, dtype
    attention = torch.float32 if img.device.type == "cuda" else dtype
    return torch.promote_types(img.dtype, dtype), attention


def memory_write(
    words: Tensor,
    rbar: Tensor,
    A: Tensor,
    B: Tensor,
    M_w: Tensor,
    M_w_b: Tensor,
    M_r: Tensor,
    M_r_b: Tensor,
    key_w: Tensor,
    key_b: Tensor,
    value_w: Tensor,
    value_b: Tensor,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Memory writing: keys and values (B x N_r x T each) from words (B x N_w x T) and r̄ (B x N_r).

    Weights are those of the stage's layers: ``A`` (1 x N_w), ``B`` (1 x N_r), ``M_w`` (N_m x N_w x 1),
    ``M_r`` (N_m x N_r x 1), ``key_w`` / ``value_w`` (N_r x N_m x 1) and their biases.
    """
    check = ShapeChecker("memory_write")
    check("words", words, ("B", "N_w", "T"))
    check("rbar", rbar, ("B", "N_r"))
    check("A", A, (1, "N_w"))
    check("B", B, (1, "N_r"))
    check("M_w", M_w, ("N_m", "N_w", 1))
    check("M_w_b", M_w_b, ("N_m",))
    check("M_r", M_r, ("N_m", "N_r", 1))
    check("M_r_b", M_r_b, ("N_m",))
    check("key_w", key_w, ("N_r", "N_m", 1))
    check("key_b", key_b, ("N_r",))
    check("value_w", value_w, ("N_r", "N_m", 1))
    check("value_b", value_b, ("N_r",))
    if words.shape[2] == 0:
        raise ValueError("memory_write: words has no word (T = 0)")
    dtype = _kernel_dtype(words)
    batch, word_dim, num_words = words.shape
    call = OpInput("memory_write", words.device, dtype, batch, rbar.shape[1], num_words, word_dim=word_dim)
    impl = _resolve(backend, call)
    tensors = (words, rbar, A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b)
    if _as_they_are(impl):  # computes in dtype whatever the inputs' own dtypes and strides
        return impl.memory_write(*tensors, dtype)
    return impl.memory_write(*_fused_inputs(impl, dtype, tensors))


def memory_read(
    img: Tensor,
    keys: Tensor,
    values: Tensor,
    pad_mask: Tensor,
    gate_w: Tensor,
    gate_b: Tensor,
    *,
    backend: str = "auto",
    return_attention: bool = False,
    legacy_mask: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Key addressing, value reading and the response gate.

    ``img`` is B x N_r x H x W, ``keys`` and ``values`` B x N_r x T, ``pad_mask`` B x T bool with True
    for padding, ``gate_w`` 1 x 2N_r x 1 x 1 (the image half first), ``gate_b`` (1,). Returns the new
    features (B x N_r x H x W) and, when ``return_attention``, the attention B x T x H x W.
    ``legacy_mask=True`` applies the padding mask the way the reference code did (see
    :func:`dmgan.ops.reference.expand_pad_mask`).
    """
    check = ShapeChecker("memory_read")
    check("img", img, ("B", "N_r", "H", "W"))
    check("keys", keys, ("B", "N_r", "T"))
    check("values", values, ("B", "N_r", "T"))
    check("pad_mask", pad_mask, ("B", "T"), dtype=torch.bool)
    check.dims["2*N_r"] = 2 * img.shape[1]
    check("gate_w", gate_w, (1, "2*N_r", 1, 1))
    check("gate_b", gate_b, (1,))
    if keys.shape[2] == 0:
        raise ValueError("memory_read: keys has no word (T = 0)")
    dtype = _kernel_dtype(img)
    batch, channels, height, width = img.shape
    call = OpInput(
        "memory_read", img.device, dtype, batch, channels, keys.shape[2], num_pixels=height * width
    )
    impl = _resolve(backend, call)
    if _as_they_are(impl):  # keys and values as the kernels compute (no-ops after memory_write)
        keys, values = (t.to(dtype) for t in (keys, values))
    else:
        keys, values, gate_w, gate_b = _fused_inputs(impl, dtype, (keys, values, gate_w, gate_b))
        pad_mask = pad_mask if impl is reference else pad_mask.contiguous()
    r_new, attention = impl.memory_read(
        _fused_image(impl, dtype, img), keys, values, pad_mask, gate_w, gate_b, return_attention, legacy_mask
    )
    if impl is reference:
        return r_new, attention
    out_dtype, attention_dtype = _eager_read_dtypes(img, dtype)
    r_new = r_new.to(out_dtype)
    return r_new, attention.to(attention_dtype) if return_attention else None


__all__ = ["AUTO_ORDER", "available_backends", "device_kind", "memory_read", "memory_write"]
