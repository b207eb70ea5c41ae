"""Training: DAMSM pretraining, then DM-GAN, then a short evaluation, each a function of a run.

    from dmgan.run import RunOptions
    from dmgan.trainer import train

    results, gan = train(RunOptions(max_steps=100))    # what python train.py does, from Python

:func:`train` opens the run (:func:`dmgan.run.open_run`) and calls the stages, which take the
:class:`dmgan.run.Run` and the dataset folder: :func:`pretrain_damsm`, :func:`train_gan` and
:func:`short_evaluation`. One iteration (:meth:`GAN.step`) is the reference's (``code/trainer.py``
of github.com/MinfengZhu/DM-GAN): frozen text encoder → G once → each D steps on (real, fake) → G
steps against the updated Ds on the same fakes (adversarial + λ DAMSM + KL) → weight EMA. Under
``torchrun`` G and each D are DistributedDataParallel modules, every rank encodes its own captions
(the text encoder is frozen and never replicated, so variable caption lengths cannot break it the
way DataParallel broke the reference), and rank 0 alone logs, samples and writes checkpoints.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import json
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dmgan import checkpoint
from dmgan.config import Config
from dmgan.data import (
    Batch,
    EpochSampler,
    TextImageDataset,
    Vocabulary,
    check_vocabulary,
    collate,
    dataset_for,
)
from dmgan.data import shapes as shapes_data
from dmgan.ema import ParameterEMA
from dmgan.losses import damsm_loss, discriminator_loss, generator_loss, kl_loss
from dmgan.models import G_NET, build_discriminators, build_image_encoder, build_text_encoder
from dmgan.models.text import check_word_ids
from dmgan.pipeline import Captions, TextToImage
from dmgan.run import (
    AMP_DTYPES,
    Interrupted,
    Run,
    RunOptions,
    Runtime,
    default_amp,
    open_run,
    rng_state,
    set_rng_state,
)
from dmgan.visualize import stage_grid


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


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _sync_gradients(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients on the last micro-batch's backward only."""
    if last or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def phase(name: str) -> contextlib.AbstractContextManager:
    """A named range of the step for torch.profiler (``dmgan.<name>``; benchmarks/profile.py
    reports the time of each)."""
    return torch.profiler.record_function(f"dmgan.{name}")


