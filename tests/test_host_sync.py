"""The training step queues its work without one wait for the device: on the CPU, no GPU needed.

A GPU waits for the host, and the host for the GPU, when an op reads a device value on the host
(``.item()``, ``nonzero``, a data-dependent shape) or copies between host and device (a CPU
index into a CUDA tensor, ``.to(device)`` of host data, ``.cpu()``). :class:`HostSyncGuard` is a
dispatch mode that fails on the first such op, naming it and the line that called it. Host
tensors are real CPU tensors (the caption lengths, ``Batch.host_cap_lens``); the step's tensors
are made to live on another device in two ways, which between them run every op of a step with
``amp="off"``:

- **fake CUDA** (``FakeTensorMode``, no GPU): :meth:`TrainingState.step` as it runs on a GPU
  (CUDA code paths, the Triton memory op with its fake kernels, the fused Adams, the EMA),
  except the backward pass: the autograd engine needs a real CUDA device for CUDA tensors, so
  ``backward`` is replaced by zero gradients for the parameters that would get one. cuDNN is off
  (asking for it needs a CUDA driver; its packed LSTM takes the same host batch sizes), and so
  is bf16 autocast (torch turns it off without CUDA).
- **meta**: the step with its real backward pass. Only the optimizer step is left out (fused
  Adam refuses meta parameters; the fake-CUDA run covers it), and ``torch.autocast`` /
  ``is_autocast_enabled``, which refuse the meta device type even when autocast is off, are
  made to say "off" for it.

tests/test_ops_gpu.py checks the same on a GPU with ``torch.cuda.set_sync_debug_mode``. The
guard itself is tested on the three syncs it was written for: the text encoder's former
``pack_padded_sequence(enforce_sorted=False)`` and ``pad_packed_sequence``, and a CPU
``arange`` indexing a device tensor (the word loss's former own-image attention).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

import dmgan.training_step
from dmgan.config import TINY_OVERRIDES, get_preset, override
from dmgan.data import Batch
from dmgan.training_step import TrainingState, synthetic_batch

aten = torch.ops.aten
VOCAB = 20

# Ops whose result the host must read before it can go on (a value, or the size of the result).
HOST_READS = {
    aten._local_scalar_dense,
    aten.item,
    aten.is_nonzero,
    aten.equal,
    aten.allclose,
    aten.nonzero,
    aten.masked_select,
    aten.unique_consecutive,
    aten.unique_dim,
    aten._unique,
    aten._unique2,
    aten.bincount,
}
# Ops that index with a boolean mask find its True entries first (nonzero), on the host.
MASK_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
COPIES = {aten._to_copy, aten.copy_, aten._copy_from, aten._copy_from_and_resize, aten.copy}
# Packed sequences keep their sizes on the host by design: these take them there. (The LSTM on
# packed data reads its host batch sizes inside a composite op the guard does not see.)
HOST_METADATA = {aten._pack_padded_sequence.default, aten._pad_packed_sequence.default}
ROOT = Path(__file__).resolve().parents[1]


def _on_device(t: Tensor) -> bool:
    return t.device.type != "cpu"


def _caller() -> str:
    """The innermost line outside torch and this guard that led to the op: 'file:line (code)'."""
    guard = {"__torch_dispatch__", "_caller"}
    for frame in reversed(traceback.extract_stack()):
        if f"{os.sep}torch{os.sep}" not in frame.filename and frame.name not in guard:
            return f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno} ({frame.line})"
    return "(unknown)"


def host_sync(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why ``func(*args, **kwargs)`` would wait for the device, or None."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
    device = [t for t in tensors if _on_device(t)]
    if func.overloadpacket in HOST_READS and device:
        return "reads a device value on the host"
    if func.overloadpacket in COPIES:
        target = kwargs.get("device")
        devices = {t.device.type for t in tensors} | ({torch.device(target).type} if target else set())
        if len(devices) > 1:
            return f"copies between devices ({' and '.join(sorted(devices))})"
        return None
    indices = args[1] if func.overloadpacket in MASK_INDEXING else ()
    if any(isinstance(i, Tensor) and _on_device(i) and i.dtype in (torch.bool, torch.uint8) for i in indices):
        return "indexes with a boolean mask (its size is read on the host)"
    if device and func not in HOST_METADATA and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
        return "mixes host and device tensors (the host ones are copied to the device)"
    return None


class HostSyncGuard(TorchDispatchMode):
    """Inside :meth:`checking`, fails on the first op that would wait for the device (see
    :func:`host_sync`) and counts the ops it saw; outside it (the setup), lets every op run.

    With ``fake_mode`` (entered below this guard), ops on host tensors only run outside it, so
    that host tensors stay real CPU tensors the code can read, and the packed-sequence ops get
    their results' sizes from the real host lengths (FakeTensorMode cannot know them)."""

    def __init__(self, fake_mode: FakeTensorMode | None = None) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.check = False
        self.seen: dict[str, int] = {}

    @contextlib.contextmanager
    def checking(self) -> Iterator[None]:
        self.check = True
        try:
            yield
        finally:
            self.check = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        why = host_sync(func, args, kwargs) if self.check else None
        if self.check:
            self.seen[str(func)] = self.seen.get(str(func), 0) + 1
        if why is not None:
            devices = [
                (t.device.type, tuple(t.shape))
                for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, Tensor)
            ]
            raise AssertionError(f"{func} {why}: {devices}, called from {_caller()}")
        if self.fake_mode is None:
            return func(*args, **kwargs)
        if func is aten._pack_padded_sequence.default:
            return _fake_pack(*args)
        if func is aten._pad_packed_sequence.default:
            return _fake_pad(*args)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        target = kwargs.get("device")
        if not any(isinstance(t, FakeTensor) for t in tensors) and (
            target is None or torch.device(target).type == "cpu"
        ):
            with _disable_current_modes():  # host work: real tensors, real values
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _fake_pack(data: Tensor, lengths: Tensor, batch_first: bool) -> tuple[Tensor, Tensor]:
    """aten._pack_padded_sequence on a fake ``data`` with real host ``lengths`` (sorted)."""
    with _disable_current_modes():
        lens = lengths.tolist()
        batch_sizes = torch.tensor([sum(n > t for n in lens) for t in range(max(lens))])
    return data.new_empty((sum(lens), *data.shape[2:])), batch_sizes


