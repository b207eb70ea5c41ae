"""Every fused backend of the dynamic-memory ops against the eager reference (dmgan/ops/parity.py).

On a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest):
small shapes, fp32 and fp16 (the interpreter computes bf16 dots wrongly, so bf16 runs on a GPU
only); the C++ extension runs its CPU kernels in fp32 and bf16. Every backend's output buffers
are poisoned with NaN, so an unwritten element fails the comparison. The CUDA kernels run on the
CPU in tests/test_ops_cuda_on_cpu.py, through the same cases.
"""

from __future__ import annotations

import pytest
import torch

from dmgan import ops
from dmgan.models import NEXT_STAGE_G
from dmgan.ops.library import OpInput
from dmgan.ops.parity import (
    CHANNELS_LAST_SHAPES,
    READ_SHAPES,
    WRITE_SHAPES,
    ReadShape,
    WriteShape,
    assert_matches,
    check_memory_read,
    check_memory_write,
    poisoned_outputs,
    read_case,
    run,
    write_case,
)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# One line per backend: its name and the dtypes it is checked in on this machine.
BACKENDS = {
    "triton": (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.float32, torch.float16),
    "cpp": (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.float32, torch.bfloat16),
}
FUSED = [b for b in BACKENDS if b in ops.available_backends(DEVICE)]
CASES = [(b, d) for b in FUSED for d in BACKENDS[b]]
ids = [f"{b}-{str(d).removeprefix('torch.')}" for b, d in CASES]


@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=ids)
@pytest.mark.parametrize("shape", READ_SHAPES, ids=str)
@pytest.mark.parametrize("legacy_mask", [False, True], ids=["mask", "legacy"])
def test_memory_read_matches_reference(backend, dtype, shape, legacy_mask):
    check_memory_read(backend, dtype, shape, legacy_mask, DEVICE)


@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=ids)
@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES, ids=str)
def test_memory_read_of_channels_last_images_matches_reference(backend, dtype, shape):
    check_memory_read(backend, dtype, shape, False, DEVICE, channels_last=True)


IMAGE_SIZED_COPIES = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("backend", FUSED)
def test_memory_read_copies_no_image_in_either_layout(backend, channels_last):
    """A channels-last model hands the op channels-last images and output gradients: the op must
    read and write them where they are, forward and backward, not copy them into another layout
    on each call. The profiler lists every aten op run (the launchers' included) with its inputs'
    shapes; no copy may take an image-sized tensor."""
    shape = ReadShape(2, 32, 9, 7, (6, 3))
    case = read_case(shape, torch.float32, DEVICE)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    img = case.pop("img").contiguous(memory_format=layout).requires_grad_()
    image_shape = list(img.shape)
    with torch.profiler.profile(record_shapes=True) as prof:
        r_new, _ = ops.memory_read(img, **case, backend=backend)
        r_new.backward(torch.ones_like(r_new))
    copies = [e.name for e in prof.events() if e.name in IMAGE_SIZED_COPIES and image_shape in e.input_shapes]
    assert not copies, f"image-sized copies per call: {copies}"
    assert r_new.is_contiguous(memory_format=layout) and img.grad.is_contiguous(memory_format=layout)
    want, _ = ops.memory_read(img.detach().contiguous(), **case, backend="eager")
    torch.testing.assert_close(r_new, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_memory_read_backward_takes_an_output_gradient_of_the_other_layout(backend):
    """Autograd may hand back a contiguous gradient for a channels-last r' (or the reverse): the
    backward converts it once to the image's layout and gives the eager reference's gradients."""
    case = read_case(ReadShape(2, 32, 5, 7, (6, 3)), torch.float32, DEVICE)
    for layout, other in (
        (torch.channels_last, torch.contiguous_format),
        (torch.contiguous_format, torch.channels_last),
    ):
        img = case["img"].contiguous(memory_format=layout).requires_grad_()
        rest = {k: v for k, v in case.items() if k != "img"}
        r_new, _ = ops.memory_read(img, **rest, backend=backend)
        grad = torch.randn(r_new.shape, generator=torch.Generator().manual_seed(3)).to(r_new)
        (got,) = torch.autograd.grad(r_new, img, grad.contiguous(memory_format=other))
        eager_img = case["img"].clone().requires_grad_()
        want_out, _ = ops.memory_read(eager_img, **rest, backend="eager")
        (want,) = torch.autograd.grad(want_out, eager_img, grad)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=ids)