def update(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: Tensor, skip: Tensor, name: str
) -> None:
    """Backward and optimizer step, left undone when ``skip`` (a device bool) is true."""
    with phase(f"{name} backward"):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    with phase(f"{name} optimizer"):
        apply_update(optimizer, scaler, skip)


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: Tensor) -> None:
    """The optimizer step on the gradients there are, left undone when ``skip``: decided on the
    device, so the host never waits for a loss. The optimizers are fused Adams, which take
    ``found_inf`` and skip on the device; with fp16 the scaler sets it, from gradients made
    non-finite here when skipping."""
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
class GAN:
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
        device: torch.device | str = "cpu",
        amp: str = "off",
        text_encoder: nn.Module | None = None,
        image_encoder: nn.Module | None = None,
        accumulate: int = 1,
        compile: bool = False,
        channels_last: bool = False,
    ) -> GAN:
        netG = G_NET(cfg.model).to(device)
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
        """One iteration, queued without waiting for the device. Returns the losses as 0-dim
        tensors, and ``nonfinite``: 1.0 when a loss was NaN/Inf. From the first non-finite loss
        on, no update of the iteration takes effect (the optimizers and the EMA skip it on the
        device), as if the iteration had stopped there."""
        if self.channels_last:
            images = [image.contiguous(memory_format=torch.channels_last) for image in batch.images]
            batch = dataclasses.replace(batch, images=images)
        if self.accumulate > 1:
            return self._accumulated_step(batch)
        autocast = functools.partial(self.autocast, batch.captions.device.type)
        lengths = batch.cap_lens if batch.host_cap_lens is None else batch.host_cap_lens
        with phase("G forward"):
            words_emb, sent_emb, mask = self.encode(batch.captions, lengths)
            noise = torch.randn(batch.captions.shape[0], self.cfg.model.z_dim, device=words_emb.device)
            with autocast():
                fake_imgs, _, mu, logvar = self.netG(noise, sent_emb, words_emb, mask)

        skip = torch.zeros((), dtype=torch.bool, device=words_emb.device)
        logs: dict[str, Tensor] = {}
        for i, (netD, optD, scaler) in enumerate(zip(self.netsD, self.optimizersD, self.scalersD)):
            with phase(f"D{i} loss"), autocast():
                errD = discriminator_loss(netD, batch.images[i], fake_imgs[i], sent_emb)
            logs[f"d_loss{i}"] = errD.detach()
            skip = skip | ~torch.isfinite(errD)
            update(optD, scaler, errD, skip, f"D{i}")

        # The Ds unwrapped and frozen: the G loss needs gradients through them, not for them.
        discriminators = [unwrap(d) for d in self.netsD]
        with phase("G loss"), autocast(), frozen(discriminators):
            total, terms = self._generator_losses(
                discriminators, batch, fake_imgs, mu, logvar, words_emb, sent_emb
            )
        logs.update({k: v.detach() for k, v in terms.items()})
        skip = skip | ~torch.isfinite(total)
        update(self.optimizerG, self.scalerG, total, skip, "G")
        with phase("EMA"):
            self.ema.update(unwrap(self.netG), skip=skip)
        logs["nonfinite"] = skip.float()
        return logs

    def _generator_losses(
        self,
        discriminators: list[nn.Module],
        batch: Batch,
        fake_imgs: list[Tensor],
        mu: Tensor,
        logvar: Tensor,
        words_emb: Tensor,
        sent_emb: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """G's loss (adversarial against the frozen Ds, DAMSM) plus the weighted KL term: the total
        to minimise, and its terms to log (each D's and DAMSM's, ``g_loss``, ``kl``)."""
        t = self.cfg.train
        errG, terms = generator_loss(
            discriminators,
            self.image_encoder,
            fake_imgs,
            words_emb,
            sent_emb,
            batch.cap_lens,
            batch.class_ids,
            t.damsm_lambda,
            (t.gamma1, t.gamma2, t.gamma3),
        )
        kl = kl_loss(mu, logvar)
        return errG + t.kl_weight * kl, {**terms, "g_loss": errG, "kl": kl}

    def _accumulated_step(self, batch: Batch) -> dict[str, Tensor]:
        """:meth:`step` on ``accumulate`` micro-batches, for a batch that does not fit at once.

        Each D, then G, sums the gradients of its loss on every micro-batch (each weighted
        1 / accumulate) before its one update. The fakes the Ds see are made without gradients;
        the G phase makes them again, from the same noise and the same CA-Net draws, through the
        updated Ds, so only one micro-batch's graph is alive at a time. What this cannot repeat
        of one large batch: batch norm normalises each micro-batch by its own statistics (and G's
        running statistics take two updates a micro-batch), and the D loss's mismatched-caption
        pairs and the DAMSM loss's candidate captions come from the micro-batch."""
        parts = self.accumulate
        device = batch.captions.device
        autocast = functools.partial(self.autocast, device.type)
        micro = []
        for mb in batch.split(parts):
            lengths = mb.cap_lens if mb.host_cap_lens is None else mb.host_cap_lens
            words_emb, sent_emb, mask = self.encode(mb.captions, lengths)
            noise = torch.randn(mb.captions.shape[0], self.cfg.model.z_dim, device=device)
            draws = _rng_state(device)  # CA-Net samples from the global RNG: the G phase replays it
            with torch.no_grad(), autocast():
                fakes = self.netG(noise, sent_emb, words_emb, mask)[0]
            micro.append((mb, words_emb, sent_emb, mask, noise, draws, fakes))

        skip = torch.zeros((), dtype=torch.bool, device=device)
        logs: dict[str, list[Tensor]] = collections.defaultdict(list)
        for i, (netD, optD, scaler) in enumerate(zip(self.netsD, self.optimizersD, self.scalersD)):
            optD.zero_grad(set_to_none=True)
            for k, (mb, _, sent_emb, _, _, _, fakes) in enumerate(micro):
                with _sync_gradients(netD, last=k == parts - 1), autocast():
                    errD = discriminator_loss(netD, mb.images[i], fakes[i], sent_emb)
                    scaler.scale(errD / parts).backward()
                logs[f"d_loss{i}"].append(errD.detach())
                skip = skip | ~torch.isfinite(errD)
            apply_update(optD, scaler, skip)

        discriminators = [unwrap(d) for d in self.netsD]
        self.optimizerG.zero_grad(set_to_none=True)
        for k, (mb, words_emb, sent_emb, mask, noise, draws, _) in enumerate(micro):
            _set_rng_state(device, draws)
            with _sync_gradients(self.netG, last=k == parts - 1):
                with autocast(), frozen(discriminators):
                    fake_imgs, _, mu, logvar = self.netG(noise, sent_emb, words_emb, mask)
                    total, terms = self._generator_losses(
                        discriminators, mb, fake_imgs, mu, logvar, words_emb, sent_emb
                    )
                self.scalerG.scale(total / parts).backward()
            for key, value in terms.items():
                logs[key].append(value.detach())
            skip = skip | ~torch.isfinite(total)
        apply_update(self.optimizerG, self.scalerG, skip)
        self.ema.update(unwrap(self.netG), skip=skip)
        means = {key: torch.stack(values).mean() for key, values in logs.items()}
        return {**means, "nonfinite": skip.float()}

    def pipeline(self, vocab: Vocabulary) -> TextToImage:
        """A copy of the EMA generator, in eval mode, with the frozen encoders: for sample grids
        and evaluation during training (the training networks are left as they are)."""
        netG = copy.deepcopy(unwrap(self.netG))
        netG._compiled_call_impl = None  # sample eagerly (other shapes, eval mode): no recompiles
        netG = self.ema.copy_to(netG).eval()
        return TextToImage(self.cfg, netG, self.text_encoder, self.image_encoder, vocab)  # type: ignore[arg-type]

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


# --------------------------------------------------------------------------------------------
# Data


def prepare_dataset(opts: RunOptions, cfg: Config) -> Path:
    """The dataset folder: ``data_dir``, or the built-in shapes data generated on first use."""
    if opts.data_dir is not None:
        return Path(opts.data_dir)
    if cfg.name != "shapes":
        raise SystemExit(f"--preset {cfg.name} needs --data-dir (the AttnGAN-layout dataset folder)")
    root = shapes_data.default_root() / f"n{opts.shapes_train}-{opts.shapes_test}-seed{opts.shapes_seed}"
    if not shapes_data.is_shapes_dataset(root):
        print(f"drawing the built-in shapes dataset into {root} ...", flush=True)
    return shapes_data.generate(
        root, opts.shapes_train, opts.shapes_test, opts.shapes_seed, cfg.text.captions_per_image
    )


def make_loader(
    dataset: TextImageDataset, batch_size: int, rt: Runtime, seed: int, workers: int
) -> DataLoader:
    sampler = EpochSampler(len(dataset), batch_size, seed=seed, rank=rt.rank, world_size=rt.world_size)
    # Its own generator: creating an iterator must not draw from the global RNG (resume equality).
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=rt.device.type == "cuda",
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def epoch_batches(loader: DataLoader, epoch: int, skip: int = 0) -> Iterator[Batch]:
    loader.sampler.set_epoch(epoch, skip)  # type: ignore[union-attr]
    loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
    yield from loader


# --------------------------------------------------------------------------------------------
# Stage 1: DAMSM pretraining


def pretrain_damsm(run: Run, root: Path) -> tuple[nn.Module, nn.Module]:
    """Train the text and image encoders with the DAMSM word + sentence losses (as the reference's
    ``code/pretrain_DAMSM.py``: Adam re-created each epoch at lr · 0.98^epoch, RNN gradients
    clipped to 0.25). Writes ``damsm/text_encoder.pth`` and ``damsm/image_encoder.pth``."""
    opts, cfg, rt, stop, log = run.options, run.config, run.runtime, run.stop, run.log
    t = cfg.train
    dataset = dataset_for(cfg, root, "train", train=True, seed=opts.seed)
    if t.encoder_recolour_backgrounds and not shapes_data.is_shapes_dataset(root):
        raise SystemExit(
            f"train.encoder_recolour_backgrounds applies to the built-in shapes data only; "
            f"{root} is not a shapes dataset (no attributes.json)"
        )
    recolour = shapes_data.recolour_unnamed_backgrounds
    loader = make_loader(dataset, t.encoder_batch_size, rt, opts.seed, opts.workers)
    text_encoder = build_text_encoder(cfg.model, len(dataset.vocab)).to(rt.device)
    image_encoder = build_image_encoder(
        cfg.model.image_encoder, cfg.model.embedding_dim, opts.inception_weights
    ).to(rt.device)
    text_ddp, image_ddp = rt.wrap(text_encoder), rt.wrap(image_encoder)
    path = run.out / "damsm" / "damsm_state.pt"
    start_epoch = 0
    if opts.resume and path.is_file():
        state = checkpoint.load(path)
        text_encoder.load_state_dict(state["text_encoder"])
        image_encoder.load_state_dict(state["image_encoder"])
        start_epoch = state["epoch"]
        set_rng_state(state["rng"])
    gammas = (t.gamma1, t.gamma2, t.gamma3)
    params = [p for m in (text_encoder, image_encoder) for p in m.parameters() if p.requires_grad]
    step = start_epoch * loader.sampler.batches_per_epoch  # type: ignore[union-attr]
    for epoch in range(start_epoch, t.encoder_max_epoch):
        lr = max(t.encoder_lr * 0.98**epoch, t.encoder_lr / 10)
        optimizer = adam(params, lr, t.betas)
        text_ddp.train(), image_ddp.train()
        bar = tqdm(
            epoch_batches(loader, epoch),
            total=len(loader),
            disable=not rt.is_main,
            desc=f"DAMSM {epoch + 1}/{t.encoder_max_epoch}",
            dynamic_ncols=True,
        )
        for batch in bar:
            if stop:
                break
            batch = batch.to(rt.device)
            images = batch.images[-1]
            if t.encoder_recolour_backgrounds:
                images = recolour(images, batch.captions, dataset.vocab.wordtoix)
            words_emb, sent_emb = text_ddp(batch.captions, batch.cap_lens)
            w_loss, s_loss = damsm_loss(
                image_ddp, images, words_emb, sent_emb, batch.cap_lens, batch.class_ids, gammas
            )
            optimizer.zero_grad(set_to_none=True)
            (w_loss + s_loss).backward()
            torch.nn.utils.clip_grad_norm_(text_encoder.parameters(), t.rnn_grad_clip)
            optimizer.step()
            step += 1
            bar.set_postfix(w=f"{w_loss.item():.2f}", s=f"{s_loss.item():.2f}")
            if step % opts.log_every == 0:
                log.write("damsm", step, {"w_loss": w_loss.item(), "s_loss": s_loss.item(), "lr": lr})
        finished_epoch = epoch + (0 if stop else 1)
        if rt.is_main:  # an interrupted epoch is redone on resume
            checkpoint.save(
                {
                    "text_encoder": text_encoder.state_dict(),
                    "image_encoder": image_encoder.state_dict(),
                    "epoch": finished_epoch,
                    "rng": rng_state(),
                },
                path,
            )
        if rt.any_true(bool(stop)):
            raise Interrupted(stop.signal or signal.SIGTERM, path)
    if rt.is_main:
        checkpoint.save(text_encoder.state_dict(), run.out / "damsm" / "text_encoder.pth")
        checkpoint.save(image_encoder.state_dict(), run.out / "damsm" / "image_encoder.pth")
    rt.barrier()
    return text_encoder.eval(), image_encoder.eval()


def load_encoders(run: Run, vocab_size: int) -> tuple[nn.Module, nn.Module]:
    """The DAMSM encoders the options name, or the ones the DAMSM stage wrote."""
    opts, cfg = run.options, run.config
    damsm_dir = run.out / "damsm"
    text_path = Path(opts.text_encoder or damsm_dir / "text_encoder.pth")
    image_path = Path(opts.image_encoder or damsm_dir / "image_encoder.pth")
    for what, path in (("text", text_path), ("image", image_path)):
        if not path.is_file():
            raise SystemExit(
                f"--stage gan needs a DAMSM {what} encoder: {path} does not exist "
                f"(run --stage damsm first or pass --{what}-encoder)"
            )
    text_state = checkpoint.load(text_path)
    check_vocabulary(vocab_size, text_state["encoder.weight"].shape[0], "captions.pickle")
    text_encoder = build_text_encoder(cfg.model, vocab_size)
    text_encoder.load_state_dict(text_state)
    image_encoder = build_image_encoder(
        cfg.model.image_encoder, cfg.model.embedding_dim, opts.inception_weights
    )
    image_encoder.load_state_dict(checkpoint.load(image_path))
    return text_encoder, image_encoder


# --------------------------------------------------------------------------------------------
# Stage 2: DM-GAN


def train_gan(run: Run, root: Path) -> GAN:
    """Train DM-GAN (or, for ``stage="eval"``, load the trained checkpoint) and return it, with
    the checkpoint ``checkpoints/latest.pt`` and sample grids written on the way."""
    opts, cfg, rt, stop, log = run.options, run.config, run.runtime, run.stop, run.log
    t = cfg.train
    dataset = dataset_for(cfg, root, "train", train=True, seed=opts.seed)
    loader = make_loader(dataset, t.batch_size, rt, opts.seed, opts.workers)
    text_encoder, image_encoder = load_encoders(run, len(dataset.vocab))
    if t.batch_size % opts.accumulate:
        raise SystemExit(f"--accumulate {opts.accumulate} must divide the batch size {t.batch_size}")
    gan = GAN.build(
        cfg,
        len(dataset.vocab),
        rt.device,
        opts.amp,
        text_encoder,
        image_encoder,
        opts.accumulate,
        opts.compile,
        opts.channels_last == "on",
    )
    ckpt_path = run.out / "checkpoints" / "latest.pt"
    step = position = 0  # G updates; batches drawn (a skipped step draws a batch, updates nothing)
    best: dict[str, Any] = {"fid": None, "step": None}  # of the evaluations while training
    if opts.resume and ckpt_path.is_file():
        state = checkpoint.load(ckpt_path)
        gan.load_state_dict(state["gan"])
        set_rng_state(state["rng"])
        step, position = state["step"], state["position"]
        best = state.get("best", best)
        if rt.is_main:
            print(f"resumed from {ckpt_path} at step {step}", flush=True)
    elif opts.stage == "eval":
        raise SystemExit(f"--stage eval needs a trained checkpoint: {ckpt_path} does not exist")
    gan.netG = rt.wrap(gan.netG, opts.sync_bn)  # DDP broadcasts rank 0's weights to every rank
    gan.netsD = [rt.wrap(d) for d in gan.netsD]
    if rt.rank > 0:  # every rank its own noise (a resumed rank got rank 0's RNG state)
        torch.manual_seed(opts.seed + 1000 * step + rt.rank)

    def save_checkpoint(path: Path = ckpt_path) -> None:
        state = gan.state_dict()
        if not checkpoint.all_finite(state):
            raise SystemExit("refusing to write a checkpoint: the weights hold NaN/Inf")
        vocab = [dataset.vocab.ixtoword[i] for i in range(len(dataset.vocab))]
        checkpoint.save(
            {
                "gan": state,
                "rng": rng_state(),
                "step": step,
                "position": position,
                "config": dataclasses.asdict(cfg),
                "vocab": vocab,  # self-contained for sampling
                "data_dir": str(root.resolve()),
                "text_encoder": gan.text_encoder.state_dict(),
                "image_encoder": gan.image_encoder.state_dict(),
                "best": best,
            },
            path,
        )

    per_epoch = loader.sampler.batches_per_epoch  # type: ignore[union-attr]
    total_steps = opts.max_steps or t.max_epoch * per_epoch  # may end mid-epoch or run past the epochs
    if opts.stage == "eval":
        total_steps = step
    test = dataset_for(cfg, root, "test", train=False, seed=opts.seed)
    rng = test.item_rng(0)  # fixed captions and noise: grids at different steps are comparable
    samples = Captions.from_pairs(
        [test.caption(i, rng, which=0) for i in range(min(opts.num_samples, len(test)))], test.vocab
    )
    nonfinite_in_row = skipped_steps = skipped_images = 0
    interval = IntervalMeans()
    bar = tqdm(total=total_steps, initial=step, disable=not rt.is_main, desc="DM-GAN", dynamic_ncols=True)
    while step < total_steps:
        epoch, skip = divmod(position, per_epoch)
        step_at_epoch_start = step
        for batch in epoch_batches(loader, epoch, skip):
            position += 1
            skipped_images += batch.skipped
            if rt.any_true(len(batch.captions) < 2):  # (almost) nothing readable in this batch
                continue
            start = time.perf_counter()
            check_word_ids(batch.captions, len(dataset.vocab))  # on the host copy: no wait
            logs = gan.step(batch.to(rt.device))
            # The step's one wait for the device: did a loss go non-finite (on any rank)?
            if rt.any_true(logs["nonfinite"]):  # every rank skips together
                nonfinite_in_row += 1
                skipped_steps += 1
                if nonfinite_in_row >= opts.max_nonfinite:
                    last = {k: round(float(v), 4) for k, v in logs.items()}
                    raise SystemExit(
                        f"stopping: {nonfinite_in_row} steps in a row had NaN/Inf losses "
                        f"(last: {last}); the last good checkpoint is {ckpt_path}"
                    )
                continue
            nonfinite_in_row = 0
            step += 1
            interval.add(logs, len(batch.captions) * rt.world_size, time.perf_counter() - start)
            bar.update()
            at_end = step == total_steps
            if step % opts.log_every == 0 or at_end:
                means = interval.take()  # the losses' means since the last line, in one transfer
                d_loss = sum(v for k, v in means.items() if k.startswith("d_loss"))
                bar.set_postfix(
                    D=f"{d_loss:.2f}", G=f"{means['g_loss']:.2f}", img_s=f"{means['images_per_s']:.1f}"
                )
                extra = {"skipped_steps": skipped_steps, "skipped_images": skipped_images}
                log.write("gan", step, {**means, **extra})
            stopping = rt.any_true(bool(stop))
            if rt.is_main and opts.eval_every and step % opts.eval_every == 0:
                scores = evaluate_while_training(run, root, gan, dataset.vocab)
                log.write("eval", step, scores)
                if best["fid"] is None or scores["fid"] < best["fid"]:
                    best = {"fid": scores["fid"], "step": step}
                    save_checkpoint(ckpt_path.with_name("best.pt"))
            if rt.is_main and (at_end or stopping or step % opts.checkpoint_every == 0):
                save_checkpoint()
            if rt.is_main and (at_end or step % opts.sample_every == 0):
                stages, _ = gan.pipeline(dataset.vocab).generate(samples, seed=0)
                stage_grid(stages, samples.texts, run.out / "samples" / f"step{step:06d}.png")
            if stopping:
                raise Interrupted(stop.signal or signal.SIGTERM, ckpt_path)
            if at_end:
                break
        if step == step_at_epoch_start and step < total_steps:
            raise SystemExit(f"a whole epoch gave no training step ({skipped_images} unreadable images)")
    bar.close()
    if rt.is_main and (skipped_images or skipped_steps):
        print(f"skipped {skipped_images} unreadable images and {skipped_steps} steps with NaN/Inf losses")
    gan.netG, gan.netsD = unwrap(gan.netG), [unwrap(d) for d in gan.netsD]
    return gan


# --------------------------------------------------------------------------------------------
# Samples and the short evaluation


def short_evaluation(run: Run, root: Path, gan: GAN) -> dict[str, Any]:
    """R-precision (and caption accuracy on shapes) over one caption per test image; FID and IS
    take longer and belong to ``python -m dmgan.evaluate``."""
    from dmgan.evaluate import evaluate, evaluation_split

    opts, cfg = run.options, run.config
    test = evaluation_split(cfg, root)
    print(
        f"evaluating on {len(test)} test captions "
        f"(for FID: python -m dmgan.evaluate {opts.out}/checkpoints/latest.pt)",
        flush=True,
    )
    return evaluate(
        gan.pipeline(test.vocab), root, len(test), image_metrics_on=False, seed=opts.seed, progress=False
    )


def evaluate_while_training(run: Run, root: Path, gan: GAN, vocab: Vocabulary) -> dict[str, float]:
    """FID (and KID, precision, recall) on a fixed sample of ``eval_images`` images (the same
    captions and noise every time, the clean protocol), R-precision, and on the shapes data the
    caption accuracy of each attribute: the numbers logged as stage "eval"."""
    from dmgan.evaluate import evaluate

    results = evaluate(
        gan.pipeline(vocab), root, run.options.eval_images, seed=run.options.seed, progress=False
    )
    scores = {"fid": results["fid"], "kid": results["kid"]["mean"]}
    scores |= {k: results[k] for k in ("precision", "recall", "density", "coverage")}
    if "r_precision" in results:
        scores["r_precision"] = results["r_precision"]["mean"]
    for name, value in results.get("caption_accuracy", {}).items():
        scores[f"caption_accuracy_{name}"] = value["accuracy"]
    return scores


# --------------------------------------------------------------------------------------------
# A whole run


def train(options: RunOptions) -> tuple[dict[str, Any], GAN | None]:
    """Run the stages ``options.stage`` asks for; returns the final metrics and the trained GAN
    (None when no GAN stage ran). Writes ``metrics.json`` beside ``config.json``."""
    results: dict[str, Any] = {}
    gan = None
    with open_run(options) as run:
        rt, opts, cfg = run.runtime, run.options, run.config
        if rt.is_main:
            print(
                f"dmgan: preset {cfg.name}, stages {cfg.model.image_sizes}, device {rt.device} x "
                f"{rt.world_size}, amp {opts.amp} ({'asked for' if options.amp else default_amp(rt.device)[1]}), "
                f"channels-last {opts.channels_last}, output {run.out}",
                flush=True,
            )
        with run.stop.installed():
            root = prepare_dataset(opts, cfg) if rt.is_main else None
            rt.barrier()
            root = root or prepare_dataset(opts, cfg)
            started = time.perf_counter()
            if opts.stage in ("all", "damsm") and not (opts.text_encoder and opts.image_encoder):
                pretrain_damsm(run, root)
                results["damsm_seconds"] = round(time.perf_counter() - started, 1)
            if opts.stage in ("all", "gan", "eval"):
                gan_start = time.perf_counter()
                gan = train_gan(run, root)
                results["gan_seconds"] = round(time.perf_counter() - gan_start, 1)
        # Outside the handlers: a signal during the evaluation stops it at once (the checkpoint
        # is already written) instead of setting a flag nobody reads any more.
        if gan is not None and opts.stage in ("all", "eval") and rt.is_main:
            results.update(short_evaluation(run, root, gan))
        results["total_seconds"] = round(time.perf_counter() - started, 1)
        if rt.is_main:
            (run.out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps(results, indent=2))
            print(
                f"samples: {run.out / 'samples'}\ncheckpoint: {run.out / 'checkpoints' / 'latest.pt'}\n"
                f"metrics: {run.out / 'metrics.json'} and {run.out / 'metrics.jsonl'}",
                flush=True,
            )
    return results, gan