def _fake_pad(
    data: Tensor, batch_sizes: Tensor, batch_first: bool, padding_value: float, total_length: int
) -> tuple[Tensor, Tensor]:
    """aten._pad_packed_sequence on a fake ``data`` with real host ``batch_sizes``."""
    with _disable_current_modes():
        sizes = batch_sizes.tolist()
        lengths = torch.tensor([sum(b > i for b in sizes) for i in range(sizes[0])])
    shape = (sizes[0], total_length) if batch_first else (total_length, sizes[0])
    return data.new_empty((*shape, *data.shape[1:])), lengths


def tiny_batch(**changes: Any) -> tuple[Any, Batch]:
    """The tiny config (with ``changes``) and a batch of 4 on the host, with caption lengths T
    (the longest there can be), 1 and a tie."""
    cfg = override(get_preset("shapes"), **{**TINY_OVERRIDES, **changes})
    words = cfg.text.words_num
    lengths = torch.tensor([words, 1, 3, 3])
    captions = torch.randint(1, VOCAB, (4, words))
    captions[torch.arange(words)[None, :] >= lengths[:, None]] = 0
    images = synthetic_batch(cfg, VOCAB, batch_size=4, device="cpu").images
    return cfg, Batch(images, captions, lengths, torch.arange(4))


def zero_grads_instead_of_backward(state: TrainingState) -> Callable[..., None]:
    """A stand-in for Tensor.backward: a zero gradient for every parameter that would get one."""
    params = [p for m in (state.netG, *state.netsD) for p in m.parameters()]

    def backward(self: Tensor, *args: Any, **kwargs: Any) -> None:
        for p in params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad

    return backward


