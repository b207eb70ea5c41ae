"""One training iteration of DM-GAN: the training state and its step.

    state = TrainingState.build(cfg, vocab_size, device="cuda", amp="bf16")
    logs = state.step(batch)          # losses as device tensors; nothing waits for the device

The step is the reference's (``code/trainer.py`` of github.com/MinfengZhu/DM-GAN): frozen text
encoder → G once → each D steps on (real, fake) → G steps against the updated Ds on the same
fakes (adversarial + λ DAMSM + KL) → weight EMA. With ``accumulate = k`` a batch is split into k
micro-batches whose gradients are summed per update; k = 1 is the plain step. The stages that
loop over it (data, checkpoints, evaluation) are in :mod:`dmgan.trainer`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dmgan import checkpoint
from dmgan.config import Config
from dmgan.counterfactual import CaptionEditor
from dmgan.data import Batch, Vocabulary
from dmgan.ema import ParameterEMA
from dmgan.losses import Counterfactuals, discriminator_loss, generator_loss, kl_loss
from dmgan.models import G_NET, build_discriminators, build_image_encoder, build_text_encoder
from dmgan.pipeline import TextToImage

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def adam(params: Iterable[Tensor], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """The reference's Adam, with the fused kernel: one pass over all parameters instead of a
    Python loop over them (about three times faster per step on a CPU; benchmarks/RESULTS.md)."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


