"""Training: DAMSM pretraining, then DM-GAN, then a short evaluation. ``train.py`` calls :func:`main`.

    python train.py                                  # built-in shapes data, end to end on a CPU
    python train.py --preset bird --data-dir data/birds --text-encoder text_encoder200.pth \\
        --image-encoder image_encoder200.pth --inception-weights inception_v3_google-1a9a5a14.pth
    torchrun --nproc_per_node 4 train.py --preset coco --data-dir data/coco ...

One iteration is the reference's (reference notes §3.3): frozen text encoder → G once → each D
steps on (real, fake) → G steps against the updated Ds on the same fakes (adversarial + λ DAMSM +
KL) → weight EMA. Under ``torchrun`` G and each D are DistributedDataParallel modules, every rank
encodes its own captions (the text encoder is frozen and never replicated, so variable caption
lengths cannot break it the way DataParallel broke the reference), and rank 0 alone logs, samples
and writes checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dmgan import checkpoint
from dmgan.config import PRESETS, Config, HelpFormatter, get_preset, override
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
from dmgan.pipeline import Captions, TextToImage
from dmgan.visualize import stage_grid

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def adam(params: Iterable[Tensor], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """The reference's Adam, with the fused kernel: one pass over all parameters instead of a
    Python loop over them (G's and the three Ds' steps 2.7 ms instead of 8.5 ms on two CPU cores)."""
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
    ) -> GAN:
        netG = G_NET(cfg.model).to(device)
        netsD = [d.to(device) for d in build_discriminators(cfg.model)]
        text_encoder = text_encoder or build_text_encoder(cfg.model, vocab_size)
        image_encoder = image_encoder or build_image_encoder(cfg.model.image_encoder, cfg.model.embedding_dim)
        for encoder in (text_encoder, image_encoder):  # frozen during GAN training
            encoder.to(device).eval().requires_grad_(False)
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
        )

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        dtype = AMP_DTYPES[self.amp]
        return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)

    def encode(self, captions: Tensor, cap_lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Word features B x N_w x T, sentence features B x N_w and the padding mask B x T."""
        with torch.no_grad(), self.autocast(captions.device.type):
            words_emb, sent_emb = self.text_encoder(captions, cap_lens)
        return words_emb, sent_emb, (captions == 0)[:, : words_emb.shape[2]]

    def step(self, batch: Batch) -> dict[str, float]:
        """One iteration. Returns the losses; ``nonfinite`` is 1.0 when a loss was NaN/Inf, in
        which case the update it belongs to, and the rest of the iteration, are skipped."""
        t = self.cfg.train
        autocast = functools.partial(self.autocast, batch.captions.device.type)
        words_emb, sent_emb, mask = self.encode(batch.captions, batch.cap_lens)
        noise = torch.randn(batch.captions.shape[0], self.cfg.model.z_dim, device=words_emb.device)
        with autocast():
            fake_imgs, _, mu, logvar = self.netG(noise, sent_emb, words_emb, mask)

        logs: dict[str, float] = {"nonfinite": 0.0}
        for i, (netD, optD, scaler) in enumerate(zip(self.netsD, self.optimizersD, self.scalersD)):
            with autocast():
                errD = discriminator_loss(netD, batch.images[i], fake_imgs[i], sent_emb)
            logs[f"d_loss{i}"] = errD.item()
            if not math.isfinite(logs[f"d_loss{i}"]):
                return {**logs, "nonfinite": 1.0}
            optD.zero_grad(set_to_none=True)
            scaler.scale(errD).backward()
            scaler.step(optD)
            scaler.update()

        # The Ds unwrapped and frozen: the G loss needs gradients through them, not for them.
        discriminators = [unwrap(d) for d in self.netsD]
        with autocast(), frozen(discriminators):
            errG, parts = generator_loss(
                discriminators, self.image_encoder, fake_imgs, words_emb, sent_emb,
                batch.cap_lens, batch.class_ids, t.damsm_lambda, (t.gamma1, t.gamma2, t.gamma3),
            )  # fmt: skip
            kl = kl_loss(mu, logvar)
        total = errG + t.kl_weight * kl
        logs.update({k: v.item() for k, v in parts.items()}, g_loss=errG.item(), kl=kl.item())
        if not math.isfinite(total.item()):
            return {**logs, "nonfinite": 1.0}
        self.optimizerG.zero_grad(set_to_none=True)
        self.scalerG.scale(total).backward()
        self.scalerG.step(self.optimizerG)
        self.scalerG.update()
        self.ema.update(unwrap(self.netG))
        return logs

    def pipeline(self, vocab: Vocabulary) -> TextToImage:
        """A copy of the EMA generator, in eval mode, with the frozen encoders: for sample grids
        and evaluation during training (the training networks are left as they are)."""
        netG = self.ema.copy_to(copy.deepcopy(unwrap(self.netG))).eval()
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