def test_a_step_on_fake_cuda_has_no_host_sync(monkeypatch):
    cfg, batch = tiny_batch(**{"model.gf_dim": 32})  # N_r 32: a width the Triton kernels take
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    guard = HostSyncGuard(fake)
    with fake, guard, torch.backends.cudnn.flags(enabled=False):
        state = TrainingState.build(cfg, VOCAB, device="cuda", memory_backend="triton")
        batch = batch.to("cuda")
        assert isinstance(batch.captions, FakeTensor) and not isinstance(batch.host_cap_lens, FakeTensor)
        monkeypatch.setattr(Tensor, "backward", zero_grads_instead_of_backward(state))
        with guard.checking():
            logs = state.step(batch)
    assert logs["nonfinite"].device.type == "cuda"
    # It ran the step: the encoder's packing, the Triton memory op (its fake kernels), the fused Adams.
    ran = {
        "aten._pack_padded_sequence.default",
        "dmgan_triton.memory_read.default",
        "aten._fused_adam_.default",
    }
    assert ran <= set(guard.seen), sorted(guard.seen)


def autocast_off_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.autocast and is_autocast_enabled refuse the meta device type even when autocast is
    off: make them say "off" for it, for the rest of the test (the step runs with amp="off")."""
    autocast, enabled = torch.autocast, torch.is_autocast_enabled

    def meta_autocast(device_type: str, *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
        if device_type != "meta":
            return autocast(device_type, *args, **kwargs)
        assert not kwargs.get("enabled", True), "autocast on the meta device"
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", meta_autocast)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False if a == ("meta",) else enabled(*a))


def test_a_step_with_its_backward_on_meta_has_no_host_sync(monkeypatch):
    cfg, batch = tiny_batch()
    state = TrainingState.build(cfg, VOCAB, device="meta")
    batch = batch.to("meta")
    updates = []
    monkeypatch.setattr(dmgan.training_step, "apply_update", lambda opt, scaler, skip: updates.append(opt))
    autocast_off_on_meta(monkeypatch)
    guard = HostSyncGuard()
    with guard, guard.checking():
        state.step(batch)
    assert len(updates) == 1 + len(state.netsD)
    assert any("convolution_backward" in op for op in guard.seen), sorted(guard.seen)


# --------------------------------------------------------------------------------------------
# The guard catches the syncs it was written for.


def _on_fake_cuda(fn: Callable[[], Any]) -> None:
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    guard = HostSyncGuard(fake)
    with fake, torch.backends.cudnn.flags(enabled=False), guard, guard.checking():
        fn()


def test_the_guard_catches_pack_padded_sequence_sorting_on_the_host():
    lengths = torch.tensor([3, 1, 2])

    def pack() -> None:
        pack_padded_sequence(torch.zeros(3, 4, 5, device="cuda"), lengths, True, enforce_sorted=False)

    with pytest.raises(AssertionError, match="_to_copy.*copies between devices.*pack_padded_sequence"):
        _on_fake_cuda(pack)


def test_the_guard_catches_pad_packed_sequence_unsorting_on_the_host():
    def pad() -> None:
        packed = pack_padded_sequence(torch.zeros(3, 4, 5, device="cuda"), torch.tensor([3, 2, 1]), True)
        order = torch.arange(3, device="cuda").flip(0)  # made on the device: no copy
        packed = type(packed)(packed.data, packed.batch_sizes, order, None)
        pad_packed_sequence(packed, batch_first=True)

    with pytest.raises(AssertionError, match="_to_copy.*copies between devices.*pad_packed_sequence"):
        _on_fake_cuda(pad)


def test_the_guard_catches_a_host_index_into_a_device_tensor():
    def index() -> None:
        attn = torch.zeros(4, 4, 3, device="cuda")
        attn[torch.arange(4), torch.arange(4)]

    with pytest.raises(AssertionError, match="index.*mixes host and device"):
        _on_fake_cuda(index)


HOST_READING = {
    "item": lambda x: x[0].item(),
    "bool": lambda x: bool(x.any()),
    "nonzero": lambda x: x.nonzero(),
    "mask": lambda x: x[x > 0],
    "cpu": lambda x: x.cpu(),
    "tolist": lambda x: x.tolist(),
}


@pytest.mark.parametrize("read", HOST_READING.values(), ids=HOST_READING.keys())
def test_the_guard_catches_host_reads(read):
    with pytest.raises(AssertionError, match="reads a device value|copies between|boolean mask"):
        _on_fake_cuda(lambda: read(torch.zeros(3, device="cuda")))
