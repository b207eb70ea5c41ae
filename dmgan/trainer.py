"""The training stages: DAMSM pretraining, then DM-GAN, then a short evaluation.

    from dmgan.runtime import RunOptions
    from dmgan.trainer import train

    results, state = train(RunOptions(max_steps=100))    # what python train.py does, from Python

:func:`train` starts the run (:func:`dmgan.runtime.start_run`) and calls the stages, which take the
:class:`dmgan.runtime.TrainingRun` and the dataset folder: :func:`pretrain_damsm`,
:func:`train_gan` and :func:`short_evaluation`. One iteration is
:meth:`dmgan.training_step.TrainingState.step`. Under ``torchrun`` G and each D are
DistributedDataParallel modules, every rank encodes its own captions (the text encoder is frozen
and never replicated, so variable caption lengths cannot break it the way DataParallel broke the
reference), and rank 0 alone logs, samples and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmgan import checkpoint
from dmgan.counterfactual import CaptionEditor, CounterfactualBatch
from dmgan.data import Vocabulary, check_vocabulary, dataset_for, epoch_batches, make_loader
from dmgan.data import shapes as shapes_data
from dmgan.losses import Counterfactuals, damsm_loss
from dmgan.models import build_image_encoder, build_text_encoder
from dmgan.models.text import check_word_ids
from dmgan.pipeline import Captions
from dmgan.progress import progress
from dmgan.runtime import (
    Interrupted,
    RunOptions,
    TrainingRun,
    all_rng_states,
    default_amp,
    restore_all_rng_states,
    start_run,
)
from dmgan.training_step import IntervalMeans, TrainingState, adam, unwrap
from dmgan.visualize import render_attention, stage_grid

# --------------------------------------------------------------------------------------------
# Stage 1: DAMSM pretraining


def pretrain_damsm(run: TrainingRun, root: Path) -> tuple[nn.Module, nn.Module]:
    """Train the text and image encoders with the DAMSM word + sentence losses (as the reference's
    ``code/pretrain_DAMSM.py``: Adam re-created each epoch at lr · 0.98^epoch, RNN gradients
    clipped to 0.25). Writes ``damsm/text_encoder.pth`` and ``damsm/image_encoder.pth``; an
    interrupted epoch is redone on resume (``damsm/damsm_state.pt``)."""
    opts, cfg, rt, stop = run.options, run.config, run.runtime, run.stop
    t = cfg.train
    if t.encoder_recolour_backgrounds and not shapes_data.is_shapes_dataset(root):
        raise SystemExit(
            f"train.encoder_recolour_backgrounds applies to the built-in shapes data only; "
            f"{root} is not a shapes dataset (no attributes.json)"
        )
    dataset = dataset_for(cfg, root, "train", train=True, seed=opts.seed)
    loader = make_loader(
        dataset,
        t.encoder_batch_size,
        seed=opts.seed,
        workers=opts.workers,
        rank=rt.rank,
        world_size=rt.world_size,
    )
    text_encoder = build_text_encoder(cfg.model, len(dataset.vocab)).to(rt.device)
    image_encoder = build_image_encoder(
        cfg.model.image_encoder, cfg.model.embedding_dim, opts.inception_weights
    ).to(rt.device)
    path = run.out / "damsm" / "damsm_state.pt"
    start_epoch = 0
    if opts.resume and path.is_file():
        state = checkpoint.load(path)
        text_encoder.load_state_dict(state["text_encoder"])
        image_encoder.load_state_dict(state["image_encoder"])
        start_epoch = state["epoch"]
        restore_all_rng_states(state["rng"])
    text_ddp, image_ddp = rt.wrap(text_encoder), rt.wrap(image_encoder)
    editor = CaptionEditor.for_dataset(root, dataset.vocab, cfg)
    per_epoch = loader.sampler.batches_per_epoch  # type: ignore[union-attr]
    step = start_epoch * per_epoch
    bar = progress(total=t.encoder_max_epoch * per_epoch, initial=step, desc="DAMSM", enabled=rt.is_main)
    for epoch in range(start_epoch, t.encoder_max_epoch):
        step = damsm_epoch(run, loader, epoch, step, text_ddp, image_ddp, dataset.vocab, bar, editor)
        if rt.is_main:
            state = {
                "text_encoder": text_encoder.state_dict(),
                "image_encoder": image_encoder.state_dict(),
                "epoch": epoch + (0 if stop else 1),
                "rng": all_rng_states(),
            }
            checkpoint.save(state, path)
        if rt.any_true(bool(stop)):
            bar.close()
            raise Interrupted(stop.signal or signal.SIGTERM, path)
    bar.close()
    if rt.is_main:
        checkpoint.save(text_encoder.state_dict(), run.out / "damsm" / "text_encoder.pth")
        checkpoint.save(image_encoder.state_dict(), run.out / "damsm" / "image_encoder.pth")
    rt.barrier()
    return text_encoder.eval(), image_encoder.eval()


def damsm_epoch(
    run: TrainingRun,
    loader: torch.utils.data.DataLoader,
    epoch: int,
    step: int,
    text_ddp: nn.Module,
    image_ddp: nn.Module,
    vocab: Vocabulary,
    bar: Any,
    editor: CaptionEditor | None = None,
) -> int:
    """One epoch of DAMSM pretraining (until a stop is asked for) on the encoders (DDP-wrapped
    under torchrun), advancing the stage's progress ``bar``; returns the step count after it.
    ``editor`` (the shapes grammar) makes the caption-consistent mask and the counterfactual
    negatives the config asks for."""
    opts, t, rt = run.options, run.config.train, run.runtime
    params = [p for m in (text_ddp, image_ddp) for p in m.parameters() if p.requires_grad]
    lr = max(t.encoder_lr * 0.98**epoch, t.encoder_lr / 10)
    optimizer = adam(params, lr, t.betas)
    text_ddp.train(), image_ddp.train()
    for batch in epoch_batches(loader, epoch):
        if run.stop:
            break
        batch = batch.to(rt.device)
        images = batch.images[-1]
        if t.encoder_recolour_backgrounds:
            images = shapes_data.recolour_unnamed_backgrounds(images, batch.captions, vocab.wordtoix)
        lengths = batch.cap_lens if batch.host_cap_lens is None else batch.host_cap_lens  # no wait
        pair_mask, edited = None, None
        if editor is not None and t.damsm_consistent_mask and batch.keys is not None:
            pair_mask = editor.consistent_pairs(batch.captions, lengths, batch.keys).to(rt.device)
        if editor is not None and t.damsm_counterfactuals:
            # Drawn from the global RNG, whose state the DAMSM checkpoint keeps.
            edited = editor.counterfactuals(
                batch.captions, lengths, random.Random(int(torch.randint(2**31, (1,))))
            )
        if edited is None:
            words_emb, sent_emb = text_ddp(batch.captions, lengths)
            counterfactual = None
        else:  # captions and counterfactuals in one forward (a DDP module takes one per backward)
            words_emb, sent_emb, counterfactual = encode_with_counterfactuals(
                text_ddp, batch.captions, lengths, edited, rt.device
            )
        w_loss, s_loss = damsm_loss(
            image_ddp,
            images,
            words_emb,
            sent_emb,
            batch.cap_lens,
            batch.class_ids,
            (t.gamma1, t.gamma2, t.gamma3),
            pair_mask=pair_mask,
            counterfactual=counterfactual,
        )
        optimizer.zero_grad(set_to_none=True)
        (w_loss + s_loss).backward()
        torch.nn.utils.clip_grad_norm_(text_ddp.parameters(), t.rnn_grad_clip)
        optimizer.step()
        step += 1
        bar.update()
        bar.set_postfix(
            epoch=f"{epoch + 1}/{t.encoder_max_epoch}", w=f"{w_loss.item():.2f}", s=f"{s_loss.item():.2f}"
        )
        if step % opts.log_every == 0:
            run.tracker.scalars("damsm", step, {"w_loss": w_loss.item(), "s_loss": s_loss.item(), "lr": lr})
    return step


def encode_with_counterfactuals(
    text_encoder: nn.Module,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    edited: CounterfactualBatch,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, Counterfactuals]:
    """Word and sentence features of the captions (B x D x T, B x D) and of their
    counterfactuals, from one forward of ``text_encoder`` over both."""
    batch, width = len(captions), max(captions.shape[1], edited.captions.shape[1])
    pad = lambda c: torch.nn.functional.pad(c, (0, width - c.shape[1]))
    joined = torch.cat([pad(captions), pad(edited.captions.to(captions.device))])
    words, sentences = text_encoder(joined, torch.cat([lengths.cpu(), edited.cap_lens]))
    counterfactual = Counterfactuals(
        words[batch:], sentences[batch:], edited.cap_lens.to(device), edited.valid.to(device)
    )
    return words[:batch], sentences[:batch], counterfactual


def load_encoders(run: TrainingRun, vocab_size: int) -> tuple[nn.Module, nn.Module]:
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


@dataclass
class LoopState:
    """Where the GAN loop is. The first three are kept in checkpoints; the rest count this
    process's trouble."""

    step: int = 0  # G updates
    position: int = 0  # batches drawn (a skipped step draws a batch and updates nothing)
    best: dict[str, Any] = field(default_factory=lambda: {"fid": None, "step": None})  # evaluations' best FID
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    skipped_images: int = 0