def synthetic_batch(cfg: Config, vocab_size: int, batch_size: int, device: torch.device | str) -> Batch:
    """Random captions (lengths 1..words_num, padded with 0) and random images: a smoke input."""
    words_num = cfg.text.words_num
    cap_lens = torch.randint(1, words_num + 1, (batch_size,))
    captions = torch.randint(1, vocab_size, (batch_size, words_num))
    captions[torch.arange(words_num)[None, :] >= cap_lens[:, None]] = 0
    images = [torch.rand(batch_size, 3, s, s, device=device) * 2 - 1 for s in cfg.model.image_sizes]
    return Batch(images, captions.to(device), cap_lens.to(device), torch.arange(batch_size, device=device))


# --------------------------------------------------------------------------------------------
# Run plumbing: processes, signals, logging, checkpoints


@dataclass
class Runtime:
    """Where this process runs and what it may do."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str | None) -> Runtime:
        """Join the ``torchrun`` process group when launched by it (NCCL on GPUs, Gloo on CPU)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if world_size == 1:
            return cls(torch.device(wanted))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if wanted.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl")
            return cls(torch.device("cuda", local_rank), dist.get_rank(), world_size)
        dist.init_process_group("gloo")
        return cls(torch.device("cpu"), dist.get_rank(), world_size)

    def wrap(self, module: nn.Module, sync_bn: bool = False) -> nn.Module:
        if self.world_size == 1:
            return module
        if sync_bn:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def all_true(self, flag: bool) -> bool:
        """Agree across ranks (e.g. on stopping): True only if every rank says True."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([0 if flag else 1], device=self.device)
        dist.all_reduce(value)
        return int(value.item()) == 0

    def any_true(self, flag: bool) -> bool:
        return not self.all_true(not flag)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def stop(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, writes a checkpoint and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        def handler(signum: int, _frame: Any) -> None:
            self.signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class Interrupted(SystemExit):
    def __init__(self, signum: int, where: Path) -> None:
        print(f"\n{signal.Signals(signum).name}: checkpoint written to {where}; continue with --resume",
              flush=True)  # fmt: skip
        super().__init__(128 + signum)


class MetricsLog:
    """JSON lines (one object per logged step), plus TensorBoard when it is installed."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled, self.writer = path, enabled, None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, stage: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": stage, "step": step, "time": time.time(), **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{stage}/{k}", v, step)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Data


def prepare_dataset(args: argparse.Namespace, cfg: Config) -> Path:
    """The dataset folder: ``--data-dir``, or the built-in shapes data generated on first use."""
    if args.data_dir is not None:
        return Path(args.data_dir)
    if cfg.name != "shapes":
        raise SystemExit(f"--preset {cfg.name} needs --data-dir (the AttnGAN-layout dataset folder)")
    root = shapes_data.default_root() / f"n{args.shapes_train}-{args.shapes_test}-seed{args.shapes_seed}"
    if not shapes_data.is_shapes_dataset(root):
        print(f"drawing the built-in shapes dataset into {root} ...", flush=True)
    return shapes_data.generate(root, args.shapes_train, args.shapes_test, args.shapes_seed,
                                cfg.text.captions_per_image)  # fmt: skip


