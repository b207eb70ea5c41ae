"""DM-GAN losses: discriminator, generator (adversarial + DAMSM), DAMSM word / sentence, KL.

Weights and conventions are the reference's (``miscc/losses.py``). The one change of form: the
discriminator heads return logits and the BCE terms use ``binary_cross_entropy_with_logits``, which
equals the reference's Sigmoid + BCELoss and stays finite under autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _bce(logits: Tensor, target: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(
        logits.float(), torch.full_like(logits, target, dtype=torch.float32)
    )


def discriminator_loss(
    netD: nn.Module,
    real_imgs: Tensor,
    fake_imgs: Tensor,
    conditions: Tensor,
    counterfactual: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """L_D = (real + cond_real) / 2 + (fake + cond_fake + cond_wrong) / 3.

    cond_wrong pairs image b with caption b+1 (real images 0..B-2, sentences 1..B-1), as the
    reference does, with no class check. With ``counterfactual`` = (sentence codes B x D of each
    caption with one named attribute changed, valid B bool), real image b with counterfactual b
    is a mismatched pair too (the valid ones), and cond_wrong is the mean over all mismatched
    pairs: the reference's pairs almost never differ in position or background alone.
    ``fake_imgs`` is detached here. ``netD`` may be wrapped in DistributedDataParallel.
    """
    batch = real_imgs.shape[0]
    # One forward over real and fake: a DistributedDataParallel D allows one forward per backward.
    features = netD(torch.cat([real_imgs, fake_imgs.detach().to(real_imgs.dtype)]))
    netD = getattr(netD, "module", netD)  # the heads are called on the wrapped module
    # Codes 0..B-1 are the real images, B..2B-1 the fakes; one conditional call scores the
    # matched real, matched fake and mismatched real pairs.
    index = torch.arange(batch, device=features.device)
    image_index = torch.cat([index, index + batch, index[: batch - 1]])
    sentence_index = torch.cat([index, index, index[1:]])
    if counterfactual is not None:  # sentences B..2B-1: the counterfactuals, each with its real image
        conditions = torch.cat([conditions, counterfactual[0].to(conditions.dtype)])
        image_index = torch.cat([image_index, index])
        sentence_index = torch.cat([sentence_index, index + batch])
    logits = netD.COND_DNET(features, conditions, (image_index, sentence_index))
    cond_real, cond_fake, cond_wrong = logits[:batch], logits[batch : 2 * batch], logits[2 * batch :]
    cond_real, cond_fake = _bce(cond_real, 1.0), _bce(cond_fake, 0.0)
    if counterfactual is not None:
        # A weighted mean rather than boolean indexing: no wait for the device to count the rows.
        weight = torch.cat([cond_wrong.new_ones(batch - 1, dtype=torch.float32), counterfactual[1].float()])
        per_pair = F.binary_cross_entropy_with_logits(
            cond_wrong.float(), torch.zeros_like(weight), reduction="none"
        )
        cond_wrong = (per_pair * weight).sum() / weight.sum().clamp(min=1.0)
    elif batch > 1:
        cond_wrong = _bce(cond_wrong, 0.0)
    else:  # no mismatched pair exists in a batch of one
        cond_wrong = cond_fake.new_zeros(())
    if netD.UNCOND_DNET is None:
        return cond_real + (cond_fake + cond_wrong) / 2.0
    real, fake = netD.UNCOND_DNET(features).split(batch)
    real, fake = _bce(real, 1.0), _bce(fake, 0.0)
    return (real + cond_real) / 2.0 + (fake + cond_fake + cond_wrong) / 3.0


def stage_consistency_loss(fake_imgs: Sequence[Tensor]) -> Tensor:
    """Σ_k mean |x_k - sg(pool(x_{k+1}))| over the stages (x_k: B x 3 x S_k x S_k, S_{k+1} = 2 S_k;
    pool: 2 x 2 average; sg: no gradient): each stage drawn as the next one's picture at half the
    side, so the stages refine one picture instead of each choosing its own background. The
    larger stage is the target, not the other way round: it sees the DAMSM loss and the sharper
    D, and pulling it towards its blurrier input would undo them.
    """
    total = fake_imgs[0].new_zeros((), dtype=torch.float32)
    for smaller, larger in zip(fake_imgs, fake_imgs[1:]):
        if larger.shape[-1] != 2 * smaller.shape[-1] or larger.shape[-2] != 2 * smaller.shape[-2]:
            raise ValueError(
                f"stage_consistency_loss: stages of {tuple(smaller.shape[-2:])} and "
                f"{tuple(larger.shape[-2:])} pixels; each stage must double the one before"
            )
        target = F.avg_pool2d(larger.detach().float(), 2)
        total = total + (smaller.float() - target).abs().mean()
    return total


def kl_loss(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) as a **mean** over batch and dimensions (the reference's form)."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())


def _class_mask(class_ids: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
    """B x B, True where samples i != j share a class (those scores are masked out)."""
    if class_ids is None:
        return None
    class_ids = torch.as_tensor(class_ids, device=device).view(-1)
    if class_ids.numel() != batch:
        raise ValueError(f"class_ids must have {batch} entries, got {class_ids.numel()}")
    same = class_ids[:, None] == class_ids[None, :]
    return same & ~torch.eye(batch, dtype=torch.bool, device=device)


def _negatives_mask(
    class_ids: Tensor | None, pair_mask: Tensor | None, batch: int, device: torch.device
) -> Tensor | None:
    """Images x captions, True for the pairs left out of the negatives: ``pair_mask`` (caption i
    true of image j, given as captions x images) when given, else same-class pairs."""
    if pair_mask is None:
        return _class_mask(class_ids, batch, device)
    if pair_mask.shape != (batch, batch):
        raise ValueError(f"pair_mask must be {batch} x {batch}, got {tuple(pair_mask.shape)}")
    return pair_mask.to(device).t() & ~torch.eye(batch, dtype=torch.bool, device=device)


@dataclass
class Counterfactuals:
    """The text features of one counterfactual per caption (one named attribute changed): words
    B x D x T', sentences B x D, lengths B, and which rows hold one (valid B bool)."""

    words: Tensor
    sentence: Tensor
    cap_lens: Tensor
    valid: Tensor