def save_training_checkpoint(
    path: Path,
    state: TrainingState,
    loop: LoopState,
    vocab: Vocabulary,
    data_dir: Path,
    environment: dict[str, Any] | None = None,
) -> Path:
    """The training state, the loop's position and RNG states, what sampling needs (the config,
    the encoders, the vocabulary: a model, see :mod:`dmgan.checkpoint`) and where it was made
    (``environment``: versions, commit, devices), atomically."""
    weights = state.state_dict()
    if not checkpoint.all_finite(weights):
        raise SystemExit("refusing to write a checkpoint: the weights hold NaN/Inf")
    return checkpoint.save(
        {
            "gan": weights,
            "rng": all_rng_states(),
            "step": loop.step,
            "position": loop.position,
            "best": loop.best,
            "config": dataclasses.asdict(state.cfg),
            "vocab": vocab.as_list(),
            "data_dir": str(data_dir.resolve()),
            "text_encoder": state.text_encoder.state_dict(),
            "image_encoder": state.image_encoder.state_dict(),
            "environment": environment or {},
        },
        path,
    )


def keep_snapshot(snapshot: Path, keep: int | None) -> None:
    """A new ``step-NNNNNN.pt`` becomes ``latest.pt`` (a hard link swapped in atomically: the same
    bytes, written once); then the oldest snapshots beyond ``keep`` go, now that what replaces
    them is safe on disk."""
    checkpoint.link_atomically(snapshot, snapshot.with_name("latest.pt"))
    if keep is not None:
        for old in sorted(snapshot.parent.glob("step-*.pt"))[:-keep]:
            old.unlink()


