"""The built-in ``shapes`` dataset: procedurally drawn objects with captions from a small grammar.

Every image holds one object (sometimes a second, smaller one) of a shape, colour, size and
position on a plain background, and gets ten captions drawn from a grammar with synonyms and
varied word order, e.g. "a small red circle in the top left on a gray background". Everything is
deterministic from a seed and written in the AttnGAN (COCO-style) layout the real datasets use::

    root/images/<key>.png            76 x 76 RGB (the loader resizes/crops like the reference)
    root/text/<key>.txt              10 captions, one per line
    root/{train,test}/filenames.pickle
    root/{train,test}/class_info.pickle
    root/captions.pickle             built by the loader's code, as for CUB / COCO
    root/attributes.json             per image: the attributes of its main object (for the
                                     attribute classifier and caption accuracy)

so ``python train.py`` exercises the same loader code path as CUB and COCO. The class id of an
image is its main object's (colour, shape) combination.

    >>> scene = sample_scene(random.Random(0))
    >>> scene.objects[0].colour in COLOURS and scene.objects[0].shape in SHAPES
    True
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from dmgan.progress import progress

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "pink": (240, 80, 200),
    "cyan": (40, 220, 230),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")

# Words a caption may use for each attribute value (the first is the canonical one).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
    "center": ("center", "middle"),
    "gray": ("gray", "grey"),
}

CANVAS = 76  # = 64 * 76 / 64: the loader's resize-then-random-crop leaves the layout intact
_CENTRES = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
_RADIUS = {"small": (0.11, 0.14), "large": (0.19, 0.24)}  # fraction of the canvas side


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]  # the first is the main object; a second one is smaller
    background: str


def class_id(obj: ShapeObject) -> int:
    """1-based id of the (colour, shape) combination, like CUB's 1..200 class ids."""
    return 1 + list(COLOURS).index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)


def sample_scene(rng: random.Random, second_object_prob: float = 0.25) -> Scene:
    main = ShapeObject(
        rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), rng.choice(POSITIONS)
    )
    objects = [main]
    if rng.random() < second_object_prob:
        corners = [p for p in POSITIONS if p not in (main.position, "center")]
        objects.append(
            ShapeObject(
                rng.choice(SHAPES),
                rng.choice([c for c in COLOURS if c != main.colour]),
                "small",
                rng.choice(corners),
            )
        )
        if main.size == "small":  # the main object stays the bigger one
            objects[0] = ShapeObject(main.shape, main.colour, "large", main.position)
    return Scene(tuple(objects), rng.choice(list(BACKGROUNDS)))


def draw_scene(scene: Scene, rng: random.Random, canvas: int = CANVAS) -> Image.Image:
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in reversed(scene.objects):  # main object on top
        cx, cy = _CENTRES[obj.position]
        cx, cy = (cx + rng.uniform(-0.04, 0.04)) * canvas, (cy + rng.uniform(-0.04, 0.04)) * canvas
        r = rng.uniform(*_RADIUS[obj.size]) * canvas
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[obj.colour])
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            s = r * 0.9
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif obj.shape == "triangle":
            points = [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0, 2.094, 4.189)]
            draw.polygon([(x, y + 0.2 * r) for x, y in points], fill=fill)
        else:  # cross
            w = r * 0.38
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image


def _say(value: str, rng: random.Random) -> str:
    return rng.choice(SYNONYMS.get(value, (value,)))


def canonical_caption(attributes: dict[str, str]) -> str:
    """The caption of a one-object scene in canonical words, from its ``attributes.json`` record.

    >>> canonical_caption({"shape": "circle", "colour": "red", "size": "small",
    ...                    "position": "top left", "background": "gray"})
    'a small red circle in the top left on a gray background'
    """
    a = attributes
    return (
        f"a {a['size']} {a['colour']} {a['shape']} in the {a['position']} on a {a['background']} background"
    )


def describe(scene: Scene, rng: random.Random) -> str:
    """One caption of the scene from the grammar (lower case, no punctuation)."""
    main = scene.objects[0]
    colour, shape = main.colour, _say(main.shape, rng)
    size, where = _say(main.size, rng), _say(main.position, rng)
    bg = _say(scene.background, rng)
    prep = rng.choice(("in the", "at the"))
    if len(scene.objects) > 1:
        other = scene.objects[1]
        second = f"{_say(other.size, rng)} {other.colour} {_say(other.shape, rng)}"
        return rng.choice(
            (
                f"a {size} {colour} {shape} and a {second} on {bg}",
                f"a {colour} {shape} {prep} {where} and a {second}",
                f"a {size} {colour} {shape} next to a {second}",
            )
        )
    return rng.choice(
        (
            f"a {size} {colour} {shape} {prep} {where} on a {bg} background",
            f"a {colour} {shape} {prep} {where}",
            f"{bg} background with a {size} {colour} {shape} {prep} {where}",
            f"there is a {size} {colour} {shape} {prep} {where}",
            f"a {shape} that is {colour} and {size} on {bg}",
            f"{prep} {where} a {colour} {shape} on {bg}",
            f"a {size} {colour} {shape}",
        )
    )