@pytest.mark.parametrize("shape", WRITE_SHAPES, ids=str)
def test_memory_write_matches_reference(backend, dtype, shape):
    check_memory_write(backend, dtype, shape, DEVICE)


@pytest.mark.parametrize("backend", FUSED)
def test_gradients_are_deterministic(backend):
    read = read_case(ReadShape(3, 32, 9, 7, (21, 3, 5)), torch.float32, DEVICE)
    write = write_case(WriteShape(3, 48, 32, 21), torch.float32, DEVICE)
    for op, case in (("memory_read", read), ("memory_write", write)):
        first, second = run(op, case, backend), run(op, case, backend)
        for name in first:
            assert torch.equal(first[name], second[name]), f"{op}: {name} differs between two runs"


@pytest.mark.parametrize("backend", FUSED)
def test_attention_is_not_written_unless_asked(backend):
    case = read_case(ReadShape(2, 32, 5, 7, (6, 3)), torch.float32, DEVICE)
    r_new, attention = ops.memory_read(**case, backend=backend)
    assert attention is None
    torch.testing.assert_close(r_new, ops.memory_read(**case, backend=backend, return_attention=True)[0])


@pytest.mark.parametrize("image_dtype", [torch.float32, "autocast"], ids=["fp32-image", "16-bit-image"])
@pytest.mark.parametrize("backend", FUSED)
def test_autocast_gives_the_dtypes_of_eager_and_fp32_parameter_gradients(backend, image_dtype):
    """Under autocast the kernels run in 16 bits, and every output has the dtype that the eager
    reference gives it: r' keeps an fp32 image's precision, the attention follows autocast's
    softmax (fp32 on CUDA), keys and values are 16-bit."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    case = read_case(ReadShape(2, 32, 5, 7, (6, 3)), torch.float32, DEVICE)
    if image_dtype == "autocast":
        case["img"] = case["img"].to(dtype)
    case = {k: (v.requires_grad_() if v.is_floating_point() else v) for k, v in case.items()}
    write = write_case(WriteShape(2, 24, 32, 5), torch.float32, DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        r_new, attention = ops.memory_read(**case, backend=backend, return_attention=True)
        want, want_attention = ops.memory_read(**case, backend="eager", return_attention=True)
        keys, _ = ops.memory_write(**write, backend=backend)
        want_keys, _ = ops.memory_write(**write, backend="eager")
    assert (r_new.dtype, attention.dtype, keys.dtype) == (want.dtype, want_attention.dtype, want_keys.dtype)
    assert keys.dtype == dtype
    torch.testing.assert_close(r_new.float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(attention.float(), want_attention.float(), rtol=2e-2, atol=2e-2)
    r_new.float().sum().backward()
    assert case["gate_w"].grad.dtype == torch.float32 and torch.isfinite(case["gate_w"].grad).all()


@pytest.mark.parametrize("backend", FUSED)
def test_float64_runs_where_the_backend_computes_it_and_falls_back_where_not(backend):
    """fp64 (what gradcheck uses): the CPU kernels compute it in fp64; the GPU kernels refuse it,
    and backend="auto" falls back to one that takes it."""
    case = read_case(ReadShape(2, 32, 3, 5, (4, 2)), torch.float64, DEVICE)
    computes_fp64 = backend == "cpp" and DEVICE == "cpu"
    if computes_fp64:
        got, _ = ops.memory_read(**case, backend=backend)
        torch.testing.assert_close(got, ops.memory_read(**case, backend="eager")[0], rtol=1e-12, atol=1e-12)
    else:
        with pytest.raises(ValueError, match=r"does not support this input: dtype torch.float64"):
            ops.memory_read(**case, backend=backend)
    auto, _ = ops.memory_read(**case)
    assert auto.dtype == torch.float64
    torch.testing.assert_close(auto, ops.memory_read(**case, backend="eager")[0], rtol=1e-12, atol=1e-12)


def test_unsupported_inputs_raise_for_triton_and_fall_back_under_auto(monkeypatch):
    if "triton" not in FUSED:
        pytest.skip("triton backend unavailable")
    case = read_case(ReadShape(1, 48, 3, 3, (4,)), torch.float32, DEVICE)
    with pytest.raises(ValueError, match=r"backend 'triton' does not support this input: N_r = 48"):
        ops.memory_read(**case, backend="triton")
    long_case = read_case(ReadShape(1, 32, 3, 3, (70,)), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="T = 70 words"):
        ops.memory_read(**long_case, backend="triton")
    monkeypatch.setitem(ops.AUTO_ORDER, (ops.device_kind(DEVICE), "memory_read"), ("triton", "eager"))
    for c in (case, long_case):
        torch.testing.assert_close(ops.memory_read(**c)[0], ops.memory_read(**c, backend="eager")[0])


def _cuda_call(op: str = "memory_read", **fields) -> OpInput:
    """A call on a CUDA device, described without one (the device need not exist to be named)."""
    base = dict(device=torch.device("cuda", 0), dtype=torch.float32, batch=2, channels=64, num_words=18)
    return OpInput(op, **{**base, "num_pixels": 64 * 64, **fields})


def test_float64_on_cuda_falls_back_to_eager_under_auto(monkeypatch):
    """Neither GPU backend computes fp64 (the Triton dot has no fp64 form; the CUDA kernels work
    in fp32): auto must not send it to them."""
    if "cpp" in FUSED:  # a CUDA device as the CUDA kernels would see it, none needed here
        monkeypatch.setattr("dmgan.ops._cpp._HAS_CUDA_KERNELS", True)
        monkeypatch.setattr("dmgan.ops._cpp._shared_memory_per_block", lambda device: 101_376)
    for backend in FUSED:
        module = ops._load(backend)
        assert "dtype torch.float64" in module.unsupported_reason(_cuda_call(dtype=torch.float64))
        assert module.unsupported_reason(_cuda_call()) is None
    assert ops._resolve("auto", _cuda_call(dtype=torch.float64)) is ops.reference


@pytest.mark.skipif("cpp" not in FUSED, reason="the C++ extension did not load")
def test_cuda_kernels_that_need_more_shared_memory_than_the_device_has_fall_back(monkeypatch):
    """The CUDA read kernels keep a sample's keys and values in shared memory (C x T each): N_r 128
    with 64 words needs about 66 KB, which sm_86 (99 KB) has and a 48 KB device has not."""
    from dmgan.ops import _cpp

    monkeypatch.setattr(_cpp, "_HAS_CUDA_KERNELS", True)
    monkeypatch.setitem(ops.AUTO_ORDER, ("cuda", "memory_read"), ("cpp", "eager"))
    wide = _cuda_call(channels=128, num_words=64)
    assert 48 * 1024 < _cpp.cuda_shared_bytes(wide) <= 101_376
    monkeypatch.setattr(_cpp, "_shared_memory_per_block", lambda device: 101_376)
    assert _cpp.unsupported_reason(wide) is None and ops._resolve("auto", wide) is _cpp
    monkeypatch.setattr(_cpp, "_shared_memory_per_block", lambda device: 48 * 1024)
    assert "shared memory" in _cpp.unsupported_reason(wide)
    assert ops._resolve("auto", wide) is ops.reference


@pytest.mark.skipif("triton" not in FUSED, reason="triton backend unavailable")
def test_triton_launches_on_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device and its current stream: a launch must make the
    inputs' device current for the call (inputs on cuda:1 with device 0 current would otherwise be
    read by a kernel on device 0). The GPU tests run this for real on a second device."""
    from dmgan.kernels._common import Launch

    entered = []

    class RecordingDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **options: entered.append(("launch", grid))

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    Launch(FakeKernel(), (3,), (OnSecondGpu(),))()
    assert entered == [torch.device("cuda", 1), ("launch", (3,)), "exit"]
    entered.clear()
    Launch(FakeKernel(), (0,), (OnSecondGpu(),))()  # an empty grid launches nothing
    assert entered == []