def resume_gan(run: TrainingRun, state: TrainingState) -> LoopState:
    """The loop where the checkpoint ``--resume`` names left it, or at its start (with the
    generator and discriminators of ``--init-from`` when it names one)."""
    opts = run.options
    path = run.out / "checkpoints" / "latest.pt" if opts.resume == "latest" else Path(opts.resume or "")
    if opts.resume is not None and path.is_file():
        saved = checkpoint.load(path)
        state.load_state_dict(saved["gan"])
        restore_all_rng_states(saved["rng"])
        if run.runtime.is_main:
            print(f"resumed from {path} at step {saved['step']}", flush=True)
        return LoopState(saved["step"], saved["position"], saved.get("best", LoopState().best))
    if opts.init_from is not None:
        try:
            loaded = state.load_weights(checkpoint.read_model(opts.init_from), opts.init_from)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--init-from: {e}") from None
        if run.runtime.is_main:
            print(f"--init-from: {' and '.join(loaded)} from {opts.init_from}, fresh optimizers", flush=True)
    return LoopState()


def train_gan(run: TrainingRun, root: Path) -> TrainingState:
    """Train DM-GAN (or, for ``stage="eval"``, load the trained checkpoint) and return it, with
    checkpoints (``checkpoints/step-NNNNNN.pt``, ``latest.pt``, ``best.pt``) and sample grids
    written on the way."""
    opts, cfg, rt = run.options, run.config, run.runtime
    dataset = dataset_for(cfg, root, "train", train=True, seed=opts.seed)
    loader = make_loader(
        dataset,
        cfg.train.batch_size,
        seed=opts.seed,
        workers=opts.workers,
        rank=rt.rank,
        world_size=rt.world_size,
        pin_memory=rt.device.type == "cuda",
    )
    if cfg.train.batch_size % opts.accumulate:
        raise SystemExit(f"--accumulate {opts.accumulate} must divide the batch size {cfg.train.batch_size}")
    text_encoder, image_encoder = load_encoders(run, len(dataset.vocab))
    state = TrainingState.build(
        cfg,
        len(dataset.vocab),
        device=rt.device,
        amp=opts.amp,
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        accumulate=opts.accumulate,
        compile=opts.compile,
        channels_last=opts.channels_last == "on",
        memory_backend=opts.memory_backend,
    )
    state.editor = CaptionEditor.for_dataset(root, dataset.vocab, cfg)
    loop = resume_gan(run, state)
    state.netG = rt.wrap(state.netG, opts.sync_bn)  # DDP broadcasts rank 0's weights to every rank
    state.netsD = [rt.wrap(d) for d in state.netsD]
    if rt.rank > 0:  # every rank its own noise (a resumed rank got rank 0's RNG state)
        torch.manual_seed(opts.seed + 1000 * loop.step + rt.rank)
    GanLoop(run, root, state, loop, loader, dataset.vocab).train()
    state.netG, state.netsD = unwrap(state.netG), [unwrap(d) for d in state.netsD]
    return state