@contextlib.contextmanager
def frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Parameters not requiring grad while a graph is built: its backward then skips their
    weight gradients (half of each conv's backward) yet still flows through them."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def device_generator_state(device: torch.device) -> Tensor:
    """The state of ``device``'s default generator, which CA-Net's noise is drawn from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def restore_device_generator_state(device: torch.device, state: Tensor) -> None:
    """Rewind ``device``'s default generator, so that a forward replays the same draws."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def gradient_sync(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients on the last micro-batch's backward only."""
    if last or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def phase(name: str) -> contextlib.AbstractContextManager:
    """A named range of the step for torch.profiler (``dmgan.<name>``; benchmarks/profile.py
    reports the time of each)."""
    return torch.profiler.record_function(f"dmgan.{name}")


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: Tensor) -> None:
    """The optimizer step on the gradients there are, left undone when ``skip`` (a device bool):
    decided on the device, so the host never waits for a loss. The optimizers are fused Adams,
    which take ``found_inf`` and skip on the device; with fp16 the scaler sets it, from gradients
    made non-finite here when skipping."""
    if scaler.is_enabled():
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch._foreach_mul_(grads, torch.where(skip, float("nan"), 1.0))
        scaler.step(optimizer)
        scaler.update()
        return
    optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]


@dataclass
class MicroBatch:
    """A micro-batch, its text features and what G drew from it: the noise, the state of the
    device's generator before CA-Net drew (to replay the draws) and the images of every stage."""

    batch: Batch
    words: Tensor  # B x N_w x T
    sentence: Tensor  # B x N_w
    mask: Tensor  # B x T, True = padding
    noise: Tensor  # B x z
    draws: Tensor | None  # None when the images below carry G's graph
    fakes: list[Tensor]
    mu: Tensor
    logvar: Tensor
    pair_mask: Tensor | None = None  # captions x images, caption i true of image j (i != j)
    counterfactual: Counterfactuals | None = None


@dataclass
class TrainingState:
    """Everything one iteration touches. ``netG`` / ``netsD`` may be DDP-wrapped."""

    cfg: Config
    netG: nn.Module
    netsD: list[nn.Module]
    text_encoder: nn.Module
    image_encoder: nn.Module
    optimizerG: torch.optim.Optimizer
    optimizersD: list[torch.optim.Optimizer]
    ema: ParameterEMA
    amp: str = "off"
    accumulate: int = 1  # micro-batches a batch is split into, their gradients summed per update
    channels_last: bool = False  # the networks' weights, activations and the real images NHWC
    scalerG: torch.amp.GradScaler = field(default=None)  # type: ignore[assignment]
    scalersD: list[torch.amp.GradScaler] = field(default_factory=list)
    # The shapes grammar, for the train.damsm_consistent_mask / damsm_counterfactuals /
    # d_counterfactuals options; None leaves them off (another dataset).
    editor: CaptionEditor | None = None

    def __post_init__(self) -> None:
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {self.amp!r}")
        device_type = next(unwrap(self.netG).parameters()).device.type
        # fp16 needs loss scaling: one scaler per optimizer, since each network's gradients differ.
        make = lambda: torch.amp.GradScaler(device_type, enabled=self.amp == "fp16")
        self.scalerG = self.scalerG or make()
        self.scalersD = self.scalersD or [make() for _ in self.netsD]

    @classmethod
    def build(
        cls,
        cfg: Config,
        vocab_size: int,
        *,
        device: torch.device | str = "cpu",
        amp: str = "off",
        text_encoder: nn.Module | None = None,
        image_encoder: nn.Module | None = None,
        accumulate: int = 1,
        compile: bool = False,
        channels_last: bool = False,
        memory_backend: str = "auto",
    ) -> TrainingState:
        """Fresh networks (or the given, already trained encoders, which stay frozen), optimizers
        and EMA for ``cfg``; ``compile`` and ``channels_last`` change how they run, not what."""
        netG = G_NET(cfg.model, memory_backend=memory_backend).to(device)
        netsD = [d.to(device) for d in build_discriminators(cfg.model)]
        text_encoder = text_encoder or build_text_encoder(cfg.model, vocab_size)
        image_encoder = image_encoder or build_image_encoder(cfg.model.image_encoder, cfg.model.embedding_dim)
        for encoder in (text_encoder, image_encoder):  # frozen during GAN training
            encoder.to(device).eval().requires_grad_(False)
        if channels_last:  # before the optimizers and the EMA copy the parameters' layout
            for module in (netG, *netsD, image_encoder):
                module.to(memory_format=torch.channels_last)
        if compile:  # in place: the state dicts keep their names; the fused ops are graph nodes
            for module in (netG, *netsD, image_encoder):
                module.compile()
        t = cfg.train
        return cls(
            cfg=cfg,
            netG=netG,
            netsD=netsD,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            optimizerG=adam(netG.parameters(), t.g_lr, t.betas),
            optimizersD=[adam(d.parameters(), t.d_lr, t.betas) for d in netsD],
            ema=ParameterEMA(netG, t.ema_decay),
            amp=amp,
            accumulate=accumulate,
            channels_last=channels_last,
        )

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        dtype = AMP_DTYPES[self.amp]
        return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)

    def encode(self, captions: Tensor, cap_lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Word features B x N_w x T, sentence features B x N_w and the padding mask B x T.
        ``cap_lens`` may stay on the host (the encoder packs with them there)."""
        with torch.no_grad(), self.autocast(captions.device.type):
            words_emb, sent_emb = self.text_encoder(captions, cap_lens)
        return words_emb, sent_emb, (captions == 0)[:, : words_emb.shape[2]]

    def step(self, batch: Batch) -> dict[str, Tensor]:
        """One iteration, queued without waiting for the device. Returns the losses (means over
        the micro-batches) as 0-dim tensors, and ``nonfinite``: 1.0 when a loss was NaN/Inf.
        From the first non-finite loss on, no update of the iteration takes effect (the
        optimizers and the EMA skip it on the device), as if the iteration had stopped there.

        With ``accumulate > 1`` each D, then G, sums the gradients of its loss on every
        micro-batch (each weighted 1 / accumulate) before its one update. The fakes the Ds see
        are then made without gradients, and the G phase makes them again, from the same noise
        and the same CA-Net draws, through the updated Ds, so only one micro-batch's graph is
        alive at a time. What this cannot repeat of one large batch: batch norm normalises each
        micro-batch by its own statistics (and G's running statistics take two updates a
        micro-batch), and the D loss's mismatched-caption pairs and the DAMSM loss's candidate
        captions come from the micro-batch."""
        if self.channels_last:
            images = [image.contiguous(memory_format=torch.channels_last) for image in batch.images]
            batch = dataclasses.replace(batch, images=images)
        parts, device = self.accumulate, batch.captions.device
        keep_graph = parts == 1  # one micro-batch: the first forward's graph serves G's loss
        with phase("G forward"):
            micro = [self._generate(mb, keep_graph) for mb in batch.split(parts)]

        skip = torch.zeros((), dtype=torch.bool, device=device)
        logs: dict[str, list[Tensor]] = collections.defaultdict(list)
        for i, (netD, optD, scaler) in enumerate(zip(self.netsD, self.optimizersD, self.scalersD)):
            optD.zero_grad(set_to_none=True)
            for k, mb in enumerate(micro):
                with gradient_sync(netD, last=k == parts - 1):
                    with phase(f"D{i} loss"), self.autocast(device.type):
                        # Called as before when the option is off: the plain D loss's signature.
                        extra = self._d_counterfactual(mb)
                        errD = discriminator_loss(
                            netD,
                            mb.batch.images[i],
                            mb.fakes[i],
                            mb.sentence,
                            **({} if extra is None else {"counterfactual": extra}),
                        )
                    with phase(f"D{i} backward"):
                        scaler.scale(errD / parts).backward()
                logs[f"d_loss{i}"].append(errD.detach())
                skip = skip | ~torch.isfinite(errD)
            with phase(f"D{i} optimizer"):
                apply_update(optD, scaler, skip)

        # The Ds unwrapped and frozen: the G loss needs gradients through them, not for them.
        discriminators = [unwrap(d) for d in self.netsD]
        self.optimizerG.zero_grad(set_to_none=True)
        for k, mb in enumerate(micro):
            with gradient_sync(self.netG, last=k == parts - 1):
                if mb.draws is not None:
                    with phase("G forward"):
                        self._regenerate(mb)
                with phase("G loss"), self.autocast(device.type), frozen(discriminators):
                    total, terms = self._generator_losses(discriminators, mb)
                with phase("G backward"):
                    self.scalerG.scale(total / parts).backward()
            for key, value in terms.items():
                logs[key].append(value.detach())
            skip = skip | ~torch.isfinite(total)
        with phase("G optimizer"):
            apply_update(self.optimizerG, self.scalerG, skip)
        with phase("EMA"):
            self.ema.update(unwrap(self.netG), skip=skip)
        means = {key: torch.stack(values).mean() for key, values in logs.items()}
        return {**means, "nonfinite": skip.float()}

    def _generate(self, mb: Batch, keep_graph: bool) -> MicroBatch:
        lengths = mb.cap_lens if mb.host_cap_lens is None else mb.host_cap_lens
        words, sentence, mask = self.encode(mb.captions, lengths)
        noise = torch.randn(mb.captions.shape[0], self.cfg.model.z_dim, device=words.device)
        # CA-Net samples from the device's generator: a G phase that runs G again replays it.
        draws = None if keep_graph else device_generator_state(words.device)
        with torch.set_grad_enabled(keep_graph), self.autocast(words.device.type):
            fakes, _, mu, logvar = self.netG(noise, sentence, words, mask)
        pair_mask, counterfactual = self._edited(mb, lengths)
        return MicroBatch(
            mb, words, sentence, mask, noise, draws, fakes, mu, logvar, pair_mask, counterfactual
        )

    def _edited(self, mb: Batch, lengths: Tensor) -> tuple[Tensor | None, Counterfactuals | None]:
        """The caption-consistent pair mask and the counterfactual captions' features, where the
        config asks for them and the shapes grammar is at hand."""
        t, editor = self.cfg.train, self.editor
        if editor is None:
            return None, None
        pair_mask = None
        if t.damsm_consistent_mask and mb.keys is not None:
            pair_mask = editor.consistent_pairs(mb.captions, lengths, mb.keys).to(mb.captions.device)
        counterfactual = None
        if t.damsm_counterfactuals or t.d_counterfactuals:
            # Drawn from the global RNG, whose state checkpoints keep: a resumed run edits alike.
            rng = random.Random(int(torch.randint(2**31, (1,))))
            edited = editor.counterfactuals(mb.captions, lengths, rng)
            device = mb.captions.device
            words, sentence, _ = self.encode(edited.captions.to(device), edited.cap_lens)
            counterfactual = Counterfactuals(
                words, sentence, edited.cap_lens.to(device), edited.valid.to(device)
            )
        return pair_mask, counterfactual

    def _d_counterfactual(self, mb: MicroBatch) -> tuple[Tensor, Tensor] | None:
        if not self.cfg.train.d_counterfactuals or mb.counterfactual is None:
            return None
        return mb.counterfactual.sentence, mb.counterfactual.valid

    def _regenerate(self, mb: MicroBatch) -> None:
        """G again on ``mb``'s noise and CA-Net draws, this time building the graph."""
        assert mb.draws is not None
        restore_device_generator_state(mb.words.device, mb.draws)
        with self.autocast(mb.words.device.type):
            mb.fakes, _, mb.mu, mb.logvar = self.netG(mb.noise, mb.sentence, mb.words, mb.mask)

    def _generator_losses(
        self, discriminators: list[nn.Module], mb: MicroBatch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """G's loss (adversarial against the frozen Ds, DAMSM) plus the weighted KL term: the total
        to minimise, and its terms to log (each D's and DAMSM's, ``g_loss``, ``kl``)."""
        t = self.cfg.train
        errG, terms = generator_loss(
            discriminators,
            self.image_encoder,
            mb.fakes,
            mb.words,
            mb.sentence,
            mb.batch.cap_lens,
            mb.batch.class_ids,
            t.damsm_lambda,
            (t.gamma1, t.gamma2, t.gamma3),
            pair_mask=mb.pair_mask,
            counterfactual=mb.counterfactual if t.damsm_counterfactuals else None,
            stage_consistency=t.stage_consistency,
        )
        kl = kl_loss(mb.mu, mb.logvar)
        return errG + t.kl_weight * kl, {**terms, "g_loss": errG, "kl": kl}

    def pipeline(self, vocab: Vocabulary) -> TextToImage:
        """A copy of the EMA generator, in eval mode, with the frozen encoders: for sample grids
        and evaluation during training (the training networks are left as they are)."""
        netG = copy.deepcopy(unwrap(self.netG))
        netG._compiled_call_impl = None  # sample eagerly (other shapes, eval mode): no recompiles
        netG = self.ema.copy_to(netG).eval()
        return TextToImage(self.cfg, netG, self.text_encoder, self.image_encoder, vocab)  # type: ignore[arg-type]

    def load_weights(self, model: dict[str, Any], source: str | os.PathLike) -> list[str]:
        """Start from the weights of ``model`` (:func:`dmgan.checkpoint.read_model`: a training
        checkpoint, a converted reference model or an export): the generator and its average, and
        the discriminators where it holds them; the optimizers stay fresh. Returns what was
        loaded; a model of other shapes is refused with the keys that do not fit."""
        gan, netG = model["gan"], unwrap(self.netG)
        checkpoint.load_state_checked(netG, gan["netG"], source, "generator of this run's configuration")
        self.ema = ParameterEMA(netG, self.cfg.train.ema_decay)
        if "ema" in gan:
            self.ema.load_state_dict(gan["ema"])
        if "netsD" not in gan:
            return ["G"]
        for i, (netD, saved) in enumerate(zip(self.netsD, gan["netsD"], strict=True)):
            checkpoint.load_state_checked(
                unwrap(netD), saved, source, f"discriminator {i} of this run's configuration"
            )
        return ["G", "the Ds"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "netG": unwrap(self.netG).state_dict(),
            "ema": self.ema.state_dict(),
            "netsD": [unwrap(d).state_dict() for d in self.netsD],
            "optimizerG": self.optimizerG.state_dict(),
            "optimizersD": [o.state_dict() for o in self.optimizersD],
            "scalerG": self.scalerG.state_dict(),
            "scalersD": [s.state_dict() for s in self.scalersD],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.netG).load_state_dict(state["netG"])
        self.ema.load_state_dict(state["ema"])
        for d, s in zip(self.netsD, state["netsD"], strict=True):
            unwrap(d).load_state_dict(s)
        self.optimizerG.load_state_dict(state["optimizerG"])
        for o, s in zip(self.optimizersD, state["optimizersD"], strict=True):
            o.load_state_dict(s)
        self.scalerG.load_state_dict(state["scalerG"])
        for sc, s in zip(self.scalersD, state["scalersD"], strict=True):
            sc.load_state_dict(s)


class IntervalMeans:
    """Per-step logs kept on the device and averaged between log lines: reading them costs one
    transfer a line instead of a wait for the device every step."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps, self.images, self.seconds = 0, 0, 0.0

    def add(self, logs: dict[str, Tensor], images: int, seconds: float) -> None:
        for key, value in logs.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.steps, self.images, self.seconds = self.steps + 1, self.images + images, self.seconds + seconds

    def take(self) -> dict[str, float]:
        """The means since the last take (and images/s), as floats; starts a new interval."""
        keys = list(self.sums)
        values = torch.stack([self.sums[k].float() for k in keys]).div(self.steps).tolist() if keys else []
        means = dict(zip(keys, values), images_per_s=self.images / max(self.seconds, 1e-9))
        self.__init__()
        return means


def synthetic_batch(cfg: Config, vocab_size: int, batch_size: int, device: torch.device | str) -> Batch:
    """Random captions (lengths 1..words_num, padded with 0) and random images: a smoke input."""
    words_num = cfg.text.words_num
    cap_lens = torch.randint(1, words_num + 1, (batch_size,))
    captions = torch.randint(1, vocab_size, (batch_size, words_num))
    captions[torch.arange(words_num)[None, :] >= cap_lens[:, None]] = 0
    images = [torch.rand(batch_size, 3, s, s, device=device) * 2 - 1 for s in cfg.model.image_sizes]
    return Batch(images, captions.to(device), cap_lens.to(device), torch.arange(batch_size, device=device))
