"""Every fused backend of the dynamic-memory ops against the eager reference (tests/parity.py).

On a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest):
small shapes, fp32 and fp16 (the interpreter computes bf16 dots wrongly, so bf16 runs on a GPU
only); the C++ extension runs its CPU kernels in fp32 and bf16. Every backend's output buffers
are poisoned with NaN, so an unwritten element fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from dmgan import ops
from dmgan.models import NEXT_STAGE_G
from tests.parity import ReadShape, WriteShape, assert_matches, read_case, reference_for, run, write_case

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

READ_SHAPES = [
    ReadShape(2, 32, 5, 7, (6, 3)),  # odd H x W, mixed caption lengths
    ReadShape(1, 32, 4, 4, (1,)),  # B = 1, T = 1
    ReadShape(3, 32, 9, 7, (21, 3, 0)),  # two word blocks, a fully padded caption, several pixel tiles
    ReadShape(2, 64, 3, 11, (5, 5)),
    ReadShape(2, 128, 2, 3, (64, 17)),  # the widest supported: N_r 128, T 64
    ReadShape(1, 32, 11, 9, (7,)),  # several forward tiles, a partial last one
]
WRITE_SHAPES = [
    WriteShape(2, 40, 32, 6),  # N_w not a multiple of the chunk
    WriteShape(1, 32, 32, 1),
    WriteShape(3, 48, 64, 21),
    WriteShape(2, 24, 128, 64),
]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv("DMGAN_POISON_OUTPUTS", "1")  # read by the C++ / CUDA kernels' allocations
    if "triton" in FUSED:
        import kernels._common

        monkeypatch.setattr(kernels._common, "POISON_OUTPUTS", True)


@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=ids)
@pytest.mark.parametrize("shape", READ_SHAPES, ids=str)
@pytest.mark.parametrize("legacy_mask", [False, True], ids=["mask", "legacy"])
def test_memory_read_matches_reference(backend, dtype, shape, legacy_mask):
    case = read_case(shape, dtype, DEVICE)
    options = dict(return_attention=True, legacy_mask=legacy_mask)
    got = run("memory_read", case, backend, **options)
    assert got["out0"].dtype == got["out1"].dtype == dtype
    assert_matches(got, reference_for("memory_read", case, dtype, **options), dtype)


@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=ids)
@pytest.mark.parametrize("shape", WRITE_SHAPES, ids=str)
def test_memory_write_matches_reference(backend, dtype, shape):
    case = write_case(shape, dtype, DEVICE)
    got = run("memory_write", case, backend)
    assert got["out0"].dtype == dtype
    assert_matches(got, reference_for("memory_write", case, dtype), dtype)


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


@pytest.mark.parametrize("backend", FUSED)
def test_autocast_runs_in_16_bit_with_fp32_parameter_gradients(backend):
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    case = read_case(ReadShape(2, 32, 5, 7, (6, 3)), torch.float32, DEVICE)
    case = {k: (v.requires_grad_() if v.is_floating_point() else v) for k, v in case.items()}
    with torch.autocast(DEVICE, dtype=dtype):
        r_new, _ = ops.memory_read(**case, backend=backend)
    assert r_new.dtype == dtype
    r_new.float().sum().backward()
    assert case["gate_w"].grad.dtype == torch.float32 and torch.isfinite(case["gate_w"].grad).all()
    want, _ = ops.memory_read(**{k: v.detach() for k, v in case.items()}, backend="eager")
    torch.testing.assert_close(r_new.float(), want, rtol=2e-2, atol=2e-2)


def test_unsupported_inputs_raise_for_triton_and_fall_back_under_auto(monkeypatch):
    if "triton" not in FUSED:
        pytest.skip("triton backend unavailable")
    case = read_case(ReadShape(1, 48, 3, 3, (4,)), torch.float32, DEVICE)
    with pytest.raises(ValueError, match=r"backend 'triton' does not support this input: N_r = 48"):
        ops.memory_read(**case, backend="triton")
    long_case = read_case(ReadShape(1, 32, 3, 3, (70,)), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="T = 70 words"):
        ops.memory_read(**long_case, backend="triton")
    monkeypatch.setitem(ops.AUTO_ORDER, DEVICE, ("triton", "eager"))
    for c in (case, long_case):
        torch.testing.assert_close(ops.memory_read(**c)[0], ops.memory_read(**c, backend="eager")[0])


def test_auto_picks_triton_only_for_cuda_tensors():
    assert ops.AUTO_ORDER["cuda"][0] == "triton"
    assert "triton" not in ops.AUTO_ORDER["cpu"]  # the interpreter is for tests, not for speed


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
