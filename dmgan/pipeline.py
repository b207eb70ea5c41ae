"""A trained text-to-image model for inference: checkpoint → captions → images (and attention).

A training checkpoint (``runs/<preset>/checkpoints/latest.pt``) holds everything needed: the
config, the generator and its EMA, the frozen DAMSM encoders and the vocabulary; so do converted
reference models and exports (:mod:`dmgan.checkpoint` has the formats). An export shared on the
Hugging Face Hub loads by its repo id (``pip install -e ".[hub]"``):

    pipe = TextToImage.from_pretrained("runs/shapes/checkpoints/latest.pt")  # or a folder, or OWNER/NAME
    images = pipe("a large red circle in the top left", num_images=4, seed=0)  # PIL images
    captions = pipe.tokenize(["a large red circle in the top left"])
    stages, attention = pipe.generate(captions, seed=0, return_attention=True)  # tensors

``TextToImage.load`` (the same as ``from_pretrained``) is the one way in for every command:
``dmgan.sample``, ``dmgan.demo`` and ``dmgan.evaluate`` take whatever it takes. What it cannot
load raises ``FileNotFoundError`` or ``ValueError`` with one line naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dmgan import __version__, checkpoint
from dmgan.config import (
    MODEL_FIELDS_ADDED_LATER,
    RUNTIME_CHOICES_ONCE_STORED,
    Config,
    ModelConfig,
    TextConfig,
    TrainConfig,
    config_from_dict,
)
from dmgan.data import Vocabulary, subsample_caption
from dmgan.ema import ParameterEMA
from dmgan.models import G_NET, build_image_encoder, build_text_encoder

if TYPE_CHECKING:
    from PIL import Image

WEIGHTS = ("ema", "raw")

# A Hub repo id: OWNER/NAME, each of letters, digits, "-", "_" and ".", at most 96 characters.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# Names that are meant as local files even when they read as OWNER/NAME (runs/latest.pt).
LOCAL_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".json", ".txt"})


def is_repo_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` is read as a Hugging Face Hub repo id rather than a local path: it is
    OWNER/NAME, nothing of that name is here, no folder OWNER is here (a mistyped path inside an
    existing folder stays a missing path) and it has no checkpoint suffix."""
    text = os.fspath(name)
    if not REPO_ID.fullmatch(text) or "--" in text or ".." in text:
        return False
    path = Path(text)
    return not path.exists() and not path.parent.is_dir() and path.suffix.lower() not in LOCAL_SUFFIXES


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {
        "1",
        "ON",
        "YES",
        "TRUE",
    }  # as huggingface_hub reads it


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def download(repo_id: str) -> Path:
    """The exported model of Hub repo ``repo_id``, as a folder in the Hub's cache: downloaded
    once (``huggingface_hub.snapshot_download``), then read from there. ``HF_HUB_OFFLINE=1`` reads
    the cache only; ``HF_HUB_CACHE`` moves the cache. Both are read here, at each call, not when
    huggingface_hub was imported (another library may have imported it first)."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"checkpoint not found: {repo_id} is no file or folder here; to load it as a Hugging Face "
            'Hub repo id, install huggingface_hub (pip install -e ".[hub]")'
        ) from None
    offline = _env_true("HF_HUB_OFFLINE")
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        folder = snapshot_download(
            repo_id,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=list(checkpoint.EXPORT_FILES),  # what loading reads: no card, no pickles
            library_name="dmgan",
            library_version=__version__,
        )
    except Exception as e:  # the client's errors (no network, no such repo, a partial cache) end here
        if offline and type(e).__name__ == "IncompleteSnapshotError":
            raise FileNotFoundError(
                f"checkpoint not found: {repo_id}: the Hugging Face Hub cache {cache} holds an incomplete "
                "copy of it (HF_HUB_OFFLINE=1: nothing is downloaded to complete it)"
            ) from None
        if offline:  # the client's own words here would suggest an argument of its API
            raise FileNotFoundError(
                f"checkpoint not found: {repo_id} is no file or folder here, nor in the Hugging Face Hub "
                f"cache {cache} (HF_HUB_OFFLINE=1: nothing is downloaded)"
            ) from None
        raise FileNotFoundError(
            f"checkpoint not found: {repo_id} is no file or folder here, and the Hugging Face Hub did "
            f"not give it ({_first_line(e)})"
        ) from None
    return Path(folder)


def locate(path_or_repo_id: str | os.PathLike) -> tuple[Path, str | None]:
    """(the local file or folder to read, the Hub repo id it came from or None)."""
    path = Path(path_or_repo_id)
    if path.exists():
        return path, None
    if is_repo_id(path_or_repo_id):
        repo_id = os.fspath(path_or_repo_id)
        return download(repo_id), repo_id
    raise FileNotFoundError(f"checkpoint not found: {path}")


def fetch_model(path_or_repo_id: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The model dictionary (:func:`dmgan.checkpoint.read_model`) at a local path or Hub repo id,
    and the local file or folder it was read from (for a repo, its snapshot in the Hub's cache)."""
    local, repo_id = locate(path_or_repo_id)
    try:
        return checkpoint.read_model(local), local
    except (FileNotFoundError, ValueError) as e:
        if repo_id is None:
            raise
        raise type(e)(f"{repo_id} (Hugging Face Hub): {e}") from None


