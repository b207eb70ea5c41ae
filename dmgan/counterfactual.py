"""Captions of the built-in shapes grammar, edited and compared in batches of word indices.

Two things the shapes preset trains with, both needing the grammar and ``attributes.json``:

- **Counterfactual captions**: each caption with one named attribute word swapped
  (:func:`dmgan.data.shapes.counterfactual_caption`), as extra negatives of the DAMSM loss and of
  the matching-aware discriminators. Without them no negative ever differs from its positive in
  position or background alone, so nothing prices those words.
- **Caption-consistent DAMSM masks**: a pair (caption i, image j) is left out of the DAMSM loss's
  negatives only when caption i is true of image j, instead of whenever the two share a (colour,
  shape) class; a same-class pair that differs in a named position stays a negative.

:meth:`CaptionEditor.for_dataset` gives None (and says so in one line) on other datasets, where
the run goes on without them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from dmgan.config import Config
from dmgan.data import Vocabulary
from dmgan.data import shapes as shapes_data

# The config fields (TrainConfig) that need the grammar and attributes.json.
GRAMMAR_OPTIONS = ("damsm_consistent_mask", "damsm_counterfactuals", "d_counterfactuals")


@dataclass
class CounterfactualBatch:
    """Word indices B x L' of each caption's counterfactual, their lengths B, and which rows hold
    one (False: the caption named nothing to change; its row repeats the caption and must not
    count as a negative)."""

    captions: Tensor
    cap_lens: Tensor
    valid: Tensor


class CaptionEditor:
    """Counterfactuals and consistency masks for captions of ``vocab``'s shapes grammar;
    ``attributes``: ``attributes.json`` by image key (for the masks)."""

    _said: ClassVar[set[str]] = set()  # datasets already reported (DAMSM, then GAN stage)

    def __init__(self, vocab: Vocabulary, attributes: dict[str, dict[str, str]]) -> None:
        self.vocab = vocab
        self.attributes = attributes

    @classmethod
    def for_dataset(cls, root: Path, vocab: Vocabulary, cfg: Config) -> CaptionEditor | None:
        """The editor for the dataset in ``root``, or None when ``cfg`` asks for none of the
        options in :data:`GRAMMAR_OPTIONS`, or (with one line per run naming those it switches
        off) when the dataset is not the built-in one: another dataset has no attributes.json and
        another caption grammar."""
        wanted = [f"train.{name}" for name in GRAMMAR_OPTIONS if getattr(cfg.train, name)]
        if not wanted:
            return None
        why = None
        said = str(root)
        if not shapes_data.is_shapes_dataset(root):
            why = f"{root} has no attributes.json (not the built-in shapes data)"
        elif missing := sorted(shapes_data.grammar_words() - set(vocab.wordtoix)):
            why = f"its vocabulary lacks the shapes grammar's words {missing}"
        if why is not None:
            if said not in cls._said:  # once per run, not once per stage
                cls._said.add(said)
                print(f"shapes-grammar options off: {', '.join(wanted)} ({why})", flush=True)
            return None
        from dmgan.attributes import load_attributes

        return cls(vocab, load_attributes(root))

    def words(self, captions: Tensor, cap_lens: Tensor) -> list[list[str]]:
        """The words of each caption row (padding dropped)."""
        rows, lengths = captions.cpu().tolist(), cap_lens.cpu().tolist()
        return [[self.vocab.ixtoword[i] for i in row[:n]] for row, n in zip(rows, lengths)]

    def indices(self, captions: list[list[str]], width: int = 0) -> tuple[Tensor, Tensor]:
        """Word indices B x max(width, longest) padded with 0, and the lengths."""
        lengths = [len(c) for c in captions]
        out = torch.zeros(len(captions), max([width, *lengths]), dtype=torch.long)
        for row, words in enumerate(captions):
            out[row, : len(words)] = torch.tensor([self.vocab.wordtoix[w] for w in words], dtype=torch.long)
        return out, torch.tensor(lengths, dtype=torch.long)

    def counterfactuals(self, captions: Tensor, cap_lens: Tensor, rng: random.Random) -> CounterfactualBatch:
        """One counterfactual per caption (on the host; move it to the captions' device)."""
        edited, valid = [], []
        for words in self.words(captions, cap_lens):
            found = shapes_data.counterfactual_caption(words, rng)
            edited.append(words if found is None else found[0])
            valid.append(found is not None)
        indices, lengths = self.indices(edited, captions.shape[1])
        return CounterfactualBatch(indices, lengths, torch.tensor(valid))

    def consistent_pairs(self, captions: Tensor, cap_lens: Tensor, keys: list[str]) -> Tensor:
        """B x B bool, [i, j] True when caption i (of image keys[i]) is true of image keys[j]
        and i != j: the pairs a caption-consistent DAMSM loss leaves out of its negatives."""
        values = [shapes_data.caption_values(w) for w in self.words(captions, cap_lens)]
        records = [self.attributes[k] for k in keys]
        pairs = torch.tensor([[shapes_data.consistent(v, r) for r in records] for v in values])
        return pairs & ~torch.eye(len(keys), dtype=torch.bool)
