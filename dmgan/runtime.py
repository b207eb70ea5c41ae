"""A training run's plumbing: what it is asked to do, where it runs, signals, logs, RNG states.

:class:`RunOptions` is everything a run is asked beyond the model and training settings (which are
the preset's, changed by ``overrides``); ``python train.py`` builds one from its command line, one
flag per field, and Python code builds one directly::

    from dmgan.runtime import RunOptions
    from dmgan.trainer import train

    results, state = train(RunOptions(out="runs/try", max_steps=100, overrides={"train.batch_size": 8}))

:func:`start_run` starts a run from its options: threads, the ``torchrun`` process group, the
metrics log, and ``config.json`` (the resolved options and configuration) in the output folder.
The trainer's stages take the :class:`TrainingRun` it yields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dmgan.cli import SHARED_FLAGS, default_device
from dmgan.config import PRESETS, Config, get_preset, override
from dmgan.data import shapes as shapes_data
from dmgan.ops import BACKENDS
from dmgan.provenance import deterministic_state, environment_record, set_deterministic
from dmgan.tracking import REPORT_TO, Tracker, check_report_to, open_tracker
from dmgan.training_step import AMP_DTYPES

AMP_MODES = tuple(AMP_DTYPES)
# Evaluations while training where they fit: the paper presets run for days on a GPU; on the shapes
# preset (the CPU default run's 15 minutes) an evaluation with FID would cost minutes.
DEFAULT_EVAL_EVERY = {"bird": 5000, "coco": 5000}
STAGES = ("all", "damsm", "gan", "eval")
ONOFF = ("on", "off")


def _option(default: Any, help: str, **cli: Any) -> Any:
    """A field of :class:`RunOptions` with its command-line help (and choices, metavar, ...)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class RunOptions:
    """What a training run is asked to do. ``None`` means "the default for this machine" and is
    filled in by :meth:`resolved`."""

    preset: str = _option("shapes", "model and training configuration", choices=sorted(PRESETS))
    overrides: dict[str, Any] = _option(
        None,
        "config fields, e.g. model.r_num=3 or train.batch_size=8",
        flag="--set",
        metavar="GROUP.FIELD=VALUE",
    )
    data_dir: str | None = _option(None, "AttnGAN-layout dataset folder (default: the built-in shapes data)")
    out: str | None = _option(None, "output folder (default: runs/<preset>)")
    stage: str = _option("all", "stages to run", choices=STAGES)
    text_encoder: str | None = _option(None, "released DAMSM text encoder (skips pretraining)")
    image_encoder: str | None = _option(None, "released DAMSM image encoder (skips pretraining)")
    inception_weights: str | None = _option(None, SHARED_FLAGS["inception-weights"]["help"])
    resume: str | None = _option(
        None,
        "continue a run: from the output folder's checkpoints (no value, or 'latest') or from a training "
        "checkpoint PATH (its GAN stage)",
        nargs="?",
        const="latest",
        metavar="latest|PATH",
    )
    init_from: str | None = _option(
        None,
        "start a new run from the generator (and discriminators) of a training checkpoint, a converted "
        "reference model or an export, with fresh optimizers at step 0",
        metavar="CHECKPOINT",
    )
    amp: str | None = _option(
        None,
        "mixed precision (default: bf16 on GPUs and on CPUs with bf16 matrix instructions, else off)",
        choices=AMP_MODES,
    )
    device: str | None = _option(None, SHARED_FLAGS["device"]["help"])
    seed: int = _option(0, SHARED_FLAGS["seed"]["help"])
    memory_backend: str = _option("auto", SHARED_FLAGS["memory-backend"]["help"], choices=BACKENDS)
    compile: bool = _option(
        False, "torch.compile G, the Ds and the DAMSM image encoder (the first steps pay the compile time)"
    )
    channels_last: str | None = _option(
        None,
        "channels-last memory format for G, the Ds, the DAMSM image encoder and the images "
        "(default: on on GPUs, off on CPUs, where it was slower)",
        choices=ONOFF,
    )
    eval_every: int | None = _option(
        None,
        "GAN steps between evaluations while training (FID on a fixed sample, R-precision, caption accuracy); "
        "the best FID is kept as best.pt (default: every 5000 steps for bird and coco, off for shapes)",
    )
    eval_images: int = _option(1000, "images of each evaluation while training")
    accumulate: int = _option(
        1, "split each batch into this many micro-batches, their gradients summed per update (less memory)"
    )
    max_steps: int | None = _option(
        None, "GAN steps to train, in place of the epoch count (default: epochs x batches per epoch)"
    )
    workers: int | None = _option(None, "data-loading processes (default: 0 on a CPU, 4 on a GPU)")
    sync_bn: bool = _option(False, "synchronised batch norm in G across processes")
    log_every: int = _option(25, "steps between metrics-log lines")
    report_to: str = _option(
        "none",
        "where else the metrics, sample grids and attention maps go besides metrics.jsonl "
        "(tensorboard and wandb come with the install extras of those names; wandb runs offline unless "
        "WANDB_MODE says otherwise)",
        choices=REPORT_TO,
    )
    checkpoint_every: int | None = _option(
        None,
        "steps between checkpoints, each kept as checkpoints/step-NNNNNN.pt beside latest.pt "
        "(default: the preset's train.snapshot_interval epochs)",
    )
    keep_checkpoints: int | None = _option(
        None, "keep only the newest N step checkpoints (latest.pt and best.pt are kept apart)"
    )
    dist_timeout: float = _option(30, "minutes a process waits for the others in a collective (torchrun)")
    main_work_timeout: float = _option(
        600,
        "minutes the other processes wait while the first evaluates, samples or writes a checkpoint (torchrun)",
    )
    sample_every: int = _option(500, "steps between sample grids")
    num_samples: int = _option(8, "captions in each sample grid")
    max_nonfinite: int = _option(5, "stop after this many NaN/Inf steps in a row")
    threads: int | None = _option(None, "CPU threads for torch")
    deterministic: bool = _option(
        False,
        "deterministic algorithms, cuDNN without autotuning, no TF32: repeatable runs, slower steps on "
        "GPUs, and an error from any op torch has no deterministic version of",
    )
    shapes_train: int = _option(4000, "built-in shapes: training images")
    shapes_test: int = _option(500, "built-in shapes: test images")
    shapes_seed: int = _option(0, "built-in shapes: drawing seed")

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", dict(self.overrides or {}))
        if isinstance(self.resume, bool):  # RunOptions(resume=True) from Python: the folder's latest
            object.__setattr__(self, "resume", "latest" if self.resume else None)
        choices = (
            ("preset", PRESETS), ("stage", STAGES), ("amp", (None, *AMP_MODES)), ("channels_last", (None, *ONOFF)),
            ("memory_backend", BACKENDS),
            ("report_to", REPORT_TO),
        )  # fmt: skip
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {sorted(a for a in allowed if a)}, got {getattr(self, name)!r}"
                )

    def config(self) -> Config:
        """The preset with the overrides applied (lists become tuples, as the config holds them)."""
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in self.overrides.items()}
        return override(get_preset(self.preset), **changes) if changes else get_preset(self.preset)

    def dataset_folder(self) -> Path:
        """The dataset folder: ``data_dir``, or the built-in shapes data, drawn on first use."""
        cfg = self.config()
        if self.data_dir is not None:
            return Path(self.data_dir)
        if cfg.name != "shapes":
            raise SystemExit(f"--preset {cfg.name} needs --data-dir (the AttnGAN-layout dataset folder)")
        root = shapes_data.default_root() / f"n{self.shapes_train}-{self.shapes_test}-seed{self.shapes_seed}"
        if not shapes_data.is_shapes_dataset(root):
            print(f"drawing the built-in shapes dataset into {root} ...", flush=True)
        return shapes_data.generate(
            root, self.shapes_train, self.shapes_test, self.shapes_seed, cfg.text.captions_per_image
        )

    def resolved(self, device: torch.device) -> RunOptions:
        """Every default filled in for a run on ``device``."""
        amp = self.amp or default_amp(device)[0]
        return dataclasses.replace(
            self,
            out=self.out or os.path.join("runs", self.config().name),
            amp=amp,
            channels_last=self.channels_last or default_channels_last(device),
            device=str(device),
            workers=self.workers if self.workers is not None else (4 if device.type == "cuda" else 0),
            resume=self.resume or ("latest" if self.stage == "eval" else None),  # eval reads the trained one
            eval_every=self.eval_every
            if self.eval_every is not None
            else DEFAULT_EVAL_EVERY.get(self.config().name),
        )


