"""One full training iteration (D steps, G step, EMA) and the train.py entry point."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dmgan.config import TINY_OVERRIDES, get_preset, override
from dmgan.data import Vocabulary
from dmgan.ema import ParameterEMA
from dmgan.pipeline import Captions
from dmgan.training_step import TrainingState, frozen, synthetic_batch


def tiny_config():
    return override(get_preset("shapes"), **{**TINY_OVERRIDES, "model.base_size": 16})


def test_one_iteration_updates_every_network_and_the_ema():
    cfg = tiny_config()
    gan = TrainingState.build(cfg, vocab_size=20)
    before_g = [p.detach().clone() for p in gan.netG.parameters()]
    before_d = [p.detach().clone() for d in gan.netsD for p in d.parameters()]
    before_text = [p.detach().clone() for p in gan.text_encoder.parameters()]
    logs = gan.step(synthetic_batch(cfg, 20, batch_size=4, device="cpu"))
    assert set(logs) >= {"d_loss0", "d_loss1", "d_loss2", "g_loss", "kl", "g_words", "g_sent"}
    assert all(torch.isfinite(v) for v in logs.values())
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
    gan = TrainingState.build(cfg, vocab_size=20, amp="bf16")
    batch = synthetic_batch(cfg, 20, batch_size=4, device="cpu")
    logs = gan.step(batch)
    assert logs["nonfinite"] == 0 and all(torch.isfinite(v) for v in logs.values())
    assert all(p.dtype == torch.float32 for p in gan.netG.parameters())
    assert not gan.scalerG.is_enabled()


def test_fp16_uses_one_gradient_scaler_per_optimizer_and_unknown_amp_is_refused():
    cfg = tiny_config()
    gan = TrainingState.build(cfg, vocab_size=20, amp="fp16")
    assert gan.scalerG.is_enabled() and len(gan.scalersD) == 3 and all(s.is_enabled() for s in gan.scalersD)
    logs = gan.step(synthetic_batch(cfg, 20, batch_size=4, device="cpu"))
    assert logs["nonfinite"] == 0
    assert gan.scalerG.get_scale() > 0
    try:
        TrainingState.build(cfg, vocab_size=20, amp="fp8")
    except ValueError as e:
        assert "amp" in str(e) and "fp8" in str(e)
    else:
        raise AssertionError("unknown amp mode accepted")


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_a_step_waits_for_no_loss_and_skips_every_update_after_a_nonfinite_one(monkeypatch, amp):
    """The losses come back as device tensors (nothing is read in the step: on a GPU the host
    runs ahead), and from the first NaN loss on no update of the iteration takes effect: here D0
    steps, D1's loss is NaN, so D1, D2, G, their optimizer states and the EMA stay as they were."""
    import traceback

    import dmgan.training_step as trainer

    cfg = tiny_config()
    gan = TrainingState.build(cfg, vocab_size=20, amp=amp)
    batch = synthetic_batch(cfg, 20, batch_size=4, device="cpu").to("cpu")
    real_loss, calls = trainer.discriminator_loss, {"n": 0}

    def nan_for_the_second_d(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(trainer, "discriminator_loss", nan_for_the_second_d)
    before = [[p.detach().clone() for p in net.parameters()] for net in (*gan.netsD, gan.netG)]
    ema_before = [p.clone() for p in gan.ema.params]
    reads = []
    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def record(self, *a, _original=original, _name=name, **k):
            reads.append((_name, traceback.extract_stack(limit=2)[0].filename))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, record)
    logs = gan.step(batch)
    monkeypatch.undo()
    # Only the text encoder's checks of the caption lengths and word ids, which read the host copies.
    assert {filename.rsplit("/", 1)[-1] for _, filename in reads} <= {"text.py"}
    assert all(isinstance(v, torch.Tensor) for v in logs.values()) and logs["nonfinite"].item() == 1.0
    after = [list(net.parameters()) for net in (*gan.netsD, gan.netG)]
    assert any(not torch.equal(a, b) for a, b in zip(before[0], after[0]))  # D0 stepped
    for old, new in zip(before[1:], after[1:]):
        assert all(torch.equal(a, b) for a, b in zip(old, new))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, gan.ema.params))
    assert all(
        int(s["step"]) == 0 for opt in (gan.optimizersD[1], gan.optimizerG) for s in opt.state.values()
    )


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, "bf16"), (False, "off")])
def test_the_cpu_default_amp_follows_the_cpu(monkeypatch, has_bf16, expected):
    """bf16 autocast where the CPU has bf16 matrix instructions (AMX / AVX-512 BF16), else off
    (it is many times slower without them); an asked-for mode always wins."""
    from dmgan import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16_matrix_instructions", lambda: has_bf16)
    mode, why = runtime.default_amp(torch.device("cpu"))
    assert mode == expected and ("AMX" in why and "AVX-512 BF16" in why)
    assert runtime.RunOptions().resolved(torch.device("cpu")).amp == expected
    assert runtime.RunOptions(amp="fp16").resolved(torch.device("cpu")).amp == "fp16"