def generate(
    root: str | os.PathLike,
    num_train: int = 4000,
    num_test: int = 500,
    seed: int = 0,
    captions_per_image: int = 10,
) -> Path:
    """Draw the dataset into ``root`` (idempotent: an existing complete dataset is kept)."""
    root = Path(root)
    done = root / "attributes.json"
    if done.is_file():
        return root
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "text").mkdir(exist_ok=True)
    attributes: dict[str, dict] = {}
    for split, count in (("train", num_train), ("test", num_test)):
        keys, classes = [], []
        for i in progress(range(count), desc=f"drawing the {split} images"):
            key = f"{split}_{i:05d}"
            scene = sample_scene(rng)
            draw_scene(scene, rng).save(root / "images" / f"{key}.png")
            captions = [describe(scene, rng) for _ in range(captions_per_image)]
            (root / "text" / f"{key}.txt").write_text("\n".join(captions) + "\n")
            keys.append(key)
            classes.append(class_id(scene.objects[0]))
            attributes[key] = {**asdict(scene.objects[0]), "background": scene.background}
        (root / split).mkdir(exist_ok=True)
        with open(root / split / "filenames.pickle", "wb") as f:
            pickle.dump(keys, f, protocol=2)
        with open(root / split / "class_info.pickle", "wb") as f:
            pickle.dump(classes, f, protocol=2)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(attributes))
    tmp.replace(done)  # written last: its presence marks a complete dataset
    return root