def make_loader(
    dataset: TextImageDataset, batch_size: int, rt: Runtime, seed: int, workers: int
) -> DataLoader:
    sampler = EpochSampler(len(dataset), batch_size, seed=seed, rank=rt.rank, world_size=rt.world_size)
    # Its own generator: creating an iterator must not draw from the global RNG (resume equality).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=rt.device.type == "cuda", drop_last=True,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def epoch_batches(loader: DataLoader, epoch: int, skip: int = 0) -> Iterator[Batch]:
    loader.sampler.set_epoch(epoch, skip)  # type: ignore[union-attr]
    loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
    yield from loader


# --------------------------------------------------------------------------------------------
# Stage 1: DAMSM pretraining


def pretrain_damsm(args: argparse.Namespace, cfg: Config, root: Path, rt: Runtime, stop: StopRequest,
                   log: MetricsLog) -> tuple[nn.Module, nn.Module]:  # fmt: skip
    """Train the text and image encoders with the DAMSM word + sentence losses (reference §4.4:
    Adam re-created each epoch at lr · 0.98^epoch, RNN gradients clipped to 0.25)."""
    t = cfg.train
    dataset = dataset_for(cfg, root, "train", train=True, seed=args.seed)
    if t.encoder_recolour_backgrounds and not shapes_data.is_shapes_dataset(root):
        raise SystemExit(f"train.encoder_recolour_backgrounds applies to the built-in shapes data only; "
                         f"{root} is not a shapes dataset (no attributes.json)")  # fmt: skip
    recolour = shapes_data.recolour_unnamed_backgrounds
    loader = make_loader(dataset, t.encoder_batch_size, rt, args.seed, args.workers)
    text_encoder = build_text_encoder(cfg.model, len(dataset.vocab)).to(rt.device)
    image_encoder = build_image_encoder(cfg.model.image_encoder, cfg.model.embedding_dim,
                                        args.inception_weights).to(rt.device)  # fmt: skip
    text_ddp, image_ddp = rt.wrap(text_encoder), rt.wrap(image_encoder)
    path = Path(args.out) / "damsm" / "damsm_state.pt"
    start_epoch = 0
    if args.resume and path.is_file():
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
        bar = tqdm(epoch_batches(loader, epoch), total=len(loader), disable=not rt.is_main,
                   desc=f"DAMSM {epoch + 1}/{t.encoder_max_epoch}", dynamic_ncols=True)  # fmt: skip
        for batch in bar:
            if stop:
                break
            batch = batch.to(rt.device)
            images = batch.images[-1]
            if t.encoder_recolour_backgrounds:
                images = recolour(images, batch.captions, dataset.vocab.wordtoix)
            words_emb, sent_emb = text_ddp(batch.captions, batch.cap_lens)
            w_loss, s_loss = damsm_loss(image_ddp, images, words_emb, sent_emb, batch.cap_lens,
                                        batch.class_ids, gammas)  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            (w_loss + s_loss).backward()
            torch.nn.utils.clip_grad_norm_(text_encoder.parameters(), t.rnn_grad_clip)
            optimizer.step()
            step += 1
            bar.set_postfix(w=f"{w_loss.item():.2f}", s=f"{s_loss.item():.2f}")
            if step % args.log_every == 0:
                log.write("damsm", step, {"w_loss": w_loss.item(), "s_loss": s_loss.item(), "lr": lr})
        finished_epoch = epoch + (0 if stop else 1)
        if rt.is_main:  # an interrupted epoch is redone on resume
            checkpoint.save({"text_encoder": text_encoder.state_dict(), "image_encoder": image_encoder.state_dict(),
                             "epoch": finished_epoch, "rng": rng_state()}, path)  # fmt: skip
        if rt.any_true(bool(stop)):
            raise Interrupted(stop.signal or signal.SIGTERM, path)
    if rt.is_main:
        checkpoint.save(text_encoder.state_dict(), Path(args.out) / "damsm" / "text_encoder.pth")
        checkpoint.save(image_encoder.state_dict(), Path(args.out) / "damsm" / "image_encoder.pth")
    rt.barrier()
    return text_encoder.eval(), image_encoder.eval()


