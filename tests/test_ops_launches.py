"""The launch budget of the fused memory op: how many device kernels one refinement stage's
memory op issues, forward and backward, as the generator calls it in bf16 training.

At the bird preset's batch (B = 10) a small kernel launch costs about as much as the op's
essential memory traffic, so the Triton backend must not surround its fused kernels with casts,
copies and reductions. Counted on the CPU, with the Triton kernels under the interpreter.

What counts as a device kernel (what a GPU would launch):

- every launch of a Triton kernel (its ``run``, the one way a ``@triton.jit`` function starts);
- every outermost aten op that computes or writes data: it writes one of its arguments (``copy_``,
  ``fill_``, ``zero_``, ...) or returns a tensor in memory of its own that it filled (casts,
  ``clone``, ``contiguous`` copies, sums, products, ``zeros``, ``ones_like``, ...).

What does not: views and aliases (``view``, ``reshape`` of a dense tensor, ``transpose``,
``detach``, ``as_strided``, and a ``.to`` / ``.contiguous`` that returns its input), bare
allocations (``empty``, ``empty_like``, ``new_empty``, ``empty_strided``: no kernel runs), ops
that return no tensor (``promote_types``) or only empty ones (a GPU launches nothing for them),
and what the Triton interpreter itself does while it runs a kernel on the CPU (its copies to and
from numpy). "Outermost": an op that another counted op runs inside itself is part of that op
(``.to`` is one ``_to_copy``, not an ``empty`` and a ``copy_``); custom ops
(``torch.ops.dmgan_triton.*``) are looked into, since their launchers are Python and their
kernels are what is counted.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dmgan import ops
from dmgan.models import NEXT_STAGE_G
from dmgan.models.text import RNN_ENCODER

if "triton" not in ops.available_backends("cuda" if torch.cuda.is_available() else "cpu"):
    pytest.skip("triton backend unavailable", allow_module_level=True)

# One stage's memory op, write and read, forward and backward: the four fused kernels plus one
# kernel that finishes each backward's partial sums; two to spare.
LAUNCH_BUDGET = 8

ALLOCATIONS = {
    torch.ops.aten.empty,
    torch.ops.aten.empty_like,
    torch.ops.aten.new_empty,
    torch.ops.aten.empty_strided,
    torch.ops.aten.new_empty_strided,
    torch.ops.aten.empty_permuted,
}


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item)]
    return []


def _computes(func: torch._ops.OpOverload, args, kwargs, result) -> bool:
    """Whether this aten op runs a kernel (see the module docstring)."""
    if any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
        return True  # in place or out=: writes an argument
    if func.overloadpacket in ALLOCATIONS:
        return False
    inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)) if t.numel()}
    outputs = [t for t in _tensors(result) if t.numel()]
    return any(t.untyped_storage().data_ptr() not in inputs for t in outputs)


class DeviceKernels(TorchDispatchMode):
    """Records the device kernels run while active: ``(where, what)`` pairs, where = the custom op
    or autograd node that ran it ("" outside both)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[tuple[str, str]] = []
        self._inside_triton = 0
        self._custom_ops: list[str] = []

    def _where(self) -> str:
        node = torch._C._current_autograd_node()
        return self._custom_ops[-1] if self._custom_ops else (node.name() if node is not None else "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prim"):
            # A custom op: run its implementation (the kernel below the Python key) with this mode
            # active, so the launcher's own ops and launches are seen.
            tensor = next(t for t in _tensors((args, kwargs)))
            below = torch._C._dispatch_keys(tensor) & torch._C._dispatch_keyset_full_after(
                torch._C.DispatchKey.Python
            )
            self._custom_ops.append(str(func))
            try:
                with self:
                    return func.redispatch(below, *args, **kwargs)
            finally:
                self._custom_ops.pop()
        result = func(*args, **kwargs)
        if not self._inside_triton and _computes(func, args, kwargs, result):
            self.kernels.append((self._where(), str(func)))
        return result

    @contextlib.contextmanager
    def triton_launch(self, name: str) -> Iterator[None]:
        self.kernels.append((self._where(), f"triton {name}"))
        self._inside_triton += 1
        try:
            yield
        finally:
            self._inside_triton -= 1