def cpu_has_bf16_matrix_instructions() -> bool:
    """AMX or AVX-512 BF16: bf16 autocast is faster than fp32 there, and far slower without."""
    cpu = torch.cpu
    checks = (getattr(cpu, "_is_amx_tile_supported", None), getattr(cpu, "_is_avx512_bf16_supported", None))
    return any(check() for check in checks if check is not None)


def default_amp(device: torch.device) -> tuple[str, str]:
    """The mixed-precision mode a run takes when none is asked for, and why."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "the default: this GPU computes in bf16"
        return "off", "the default: this GPU has no bf16"
    if cpu_has_bf16_matrix_instructions():
        return "bf16", "the default: this CPU has AMX or AVX-512 BF16 instructions"
    return "off", "the default: this CPU has no AMX or AVX-512 BF16, where bf16 is slower than fp32"


def default_channels_last(device: torch.device) -> str:
    """Channels-last where convolutions are fastest in it: GPUs (tensor-core convolutions take
    NHWC); on the CPU the shapes preset's step was slower in it (benchmarks/RESULTS.md)."""
    return "on" if device.type == "cuda" else "off"


def describe(options: RunOptions, cfg: Config, environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``config.json`` holds: the options and the configuration the run uses (what
    ``python train.py --config`` replays), and, for a started run, where it ran
    (:func:`dmgan.provenance.environment_record`, with the determinism switches)."""
    described = {"options": dataclasses.asdict(options), "config": dataclasses.asdict(cfg)}
    return described if environment is None else {**described, "environment": environment}


@dataclass
class Runtime:
    """Where this process runs and what it may do."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    main_work_group: Any = None  # a Gloo group whose timeout covers the first process's own work

    @classmethod
    def start(
        cls, device: str | None, timeout_minutes: float = 30, main_work_minutes: float = 600
    ) -> Runtime:
        """Join the ``torchrun`` process group when launched by it (NCCL on GPUs, Gloo on CPU),
        with ``timeout_minutes`` for its collectives, and a second (Gloo) group for waiting up to
        ``main_work_minutes`` while the first process works alone (:meth:`wait_for_main`)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        wanted = device or default_device()
        if world_size == 1:
            return cls(torch.device(wanted))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if wanted.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", timeout=timeout)
            runtime = cls(torch.device("cuda", local_rank), dist.get_rank(), world_size)
        else:
            dist.init_process_group("gloo", timeout=timeout)
            runtime = cls(torch.device("cpu"), dist.get_rank(), world_size)
        # Made now, while every process is here: making a group is itself a collective.
        runtime.main_work_group = dist.new_group(
            backend="gloo", timeout=datetime.timedelta(minutes=main_work_minutes)
        )
        return runtime

    def wait_for_main(self) -> None:
        """Every process waits here while the first one works alone (an evaluation, a sample grid,
        a checkpoint): on a group whose timeout is longer than the collectives', which an
        evaluation at paper scale would outlast. Gloo, so NCCL's watchdog is not involved."""
        if self.world_size > 1:
            dist.barrier(group=self.main_work_group)

    def wrap(self, module: nn.Module, sync_bn: bool = False) -> nn.Module:
        if self.world_size == 1:
            return module
        if sync_bn:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def any_true(self, flag: bool | torch.Tensor) -> bool:
        """Agree across ranks (on stopping, on skipping a step): True if any rank says True. A
        flag on the device is read once, after the reduction: one wait for the device."""
        if self.world_size == 1:
            return bool(flag)
        value = torch.as_tensor(flag, device=self.device).to(torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

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
        print(
            f"\n{signal.Signals(signum).name}: checkpoint written to {where}; continue with --resume",
            flush=True,
        )
        super().__init__(128 + signum)


def all_rng_states() -> dict[str, Any]:
    """The CPU's and every GPU's generator: what a checkpoint keeps to resume the same draws."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_all_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainingRun:
    """A started run, as the trainer's stages take it."""

    options: RunOptions  # resolved: no default left open
    config: Config
    runtime: Runtime
    tracker: Tracker
    environment: dict[str, Any] = field(default_factory=dict)  # provenance.environment_record
    stop: StopRequest = field(default_factory=StopRequest)

    @property
    def out(self) -> Path:
        return Path(self.options.out)


# What each stage writes in the output folder, and what it resumes from there.
DAMSM_STATE, GAN_LATEST = Path("damsm") / "damsm_state.pt", Path("checkpoints") / "latest.pt"
DAMSM_ENCODER = Path("damsm") / "text_encoder.pth"
# Settings a resumed run cannot change: the networks' shapes and the captions they read.
BREAKING_GROUPS = ("model", "text")


def check_run_folder(options: RunOptions, cfg: Config) -> None:
    """Runs never clobber each other: a new run refuses a folder where its stages already wrote,
    and ``--resume`` needs something to resume and settings that fit it (differences are listed;
    those that would break the run are refused)."""
    out = Path(options.out)
    runs_damsm = options.stage in ("all", "damsm") and not (options.text_encoder and options.image_encoder)
    runs_gan = options.stage in ("all", "gan")
    ours = [DAMSM_STATE, DAMSM_ENCODER] * runs_damsm + [GAN_LATEST] * runs_gan
    if options.resume is None:
        found = [str(out / p) for p in ours if (out / p).exists()]
        if found:
            fresh = next(f"{out}-{k}" for k in range(2, 10_000) if not Path(f"{out}-{k}").exists())
            raise SystemExit(
                f"{out} already holds a run ({', '.join(found)}): continue it with --resume, "
                f"or start a new one with --out {fresh}"
            )
        return
    if options.stage == "eval" and options.resume == "latest" and not (out / GAN_LATEST).is_file():
        raise SystemExit(f"--stage eval needs a trained checkpoint: {out / GAN_LATEST} does not exist")
    if options.resume == "latest":
        if not any((out / p).exists() for p in (DAMSM_STATE, DAMSM_ENCODER, GAN_LATEST)):
            raise SystemExit(
                f"--resume: nothing to resume in {out} (no {DAMSM_STATE} and no {GAN_LATEST}); "
                "leave out --resume to start a run there"
            )
        stored_path = out / "config.json"
        stored = json.loads(stored_path.read_text())["config"] if stored_path.is_file() else None
    else:
        stored_path = Path(options.resume)
        if not stored_path.is_file():
            raise SystemExit(f"--resume {stored_path}: no such checkpoint")
        from dmgan import checkpoint

        stored = checkpoint.load(stored_path).get("config")
    if stored is not None:
        compare_settings(stored, dataclasses.asdict(cfg), stored_path)


def compare_settings(stored: dict[str, Any], wanted: dict[str, Any], source: Path) -> None:
    """Print what a resumed run changes of the configuration it resumes (as stored in ``source``);
    refuse changes of the networks or the captions, under which the checkpoint cannot go on."""
    changed = {
        f"{group}.{key}": (old, wanted[group].get(key))
        for group in ("model", "text", "train")
        for key, old in stored.get(group, {}).items()
        if key in wanted[group] and _comparable(old) != _comparable(wanted[group][key])
    }
    if stored.get("name") != wanted["name"]:
        changed["preset"] = (stored.get("name"), wanted["name"])
    if not changed:
        return
    listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
    breaking = [k for k in changed if k == "preset" or k.split(".")[0] in BREAKING_GROUPS]
    if breaking:
        raise SystemExit(
            f"--resume: {source} was made with other settings ({listing}); {', '.join(breaking)} "
            "cannot change in a resumed run (start a new run, or --init-from its weights)"
        )
    print(f"resuming with changed settings against {source}: {listing}", flush=True)


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


@contextlib.contextmanager
def start_run(options: RunOptions) -> Iterator[TrainingRun]:
    """Start a run: threads, the process group, the tracker and ``config.json``; the tracker and
    the process group end when the block does. A new run refuses a folder that holds another
    run's outputs."""
    cfg = options.config()
    if options.threads:
        torch.set_num_threads(options.threads)
    check_run_folder(options.resolved(torch.device(options.device or default_device())), cfg)
    check_report_to(options.report_to)  # a missing package stops every process before anything runs
    runtime = Runtime.start(options.device, options.dist_timeout, options.main_work_timeout)
    with contextlib.ExitStack() as stack:
        stack.callback(runtime.stop)
        options = options.resolved(runtime.device)
        torch.manual_seed(options.seed)  # the same initial weights on every rank
        if options.deterministic:
            stack.callback(set_deterministic, False)
        switches = set_deterministic(True) if options.deterministic else deterministic_state()
        environment = {**environment_record(runtime.device, runtime.world_size), "determinism": switches}
        described = describe(options, cfg, environment)
        out = Path(options.out)
        tracker = open_tracker(
            options.report_to, out, run_name=out.name, config=described, enabled=runtime.is_main
        )
        stack.callback(tracker.close)
        started = TrainingRun(options, cfg, runtime, tracker, environment)
        if runtime.is_main:
            started.out.mkdir(parents=True, exist_ok=True)
            (started.out / "config.json").write_text(json.dumps(described, indent=2) + "\n")
        yield started