def load_encoders(args: argparse.Namespace, cfg: Config, vocab_size: int) -> tuple[nn.Module, nn.Module]:
    """The DAMSM encoders given on the command line, or the ones the DAMSM stage wrote."""
    damsm_dir = Path(args.out) / "damsm"
    text_path = Path(args.text_encoder or damsm_dir / "text_encoder.pth")
    image_path = Path(args.image_encoder or damsm_dir / "image_encoder.pth")
    for what, path in (("text", text_path), ("image", image_path)):
        if not path.is_file():
            raise SystemExit(f"--stage gan needs a DAMSM {what} encoder: {path} does not exist "
                             f"(run --stage damsm first or pass --{what}-encoder)")  # fmt: skip
    text_state = checkpoint.load(text_path)
    check_vocabulary(vocab_size, text_state["encoder.weight"].shape[0], "captions.pickle")
    text_encoder = build_text_encoder(cfg.model, vocab_size)
    text_encoder.load_state_dict(text_state)
    image_encoder = build_image_encoder(
        cfg.model.image_encoder, cfg.model.embedding_dim, args.inception_weights
    )
    image_encoder.load_state_dict(checkpoint.load(image_path))
    return text_encoder, image_encoder


# --------------------------------------------------------------------------------------------
# Stage 2: DM-GAN


def train_gan(args: argparse.Namespace, cfg: Config, root: Path, rt: Runtime, stop: StopRequest,
              log: MetricsLog) -> GAN:  # fmt: skip
    t = cfg.train
    dataset = dataset_for(cfg, root, "train", train=True, seed=args.seed)
    loader = make_loader(dataset, t.batch_size, rt, args.seed, args.workers)
    text_encoder, image_encoder = load_encoders(args, cfg, len(dataset.vocab))
    gan = GAN.build(cfg, len(dataset.vocab), rt.device, args.amp, text_encoder, image_encoder)
    ckpt_path = Path(args.out) / "checkpoints" / "latest.pt"
    step = position = 0  # G updates; batches drawn (a skipped step draws a batch, updates nothing)
    if args.resume and ckpt_path.is_file():
        state = checkpoint.load(ckpt_path)
        gan.load_state_dict(state["gan"])
        set_rng_state(state["rng"])
        step, position = state["step"], state["position"]
        if rt.is_main:
            print(f"resumed from {ckpt_path} at step {step}", flush=True)
    elif args.stage == "eval":
        raise SystemExit(f"--stage eval needs a trained checkpoint: {ckpt_path} does not exist")
    gan.netG = rt.wrap(gan.netG, args.sync_bn)  # DDP broadcasts rank 0's weights to every rank
    gan.netsD = [rt.wrap(d) for d in gan.netsD]
    if rt.rank > 0:  # every rank its own noise (a resumed rank got rank 0's RNG state)
        torch.manual_seed(args.seed + 1000 * step + rt.rank)

    def save_checkpoint() -> None:
        state = gan.state_dict()
        if not checkpoint.all_finite(state):
            raise SystemExit("refusing to write a checkpoint: the weights hold NaN/Inf")
        vocab = [dataset.vocab.ixtoword[i] for i in range(len(dataset.vocab))]
        checkpoint.save({"gan": state, "rng": rng_state(), "step": step, "position": position,
                         "config": dataclasses.asdict(cfg), "vocab": vocab,  # self-contained for sampling
                         "data_dir": str(root.resolve()),
                         "text_encoder": gan.text_encoder.state_dict(),
                         "image_encoder": gan.image_encoder.state_dict()}, ckpt_path)  # fmt: skip

    per_epoch = loader.sampler.batches_per_epoch  # type: ignore[union-attr]
    total_steps = args.max_steps or t.max_epoch * per_epoch  # may end mid-epoch or run past the epochs
    if args.stage == "eval":
        total_steps = step
    test = dataset_for(cfg, root, "test", train=False, seed=args.seed)
    rng = test.item_rng(0)  # fixed captions and noise: grids at different steps are comparable
    samples = Captions.from_pairs([test.caption(i, rng, which=0) for i in range(min(args.num_samples, len(test)))],
                                  test.vocab)  # fmt: skip
    nonfinite_in_row = skipped_steps = skipped_images = 0
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
            logs = gan.step(batch.to(rt.device))
            if rt.any_true(logs["nonfinite"] > 0):  # every rank skips together
                nonfinite_in_row += 1
                skipped_steps += 1
                if nonfinite_in_row >= args.max_nonfinite:
                    raise SystemExit(f"stopping: {nonfinite_in_row} steps in a row had NaN/Inf losses "
                                     f"(last: {logs}); the last good checkpoint is {ckpt_path}")  # fmt: skip
                continue
            nonfinite_in_row = 0
            step += 1
            speed = len(batch.captions) * rt.world_size / (time.perf_counter() - start)
            bar.update()
            bar.set_postfix(D=f"{sum(v for k, v in logs.items() if k.startswith('d_loss')):.2f}",
                            G=f"{logs['g_loss']:.2f}", img_s=f"{speed:.1f}")  # fmt: skip
            at_end = step == total_steps
            if step % args.log_every == 0 or at_end:
                log.write("gan", step, {**logs, "images_per_s": speed, "skipped_steps": skipped_steps,
                                        "skipped_images": skipped_images})  # fmt: skip
            stopping = rt.any_true(bool(stop))
            if rt.is_main and (at_end or stopping or step % args.checkpoint_every == 0):
                save_checkpoint()
            if rt.is_main and (at_end or step % args.sample_every == 0):
                stages, _ = gan.pipeline(dataset.vocab).generate(samples, seed=0)
                stage_grid(stages, samples.texts, Path(args.out) / "samples" / f"step{step:06d}.png")
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