@contextlib.contextmanager
def counting_kernels(monkeypatch) -> Iterator[DeviceKernels]:
    """A :class:`DeviceKernels` that also sees every Triton launch (the JIT function's ``run``,
    compiled or interpreted)."""
    from dmgan.kernels import memory_read

    mode = DeviceKernels()
    kernel_type = type(memory_read.memory_read_forward_kernel)
    run = kernel_type.run

    def counted_run(kernel, *args, **kwargs):
        with mode.triton_launch(kernel.__name__):
            return run(kernel, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", counted_run)
    with mode:
        yield mode


def _stage_inputs(device: str, dtype: torch.dtype):
    """A refinement stage and its memory op's inputs as training hands them over: words from the
    frozen text encoder (no grad, the encoder's B x N_w x T transpose of its B x T x N_w output),
    the padding mask sliced from the captions, a 16-bit image from the previous stage (autocast),
    and r̄ detached as the stage detaches it."""
    torch.manual_seed(0)
    batch, num_words, ngf = 2, 5, 32
    encoder = RNN_ENCODER(ntoken=20, ninput=8, nhidden=16).to(device).eval().requires_grad_(False)
    stage = NEXT_STAGE_G(ngf=ngf, nef=16, ncf=8, r_num=1, backend="triton").to(device)
    captions = torch.randint(1, 20, (batch, num_words + 2), device=device)
    cap_lens = torch.tensor([num_words, 3])
    captions[1, 3:] = 0
    captions[0, num_words:] = 0
    with torch.no_grad(), torch.autocast(device, dtype=dtype):  # as Trainer.encode
        words, _ = encoder(captions, cap_lens, total_length=num_words)
    pad_mask = (captions == 0)[:, : words.shape[2]]
    img = torch.randn(batch, ngf, 4, 4, device=device, dtype=dtype, requires_grad=True)
    rbar = img.mean(dim=(2, 3)).detach()  # as NEXT_STAGE_G.forward
    return stage, words, pad_mask, img, rbar


def test_one_stage_memory_op_issues_at_most_the_launch_budget(monkeypatch):
    """Write + read, forward + backward, Triton, bf16 autocast, inputs as in training: at most
    LAUNCH_BUDGET device kernels in all (the fused kernels and whatever runs around them)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    stage, words, pad_mask, img, rbar = _stage_inputs(device, dtype)
    assert not words.requires_grad and not rbar.requires_grad  # what the backward may skip
    gate = stage.response_gate[0]
    grad = torch.randn(img.shape, device=device, dtype=dtype)
    with counting_kernels(monkeypatch) as count:
        with torch.autocast(device, dtype=dtype):
            keys, values = ops.memory_write(words, rbar, *stage.writing_weights(), backend="triton")
            forward_write = len(count.kernels)
            r_new, _ = ops.memory_read(img, keys, values, pad_mask, gate.weight, gate.bias, backend="triton")
            forward = len(count.kernels)
        r_new.backward(grad)
    kernels = count.kernels
    by_op = collections.Counter(where for where, _ in kernels[forward:])
    report = (
        f"{len(kernels)} kernels: forward {forward} (write {forward_write}, read {forward - forward_write}), "
        f"backward {len(kernels) - forward} {dict(by_op)}:\n"
        + "\n".join(f"  {w or '-'}: {k}" for w, k in kernels)
    )
    print(report)
    assert len(kernels) <= LAUNCH_BUDGET, report
    # Every parameter got its gradient in its own dtype (no cast left for autograd to add).
    for p in (*stage.writing_weights(), gate.weight, gate.bias):
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()
    assert img.grad is not None and img.grad.dtype == img.dtype


def test_the_counter_sees_casts_copies_and_launches(monkeypatch):
    """The counter itself: a cast, a copy and a sum count, views and allocations do not, and a
    Triton launch counts once (not the interpreter's copies inside it)."""
    x = torch.randn(4, 3)
    with counting_kernels(monkeypatch) as count:
        x.t().contiguous()  # copy: 1
        x.view(3, 4).reshape(12).to(torch.float32).contiguous()  # views, no-op to / contiguous: 0
        torch.empty(5)  # allocation: 0
        x.to(torch.bfloat16)  # cast: 1
        x.sum(0)  # reduction: 1
        torch.zeros(3)  # fill: 1
    assert [k for _, k in count.kernels] == [
        "aten.clone.default",
        "aten._to_copy.default",
        "aten.sum.dim_IntList",
        "aten.zeros.default",
    ], count.kernels
    case_img = torch.randn(1, 32, 2, 2)
    keys, values = torch.rand(1, 32, 3), torch.rand(1, 32, 3)
    mask = torch.zeros(1, 3, dtype=torch.bool)
    gate_w, gate_b = torch.randn(1, 64, 1, 1), torch.randn(1)
    with counting_kernels(monkeypatch) as count:
        ops.memory_read(case_img, keys, values, mask, gate_w, gate_b, backend="triton")
    assert [k for _, k in count.kernels if k.startswith("triton")] == ["triton memory_read_forward_kernel"]