def test_accumulated_micro_batches_give_the_gradients_of_one_batch(monkeypatch):
    """What accumulation can repeat exactly: with no batch norm, no DAMSM term (its candidate
    captions come from the micro-batch) and D losses without the mismatched pairs, two
    micro-batches give every network the gradients of one batch (fp32 rounding apart). Noise is
    zero here, so both draw the same images."""
    import dmgan.training_step as trainer
    from dmgan.losses import _bce

    def matched_pairs_only(netD, real, fake, sentence):
        features = netD(torch.cat([real, fake.detach()]))
        batch, index = real.shape[0], torch.arange(real.shape[0])
        pairs = (torch.cat([index, index + batch]), torch.cat([index, index]))
        cond_real, cond_fake = netD.COND_DNET(features, sentence, pairs).split(batch)
        return _bce(cond_real, 1.0) + _bce(cond_fake, 0.0)

    monkeypatch.setattr(trainer, "discriminator_loss", matched_pairs_only)
    grads: dict[int, list[list[torch.Tensor]]] = {}
    real_apply = trainer.apply_update

    def recording_apply(optimizer, scaler, skip):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads.setdefault(id(optimizer), []).append([p.grad.clone() for p in params])
        real_apply(optimizer, scaler, skip)

    monkeypatch.setattr(trainer, "apply_update", recording_apply)
    cfg = override(tiny_config(), **{"train.damsm_lambda": 0.0})
    batch = synthetic_batch(cfg, 20, batch_size=4, device="cpu").to("cpu")
    gans = []
    for accumulate in (1, 2):
        torch.manual_seed(0)
        gan = TrainingState.build(cfg, vocab_size=20, accumulate=accumulate)
        for net in (gan.netG, *gan.netsD):
            for name, module in list(net.named_modules()):
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
                    setattr(parent, name.rpartition(".")[2], nn.Identity())
        gan.ema = ParameterEMA(gan.netG, cfg.train.ema_decay)  # over what is left
        gans.append(gan)
    monkeypatch.setattr(torch, "randn", lambda *size, **kw: torch.zeros(*size, **kw))
    monkeypatch.setattr(torch, "randn_like", lambda t, **kw: torch.zeros_like(t, **kw))
    results = []
    for gan in gans:
        grads.clear()
        logs = gan.step(batch)
        assert logs["nonfinite"].item() == 0.0
        optimizers = [*gan.optimizersD, gan.optimizerG]
        results.append([grads[id(opt)][0] for opt in optimizers])
    for one_batch, micro in zip(*results):
        for a, b in zip(one_batch, micro):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_compiled_step_equals_an_eager_step(monkeypatch):
    """--compile (torch.compile of G, the Ds and the image encoder, inductor on the CPU): the same
    losses and gradients as eager, within fp32 tolerance, when the compiled random ops draw what
    eager draws (inductor's own generator differs: fallback_random); the state dicts keep their
    names, so checkpoints are interchangeable. (Gradients, not weights: Adam's first step is
    about lr * sign(g), which rounding flips where g is near 0.)"""
    import torch._inductor.config

    import dmgan.training_step as trainer

    grads: list[list[torch.Tensor]] = []
    real_apply = trainer.apply_update

    def recording_apply(optimizer, scaler, skip):
        grads.append(
            [
                p.grad.clone()
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None
            ]
        )
        real_apply(optimizer, scaler, skip)

    monkeypatch.setattr(trainer, "apply_update", recording_apply)
    cfg = tiny_config()
    batch = synthetic_batch(cfg, 20, batch_size=4, device="cpu").to("cpu")
    runs = []
    # The config's own patch (monkeypatch would delete the entry on undo and break later compiles).
    with torch._inductor.config.patch(fallback_random=True):
        for compile in (False, True):
            torch.manual_seed(0)
            gan = TrainingState.build(cfg, vocab_size=20, compile=compile)
            torch.manual_seed(1)
            grads.clear()
            logs = gan.step(batch)
            runs.append((gan, logs, list(grads)))
    (eager, eager_logs, eager_grads), (compiled, compiled_logs, compiled_grads) = runs
    assert eager.state_dict()["netG"].keys() == compiled.state_dict()["netG"].keys()
    for key in eager_logs:
        torch.testing.assert_close(compiled_logs[key], eager_logs[key], rtol=1e-4, atol=1e-5)
    # Normwise per network: biases that batch norm follows have gradients that are 0 but for rounding.
    for per_optimizer_eager, per_optimizer_compiled in zip(eager_grads, compiled_grads, strict=True):
        a, b = (torch.cat([g.flatten() for g in gs]) for gs in (per_optimizer_eager, per_optimizer_compiled))
        assert (a - b).norm() <= 1e-4 * a.norm(), float((a - b).norm() / a.norm())
    vocab = Vocabulary({i: f"w{i}" for i in range(20)}, {f"w{i}": i for i in range(20)})
    captions = Captions.from_pairs([(batch.captions[i], int(batch.cap_lens[i])) for i in range(2)], vocab)
    stages, _ = compiled.pipeline(vocab).generate(captions, seed=0)  # sampling from a compiled G
    assert all(torch.isfinite(s).all() for s in stages)


