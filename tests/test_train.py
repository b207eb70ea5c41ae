"""One full training iteration (D steps, G step, EMA) and the train.py entry point."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dmgan.config import get_preset, override
from dmgan.trainer import GAN, frozen, synthetic_batch


def tiny_config():
    cfg = get_preset("shapes")
    return override(
        cfg,
        **{
            "model.base_size": 16,
            "model.gf_dim": 8,
            "model.df_dim": 4,
            "model.embedding_dim": 16,
            "model.word_dim": 8,
            "model.z_dim": 8,
            "model.condition_dim": 8,
        },
    )


def test_one_iteration_updates_every_network_and_the_ema():
    cfg = tiny_config()
    gan = GAN.build(cfg, vocab_size=20)
    before_g = [p.detach().clone() for p in gan.netG.parameters()]
    before_d = [p.detach().clone() for d in gan.netsD for p in d.parameters()]
    before_text = [p.detach().clone() for p in gan.text_encoder.parameters()]
    logs = gan.step(synthetic_batch(cfg, 20, batch_size=4, device="cpu"))
    assert set(logs) >= {"d_loss0", "d_loss1", "d_loss2", "g_loss", "kl", "g_words", "g_sent"}
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert all(not torch.equal(a, b) for a, b in zip(before_g, gan.netG.parameters()) if a.dim() > 1)
    assert any(
        not torch.equal(a, b) for a, b in zip(before_d, (p for d in gan.netsD for p in d.parameters()))
    )
    assert all(torch.equal(a, b) for a, b in zip(before_text, gan.text_encoder.parameters()))  # frozen
    for avg, old, new in zip(gan.ema.params, before_g, gan.netG.parameters()):
        torch.testing.assert_close(avg, 0.999 * old + 0.001 * new.detach())
    assert all(p.requires_grad for d in gan.netsD for p in d.parameters())  # the G step unfroze them


def test_frozen_modules_pass_gradients_through_but_get_none():
    net, x = nn.Linear(3, 3), torch.randn(2, 3, requires_grad=True)
    with frozen([net]):
        y = net(x).square().sum()
    assert all(p.requires_grad for p in net.parameters())  # restored at once
    y.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_config_override_rejects_unknown_fields():
    cfg = get_preset("bird")
    assert override(cfg, **{"train.batch_size": 3}).train.batch_size == 3
    assert dataclasses.asdict(cfg) == dataclasses.asdict(get_preset("bird"))
    for bad in ("batch_size", "train.nope", "optim.lr"):
        try:
            override(cfg, **{bad: 1})
        except ValueError as e:
            assert bad.split(".")[-1] in str(e) or bad in str(e)
        else:
            raise AssertionError(f"{bad} accepted")


def test_bf16_autocast_iteration_is_finite_and_keeps_fp32_weights():
    cfg = tiny_config()
    gan = GAN.build(cfg, vocab_size=20, amp="bf16")
    batch = synthetic_batch(cfg, 20, batch_size=4, device="cpu")
    logs = gan.step(batch)
    assert logs["nonfinite"] == 0 and all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert all(p.dtype == torch.float32 for p in gan.netG.parameters())
    assert not gan.scalerG.is_enabled()


def test_fp16_uses_one_gradient_scaler_per_optimizer_and_unknown_amp_is_refused():
    cfg = tiny_config()
    gan = GAN.build(cfg, vocab_size=20, amp="fp16")
    assert gan.scalerG.is_enabled() and len(gan.scalersD) == 3 and all(s.is_enabled() for s in gan.scalersD)
    logs = gan.step(synthetic_batch(cfg, 20, batch_size=4, device="cpu"))
    assert logs["nonfinite"] == 0
    assert gan.scalerG.get_scale() > 0
    try:
        GAN.build(cfg, vocab_size=20, amp="fp8")
    except ValueError as e:
        assert "amp" in str(e) and "fp8" in str(e)
    else:
        raise AssertionError("unknown amp mode accepted")