@dataclass
class GanLoop:
    """The GAN stage's loop over batches: a step, then what falls due after it."""

    run: TrainingRun
    root: Path
    state: TrainingState
    loop: LoopState
    loader: torch.utils.data.DataLoader
    vocab: Vocabulary
    interval: IntervalMeans = field(default_factory=IntervalMeans)

    def __post_init__(self) -> None:
        opts, cfg = self.run.options, self.run.config
        self.per_epoch = self.loader.sampler.batches_per_epoch  # type: ignore[union-attr]
        self.total = (
            self.loop.step if opts.stage == "eval" else opts.max_steps or cfg.train.max_epoch * self.per_epoch
        )
        self.checkpoint_every = opts.checkpoint_every or cfg.train.snapshot_interval * self.per_epoch
        self.checkpoints = self.run.out / "checkpoints"
        test = dataset_for(cfg, self.root, "test", train=False, seed=opts.seed)
        rng = test.item_rng(0)  # fixed captions and noise: grids at different steps are comparable
        pairs = [test.caption(i, rng, which=0) for i in range(min(opts.num_samples, len(test)))]
        self.samples = Captions.from_pairs(pairs, test.vocab)

    def train(self) -> None:
        """Steps until the total, epoch after epoch, from where the loop state stands."""
        rt, loop = self.run.runtime, self.loop
        self.bar = progress(total=self.total, initial=loop.step, desc="DM-GAN", enabled=rt.is_main)
        while loop.step < self.total:
            epoch, skip = divmod(loop.position, self.per_epoch)
            step_at_epoch_start = loop.step
            for batch in epoch_batches(self.loader, epoch, skip):
                loop.position += 1
                loop.skipped_images += batch.skipped
                if rt.any_true(len(batch.captions) < 2):  # (almost) nothing readable in this batch
                    continue
                start = time.perf_counter()
                check_word_ids(batch.captions, len(self.vocab))  # on the host copy: no wait
                logs = self.state.step(batch.to(rt.device))
                if not self.count_step(logs):
                    continue
                self.interval.add(logs, len(batch.captions) * rt.world_size, time.perf_counter() - start)
                self.bar.update()
                self.after_step()
                if loop.step == self.total:
                    break
            if loop.step == step_at_epoch_start and loop.step < self.total:
                raise SystemExit(
                    f"a whole epoch gave no training step ({loop.skipped_images} unreadable images)"
                )
        self.bar.close()
        if rt.is_main and (loop.skipped_images or loop.skipped_steps):
            print(
                f"skipped {loop.skipped_images} unreadable images and {loop.skipped_steps} steps with NaN/Inf losses"
            )

    def save_checkpoint(self, name: str) -> Path:
        return save_training_checkpoint(
            self.checkpoints / name, self.state, self.loop, self.vocab, self.root, self.run.environment
        )

    def sample_grid(self, step: int) -> None:
        """The fixed captions' images at every stage as ``samples/stepNNNNNN.png``, and to the
        tracker with the first caption's word-attention maps of the last memory stage."""
        stages, maps = self.state.pipeline(self.vocab).generate(self.samples, seed=0, return_attention=True)
        texts = self.samples.texts
        grid = stage_grid(stages, texts, self.run.out / "samples" / f"step{step:06d}.png")
        figures: dict[str, Any] = {"samples": grid}
        if maps:
            first = [s[0] for s in stages]
            figures["attention"] = render_attention(first, maps[-1][0], texts[0].split(), texts[0])
        self.run.tracker.images("gan", step, figures)

    def count_step(self, logs: dict[str, torch.Tensor]) -> bool:
        """Whether the step took effect: the step's one wait for the device, to learn whether a
        loss went non-finite on any rank (then every rank skips it). Too many in a row stop the run."""
        loop = self.loop
        if self.run.runtime.any_true(logs["nonfinite"]):
            loop.nonfinite_in_row += 1
            loop.skipped_steps += 1
            if loop.nonfinite_in_row >= self.run.options.max_nonfinite:
                last = {k: round(float(v), 4) for k, v in logs.items()}
                raise SystemExit(
                    f"stopping: {loop.nonfinite_in_row} steps in a row had NaN/Inf losses "
                    f"(last: {last}); the last good checkpoint is {self.checkpoints / 'latest.pt'}"
                )
            return False
        loop.nonfinite_in_row = 0
        loop.step += 1
        return True

    def after_step(self) -> None:
        """What falls due after a step: the log line, an evaluation (and ``best.pt``), a
        checkpoint, a sample grid; and stopping, when a signal asked for it (checkpoint first).
        The first process does the writing while the others wait for it."""
        run, opts, rt, loop = self.run, self.run.options, self.run.runtime, self.loop
        step, at_end = loop.step, loop.step == self.total
        if step % opts.log_every == 0 or at_end:
            means = self.interval.take()  # the losses' means since the last line, in one transfer
            d_loss = sum(v for k, v in means.items() if k.startswith("d_loss"))
            self.bar.set_postfix(
                D=f"{d_loss:.2f}", G=f"{means['g_loss']:.2f}", img_s=f"{means['images_per_s']:.1f}"
            )
            counts = {"skipped_steps": loop.skipped_steps, "skipped_images": loop.skipped_images}
            run.tracker.scalars("gan", step, {**means, **counts})
        stopping = rt.any_true(bool(run.stop))
        evaluate = bool(opts.eval_every) and step % opts.eval_every == 0
        save = at_end or stopping or step % self.checkpoint_every == 0
        sample = at_end or step % opts.sample_every == 0
        if rt.is_main and evaluate:
            scores = evaluate_while_training(run, self.root, self.state, self.vocab)
            run.tracker.scalars("eval", step, scores)
            if loop.best["fid"] is None or scores["fid"] < loop.best["fid"]:
                loop.best = {"fid": scores["fid"], "step": step}
                self.save_checkpoint("best.pt")
        if rt.is_main and save:
            keep_snapshot(self.save_checkpoint(f"step-{step:06d}.pt"), opts.keep_checkpoints)
        if rt.is_main and sample:
            self.sample_grid(step)
        if evaluate or save or sample:
            rt.wait_for_main()
        if stopping:
            raise Interrupted(run.stop.signal or signal.SIGTERM, self.checkpoints / "latest.pt")


