"""What only a GPU can show about the fused backends: 16-bit tensor-core dots (the interpreter
runs dots in fp32), grids past 65,535 samples, a second stream, a second device, the CUDA
kernels' float64 refusal and shared-memory opt-in. The parity cases themselves run on the GPU
from tests/test_ops_backends.py. Run by ``python -m benchmarks.device_check`` on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from dmgan import ops
from dmgan.ops.parity import ReadShape, WriteShape, assert_matches, read_case, reference_for, run, write_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
FUSED = [b for b in ("triton", "cpp") if torch.cuda.is_available() and b in ops.available_backends("cuda")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", FUSED)
def test_16_bit_at_the_bird_shape(backend, dtype):
    """The bird preset's third stage (B 10, 128 x 128, N_r 64, T 18): tensor-core dots in 16 bits,
    many tiles and persistent backward programs."""
    case = read_case(ReadShape(10, 64, 128, 128, tuple(18 - i % 7 for i in range(10))), dtype, "cuda")
    options = dict(return_attention=True, legacy_mask=False)
    assert_matches(
        run("memory_read", case, backend, **options),
        reference_for("memory_read", case, dtype, **options),
        dtype,
    )
    write = write_case(WriteShape(10, 256, 64, 18), dtype, "cuda")
    assert_matches(run("memory_write", write, backend), reference_for("memory_write", write, dtype), dtype)


@pytest.mark.parametrize("backend", FUSED)
def test_batches_beyond_65535(backend):
    batch = 70_000
    case = read_case(
        ReadShape(batch, 32, 2, 2, tuple(1 + i % 3 for i in range(batch))), torch.float32, "cuda"
    )
    assert_matches(
        run("memory_read", case, backend), reference_for("memory_read", case, torch.float32), torch.float32
    )
    write = write_case(WriteShape(batch, 16, 32, 3), torch.float32, "cuda")
    assert_matches(
        run("memory_write", write, backend),
        reference_for("memory_write", write, torch.float32),
        torch.float32,
    )


@pytest.mark.parametrize("backend", FUSED)
def test_a_second_stream(backend):
    """Kernels launch on the current stream: work queued on a side stream, ordered after the
    inputs were made, gives the default stream's result."""
    case = read_case(ReadShape(4, 64, 32, 32, (9, 4, 18, 1)), torch.float32, "cuda")
    want = run("memory_read", case, backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run("memory_read", case, backend)
    torch.cuda.current_stream().wait_stream(side)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
@pytest.mark.parametrize("backend", FUSED)
def test_inputs_on_a_second_device(backend):
    assert torch.cuda.current_device() == 0
    case = read_case(ReadShape(2, 64, 16, 16, (9, 4)), torch.float32, "cuda:1")
    got = run("memory_read", case, backend)
    assert got["out0"].device == torch.device("cuda", 1)
    assert_matches(got, reference_for("memory_read", case, torch.float32), torch.float32)


@pytest.mark.skipif(
    torch.cuda.is_available() and "cpp" not in FUSED, reason="the extension has no CUDA kernels"
)
def test_the_cuda_kernels_refuse_float64_and_auto_falls_back():
    case = read_case(ReadShape(1, 32, 3, 3, (2,)), torch.float64, "cuda")
    with pytest.raises(RuntimeError, match="float64 is not supported on CUDA"):
        torch.ops.dmgan.memory_read(*case.values(), False, False)
    got, _ = ops.memory_read(**case)
    torch.testing.assert_close(got, ops.memory_read(**case, backend="eager")[0])


def test_a_training_step_does_not_wait_for_the_device():
    """TrainingState.step queues its work: no device-to-host copy or synchronisation until the
    caller reads the non-finite flag (the training loop's one wait a step). The caption lengths
    the text encoder packs with stay on the host (Batch.to keeps a copy there). On the CPU,
    tests/test_host_sync.py checks the same op by op, on fake CUDA and meta tensors."""
    from dmgan.config import get_preset
    from dmgan.training_step import TrainingState, synthetic_batch

    cfg = get_preset("shapes")
    gan = TrainingState.build(cfg, vocab_size=50, device="cuda", amp="bf16")
    batch = synthetic_batch(cfg, 50, batch_size=4, device="cpu").to("cuda")
    assert batch.captions.is_cuda and batch.host_cap_lens.device.type == "cpu"
    gan.step(batch)  # warm-up: first-use builds and Triton compiles may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logs = gan.step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logs["nonfinite"].item() == 0.0


def test_the_text_encoder_and_the_word_loss_do_not_wait_for_the_device():
    """The two parts of the step that used to wait, alone: the text encoder with host lengths (it
    sorts and unsorts with host indices; cuDNN packs with host batch sizes) and the DAMSM word
    loss (no host index into its attention). Lengths on the device make the encoder wait, as its
    docstring says: it reads them on the host."""
    from dmgan.losses import words_loss
    from dmgan.models import RNN_ENCODER

    rnn = RNN_ENCODER(50, ninput=16, nhidden=32).cuda().eval()
    lengths = torch.tensor([5, 1, 3, 3])
    captions = torch.randint(1, 50, (4, 5))
    captions[torch.arange(5)[None, :] >= lengths[:, None]] = 0
    captions, device_lengths = captions.cuda(), lengths.cuda()
    regions, labels = torch.randn(4, 32, 4, 4, device="cuda"), torch.arange(4, device="cuda")

    def encode_and_score(cap_lens):
        words, _ = rnn(captions, cap_lens)
        return words_loss(regions, words, labels, device_lengths, None)

    encode_and_score(lengths)  # warm-up: cuDNN's handle and plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss0, loss1, attention = encode_and_score(lengths)
        with pytest.raises(RuntimeError, match="synchroniz"):
            rnn(captions, device_lengths)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert attention is None and torch.isfinite(loss0 + loss1).item()