def is_shapes_dataset(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds built-in shapes data (its ``attributes.json`` is written last)."""
    return (Path(root) / "attributes.json").is_file()


def background_words() -> set[str]:
    """Every word a caption may use to name a background colour."""
    return {word for bg in BACKGROUNDS for word in SYNONYMS.get(bg, (bg,))}


def named_attributes(caption: str) -> set[str]:
    """Which of the main object's attributes (and the background) a caption of :func:`describe`
    names: colour and shape always; size, position and background only in some templates. The
    main object is what comes before a second object's "and a" / "next to a".

    >>> sorted(named_attributes("a red circle at the upper left and a small blue square"))
    ['colour', 'position', 'shape']
    >>> sorted(named_attributes("gray background with a big green cross in the middle"))
    ['background', 'colour', 'position', 'shape', 'size']
    """
    text = f" {' '.join(caption.lower().split())} "
    main = text.split(" and a ")[0].split(" next to a ")[0] + " "

    def says(values, where: str) -> bool:
        return any(f" {word} " in where for value in values for word in SYNONYMS.get(value, (value,)))

    found = {"colour": says(COLOURS, main), "shape": says(SHAPES, main), "size": says(SIZES, main)}
    found |= {"position": says(POSITIONS, text), "background": says(BACKGROUNDS, text)}
    return {name for name, said in found.items() if said}


# The attributes a caption may name, with their values (canonical words, as in attributes.json).
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
# Colour, shape and size name the main object only where they come before the second object;
# the grammar gives position to the main object alone and the background to the whole scene.
_MAIN_OBJECT_ONLY = frozenset({"colour", "shape", "size"})


def _phrases(attribute: str) -> list[tuple[tuple[str, ...], str]]:
    """(words, value) of every phrase naming a value of ``attribute``, longest first, so that a
    two-word phrase ("round shape", "upper left") is found before any word inside it."""
    phrases = [
        (tuple(word.split()), value)
        for value in ATTRIBUTE_VALUES[attribute]
        for word in SYNONYMS.get(value, (value,))
    ]
    return sorted(phrases, key=lambda p: -len(p[0]))


def _main_object_end(words: Sequence[str]) -> int:
    """Index of the first word of a second object's phrase ("and a ...", "next to a ..."), or len."""
    for i in range(len(words) - 1):
        if (words[i], words[i + 1]) == ("and", "a") or tuple(words[i : i + 3]) == ("next", "to", "a"):
            return i
    return len(words)


def find_attribute(words: Sequence[str], attribute: str) -> tuple[int, int, str] | None:
    """Where a tokenized caption of :func:`describe` names ``attribute`` of its main object (or
    the background): (first word, one past the last word, canonical value), or None.

    >>> find_attribute("a red circle at the upper left and a small blue square".split(), "size")
    >>> find_attribute("a red circle at the upper left and a small blue square".split(), "position")
    (5, 7, 'top left')
    """
    end = _main_object_end(words) if attribute in _MAIN_OBJECT_ONLY else len(words)
    for phrase, value in _phrases(attribute):
        n = len(phrase)
        for start in range(end - n + 1):
            if tuple(words[start : start + n]) == phrase:
                return start, start + n, value
    return None


def caption_values(words: Sequence[str]) -> dict[str, str]:
    """The attribute values a tokenized caption names (canonical words), e.g. ``{"colour":
    "red", "shape": "circle"}``; the keys are :func:`named_attributes` of the caption."""
    found = {name: find_attribute(words, name) for name in ATTRIBUTE_VALUES}
    return {name: where[2] for name, where in found.items() if where is not None}


def with_value(words: Sequence[str], attribute: str, value: str) -> list[str]:
    """The caption with the phrase naming ``attribute`` replaced by ``value``'s canonical words
    (the caption as it is when it does not name the attribute)."""
    where = find_attribute(words, attribute)
    if where is None:
        return list(words)
    start, end, _ = where
    return [*words[:start], *value.split(), *words[end:]]


# How often each named attribute is the one a counterfactual caption changes: weighted towards
# the attributes the generator ignores (position, background) and away from colour, which every
# other negative already prices.
COUNTERFACTUAL_WEIGHTS: dict[str, float] = {
    "position": 0.35,
    "background": 0.3,
    "shape": 0.2,
    "size": 0.1,
    "colour": 0.05,
}


def counterfactual_caption(
    words: Sequence[str], rng: random.Random, weights: dict[str, float] = COUNTERFACTUAL_WEIGHTS
) -> tuple[list[str], str] | None:
    """The caption with one attribute it names set to another value (the attribute drawn by
    ``weights`` among those named, the value uniformly among the others), and that attribute's
    name; None for a caption that names none (not of this grammar).

    >>> words, changed = counterfactual_caption("a red circle in the center".split(), random.Random(0))
    >>> changed in ("colour", "shape", "position") and words != "a red circle in the center".split()
    True
    """
    named = [name for name in weights if find_attribute(words, name) is not None]
    if not named:
        return None
    attribute = rng.choices(named, weights=[weights[n] for n in named])[0]
    current = caption_values(words)[attribute]
    value = rng.choice([v for v in ATTRIBUTE_VALUES[attribute] if v != current])
    return with_value(words, attribute, value), attribute


def consistent(values: dict[str, str], record: dict[str, str]) -> bool:
    """Whether a caption naming ``values`` (:func:`caption_values`) is true of an image with the
    ``attributes.json`` ``record``: every attribute it names has the image's value."""
    return all(record[name] == value for name, value in values.items())


def grammar_words() -> set[str]:
    """Every word of every attribute value's canonical phrase: what a vocabulary must hold for
    :func:`with_value` captions to be encoded."""
    return {word for values in ATTRIBUTE_VALUES.values() for value in values for word in value.split()}


def recolour_unnamed_backgrounds(
    images: Tensor, captions: Tensor, wordtoix: dict[str, int], tolerance: float = 0.2
) -> Tensor:
    """Give each image whose caption names no background a random background colour (of the three).

    A DAMSM augmentation: such a caption says nothing about the background, so every background
    is a true match. Without it the encoders learn part of "circle" or "square" from the
    background colours those classes happen to be drawn on, and the generator then pleases them
    with a background instead of a shape (docs/experiments.md, "why shape stalls").

    images: B x 3 x S x S in [-1, 1]; captions: B x T word indices (0 = padding). An image's
    background is the palette colour nearest the median of its border pixels, and its background
    pixels are those within ``tolerance`` of it in every channel (object colours are >= 0.4 away;
    bilinear edge pixels keep the old tint). Draws from the global torch RNG.
    """
    palette = torch.tensor(list(BACKGROUNDS.values()), dtype=images.dtype, device=images.device) / 127.5 - 1
    named_ids = torch.tensor(
        sorted(wordtoix[w] for w in background_words() if w in wordtoix),
        dtype=captions.dtype,
        device=captions.device,
    )
    unnamed = ~torch.isin(captions, named_ids).any(1)  # B
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], -1)
    current = (border.median(-1).values[:, None] - palette[None]).abs().amax(-1).argmin(1)  # B
    is_background = (images - palette[current][..., None, None]).abs().amax(1, keepdim=True) < tolerance
    new = palette[torch.randint(len(palette), (len(images),), device=images.device)][..., None, None]
    return torch.where(is_background & unnamed[:, None, None, None], new, images)


def default_root() -> Path:
    """``$DMGAN_DATA/shapes`` or ``~/.cache/dmgan/shapes``."""
    base = os.environ.get("DMGAN_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "dmgan")
    return Path(base) / "shapes"