def test_a_channels_last_step_equals_a_contiguous_step(monkeypatch):
    """--channels-last on: the networks' weights, their activations and the real images NHWC, the
    memory op reading the images where they lie; the same losses and gradients as the contiguous
    step within fp32 tolerance (the convolutions sum in another order), and state dicts that load
    into a contiguous model."""
    import dmgan.training_step as trainer
    from dmgan import ops

    grads: list[torch.Tensor] = []
    real_apply = trainer.apply_update

    def recording_apply(optimizer, scaler, skip):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        real_apply(optimizer, scaler, skip)

    layouts: list[bool] = []
    real_read = ops.memory_read

    def recording_read(img, *args, **kwargs):
        layouts.append(img.is_contiguous(memory_format=torch.channels_last) and not img.is_contiguous())
        return real_read(img, *args, **kwargs)

    monkeypatch.setattr(trainer, "apply_update", recording_apply)
    monkeypatch.setattr(ops, "memory_read", recording_read)
    cfg = tiny_config()
    batch = synthetic_batch(cfg, 20, batch_size=4, device="cpu").to("cpu")
    runs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        gan = TrainingState.build(cfg, vocab_size=20, channels_last=channels_last)
        torch.manual_seed(1)
        grads.clear(), layouts.clear()
        logs = gan.step(batch)
        assert layouts and all(layouts) == channels_last and any(layouts) == channels_last
        runs.append((gan, logs, list(grads)))
    (plain, plain_logs, plain_grads), (nhwc, nhwc_logs, nhwc_grads) = runs
    for net in (nhwc.netG, *nhwc.netsD, nhwc.image_encoder):
        kernel = next(p for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
        assert kernel.is_contiguous(memory_format=torch.channels_last) and not kernel.is_contiguous()
    for key in plain_logs:
        torch.testing.assert_close(nhwc_logs[key], plain_logs[key], rtol=1e-4, atol=1e-5)
    for a, b in zip(plain_grads, nhwc_grads, strict=True):
        assert (a - b).norm() <= 1e-4 * a.norm(), float((a - b).norm() / a.norm())
    plain.load_state_dict(nhwc.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(plain.netG.parameters(), nhwc.netG.parameters()))


def test_channels_last_is_on_for_gpus_and_off_for_cpus_unless_asked():
    from dmgan.runtime import RunOptions

    assert RunOptions().resolved(torch.device("cpu")).channels_last == "off"
    assert RunOptions().resolved(torch.device("cuda")).channels_last == "on"
    assert RunOptions(channels_last="on").resolved(torch.device("cpu")).channels_last == "on"
    with pytest.raises(ValueError, match="channels_last must be one of"):
        RunOptions(channels_last="yes")


def test_evaluation_while_training_is_on_for_the_paper_presets_and_off_for_shapes():
    from dmgan.runtime import RunOptions

    cpu = torch.device("cpu")
    assert RunOptions(preset="bird").resolved(cpu).eval_every == 5000
    assert RunOptions(preset="coco").resolved(cpu).eval_every == 5000
    assert RunOptions(preset="shapes").resolved(cpu).eval_every is None
    assert RunOptions(preset="shapes", eval_every=100).resolved(cpu).eval_every == 100