@pytest.mark.skipif("triton" not in FUSED, reason="triton backend unavailable")
def test_triton_grids_are_flat_so_batches_beyond_65535_fit():
    """Only a grid's first axis takes more than 65,535 programs: the reading kernels put
    samples x tiles on it (the writing kernel has samples there already)."""
    from dmgan.kernels import memory_read, memory_write

    batch = 70_000
    read = read_case(ReadShape(batch, 32, 2, 2, (2,) * batch), torch.float32)
    out, empty = torch.empty_like(read["img"]), torch.empty(0)
    forward = memory_read.plan_forward(*read.values(), out, empty, False, multiprocessors=100_000)
    buffers = memory_read.backward_buffers(read["img"], 2, 1)
    backward = memory_read.plan_backward(read["img"], *read.values(), buffers, False)
    write = write_case(WriteShape(batch, 8, 32, 2), torch.float32)
    weights = tuple(write.values())[2:]
    keys = torch.empty(batch, 32, 2)
    write_forward = memory_write.plan_forward(write["words"], write["rbar"], weights, keys, keys)
    assert forward.grid == (batch,) and backward.grid == (batch,) and write_forward.grid == (batch, 1)


@pytest.mark.skipif("triton" not in FUSED, reason="triton backend unavailable")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("size", [64, 128])
def test_triton_read_backward_moves_little_beyond_the_essential_traffic(size, dtype):
    """At the bird preset's stages on an H200 (132 multiprocessors), the persistent backward's
    partial sums and per-program loads add at most 30% to reading r and dr' and writing dr."""
    from dmgan.kernels.memory_read import backward_bytes

    traffic = backward_bytes(10, 64, size * size, 18, dtype, multiprocessors=132)
    assert traffic["essential"] < traffic["moved"] <= 1.3 * traffic["essential"]