def short_evaluation(gan: GAN, root: Path, cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    """R-precision (and caption accuracy on shapes) over one caption per test image; FID and IS
    take longer and belong to ``python -m dmgan.evaluate``."""
    from dmgan.evaluate import evaluate, evaluation_split

    test = evaluation_split(cfg, root)
    print(f"evaluating on {len(test)} test captions "
          f"(for FID: python -m dmgan.evaluate {args.out}/checkpoints/latest.pt)", flush=True)  # fmt: skip
    return evaluate(gan.pipeline(test.vocab), root, len(test), fid=False, seed=args.seed, progress=False)


# --------------------------------------------------------------------------------------------
# Command line


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train DM-GAN: DAMSM pretraining, then the GAN, then a short evaluation. With no "
        "arguments: the built-in shapes data end to end (13-16 minutes on two CPU cores).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--preset", default="shapes", choices=sorted(PRESETS), help="model and training configuration"
    )
    p.add_argument(
        "--data-dir", default=None, help="AttnGAN-layout dataset folder (default: built-in shapes)"
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    p.add_argument("--stage", default="all", choices=["all", "damsm", "gan", "eval"], help="stages to run")
    p.add_argument("--text-encoder", default=None, help="released DAMSM text encoder (skips pretraining)")
    p.add_argument("--image-encoder", default=None, help="released DAMSM image encoder (skips pretraining)")
    p.add_argument("--inception-weights", default=None, help="torchvision Inception-v3 weights file")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--amp", default=None, choices=sorted(AMP_DTYPES),
                   help="mixed precision (default: bf16 on GPUs that support it, else off)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--epochs", type=int, default=None, help="GAN epochs (default: the preset's)")
    p.add_argument("--damsm-epochs", type=int, default=None, help="DAMSM epochs (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="GAN batch size per process")
    p.add_argument("--max-steps", type=int, default=None,
                   help="GAN steps to train, in place of the epoch count (default: epochs x batches per epoch)")  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=None, help="data-loading processes (default: 0 on CPU, 4 on GPU)"
    )
    p.add_argument("--sync-bn", action="store_true", help="synchronised batch norm in G across processes")
    p.add_argument("--log-every", type=int, default=25, help="steps between metrics-log lines")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--sample-every", type=int, default=500, help="steps between sample grids")
    p.add_argument("--num-samples", type=int, default=8, help="captions in each sample grid")
    p.add_argument("--max-nonfinite", type=int, default=5, help="stop after this many NaN/Inf steps in a row")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--shapes-train", type=int, default=4000, help="built-in shapes: training images")
    p.add_argument("--shapes-test", type=int, default=500, help="built-in shapes: test images")
    p.add_argument("--shapes-seed", type=int, default=0, help="built-in shapes: drawing seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override,
                   metavar="GROUP.FIELD=VALUE", help="any config field, e.g. --set model.r_num=3")  # fmt: skip
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    cfg = get_preset(args.preset)
    changes: dict[str, Any] = dict(args.overrides)
    for flag, key in (("epochs", "train.max_epoch"), ("damsm_epochs", "train.encoder_max_epoch"),
                      ("batch_size", "train.batch_size")):  # fmt: skip
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    for key, value in changes.items():
        if isinstance(value, list):
            changes[key] = tuple(value)
    return override(cfg, **changes) if changes else cfg


