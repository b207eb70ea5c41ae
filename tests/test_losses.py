"""Losses against line-by-line ports of the reference (miscc/losses.py, GlobalAttention.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dmgan.ema import ParameterEMA
from dmgan.losses import (
    damsm_loss,
    discriminator_loss,
    generator_loss,
    kl_loss,
    sent_loss,
    stage_consistency_loss,
    words_loss,
)
from dmgan.models import D_NET, SMALL_CNN_ENCODER

GAMMA1, GAMMA2, GAMMA3 = 4.0, 5.0, 10.0


def ref_cosine_similarity(x1, x2, dim=1, eps=1e-8):
    w12 = torch.sum(x1 * x2, dim)
    w1 = torch.norm(x1, 2, dim)
    w2 = torch.norm(x2, 2, dim)
    return (w12 / (w1 * w2).clamp(min=eps)).squeeze()


def ref_func_attention(query, context, gamma1):
    batch_size, query_len = query.size(0), query.size(2)
    ih, iw = context.size(2), context.size(3)
    source_len = ih * iw
    context = context.view(batch_size, -1, source_len)
    context_T = torch.transpose(context, 1, 2).contiguous()
    attn = torch.bmm(context_T, query).view(batch_size * source_len, query_len)
    attn = torch.softmax(attn, dim=1).view(batch_size, source_len, query_len)
    attn = torch.transpose(attn, 1, 2).contiguous().view(batch_size * query_len, source_len)
    attn = torch.softmax(attn * gamma1, dim=1).view(batch_size, query_len, source_len)
    attn_T = torch.transpose(attn, 1, 2).contiguous()
    return torch.bmm(context, attn_T), attn.view(batch_size, -1, ih, iw)


def ref_words_loss(img_features, words_emb, labels, cap_lens, class_ids, batch_size):
    masks, att_maps, similarities = [], [], []
    cap_lens = cap_lens.tolist()
    for i in range(batch_size):
        if class_ids is not None:
            mask = (class_ids == class_ids[i]).astype(np.uint8)
            mask[i] = 0
            masks.append(mask.reshape((1, -1)))
        words_num = cap_lens[i]
        word = words_emb[i, :, :words_num].unsqueeze(0).contiguous().repeat(batch_size, 1, 1)
        wei_context, attn = ref_func_attention(word, img_features, GAMMA1)
        att_maps.append(attn[i].unsqueeze(0).contiguous())
        word = word.transpose(1, 2).contiguous().view(batch_size * words_num, -1)
        wei_context = wei_context.transpose(1, 2).contiguous().view(batch_size * words_num, -1)
        row_sim = ref_cosine_similarity(word, wei_context).view(batch_size, words_num)
        row_sim = torch.log(row_sim.mul(GAMMA2).exp().sum(dim=1, keepdim=True))
        similarities.append(row_sim)
    similarities = torch.cat(similarities, 1) * GAMMA3
    if class_ids is not None:
        similarities = similarities.masked_fill(
            torch.from_numpy(np.concatenate(masks, 0)).bool(), -float("inf")
        )
    loss0 = nn.CrossEntropyLoss()(similarities, labels)
    loss1 = nn.CrossEntropyLoss()(similarities.transpose(0, 1), labels)
    return loss0, loss1, att_maps


def ref_sent_loss(cnn_code, rnn_code, labels, class_ids, batch_size, eps=1e-8):
    masks = []
    if class_ids is not None:
        for i in range(batch_size):
            mask = (class_ids == class_ids[i]).astype(np.uint8)
            mask[i] = 0
            masks.append(mask.reshape((1, -1)))
        masks = torch.from_numpy(np.concatenate(masks, 0)).bool()
    cnn_code, rnn_code = cnn_code.unsqueeze(0), rnn_code.unsqueeze(0)
    cnn_code_norm = torch.norm(cnn_code, 2, dim=2, keepdim=True)
    rnn_code_norm = torch.norm(rnn_code, 2, dim=2, keepdim=True)
    scores0 = torch.bmm(cnn_code, rnn_code.transpose(1, 2))
    norm0 = torch.bmm(cnn_code_norm, rnn_code_norm.transpose(1, 2))
    scores0 = (scores0 / norm0.clamp(min=eps) * GAMMA3).squeeze()
    if class_ids is not None:
        scores0 = scores0.masked_fill(masks, -float("inf"))
    return nn.CrossEntropyLoss()(scores0, labels), nn.CrossEntropyLoss()(scores0.transpose(0, 1), labels)


@pytest.mark.parametrize("class_ids", [None, np.array([3, 1, 3, 2, 1])])
def test_words_loss_equals_the_reference_loop(class_ids):
    batch, dim, num_words = 5, 16, 7
    regions = torch.randn(batch, dim, 4, 3, requires_grad=True)
    words = torch.randn(batch, dim, num_words, requires_grad=True)
    cap_lens = torch.tensor([7, 3, 5, 1, 6])
    labels = torch.arange(batch)
    ids = None if class_ids is None else torch.from_numpy(class_ids)
    gammas = (GAMMA1, GAMMA2, GAMMA3)
    got0, got1, got_att = words_loss(regions, words, labels, cap_lens, ids, *gammas, return_attention=True)
    want0, want1, want_att = ref_words_loss(regions, words, labels, cap_lens, class_ids, batch)
    torch.testing.assert_close(got0, want0)
    torch.testing.assert_close(got1, want1)
    assert got_att.shape == (batch, num_words, 4, 3)
    for i in range(batch):
        torch.testing.assert_close(got_att[i, : cap_lens[i]], want_att[i][0])
    # Training asks for no attention: the same losses, bit for bit, and no attention made.
    train0, train1, no_att = words_loss(regions, words, labels, cap_lens, ids, *gammas)
    assert no_att is None and torch.equal(train0, got0) and torch.equal(train1, got1)
    g_got = torch.autograd.grad(got0 + 2 * got1, (regions, words))
    g_want = torch.autograd.grad(want0 + 2 * want1, (regions, words))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("class_ids", [None, np.array([0, 0, 1, 2])])
def test_sent_loss_equals_the_reference(class_ids):
    cnn, rnn = torch.randn(4, 8), torch.randn(4, 8)
    labels = torch.arange(4)
    ids = None if class_ids is None else torch.from_numpy(class_ids)
    for got, want in zip(
        sent_loss(cnn, rnn, labels, ids, GAMMA3), ref_sent_loss(cnn, rnn, labels, class_ids, 4)
    ):
        torch.testing.assert_close(got, want)


def test_same_class_masking_changes_the_loss():
    cnn, rnn = torch.randn(4, 8), torch.randn(4, 8)
    labels = torch.arange(4)
    plain = sent_loss(cnn, rnn, labels, None)[0]
    masked = sent_loss(cnn, rnn, labels, torch.tensor([0, 0, 1, 1]))[0]
    assert masked < plain  # fewer competitors


def test_kl_is_a_mean_over_batch_and_dimensions():
    mu, logvar = torch.randn(6, 10), torch.randn(6, 10)
    per_element = 0.5 * (mu**2 + logvar.exp() - 1 - logvar)
    torch.testing.assert_close(kl_loss(mu, logvar), per_element.mean())
    assert kl_loss(torch.zeros(2, 3), torch.zeros(2, 3)) == 0


class FixedD(nn.Module):
    """A 'discriminator' whose heads return chosen logits, to check the loss weights."""

    def __init__(self, cond_logit, uncond_logit):
        super().__init__()

        def cond(code, s, pairs=None):
            count = code.shape[0] if pairs is None else len(pairs[0])
            return torch.full((count,), cond_logit) + 0 * s.sum()

        self.COND_DNET = cond
        self.UNCOND_DNET = lambda code: torch.full((code.shape[0],), uncond_logit)

    def forward(self, x):
        return x


def bce(logit, target):
    p = torch.sigmoid(torch.tensor(logit))
    return float(-(target * torch.log(p) + (1 - target) * torch.log(1 - p)))


def test_discriminator_loss_weights_are_the_references():
    imgs, sent = torch.randn(4, 3, 8, 8), torch.randn(4, 5)
    loss = discriminator_loss(FixedD(0.7, -0.4), imgs, imgs, sent)
    real, cond_real = bce(-0.4, 1), bce(0.7, 1)
    fake, cond_fake, cond_wrong = bce(-0.4, 0), bce(0.7, 0), bce(0.7, 0)
    assert float(loss) == pytest.approx(
        (real + cond_real) / 2 + (fake + cond_fake + cond_wrong) / 3, rel=1e-5
    )


def test_discriminator_loss_on_a_real_discriminator_backpropagates():
    netD = D_NET(32, ndf=8, nef=6)
    real, fake = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32, requires_grad=True)
    loss = discriminator_loss(netD, real, fake, torch.randn(3, 6))
    loss.backward()
    assert fake.grad is None  # fakes are detached for the D step
    assert all(torch.isfinite(p.grad).all() for p in netD.parameters() if p.requires_grad)


def generator_loss_inputs() -> tuple:
    """A DAMSM image encoder, two fixed Ds (logits 0.3 / -1.2 and -0.5 / 2.0), 16- and 32-pixel
    fakes, words, sentence and lengths of 3 captions."""
    encoder = SMALL_CNN_ENCODER(6).eval()
    netsD = [FixedD(0.3, -1.2), FixedD(-0.5, 2.0)]
    fakes = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 32, 32)]
    return encoder, netsD, fakes, torch.randn(3, 6, 4), torch.randn(3, 6), torch.tensor([4, 2, 3])


def test_generator_loss_sums_stages_and_adds_lambda_damsm():
    encoder, netsD, fakes, words, sent, lens = generator_loss_inputs()
    with torch.no_grad():
        total, parts = generator_loss(netsD, encoder, fakes, words, sent, lens, None, damsm_lambda=5.0)
        w, s = damsm_loss(encoder, fakes[-1], words, sent, lens, None)
    adv = bce(0.3, 1) + bce(-1.2, 1) + bce(-0.5, 1) + bce(2.0, 1)
    assert float(total) == pytest.approx(adv + 5.0 * float(w + s), rel=1e-5)
    assert set(parts) == {"g_adv0", "g_adv1", "g_words", "g_sent"}


def test_stage_consistency_pulls_each_stage_towards_the_next_at_half_size():
    top = torch.rand(2, 3, 32, 32) * 2 - 1
    middle = torch.nn.functional.avg_pool2d(top, 2)
    bottom = torch.nn.functional.avg_pool2d(middle, 2)
    assert float(stage_consistency_loss([bottom, middle, top])) == pytest.approx(0.0, abs=1e-7)

    # a repainted background in the middle stage: that stage is pulled back, the larger one is not
    middle = middle.clone().fill_(-1.0).requires_grad_()
    top = top.clone().requires_grad_()
    loss = stage_consistency_loss([bottom, middle, top])
    expected = (middle - torch.nn.functional.avg_pool2d(top, 2)).abs().mean() + (
        bottom - torch.nn.functional.avg_pool2d(middle, 2)
    ).abs().mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6) and float(loss) > 0.1
    loss.backward()
    assert top.grad is None or not top.grad.any()
    assert middle.grad is not None and middle.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="each stage must double"):
        stage_consistency_loss([torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 24, 24)])


def test_generator_loss_adds_the_weighted_stage_consistency():
    encoder, netsD, fakes, words, sent, lens = generator_loss_inputs()
    with torch.no_grad():
        plain, _ = generator_loss(netsD, encoder, fakes, words, sent, lens, None)
        total, parts = generator_loss(netsD, encoder, fakes, words, sent, lens, None, stage_consistency=2.5)
    assert float(parts["g_consistency"]) == pytest.approx(2.5 * float(stage_consistency_loss(fakes)))
    assert float(total) == pytest.approx(float(plain) + float(parts["g_consistency"]), rel=1e-5)


def test_losses_stay_finite_under_bf16_autocast():
    netD = D_NET(32, ndf=8, nef=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = discriminator_loss(
            netD, torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 6)
        )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_ema_follows_the_reference_update_and_swaps_weights():
    model = nn.Linear(3, 2)
    ema = ParameterEMA(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for avg, p0, p in zip(ema.params, start, model.parameters()):
        torch.testing.assert_close(avg, 0.9 * p0 + 0.1 * p.detach())
    raw = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_into(model):
        torch.testing.assert_close(model.weight, ema.params[0])
    torch.testing.assert_close(model.weight, raw[0])
    restored = ParameterEMA(nn.Linear(3, 2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and torch.equal(restored.params[1], ema.params[1])