def test_auto_picks_triton_only_for_cuda_tensors():
    for op in ("memory_read", "memory_write"):
        assert ops.AUTO_ORDER["cuda", op][0] == "triton"
        for isa in ("default", "avx2", "avx512"):  # the interpreter is for tests, not for speed
            assert "triton" not in ops.AUTO_ORDER[f"cpu-{isa}", op]


OP_NAMESPACES = {"triton": "dmgan_triton", "cpp": "dmgan"}


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    namespace = getattr(torch.ops, OP_NAMESPACES[backend])
    read = read_case(ReadShape(2, 32, 3, 5, (4, 2)), torch.float32, DEVICE)
    read = {k: (v.requires_grad_() if v.is_floating_point() else v) for k, v in read.items()}
    for return_attention in (False, True):
        args = (*read.values(), return_attention, True)
        torch.library.opcheck(namespace.memory_read.default, args)
    write = write_case(WriteShape(2, 32, 32, 3), torch.float32, DEVICE)
    torch.library.opcheck(namespace.memory_write.default, [v.requires_grad_() for v in write.values()])


def test_opcheck_of_the_triton_ops_mixed_inputs():
    """The Triton ops' optional arguments: memory_write's compute dtype (fp32 weights, words of
    another dtype and layout) and, through autograd, memory_write_backward's needs_input_grad
    (words and r̄ without gradients); memory_read with fp32 gate weights and a sliced mask."""
    if "triton" not in FUSED:
        pytest.skip("triton backend unavailable")
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    write = write_case(WriteShape(2, 32, 32, 3), torch.float32, DEVICE)
    words = write.pop("words").transpose(1, 2).contiguous().transpose(1, 2)
    rbar = write.pop("rbar").to(dtype)
    args = (words, rbar, *(v.requires_grad_() for v in write.values()), dtype)
    torch.library.opcheck(torch.ops.dmgan_triton.memory_write.default, args)
    read = read_case(ReadShape(2, 32, 3, 5, (4, 2), num_words=6), dtype, DEVICE)
    read["pad_mask"] = read["pad_mask"][:, :4]  # as a batch's words are sliced: not contiguous
    read["keys"], read["values"] = read["keys"][:, :, :4], read["values"][:, :, :4]
    read.update(gate_w=read["gate_w"].float(), gate_b=read["gate_b"].float())
    read = {k: (v.contiguous().requires_grad_() if v.is_floating_point() else v) for k, v in read.items()}
    torch.library.opcheck(torch.ops.dmgan_triton.memory_read.default, (*read.values(), False, False))