def default_amp(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``train.py``: run the stages the arguments ask for; returns the final metrics."""
    return run(argv)[0]


def run(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], GAN | None]:
    """:func:`main`, also returning the trained :class:`GAN` (None when no GAN stage ran)."""
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    args.out = args.out or os.path.join("runs", cfg.name)
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = Runtime.start(args.device)
    args.amp = args.amp or default_amp(rt.device)
    args.workers = args.workers if args.workers is not None else (4 if rt.device.type == "cuda" else 0)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    out = Path(args.out)
    log = MetricsLog(out / "metrics.jsonl", rt.is_main)
    if rt.is_main:
        print(f"dmgan: preset {cfg.name}, stages {cfg.model.image_sizes}, device {rt.device} x {rt.world_size}, "
              f"amp {args.amp}, output {out}", flush=True)  # fmt: skip
    stop = StopRequest()
    results: dict[str, Any] = {}
    gan = None
    try:
        with stop.installed():
            root = prepare_dataset(args, cfg) if rt.is_main else None
            rt.barrier()
            root = root or prepare_dataset(args, cfg)
            started = time.perf_counter()
            if args.stage in ("all", "damsm") and not (args.text_encoder and args.image_encoder):
                pretrain_damsm(args, cfg, root, rt, stop, log)
                results["damsm_seconds"] = round(time.perf_counter() - started, 1)
            if args.stage in ("all", "gan", "eval"):
                args.resume = args.resume or args.stage == "eval"
                gan_start = time.perf_counter()
                gan = train_gan(args, cfg, root, rt, stop, log)
                results["gan_seconds"] = round(time.perf_counter() - gan_start, 1)
        # Outside the handlers: a signal during the evaluation stops it at once (the checkpoint
        # is already written) instead of setting a flag nobody reads any more.
        if gan is not None and args.stage in ("all", "eval") and rt.is_main:
            results.update(short_evaluation(gan, root, cfg, args))
        results["total_seconds"] = round(time.perf_counter() - started, 1)
    finally:
        rt.stop()
    if rt.is_main:
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        print(f"samples: {out / 'samples'}\ncheckpoint: {out / 'checkpoints' / 'latest.pt'}\n"
              f"metrics: {out / 'metrics.json'} and {out / 'metrics.jsonl'}", flush=True)  # fmt: skip
    return results, gan


if __name__ == "__main__":
    main()