# --------------------------------------------------------------------------------------------
# Stage 3: the short evaluation (and the one while training)


def short_evaluation(run: TrainingRun, root: Path, state: TrainingState) -> dict[str, Any]:
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
    return evaluate(state.pipeline(test.vocab), root, len(test), image_metrics_on=False, seed=opts.seed)


def evaluate_while_training(
    run: TrainingRun, root: Path, state: TrainingState, vocab: Vocabulary
) -> dict[str, float]:
    """FID (and KID, precision, recall) on a fixed sample of ``eval_images`` images (the same
    captions and noise every time, the legacy-pytorch protocol), R-precision, and on the shapes data the
    caption accuracy of each attribute: the numbers logged as stage "eval"."""
    from dmgan.evaluate import evaluate

    results = evaluate(state.pipeline(vocab), root, run.options.eval_images, seed=run.options.seed)
    scores = {"fid": results["fid"], "kid": results["kid"]["mean"]}
    scores |= {k: results[k] for k in ("precision", "recall", "density", "coverage")}
    if "r_precision" in results:
        scores["r_precision"] = results["r_precision"]["mean"]
    for name, value in results.get("caption_accuracy", {}).items():
        scores[f"caption_accuracy_{name}"] = value["accuracy"]
    for name, value in results.get("counterfactual_r_precision", {}).items():
        if isinstance(value, dict):
            scores[f"counterfactual_r_precision_{name}"] = value["accuracy"]
    return scores