def report_path(path_or_repo_id: str | os.PathLike, name: str = "evaluation.json") -> Path:
    """Where a report on a model goes by default: beside a local checkpoint or export folder;
    for a Hub model, in the current folder, named after the repo (``OWNER--NAME-evaluation.json``),
    never inside the Hub's cache."""
    if is_repo_id(path_or_repo_id):
        return Path(f"{os.fspath(path_or_repo_id).replace('/', '--')}-{name}")
    return Path(path_or_repo_id).with_name(name)


CONFIG_GROUPS: dict[str, type] = {"model": ModelConfig, "text": TextConfig, "train": TrainConfig}


def config_of(state: dict[str, Any], source: str) -> Config:
    """The config a model was saved with, or a ValueError naming ``source`` and the fields that do
    not fit this dmgan (a checkpoint of a newer or older version). The model and text sections
    describe the networks and the captions, so every field must be known and present (but those added
    later, :data:`~dmgan.config.MODEL_FIELDS_ADDED_LATER`, which take their old meaning); the train
    section only records how the model was trained, so its unknown fields are passed over and its
    missing ones take today's defaults (sampling never reads them)."""
    data = state["config"]
    written_by = (state.get("environment") or {}).get("dmgan")
    if not isinstance(data, dict):
        raise ValueError(f"{source}: its config is a {type(data).__name__}, not a dmgan config")
    problems = [f"unknown section {k!r}" for k in sorted(data.keys() - {"name", *CONFIG_GROUPS})]
    if not isinstance(data.get("name"), str):
        problems.append("no preset name")
    for group in ("model", "text"):
        given = data.get(group)
        if not isinstance(given, dict):
            problems.append(f"no {group} section")
            continue
        known = {f.name for f in dataclasses.fields(CONFIG_GROUPS[group])}
        stored_once = RUNTIME_CHOICES_ONCE_STORED if group == "model" else frozenset()
        unknown = sorted(given.keys() - known - stored_once)
        if group == "model":  # an older checkpoint: what it was trained with
            given = {**MODEL_FIELDS_ADDED_LATER, **given}
            data = {**data, "model": given}
        missing = sorted(known - given.keys())
        problems += [f"unknown field {group}.{k}" for k in unknown]
        problems += [f"missing field {group}.{k}" for k in missing]
    if problems:
        who = (
            f"dmgan {written_by}" if written_by and written_by != __version__ else "another version of dmgan?"
        )
        raise ValueError(
            f"{source}: its config does not fit dmgan {__version__} ({', '.join(problems)}; written by {who})"
        )
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = dataclasses.asdict(TrainConfig()) | {
        k: v for k, v in (data.get("train") or {}).items() if k in train_fields
    }
    try:
        return config_from_dict({**data, "train": train})
    except (TypeError, ValueError) as e:  # a field of the wrong kind
        raise ValueError(f"{source}: its config cannot be read ({e})") from None


