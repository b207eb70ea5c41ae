"""The eager dynamic-memory ops against an independent float64 computation of the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmgan import ops
from dmgan.ops import reference
from dmgan.ops.library import write_argument_shapes
from tests.conftest import random_pad_mask


def make_write_inputs(batch=3, nw=12, nr=8, num_words=5, dtype=torch.float32, requires_grad=False):
    shapes = write_argument_shapes(batch, nw, nr, num_words)
    return {k: (torch.randn(s, dtype=dtype) * 0.5).requires_grad_(requires_grad) for k, s in shapes.items()}


def make_read_inputs(
    batch=3, nr=8, height=5, width=3, lengths=(5, 2, 4), dtype=torch.float32, requires_grad=False
):
    num_words = max(max(lengths), 1)
    tensors = dict(
        img=torch.randn(batch, nr, height, width, dtype=dtype),
        keys=torch.rand(batch, nr, num_words, dtype=dtype),
        values=torch.rand(batch, nr, num_words, dtype=dtype),
        gate_w=torch.randn(1, 2 * nr, 1, 1, dtype=dtype) * 0.3,
        gate_b=torch.randn(1, dtype=dtype),
    )
    tensors = {k: v.requires_grad_(requires_grad) for k, v in tensors.items()}
    tensors["pad_mask"] = random_pad_mask(list(lengths), num_words)
    return tensors


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def write_formula(t):
    """Memory writing, word by word, in float64 numpy."""
    t = {k: v.detach().double().numpy() for k, v in t.items()}
    batch, _, num_words = t["words"].shape
    nr = t["rbar"].shape[1]
    keys = np.zeros((batch, nr, num_words))
    values = np.zeros((batch, nr, num_words))
    for b in range(batch):
        rbar = t["rbar"][b]
        from_image = np.maximum(t["M_r"][:, :, 0] @ rbar + t["M_r_b"], 0)
        for i in range(num_words):
            w = t["words"][b, :, i]
            gate = sigmoid(t["A"][0] @ w + t["B"][0] @ rbar)
            from_words = np.maximum(t["M_w"][:, :, 0] @ w + t["M_w_b"], 0)
            m = from_words * gate + from_image * (1 - gate)
            keys[b, :, i] = np.maximum(t["key_w"][:, :, 0] @ m + t["key_b"], 0)
            values[b, :, i] = np.maximum(t["value_w"][:, :, 0] @ m + t["value_b"], 0)
    return keys, values


def read_formula(t, pixel_mask=None):
    """Memory reading, pixel by pixel, in float64 numpy. pixel_mask: B x N x T (default per sample)."""
    img = t["img"].detach().double().numpy()
    keys = t["keys"].detach().double().numpy()
    values = t["values"].detach().double().numpy()
    w = t["gate_w"].detach().double().numpy().reshape(-1)
    bias = float(t["gate_b"].detach().double())
    batch, nr, height, width = img.shape
    num_words = keys.shape[2]
    if pixel_mask is None:
        pixel_mask = t["pad_mask"][:, None, :].expand(batch, height * width, num_words)
    pixel_mask = pixel_mask.numpy()
    r_new = np.zeros_like(img)
    attention = np.zeros((batch, num_words, height, width))
    for b in range(batch):
        for j in range(height * width):
            y, x = divmod(j, width)
            r = img[b, :, y, x]
            valid = ~pixel_mask[b, j]
            alpha = np.zeros(num_words)
            if valid.any():
                s = r @ keys[b]  # T
                e = np.exp(s[valid] - s[valid].max())
                alpha[valid] = e / e.sum()
            o = values[b] @ alpha
            g = sigmoid(w[:nr] @ r + w[nr:] @ o + bias)
            r_new[b, :, y, x] = r * (1 - g) + o * g
            attention[b, :, y, x] = alpha
    return r_new, attention


def test_memory_write_matches_formula():
    t = make_write_inputs()
    keys, values = ops.memory_write(**t, backend="eager")
    want_keys, want_values = write_formula(t)
    np.testing.assert_allclose(keys.double().numpy(), want_keys, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values.double().numpy(), want_values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shape",
    [
        dict(batch=3, height=5, width=3, lengths=(5, 2, 4)),
        dict(batch=1, height=4, width=4, lengths=(1,)),
        dict(batch=2, height=1, width=7, lengths=(3, 3)),
    ],
)
def test_memory_read_matches_formula(shape):
    t = make_read_inputs(**shape)
    r_new, attention = ops.memory_read(**t, backend="eager", return_attention=True)
    want_r, want_att = read_formula(t)
    np.testing.assert_allclose(r_new.double().numpy(), want_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attention.double().numpy(), want_att, rtol=1e-5, atol=1e-6)


def test_memory_read_without_attention_returns_none_and_same_features():
    t = make_read_inputs()
    r_a, att = ops.memory_read(**t, backend="eager")
    r_b, _ = ops.memory_read(**t, backend="eager", return_attention=True)
    assert att is None
    torch.testing.assert_close(r_a, r_b, rtol=0, atol=0)


def test_padded_words_get_no_attention():
    t = make_read_inputs(lengths=(5, 2, 4))
    _, attention = ops.memory_read(**t, backend="eager", return_attention=True)
    assert attention[1, 2:].abs().max() == 0
    assert attention[2, 4:].abs().max() == 0
    torch.testing.assert_close(attention.sum(1), torch.ones(3, 5, 3))


def test_fully_padded_caption_reads_nothing_and_stays_finite():
    t = make_read_inputs(lengths=(3, 0, 2), requires_grad=True)
    r_new, attention = ops.memory_read(**t, backend="eager", return_attention=True)
    assert attention[1].abs().max() == 0
    img, w, b = t["img"][1], t["gate_w"].view(-1), t["gate_b"]
    gate = torch.sigmoid(torch.einsum("c,chw->hw", w[: img.shape[0]], img) + b)
    torch.testing.assert_close(r_new[1], img * (1 - gate))
    r_new.square().sum().backward()
    for name in ("img", "keys", "values", "gate_w", "gate_b"):
        assert torch.isfinite(t[name].grad).all(), name
    np.testing.assert_allclose(r_new.detach().double().numpy(), read_formula(t)[0], rtol=1e-5, atol=1e-6)


def test_legacy_mask_reproduces_the_reference_broadcast():
    """With mixed caption lengths the legacy mask differs from the correct one and equals the
    reference's ``mask.repeat(queryL, 1)`` on batch-major rows."""
    t = make_read_inputs(batch=3, height=3, width=5, lengths=(5, 1, 3))
    batch, _, height, width = t["img"].shape
    num_pixels, num_words = height * width, t["keys"].shape[2]
    reference_rows = t["pad_mask"].repeat(num_pixels, 1)  # (B*N) x T, as in the reference code
    reference_mask = reference_rows.view(batch, num_pixels, num_words)

    legacy, legacy_att = ops.memory_read(**t, backend="eager", legacy_mask=True, return_attention=True)
    correct, _ = ops.memory_read(**t, backend="eager")
    assert not torch.allclose(legacy, correct)
    torch.testing.assert_close(
        reference.expand_pad_mask(t["pad_mask"], num_pixels, legacy=True), reference_mask
    )
    want_r, want_att = read_formula(t, pixel_mask=reference_mask)
    np.testing.assert_allclose(legacy.double().numpy(), want_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(legacy_att.double().numpy(), want_att, rtol=1e-5, atol=1e-6)


def test_legacy_and_correct_agree_when_all_captions_have_one_length():
    t = make_read_inputs(lengths=(4, 4, 4))
    legacy, _ = ops.memory_read(**t, backend="eager", legacy_mask=True)
    correct, _ = ops.memory_read(**t, backend="eager")
    torch.testing.assert_close(legacy, correct, rtol=0, atol=0)


def test_gradients_match_float64_autograd():
    """fp32 gradients of both ops against the same ops run in float64."""
    w32 = make_write_inputs(requires_grad=True)
    w64 = {k: v.detach().double().requires_grad_() for k, v in w32.items()}
    r32 = make_read_inputs(requires_grad=True)
    r64 = {k: (v.detach().double().requires_grad_() if v.is_floating_point() else v) for k, v in r32.items()}
    for w, r in ((w32, r32), (w64, r64)):
        keys, values = ops.memory_write(**w, backend="eager")
        r_new, _ = ops.memory_read(
            r["img"], keys, values, r["pad_mask"], r["gate_w"], r["gate_b"], backend="eager"
        )
        r_new.sin().sum().backward()
    for name in list(w32) + ["img", "gate_w", "gate_b"]:
        src32, src64 = (w32, w64) if name in w32 else (r32, r64)
        torch.testing.assert_close(
            src32[name].grad.double(), src64[name].grad, rtol=1e-4, atol=1e-5, msg=name
        )


def test_float64_gradcheck():
    w = make_write_inputs(batch=2, nw=4, nr=3, num_words=3, dtype=torch.float64, requires_grad=True)
    r = make_read_inputs(
        batch=2, nr=3, height=2, width=3, lengths=(3, 1), dtype=torch.float64, requires_grad=True
    )
    names = list(w)
    assert torch.autograd.gradcheck(lambda *a: ops.memory_write(*a, backend="eager"), [w[k] for k in names])
    read = lambda img, k, v, gw, gb: ops.memory_read(img, k, v, r["pad_mask"], gw, gb, backend="eager")[0]
    assert torch.autograd.gradcheck(read, [r[k] for k in ("img", "keys", "values", "gate_w", "gate_b")])


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.


@pytest.mark.parametrize(
    ("name", "bad", "error", "match"),
    [
        (
            "keys",
            torch.zeros(3, 9, 5),
            ValueError,
            r"keys must have shape \(B, N_r, T\) = \(3, 8, T\), got \(3, 9, 5\)",
        ),
        ("values", torch.zeros(3, 7, 5), ValueError, "values must have shape"),
        (
            "pad_mask",
            torch.zeros(3, 4, dtype=torch.bool),
            ValueError,
            r"pad_mask must have shape \(B, T\) = \(3, 5\)",
        ),
        ("pad_mask", torch.zeros(3, 5), TypeError, "pad_mask must be torch.bool"),
        (
            "gate_w",
            torch.zeros(1, 8, 1, 1),
            ValueError,
            r"gate_w must have shape \(1, 2\*N_r, 1, 1\) = \(1, 16, 1, 1\)",
        ),
        ("img", torch.zeros(3, 8, 5), ValueError, "img must have shape"),
        ("img", torch.zeros(3, 8, 5, 3, dtype=torch.long), TypeError, "img must be a floating-point tensor"),
        (
            "keys",
            torch.zeros(3, 8, 5, dtype=torch.float64),
            TypeError,
            "keys is torch.float64 but img is torch.float32",
        ),
        ("keys", torch.zeros(3, 8, 5, device="meta"), ValueError, "keys is on meta"),
        ("values", [1.0], TypeError, "values must be a torch.Tensor"),
    ],
)
def test_memory_read_rejects_bad_input(name, bad, error, match):
    t = make_read_inputs(lengths=(5, 2, 4))
    t[name] = bad
    with pytest.raises(error, match=match):
        ops.memory_read(**t)


@pytest.mark.parametrize(
    ("name", "bad", "match"),
    [
        ("words", torch.zeros(3, 12), r"words must have shape \(B, N_w, T\)"),
        ("rbar", torch.zeros(2, 8), r"rbar must have shape \(B, N_r\) = \(3, N_r\), got \(2, 8\)"),
        ("M_w", torch.zeros(16, 11, 1), r"M_w must have shape \(N_m, N_w, 1\) = \(N_m, 12, 1\)"),
        ("key_w", torch.zeros(8, 15, 1), r"key_w must have shape \(N_r, N_m, 1\) = \(8, 16, 1\)"),
        ("value_b", torch.zeros(9), r"value_b must have shape \(N_r,\) = \(8\)|value_b must have shape"),
        ("words", torch.zeros(3, 12, 0), "no word"),
    ],
)
def test_memory_write_rejects_bad_input(name, bad, match):
    t = make_write_inputs()
    t[name] = bad
    with pytest.raises(ValueError, match=match):
        ops.memory_write(**t)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        ops.memory_read(**make_read_inputs(), backend="cuda-magic")


def test_auto_runs_and_eager_is_available_everywhere():
    assert "eager" in ops.available_backends("cpu")
    t = make_read_inputs()
    torch.testing.assert_close(ops.memory_read(**t)[0], ops.memory_read(**t, backend="eager")[0])


def test_mixed_dtypes_are_accepted_under_autocast():
    t = make_read_inputs()
    t["img"] = t["img"].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r_new, _ = ops.memory_read(**t)
    want, _ = read_formula(t)
    np.testing.assert_allclose(r_new.float().numpy(), want, rtol=3e-2, atol=3e-2)
