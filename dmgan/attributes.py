"""Attribute classifier for the built-in ``shapes`` data: reads an image's main object.

Trained on real ``shapes`` images, it predicts the main object's colour, shape, size and position
and the background; applied to generated images it measures whether they follow their captions
(caption accuracy: the fraction of generated images whose predicted attribute equals the
caption's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmgan.data.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}


def attribute_targets(records: list[dict]) -> dict[str, Tensor]:
    """Per attribute, the class index of each record (a dict as in ``attributes.json``)."""
    return {
        name: torch.tensor([values.index(r[name]) for r in records]) for name, values in ATTRIBUTES.items()
    }


class AttributeClassifier(nn.Module):
    """Conv net on 64 x 64 images in [-1, 1] (other sizes are resized) with one head per attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.trunk = nn.Sequential(
            block(3, width), block(width, width), block(width, 2 * width), block(2 * width, 2 * width)
        )  # 64 → 4
        self.heads = nn.ModuleDict(
            {name: nn.Linear(2 * width * 16, len(values)) for name, values in ATTRIBUTES.items()}
        )

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.shape[-1] != 64 or images.shape[-2] != 64:
            images = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
        x = self.trunk(images).flatten(1)
        return {name: head(x) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
        self.eval()
        chunks = [self(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return {name: torch.cat([c[name] for c in chunks]).argmax(1) for name in ATTRIBUTES}


def load_attributes(root: str | os.PathLike) -> dict[str, dict]:
    path = Path(root) / "attributes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: attribute labels exist only for the built-in shapes data")
    return json.loads(path.read_text())


def train_classifier(
    images: Tensor, targets: dict[str, Tensor], epochs: int = 4, batch_size: int = 64, seed: int = 0
) -> AttributeClassifier:
    """Fit a classifier to N x 3 x 64 x 64 images in [-1, 1] and their attribute targets."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AttributeClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=generator).split(batch_size):
            logits = model(images[idx])
            loss = sum(F.cross_entropy(logits[n], targets[n][idx]) for n in ATTRIBUTES)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(predictions: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, float]:
    """Per attribute, the fraction of predictions equal to the target."""
    return {name: (predictions[name] == targets[name]).float().mean().item() for name in predictions}


def accuracy_where_named(
    predictions: dict[str, Tensor], targets: dict[str, Tensor], named: list[set[str]]
) -> dict[str, dict[str, float | int]]:
    """Per attribute, the accuracy over the images whose caption names it (``named[i]``: what
    image i's caption names), with how many those are and the chance level."""
    out = {}
    for name, values in ATTRIBUTES.items():
        keep = torch.tensor([name in n for n in named], dtype=torch.bool)
        hits = (predictions[name] == targets[name])[keep]
        rate = hits.float().mean().item() if len(hits) else float("nan")
        out[name] = {"accuracy": rate, "captions": int(keep.sum()), "chance": 1 / len(values)}
    return out


# The reading of an object: pixels further than this from the background colour in some channel
# (images in [-1, 1]; the palette's object colours are >= 0.4 from every background, edges less).
OBJECT_THRESHOLD = 0.5
# Two stages place the object alike when their centroids lie within this fraction of the side:
# half the distance from a corner's centre to the image centre.
CENTROID_TOLERANCE = 0.15


def read_layout(images: Tensor) -> dict[str, Tensor]:
    """What a generated image shows of its layout, read without a classifier (so that every stage,
    even the 8-pixel one, is read the same way): per image of N x 3 x S x S in [-1, 1], the
    background (index into BACKGROUNDS: the palette colour nearest the median of the border
    pixels), the object's centroid (x, y in [0, 1] of the side, the mean of the pixels
    :data:`OBJECT_THRESHOLD` away from the background; (0.5, 0.5) when there are none), its
    position (index into POSITIONS: the nearest position centre), its colour (index into COLOURS:
    nearest to the object pixels' median) and whether any object pixel was found."""
    from dmgan.data.shapes import _CENTRES

    images = images.float()
    n, _, size, _ = images.shape
    palette = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32) / 127.5 - 1
    colours = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], -1
    )
    border_colour = border.median(-1).values  # N x 3
    background = torch.cdist(border_colour, palette).argmin(1)
    is_object = (images - border_colour[..., None, None]).abs().amax(1) > OBJECT_THRESHOLD  # N x S x S
    ramp = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    count = is_object.sum((1, 2))
    found = count > 0
    weight = is_object.float() / count.clamp(min=1)[:, None, None]
    centroid = torch.stack(
        [(weight * ramp[None, None, :]).sum((1, 2)), (weight * ramp[None, :, None]).sum((1, 2))], 1
    )
    centroid = torch.where(found[:, None], centroid, torch.full_like(centroid, 0.5))
    centres = torch.tensor([_CENTRES[p] for p in POSITIONS])
    position = torch.cdist(centroid, centres).argmin(1)
    pixels = images.permute(0, 2, 3, 1)  # N x S x S x 3
    object_colour = torch.stack(
        [pixels[i][is_object[i]].median(0).values if found[i] else border_colour[i] for i in range(n)]
    )
    colour = torch.cdist(object_colour, colours).argmin(1)
    return {
        "background": background,
        "centroid": centroid,
        "position": position,
        "colour": colour,
        "found": found,
    }


def stage_agreement(
    layouts: list[dict[str, Tensor]], targets: dict[str, Tensor], named: list[set[str]]
) -> dict[str, object]:
    """Do the stages refine one picture? ``layouts``: :func:`read_layout` of each stage's images
    (N each); ``targets``: the captions' attribute indices (:func:`attribute_targets`); ``named``:
    what each caption names. Between each stage and the one before: how often the background
    agrees, the centroids lie within :data:`CENTROID_TOLERANCE` (both with an object found), and
    both. Per stage: how often its background, position and colour as read here match the
    caption, over the captions that name them."""
    between = []
    for before, after in zip(layouts, layouts[1:]):
        background = before["background"] == after["background"]
        close = (before["centroid"] - after["centroid"]).norm(dim=1) <= CENTROID_TOLERANCE
        centroid = close & before["found"] & after["found"]
        between.append(
            {
                "background": background.float().mean().item(),
                "centroid": centroid.float().mean().item(),
                "both": (background & centroid).float().mean().item(),
            }
        )
    per_stage = []
    for layout in layouts:
        matches = {}
        for name in ("background", "position", "colour"):
            keep = torch.tensor([name in n for n in named], dtype=torch.bool)
            hits = (layout[name] == targets[name])[keep]
            matches[name] = hits.float().mean().item() if len(hits) else float("nan")
        per_stage.append(matches)
    return {
        "each_stage_with_the_one_before": between,
        "each_stage_matches_the_caption": per_stage,
        "reading": f"background: palette colour nearest the border's median; object: pixels over "
        f"{OBJECT_THRESHOLD} from it, centroids agreeing within {CENTROID_TOLERANCE} of the side",
    }