def seeded_noise(
    seeds: Sequence[int], z_dim: int, c_dim: int, truncation: float | None
) -> tuple[Tensor, Tensor]:
    """Per image, z (len(seeds) x z_dim) and CA-Net's noise ε (len(seeds) x c_dim), both drawn from
    a generator seeded with that image's seed: an image is a function of its caption and seed
    alone, whatever else is in its batch."""
    zs, eps = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        zs.append(truncated_noise(1, z_dim, truncation, generator))
        eps.append(torch.randn(1, c_dim, generator=generator))
    return torch.cat(zs), torch.cat(eps)


@dataclass
class Captions:
    """Encoded captions: indices N x L (0-padded), lengths N, the texts, and unknown words per text."""

    indices: Tensor
    lengths: Tensor
    texts: list[str]
    unknown: list[list[str]] = field(default_factory=list)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[Tensor, int]], vocab: Vocabulary) -> Captions:
        """From (padded indices, length) pairs as :meth:`TextImageDataset.caption` returns them."""
        return cls(
            torch.stack([c for c, _ in pairs]),
            torch.tensor([n for _, n in pairs]),
            [vocab.decode(c) for c, _ in pairs],
        )

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, rows: slice) -> Captions:
        return Captions(self.indices[rows], self.lengths[rows], self.texts[rows], self.unknown[rows])

    def select(self, rows: Sequence[int]) -> Captions:
        """These rows, in this order (repeats allowed): a batch of (caption, seed) pairs."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        unknown = [self.unknown[i] for i in rows] if self.unknown else []
        return Captions(self.indices[index], self.lengths[index], [self.texts[i] for i in rows], unknown)


def truncated_noise(count: int, dim: int, truncation: float | None, generator: torch.Generator) -> Tensor:
    """z ~ N(0, I), entries with |z| > truncation redrawn until none is left (the truncation trick)."""
    z = torch.randn(count, dim, generator=generator)
    if truncation is not None:
        if truncation <= 0:
            raise ValueError(f"truncation must be positive, got {truncation}")
        while (outside := z.abs() > truncation).any():
            z[outside] = torch.randn(int(outside.sum()), generator=generator)
    return z


@dataclass
class TextToImage:
    cfg: Config
    netG: G_NET
    text_encoder: nn.Module
    image_encoder: nn.Module
    vocab: Vocabulary
    data_dir: str | None = None  # the dataset the checkpoint was trained on, where it says
    source: str | None = None  # what it was loaded from: a path or a Hub repo id

    @classmethod
    def load(
        cls,
        path_or_repo_id: str | os.PathLike,
        device: str | torch.device = "cpu",
        weights: str = "ema",
        memory_backend: str = "auto",
    ) -> TextToImage:
        """A training checkpoint, a converted reference model (both ``.pt``), an exported model
        folder, or the repo id (``OWNER/NAME``) of an export on the Hugging Face Hub, downloaded
        once into the Hub's cache (:func:`download`; ``HF_HUB_OFFLINE=1``: the cache only). A local
        path wins over a repo id of the same spelling. ``weights``: "ema" (the averaged generator,
        what the reference samples with) or "raw" (the same for converted and exported models,
        which hold only one). ``memory_backend``: how the dynamic-memory op runs here
        (:data:`dmgan.ops.BACKENDS`), whatever the model was trained with.

        Raises ``FileNotFoundError`` (nothing there) or ``ValueError`` (a file that is cut off, of
        other content, or of another dmgan version), each one line that names it."""
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
        state, _ = fetch_model(path_or_repo_id)
        return cls.from_state(state, device, weights, memory_backend, source=os.fspath(path_or_repo_id))

    from_pretrained = load  # the name the Hugging Face libraries give it

    @classmethod
    def from_state(
        cls,
        state: dict[str, Any],
        device: str | torch.device = "cpu",
        weights: str = "ema",
        memory_backend: str = "auto",
        source: str = "the model",
    ) -> TextToImage:
        """The pipeline of a model dictionary (:func:`dmgan.checkpoint.read_model`); ``source``
        names it in errors: a config of another dmgan version, or weights that do not fit it."""
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
        cfg = config_of(state, source)
        gan = state["gan"]
        if not (isinstance(gan, dict) and isinstance(gan.get("netG"), dict)):
            raise ValueError(f"{source}: its 'gan' entry holds no generator state (netG)")
        netG = G_NET(cfg.model, memory_backend=memory_backend)
        checkpoint.load_state_checked(netG, gan["netG"], source, "generator its config describes")
        if weights == "ema" and "ema" in gan:  # converted and exported models hold the average already
            ema = ParameterEMA(netG)
            try:
                ema.load_state_dict(gan["ema"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{source}: its EMA weights do not fit its generator ({e})") from None
            ema.copy_to(netG)
        vocab = Vocabulary.from_list(state["vocab"])
        text_encoder = build_text_encoder(cfg.model, len(vocab))
        checkpoint.load_state_checked(
            text_encoder, state["text_encoder"], source, f"text encoder of its {len(vocab)} words"
        )
        image_encoder = build_image_encoder(cfg.model.image_encoder, cfg.model.embedding_dim)
        checkpoint.load_state_checked(image_encoder, state["image_encoder"], source, "image encoder")
        modules = [m.to(device).eval().requires_grad_(False) for m in (netG, text_encoder, image_encoder)]
        return cls(cfg, *modules, vocab, state.get("data_dir"), source)  # type: ignore[arg-type]

    def model_state(self) -> dict[str, Any]:
        """This model as the dictionary checkpoints and exports store (one generator, no EMA)."""
        state: dict[str, Any] = {
            "config": dataclasses.asdict(self.cfg),
            "gan": {"netG": self.netG.state_dict()},
            "text_encoder": self.text_encoder.state_dict(),
            "image_encoder": self.image_encoder.state_dict(),
            "vocab": self.vocab.as_list(),
        }
        if self.data_dir is not None:
            state["data_dir"] = self.data_dir
        return state

    @property
    def device(self) -> torch.device:
        return next(self.netG.parameters()).device

    def tokenize(self, texts: list[str], words_num: int | None = None) -> Captions:
        """Encode captions; unknown words are dropped (and listed per caption). A caption with no
        known word is an error that names it."""
        words_num = words_num or self.cfg.text.words_num
        rows, lengths, unknown = [], [], []
        for text in texts:
            known, missing = self.vocab.encode(text)
            if not known:
                raise ValueError(f"caption {text!r} has no word of the vocabulary ({len(self.vocab)} words)")
            padded, n = subsample_caption(known, words_num, random.Random(0))  # as the loader does
            rows.append(padded)
            lengths.append(n)
            unknown.append(missing)
        return Captions(torch.tensor(rows), torch.tensor(lengths), list(texts), unknown)

    @torch.no_grad()
    def encode(self, indices: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Word features N x D x T, sentence features N x D, padding mask N x T."""
        indices, lengths = indices.to(self.device), lengths.to(self.device)
        words_emb, sent_emb = self.text_encoder(indices, lengths)
        return words_emb, sent_emb, (indices == 0)[:, : words_emb.shape[2]]

    def __call__(
        self,
        prompt: str | Sequence[str],
        num_images: int = 1,
        seed: int = 0,
        truncation: float | None = None,
        batch_size: int = 64,
    ) -> list[Image.Image]:
        """``num_images`` images of each caption in ``prompt`` (caption by caption), as PIL images
        of the last stage. Image k of a caption has seed ``seed + k`` and is a function of the
        caption and that seed alone (:meth:`generate` with ``seeds``), so
        ``pipe(c, num_images=4)[2]`` is ``pipe(c, seed=2)[0]``. Unknown words are left out
        (:meth:`tokenize`)."""
        from PIL import Image

        from dmgan.visualize import to_uint8

        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        captions = self.tokenize([t for t in texts for _ in range(num_images)])
        seeds = [seed + k for _ in texts for k in range(num_images)]
        last = self.generate(captions, truncation=truncation, batch_size=batch_size, seeds=seeds)[0][-1]
        return [Image.fromarray(pixels) for pixels in to_uint8(last)]

    @torch.no_grad()
    def generate(
        self,
        captions: Captions,
        seed: int = 0,
        truncation: float | None = None,
        return_attention: bool = False,
        batch_size: int = 64,
        noise: Tensor | None = None,
        sentence_mix: tuple[Captions, Tensor] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Images of every stage (each N x 3 x S x S in [-1, 1], on the CPU) and, when asked, the
        key-addressing maps of each refinement stage (N x T x s x s).

        A function of ``seed``: z comes from a generator seeded with it (or is ``noise``, N x z),
        and CA-Net's noise (drawn from the global RNG, as the reference draws it) from a forked
        global RNG seeded with it, so the caller's RNG state is left as it was. With ``seeds`` (one
        per caption) each image draws z and CA-Net's noise from its own seed instead
        (:func:`seeded_noise`): image n is then a function of caption n and ``seeds[n]`` alone,
        the same in any batch. With ``sentence_mix = (others, weights)`` caption n's sentence
        feature is blended towards that of ``others[n]`` by ``weights[n]`` (0: its own, 1: the
        other's), for walks between captions."""
        if seeds is not None:
            if len(seeds) != len(captions):
                raise ValueError(f"{len(seeds)} seeds for {len(captions)} captions")
            if noise is not None:
                raise ValueError("give seeds or noise, not both")
        generator = torch.Generator().manual_seed(seed)
        stages: list[list[Tensor]] = []
        maps: list[list[Tensor]] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(captions), batch_size):
                part = captions[start : start + batch_size]
                words_emb, sent_emb, mask = self.encode(part.indices, part.lengths)
                if sentence_mix is not None:
                    others, weights = sentence_mix[0][start : start + batch_size], sentence_mix[1]
                    other_sent = self.encode(others.indices, others.lengths)[1]
                    blend = weights[start : start + batch_size].to(sent_emb)[:, None]
                    sent_emb = torch.lerp(sent_emb, other_sent, blend)
                hook = None
                if seeds is not None:
                    z, eps = seeded_noise(
                        seeds[start : start + batch_size],
                        self.cfg.model.z_dim,
                        self.netG.ca_net.c_dim,
                        truncation,
                    )
                    hook = self.netG.ca_net.register_forward_hook(_with_ca_noise(eps))
                elif noise is None:
                    z = truncated_noise(len(part), self.cfg.model.z_dim, truncation, generator)
                else:
                    z = noise[start : start + batch_size]
                z = z.to(self.device)
                try:
                    imgs, att, _, _ = self.netG(
                        z, sent_emb, words_emb, mask, return_attention=return_attention
                    )
                finally:
                    if hook is not None:
                        hook.remove()
                stages.append([i.float().cpu() for i in imgs])
                maps.append([a.float().cpu() for a in att])
        return [torch.cat(s) for s in zip(*stages)], [torch.cat(m) for m in zip(*maps)]


def _with_ca_noise(eps: Tensor) -> Any:
    """A forward hook for CA-Net that redoes its sample c = μ + s ε ⊙ exp(½ log σ²) with the given ε
    (one row per image) in place of the batch's draw from the global RNG."""

    def hook(module: nn.Module, inputs: Any, output: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
        _, mu, logvar = output
        scale = getattr(module, "noise_scale", 1.0)
        return mu + eps.to(mu) * (scale * torch.exp(0.5 * logvar)), mu, logvar

    return hook