# --------------------------------------------------------------------------------------------
# A whole run


def train(options: RunOptions) -> tuple[dict[str, Any], TrainingState | None]:
    """Run the stages ``options.stage`` asks for; returns the final metrics and the training
    state (None when no GAN stage ran). Writes ``metrics.json`` beside ``config.json``."""
    results: dict[str, Any] = {}
    state = None
    with start_run(options) as run:
        rt, opts, cfg = run.runtime, run.options, run.config
        if rt.is_main:
            amp_why = "asked for" if options.amp else default_amp(rt.device)[1]
            print(
                f"dmgan: preset {cfg.name}, stages {cfg.model.image_sizes}, device {rt.device} x "
                f"{rt.world_size}, amp {opts.amp} ({amp_why}), channels-last {opts.channels_last}, "
                f"memory backend {opts.memory_backend}, output {run.out}",
                flush=True,
            )
        with run.stop.installed():
            root = opts.dataset_folder() if rt.is_main else None
            rt.barrier()
            root = root or opts.dataset_folder()
            started = time.perf_counter()
            if opts.stage in ("all", "damsm") and not (opts.text_encoder and opts.image_encoder):
                pretrain_damsm(run, root)
                results["damsm_seconds"] = round(time.perf_counter() - started, 1)
            if opts.stage in ("all", "gan", "eval"):
                gan_start = time.perf_counter()
                state = train_gan(run, root)
                results["gan_seconds"] = round(time.perf_counter() - gan_start, 1)
        # Outside the handlers: a signal during the evaluation stops it at once (the checkpoint
        # is already written) instead of setting a flag nobody reads any more.
        if state is not None and opts.stage in ("all", "eval") and rt.is_main:
            results.update(short_evaluation(run, root, state))
        results["total_seconds"] = round(time.perf_counter() - started, 1)
        if rt.is_main:
            (run.out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps(results, indent=2))
            print(
                f"samples: {run.out / 'samples'}\ncheckpoint: {run.out / 'checkpoints' / 'latest.pt'}\n"
                f"metrics: {run.out / 'metrics.json'} and {run.out / 'metrics.jsonl'}",
                flush=True,
            )
    return results, state
