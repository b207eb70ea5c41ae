"""A trained text-to-image model for inference: checkpoint → captions → images (and attention).

A training checkpoint (``runs/<preset>/checkpoints/latest.pt``) holds everything needed: the
config, the generator and its EMA, the frozen DAMSM encoders and the vocabulary; so do converted
reference models and exports (:mod:`dmgan.checkpoint` has the formats).

    pipe = TextToImage.load("runs/shapes/checkpoints/latest.pt")
    captions = pipe.tokenize(["a large red circle in the top left"])
    images, attention = pipe.generate(captions, seed=0, return_attention=True)
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dmgan import checkpoint
from dmgan.config import Config, config_from_dict
from dmgan.data import Vocabulary, subsample_caption
from dmgan.ema import ParameterEMA
from dmgan.models import G_NET, build_image_encoder, build_text_encoder


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

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        weights: str = "ema",
        memory_backend: str = "auto",
    ) -> TextToImage:
        """A training checkpoint, a converted reference model (both ``.pt``) or an exported model
        folder. ``weights``: "ema" (the averaged generator, what the reference samples with) or
        "raw" (the same for converted and exported models, which hold only one).
        ``memory_backend``: how the dynamic-memory op runs here (:data:`dmgan.ops.BACKENDS`),
        whatever the model was trained with."""
        if weights not in ("ema", "raw"):
            raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
        state = checkpoint.read_model(path)
        cfg = config_from_dict(state["config"])
        netG = G_NET(cfg.model, memory_backend=memory_backend)
        netG.load_state_dict(state["gan"]["netG"])
        if (
            weights == "ema" and "ema" in state["gan"]
        ):  # converted and exported models hold the average already
            ema = ParameterEMA(netG)
            ema.load_state_dict(state["gan"]["ema"])
            ema.copy_to(netG)
        vocab = Vocabulary.from_list(state["vocab"])
        text_encoder = build_text_encoder(cfg.model, len(vocab))
        text_encoder.load_state_dict(state["text_encoder"])
        image_encoder = build_image_encoder(cfg.model.image_encoder, cfg.model.embedding_dim)
        image_encoder.load_state_dict(state["image_encoder"])
        modules = [m.to(device).eval().requires_grad_(False) for m in (netG, text_encoder, image_encoder)]
        return cls(cfg, *modules, vocab, state.get("data_dir"))  # type: ignore[arg-type]

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
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Images of every stage (each N x 3 x S x S in [-1, 1], on the CPU) and, when asked, the
        key-addressing maps of each refinement stage (N x T x s x s).

        A function of ``seed``: z comes from a generator seeded with it (or is ``noise``, N x z),
        and CA-Net's noise (drawn from the global RNG, as the reference draws it) from a forked
        global RNG seeded with it, so the caller's RNG state is left as it was. With
        ``sentence_mix = (others, weights)`` caption n's sentence feature is blended towards that
        of ``others[n]`` by ``weights[n]`` (0: its own, 1: the other's), for walks between captions."""
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
                if noise is None:
                    z = truncated_noise(len(part), self.cfg.model.z_dim, truncation, generator)
                else:
                    z = noise[start : start + batch_size]
                z = z.to(self.device)
                imgs, att, _, _ = self.netG(z, sent_emb, words_emb, mask, return_attention=return_attention)
                stages.append([i.float().cpu() for i in imgs])
                maps.append([a.float().cpu() for a in att])
        return [torch.cat(s) for s in zip(*stages)], [torch.cat(m) for m in zip(*maps)]