def _with_counterfactual_column(scores: Tensor, own: Tensor, valid: Tensor) -> Tensor:
    """Images x (captions + 1): each image's score with its own caption's counterfactual as one
    more candidate (-inf where there is none)."""
    own = own.masked_fill(~valid.to(own.device), float("-inf"))
    return torch.cat([scores, own[:, None]], 1)


def _cosine(dots: Tensor, norms: Tensor, eps: float = 1e-8) -> Tensor:
    """x1·x2 / max(|x1| |x2|, eps) from the dot products and the products of the norms: the
    reference's form (torch's cosine_similarity clamps each norm instead)."""
    return dots / norms.clamp(min=eps)


def _cross_entropy_both_ways(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return F.cross_entropy(scores, labels), F.cross_entropy(scores.t(), labels)


def words_loss(
    img_features: Tensor,
    words_emb: Tensor,
    labels: Tensor,
    cap_lens: Tensor,
    class_ids: Tensor | None,
    gamma1: float = 4.0,
    gamma2: float = 5.0,
    gamma3: float = 10.0,
    return_attention: bool = False,
    *,
    pair_mask: Tensor | None = None,
    counterfactual: Counterfactuals | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """DAMSM word-level loss, all caption x image pairs at once.

    img_features: B x D x h x w regions v; words_emb: B x D x T words e; only the first
    ``cap_lens[i]`` words of caption i count. For caption i and image j::

        s̄ = softmax_words(e_iᵀ v_j)          α = softmax_regions(γ1 s̄)         c_t = Σ_r α_tr v_r
        R(i, j) = log Σ_t exp(γ2 cos(c_t, e_t))                (the code's form: no 1/γ2)

    ``scores[j, i] = γ3 R(i, j)`` (rows: images), same-class pairs masked to -inf, and the
    losses are the cross-entropies of its rows and of its columns. ``pair_mask`` (captions x
    images, True where caption i is true of image j) replaces the class mask; with
    ``counterfactual``, image i's row also scores caption i's counterfactual as a candidate
    (NegCLIP's hard negatives), the columns stay as they are. Returns (loss0, loss1,
    attention B x T x h x w of each caption over its own image, or None unless
    ``return_attention``: training does not look at it).
    """
    batch = words_emb.shape[0]
    regions = img_features.flatten(2).float()  # B_img x D x R
    scores, attn = _word_scores(words_emb, regions, cap_lens, gamma1, gamma2, gamma3, "idt,jdr->ijtr")
    mask = _negatives_mask(class_ids, pair_mask, batch, words_emb.device)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    rows = scores
    if counterfactual is not None:
        own, _ = _word_scores(
            counterfactual.words, regions, counterfactual.cap_lens, gamma1, gamma2, gamma3, "idt,idr->itr"
        )
        rows = _with_counterfactual_column(scores, own, counterfactual.valid)
    loss0, loss1 = F.cross_entropy(rows, labels), F.cross_entropy(scores.t(), labels)
    if not return_attention:
        return loss0, loss1, None
    # attn[i, i] for every i: a view, so no index tensor (which must live on attn's device).
    own = attn.diagonal(dim1=0, dim2=1).movedim(-1, 0)  # B x T x R
    return loss0, loss1, own.unflatten(2, img_features.shape[2:])


def _word_scores(
    words_emb: Tensor,
    regions: Tensor,
    cap_lens: Tensor,
    gamma1: float,
    gamma2: float,
    gamma3: float,
    pairing: str,
) -> tuple[Tensor, Tensor]:
    """γ3 R(caption, image) (see :func:`words_loss`) and the attention α. ``pairing`` is the
    einsum of the word-region products: every caption with every image ("idt,jdr->ijtr":
    scores image j x caption i, attention i x j x T x R) or caption k with image k only
    ("idt,idr->itr": scores B, attention B x T x R)."""
    words = words_emb.float()
    num_words = words.shape[2]
    valid = torch.arange(num_words, device=words.device)[None, :] < cap_lens.to(words.device)[:, None]
    every = pairing == "idt,jdr->ijtr"
    pad = ~valid[:, None, :, None] if every else ~valid[:, :, None]
    word_axis, region_axis = (2, 3) if every else (1, 2)
    dots = torch.einsum(pairing, words, regions)  # e_t·v_r
    sim = dots.masked_fill(pad, float("-inf")).softmax(dim=word_axis)
    attn = (gamma1 * sim).softmax(dim=region_axis)
    context = torch.einsum("ijtr,jdr->ijtd" if every else "itr,idr->itd", attn, regions)
    # c_t·e_t = Σ_r α_tr (e_t·v_r): from the products above, without a second pass over D.
    word_norms = words.norm(dim=1)[:, None, :] if every else words.norm(dim=1)
    cos = _cosine((attn * dots).sum(region_axis), context.norm(dim=region_axis) * word_norms)
    cos = (gamma2 * cos).masked_fill(~valid[:, None, :] if every else ~valid, float("-inf"))
    scores = gamma3 * torch.logsumexp(cos, dim=word_axis)
    return (scores.t() if every else scores), attn


def sent_loss(
    cnn_code: Tensor,
    rnn_code: Tensor,
    labels: Tensor,
    class_ids: Tensor | None,
    gamma3: float = 10.0,
    *,
    pair_mask: Tensor | None = None,
    counterfactual: Counterfactuals | None = None,
) -> tuple[Tensor, Tensor]:
    """DAMSM sentence-level loss: γ3 cos(image code_j, sentence_i) scores, same-class masked (or
    ``pair_mask``, as in :func:`words_loss`), CE both ways; with ``counterfactual``, image i's
    row also scores caption i's counterfactual."""
    cnn_code, rnn_code = cnn_code.float(), rnn_code.float()
    norms = cnn_code.norm(dim=1)[:, None] * rnn_code.norm(dim=1)[None, :]
    scores = gamma3 * _cosine(cnn_code @ rnn_code.t(), norms)  # image x sentence
    mask = _negatives_mask(class_ids, pair_mask, cnn_code.shape[0], cnn_code.device)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    if counterfactual is None:
        return _cross_entropy_both_ways(scores, labels)
    other = counterfactual.sentence.float()
    own = gamma3 * _cosine((cnn_code * other).sum(1), cnn_code.norm(dim=1) * other.norm(dim=1))
    rows = _with_counterfactual_column(scores, own, counterfactual.valid)
    return F.cross_entropy(rows, labels), F.cross_entropy(scores.t(), labels)


def damsm_loss(
    image_encoder: nn.Module,
    images: Tensor,
    words_emb: Tensor,
    sent_emb: Tensor,
    cap_lens: Tensor,
    class_ids: Tensor | None,
    gammas: tuple[float, float, float] = (4.0, 5.0, 10.0),
    *,
    pair_mask: Tensor | None = None,
    counterfactual: Counterfactuals | None = None,
) -> tuple[Tensor, Tensor]:
    """(word loss, sentence loss), each the sum of both directions, for images and their captions
    (``pair_mask`` and ``counterfactual`` as in :func:`words_loss`)."""
    region_features, cnn_code = image_encoder(images)
    labels = torch.arange(images.shape[0], device=images.device)
    extra = dict(pair_mask=pair_mask, counterfactual=counterfactual)
    w0, w1, _ = words_loss(region_features, words_emb, labels, cap_lens, class_ids, *gammas, **extra)
    s0, s1 = sent_loss(cnn_code, sent_emb, labels, class_ids, gammas[2], **extra)
    return w0 + w1, s0 + s1


def generator_loss(
    netsD: Sequence[nn.Module],
    image_encoder: nn.Module,
    fake_imgs: Sequence[Tensor],
    words_emb: Tensor,
    sent_emb: Tensor,
    cap_lens: Tensor,
    class_ids: Tensor | None,
    damsm_lambda: float = 5.0,
    gammas: tuple[float, float, float] = (4.0, 5.0, 10.0),
    *,
    pair_mask: Tensor | None = None,
    counterfactual: Counterfactuals | None = None,
    stage_consistency: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_stages [BCE(D_u(x̂), 1) + BCE(D_c(x̂, s), 1)] + λ (DAMSM word + sentence) on the last stage
    (``pair_mask`` and ``counterfactual`` as in :func:`words_loss`), plus ``stage_consistency``
    times :func:`stage_consistency_loss` when it is not 0.

    Returns the total and its parts (detached) for logging. Add the KL term separately.
    """
    total = fake_imgs[0].new_zeros((), dtype=torch.float32)
    parts: dict[str, Tensor] = {}
    for i, (netD, fake) in enumerate(zip(netsD, fake_imgs)):
        features = netD(fake)
        g_loss = _bce(netD.COND_DNET(features, sent_emb), 1.0)
        if netD.UNCOND_DNET is not None:
            g_loss = g_loss + _bce(netD.UNCOND_DNET(features), 1.0)
        parts[f"g_adv{i}"] = g_loss.detach()
        total = total + g_loss
    w_loss, s_loss = damsm_loss(
        image_encoder,
        fake_imgs[-1],
        words_emb,
        sent_emb,
        cap_lens,
        class_ids,
        gammas,
        pair_mask=pair_mask,
        counterfactual=counterfactual,
    )
    parts["g_words"] = (damsm_lambda * w_loss).detach()
    parts["g_sent"] = (damsm_lambda * s_loss).detach()
    total = total + damsm_lambda * (w_loss + s_loss)
    if stage_consistency:
        consistency = stage_consistency * stage_consistency_loss(fake_imgs)
        parts["g_consistency"] = consistency.detach()
        total = total + consistency
    return total, parts