def _stage_memory_op(backend: str, dtype: torch.dtype, write: dict, read: dict, grad: torch.Tensor) -> dict:
    """One stage's memory op under autocast, as training calls it; outputs and the gradients of
    every input that requires one."""
    weights = {k: v.detach().clone().requires_grad_() for k, v in write.items() if k not in ("words", "rbar")}
    img = read["img"].detach().clone().requires_grad_()
    gate = {k: read[k].detach().clone().requires_grad_() for k in ("gate_w", "gate_b")}
    with torch.autocast(DEVICE, dtype=dtype):
        keys, values = ops.memory_write(write["words"], write["rbar"], **weights, backend=backend)
        r_new, _ = ops.memory_read(img, keys, values, read["pad_mask"], **gate, backend=backend)
    r_new.backward(grad)
    result = {"keys": keys.detach(), "values": values.detach(), "r_new": r_new.detach(), "grad_img": img.grad}
    result.update({f"grad_{k}": v.grad for k, v in (*weights.items(), *gate.items())})
    return result


@pytest.mark.parametrize("backend", FUSED)
def test_inputs_as_training_hands_them_over_match_eager(backend):
    """Under autocast, training hands the memory op fp32 parameters, the frozen text encoder's
    words (fp32 here, no gradient, the B x N_w x T transpose of its B x T x N_w output), r̄
    detached, a 16-bit image and a padding mask sliced from the captions. The Triton kernels take
    them as they are (casts in registers, strides read where they lie, no gradient for the words
    and r̄); outputs and gradients match eager under the same autocast, each in eager's dtype."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    write = write_case(WriteShape(3, 24, 32, 6), torch.float32, DEVICE)
    write["words"] = write["words"].transpose(1, 2).contiguous().transpose(1, 2)
    read = read_case(ReadShape(3, 32, 5, 7, (6, 3, 0), num_words=9), dtype, DEVICE)
    read["pad_mask"] = read["pad_mask"][:, :6]
    read.update(gate_w=read["gate_w"].float(), gate_b=read["gate_b"].float())
    grad = torch.randn(read["img"].shape, generator=torch.Generator().manual_seed(5)).to(read["img"])
    with poisoned_outputs():
        got = _stage_memory_op(backend, dtype, write, read, grad)
    want = _stage_memory_op("eager", dtype, write, read, grad)
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
    assert_matches(got, want, torch.bfloat16)  # both sides round to 16 bits: the wider tolerance


@pytest.mark.parametrize("layout", ["transposed", "gapped"])
@pytest.mark.parametrize("backend", FUSED)
def test_memory_write_takes_words_in_any_layout(backend, layout):
    """Words in the text encoder's transposed layout are read (and their gradient written) where
    they lie; words with gaps between them get their gradient all the same."""
    case = write_case(WriteShape(2, 24, 32, 6), torch.float32, DEVICE)
    words = case["words"]
    if layout == "transposed":
        laid_out = words.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        laid_out = torch.stack((words, torch.full_like(words, float("nan"))), dim=3).flatten(2)[:, :, ::2]
    assert torch.equal(laid_out, words) and not laid_out.is_contiguous()
    inputs = {k: v.detach().clone().requires_grad_() for k, v in case.items() if k != "words"}
    words_in = laid_out.detach().requires_grad_()
    with poisoned_outputs():
        keys, values = ops.memory_write(words_in, **inputs, backend=backend)
    grads_out = [torch.randn(keys.shape, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    got = dict(zip(("keys", "values"), (keys.detach(), values.detach())))
    got.update(
        zip(("words", *inputs), torch.autograd.grad((keys, values), (words_in, *inputs.values()), grads_out))
    )
    wide = {k: v.detach().double().requires_grad_() for k, v in case.items()}
    want_keys, want_values = ops.memory_write(**wide, backend="eager")
    want = {"keys": want_keys.detach(), "values": want_values.detach()}
    want.update(zip(wide, torch.autograd.grad((want_keys, want_values), list(wide.values()), grads_out)))
    assert_matches(got, want, torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_of_a_generator_stage_has_no_graph_breaks(backend):
    torch._dynamo.reset()
    stage = NEXT_STAGE_G(ngf=32, nef=16, ncf=8, r_num=1, backend=backend).to(DEVICE)
    h = torch.randn(2, 32, 4, 4, device=DEVICE, requires_grad=True)
    words = torch.randn(2, 16, 5, device=DEVICE)
    mask = (torch.arange(5)[None, :] >= torch.tensor([5, 2])[:, None]).to(DEVICE)
    compiled = torch.compile(stage, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    out, att = compiled(h, words, mask, return_attention=True)
    want, want_att = stage(h, words, mask, return_attention=True)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(att, want_att, rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), h)
    (want_grad,) = torch.autograd.grad(want.sum(), h)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-4)
