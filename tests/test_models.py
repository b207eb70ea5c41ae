"""Forward and backward of the networks; the memory stage against a literal port of the reference."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dmgan import ops
from dmgan.config import get_preset
from dmgan.models import (
    D_NET,
    G_NET,
    NEXT_STAGE_G,
    RNN_ENCODER,
    SMALL_CNN_ENCODER,
    build_discriminators,
    build_image_encoder,
    load_inception_v3,
)
from dmgan.models.discriminator import D_GET_LOGITS
from dmgan.models.text import CNN_ENCODER
from tests.conftest import random_pad_mask


def g_inputs(cfg, batch=2, lengths=(5, 3)):
    num_words = max(lengths)
    return dict(
        z_code=torch.randn(batch, cfg.z_dim),
        sent_emb=torch.randn(batch, cfg.embedding_dim),
        word_embs=torch.randn(batch, cfg.embedding_dim, num_words),
        mask=random_pad_mask(list(lengths), num_words),
    )


@pytest.mark.parametrize("preset", ["shapes", "bird"])
def test_generator_forward_all_stages_with_attention(preset):
    cfg = get_preset(preset).model
    netG = G_NET(cfg).eval()
    with torch.no_grad():
        imgs, atts, mu, logvar = netG(**g_inputs(cfg), return_attention=True)
    assert [tuple(i.shape) for i in imgs] == [(2, 3, s, s) for s in cfg.image_sizes]
    assert [tuple(a.shape) for a in atts] == [(2, 5, s, s) for s in cfg.image_sizes[:-1]]
    assert all(i.abs().max() <= 1 and torch.isfinite(i).all() for i in imgs)
    for att in atts:  # each pixel's attention is a distribution over its caption's words
        torch.testing.assert_close(att.sum(1), torch.ones_like(att[:, 0]))
        assert att[1, 3:].abs().max() == 0
    assert mu.shape == logvar.shape == (2, cfg.condition_dim)


def test_generator_without_attention_returns_no_maps():
    cfg = get_preset("shapes").model
    _, atts, _, _ = G_NET(cfg)(**g_inputs(cfg))
    assert atts == []


def test_every_trainable_parameter_gets_a_finite_gradient():
    cfg = get_preset("shapes").model
    netG = G_NET(cfg)
    netsD = build_discriminators(cfg)
    inputs = g_inputs(cfg, batch=3, lengths=(5, 2, 4))
    imgs, _, mu, logvar = netG(**inputs)
    loss = mu.square().mean() + logvar.exp().mean()
    for netD, img in zip(netsD, imgs):
        code = netD(img)
        loss = loss + netD.COND_DNET(code, inputs["sent_emb"]).mean() + netD.UNCOND_DNET(code).mean()
    loss.backward()
    for module in [netG, *netsD]:
        for name, p in module.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, name
                assert torch.isfinite(p.grad).all(), name
                assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pairs", [None, ([0, 4, 2, 1, 4], [2, 0, 1, 1, 2])])
def test_conditional_head_equals_the_tiled_joint_conv(pairs):
    """The split image / sentence terms are the reference's conv over cat(h, c tiled), values
    and gradients (float64: the two forms differ only in summation order)."""
    head = D_GET_LOGITS(ndf=4, nef=6, bcondition=True).double()
    reference = copy.deepcopy(head)  # same u, v: both take the same power-iteration step
    h = torch.randn(5, 32, 4, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5 if pairs is None else 3, 6, dtype=torch.float64, requires_grad=True)
    if pairs is None:
        got = head(h, c)
        tiled = torch.cat([h, c.view(-1, 6, 1, 1).expand(-1, -1, 4, 4)], 1)
    else:
        pairs = tuple(torch.tensor(p) for p in pairs)
        got = head(h, c, pairs)
        tiled = torch.cat([h[pairs[0]], c[pairs[1]].view(-1, 6, 1, 1).expand(-1, -1, 4, 4)], 1)
    want = reference.outlogits(reference.jointConv(tiled)).view(-1)
    torch.testing.assert_close(got, want)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), [h, c, head.jointConv[0].module.weight_bar])
    want_grads = torch.autograd.grad((want * weights).sum(), [h, c, reference.jointConv[0].module.weight_bar])
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_conditional_head_refuses_unpaired_batches():
    head = D_GET_LOGITS(ndf=4, nef=6, bcondition=True)
    with pytest.raises(ValueError, match="5 image codes but 3 sentences"):
        head(torch.randn(5, 32, 4, 4), torch.randn(3, 6))
    with pytest.raises(ValueError, match="pairs need the conditional head"):
        D_GET_LOGITS(ndf=4, nef=6)(torch.randn(2, 32, 4, 4), None, (torch.tensor([0]), torch.tensor([0])))


def test_bird_discriminators_forward():
    cfg = get_preset("bird").model
    sent = torch.randn(2, 256)
    for netD, size in zip(build_discriminators(cfg), (64, 128, 256)):
        code = netD(torch.randn(2, 3, size, size))
        assert code.shape == (2, 256, 4, 4)
        assert netD.COND_DNET(code, sent).shape == netD.UNCOND_DNET(code).shape == (2,)


def test_spectral_norm_normalises_the_weight_and_keeps_u_v_out_of_training():
    netD = D_NET(64, ndf=8, nef=16)
    sn = netD.img_code_s16[2]
    for _ in range(30):  # power iterations converge to the top singular pair
        sn.normalized_weight()
    w = sn.normalized_weight().detach().flatten(1)
    assert torch.linalg.matrix_norm(w, ord=2) == pytest.approx(1.0, rel=1e-3)
    names = {n for n, _ in netD.named_parameters()}
    assert "img_code_s16.2.module.weight_bar" in names and "img_code_s16.2.module.weight_u" not in names
    assert "img_code_s16.2.module.weight_u" in netD.state_dict()


def test_discriminator_rejects_wrong_image_size():
    with pytest.raises(
        ValueError, match=r"D_NET64: images must have shape \(B, 3, 64, 64\), got \(2, 3, 32, 32\)"
    ):
        D_NET(64)(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    ("name", "bad", "error", "match"),
    [
        ("z_code", torch.randn(2, 7), ValueError, r"z_code must have shape \(B, 64\)"),
        ("sent_emb", torch.randn(3, 128), ValueError, r"sent_emb must have shape \(B, 128\) = \(2, 128\)"),
        ("word_embs", torch.randn(2, 100, 5), ValueError, r"word_embs must have shape \(B, 128, T\)"),
        (
            "mask",
            torch.zeros(2, 4, dtype=torch.bool),
            ValueError,
            r"mask must have shape \(B, T\) = \(2, 5\)",
        ),
        ("mask", torch.zeros(2, 5, dtype=torch.uint8), TypeError, "mask must be torch.bool"),
        ("word_embs", torch.randn(2, 128, 5, dtype=torch.float64), TypeError, "word_embs is torch.float64"),
    ],
)
def test_generator_rejects_bad_input(name, bad, error, match):
    cfg = get_preset("shapes").model
    inputs = g_inputs(cfg)
    inputs[name] = bad
    with pytest.raises(error, match=match):
        G_NET(cfg)(**inputs)


# ---------------------------------------------------------------------------------------------
# The memory stage against the reference code, ported line by line (model.py: NEXT_STAGE_G and
# Memory), with the stage's own weights.


def reference_stage_forward(stage: NEXT_STAGE_G, h_code, word_embs, mask):
    word_embs_T = torch.transpose(word_embs, 1, 2).contiguous()
    h_code_avg = F.avg_pool2d(h_code, h_code.shape[2]).detach().squeeze(3)
    h_code_avg_T = torch.transpose(h_code_avg, 1, 2).contiguous()
    gate1 = torch.transpose(stage.A(word_embs_T), 1, 2).contiguous()
    gate2 = stage.B(h_code_avg_T).repeat(1, 1, word_embs.size(2))
    writing_gate = torch.sigmoid(gate1 + gate2)
    h_code_avg = h_code_avg.repeat(1, 1, word_embs.size(2))
    memory = stage.M_w(word_embs) * writing_gate + stage.M_r(h_code_avg) * (1 - writing_gate)
    key, value = stage.key(memory), stage.value(memory)
    # Memory.forward
    ih, iw = h_code.size(2), h_code.size(3)
    query_len = ih * iw
    batch_size, source_len = key.size(0), key.size(2)
    target_T = torch.transpose(h_code.view(batch_size, -1, query_len), 1, 2).contiguous()
    weight = torch.bmm(target_T, key).view(batch_size * query_len, source_len)
    weight = weight.masked_fill(mask.repeat(query_len, 1), -float("inf"))
    weight = torch.softmax(weight, dim=1).view(batch_size, query_len, source_len)
    weight = torch.transpose(weight, 1, 2).contiguous()
    memory_out = torch.matmul(value, weight).view(batch_size, -1, ih, iw)
    att = weight.view(batch_size, -1, ih, iw)
    # response gate and refinement
    response_gate = stage.response_gate(torch.cat((h_code, memory_out), 1))
    h_code_new = h_code * (1 - response_gate) + response_gate * memory_out
    out_code = stage.upsample(stage.residual(torch.cat((h_code_new, h_code_new), 1)))
    return out_code, att


@pytest.mark.parametrize("legacy", [True, False])
def test_memory_stage_equals_the_reference_code(legacy):
    stage = NEXT_STAGE_G(ngf=16, nef=24, ncf=8, r_num=2, backend="eager", legacy_mask=legacy).eval()
    h_code = torch.randn(3, 16, 8, 8)
    words = torch.randn(3, 24, 6)
    # Legacy: mixed lengths, where the reference's broadcast matters. Correct mode: the two agree
    # whenever every caption has the longest length, so compare there.
    mask = random_pad_mask([6, 2, 4] if legacy else [6, 6, 6], 6)
    with torch.no_grad():
        out, att = stage(h_code, words, mask, return_attention=True)
        want_out, want_att = reference_stage_forward(stage, h_code, words, mask)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(att, want_att, rtol=1e-5, atol=1e-6)


def test_memory_stage_gradients_equal_the_reference_code_and_detach_rbar():
    """Gradients w.r.t. h and the words match the reference port, which detaches r̄; a version
    that lets gradient through r̄ gives a different gradient for h."""
    stage = NEXT_STAGE_G(ngf=8, nef=12, ncf=4, r_num=1, backend="eager").eval()
    words, mask = torch.randn(2, 12, 3), random_pad_mask([3, 3], 3)
    grads = []
    for forward in (stage, lambda h, w, m: reference_stage_forward(stage, h, w, m)):
        h = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        w = words.clone().requires_grad_()
        forward(h, w, mask)[0].square().sum().backward()
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)

    h = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
    rbar = h.mean(dim=(2, 3))  # not detached
    keys, values = stage_memory_write(stage, words, rbar)
    r_new, _ = stage_memory_read(stage, h, keys, values, mask)
    out = stage.upsample(stage.residual(torch.cat((r_new, r_new), 1)))
    (undetached,) = torch.autograd.grad(out.square().sum(), h)
    assert not torch.allclose(undetached, grads[0][0], rtol=1e-4, atol=1e-6)


def stage_memory_write(stage, words, rbar):
    return ops.memory_write(
        words,
        rbar,
        stage.A.weight,
        stage.B.weight,
        stage.M_w[0].weight,
        stage.M_w[0].bias,
        stage.M_r[0].weight,
        stage.M_r[0].bias,
        stage.key[0].weight,
        stage.key[0].bias,
        stage.value[0].weight,
        stage.value[0].bias,
    )


def stage_memory_read(stage, h, keys, values, mask):
    return ops.memory_read(h, keys, values, mask, stage.response_gate[0].weight, stage.response_gate[0].bias)


# ---------------------------------------------------------------------------------------------
# Text side


def test_rnn_encoder_shapes_and_padding():
    rnn = RNN_ENCODER(50, ninput=16, nhidden=32).eval()
    captions = torch.tensor([[4, 7, 9, 0, 0], [3, 2, 8, 6, 5], [1, 0, 0, 0, 0]])
    lens = torch.tensor([3, 5, 1])
    words, sent = rnn(captions, lens)
    assert words.shape == (3, 32, 5) and sent.shape == (3, 32)
    assert words[0, :, 3:].abs().max() == 0 and words[2, :, 1:].abs().max() == 0
    # the forward direction's last output is the forward half of the sentence feature
    torch.testing.assert_close(sent[0, :16], words[0, :16, 2])
    torch.testing.assert_close(sent[0, 16:], words[0, 16:, 0])
    # same caption alone gives the same features (packing is per sample)
    w_alone, s_alone = rnn(captions[:1, :3], lens[:1])
    torch.testing.assert_close(w_alone, words[:1, :, :3])
    torch.testing.assert_close(s_alone, sent[:1])


def unsorted_packing_forward(rnn, captions, lens, total_length=None):
    """RNN_ENCODER's forward as it was before it sorted on the host (the reference's form):
    pack_padded_sequence(enforce_sorted=False) and pad_packed_sequence."""
    emb = rnn.drop(rnn.encoder(captions))
    packed = pack_padded_sequence(emb, lens, batch_first=True, enforce_sorted=False)
    output, (h_n, _) = rnn.rnn(packed)
    output = pad_packed_sequence(output, batch_first=True, total_length=total_length)[0]
    sent = h_n[-rnn.num_directions :].transpose(0, 1).reshape(captions.shape[0], -1)
    return output.transpose(1, 2), sent


def random_captions(lens, num_words, vocab):
    captions = torch.randint(1, vocab, (len(lens), num_words))
    captions[torch.arange(num_words)[None, :] >= torch.tensor(lens)[:, None]] = 0
    return captions, torch.tensor(lens)


@pytest.mark.parametrize(
    "lens",
    [
        [7, 18, 1, 12, 7, 18, 3, 1, 9, 7],  # the longest (T), 1, ties, in no order
        [18, 12, 9, 7, 7, 3, 1],  # already sorted: no permutation at all
        [5],
    ],
    ids=["shuffled", "sorted", "one"],
)
@pytest.mark.parametrize("total_length", [None, 20])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_rnn_encoder_equals_unsorted_packing(lens, total_length, training):
    """The bird encoder's sizes (what released text encoders load into): the same features, bit
    for bit, and the same gradients, as packing with enforce_sorted=False (dropout draws alike)."""
    rnn = RNN_ENCODER(300, ninput=300, nhidden=256).train(training)
    captions, lens = random_captions(lens, 18, 300)
    outputs, grads = [], []
    for forward in (rnn.forward, lambda *a: unsorted_packing_forward(rnn, *a)):
        torch.manual_seed(1)
        words, sent = forward(captions, lens, total_length)
        rnn.zero_grad()
        (words.square().sum() + sent.sum()).backward()
        outputs.append((words, sent))
        grads.append([p.grad.clone() for p in rnn.parameters()])
    (words, sent), (want_words, want_sent) = outputs
    assert words.shape == (len(lens), 256, total_length or max(lens))
    assert torch.equal(words, want_words) and torch.equal(sent, want_sent)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_rnn_encoder_takes_lengths_on_another_device_than_the_captions():
    """Device captions with host lengths (what the training step passes): meta stands in for
    the device, and the features come out there."""
    rnn = RNN_ENCODER(50, ninput=16, nhidden=32).eval().to("meta")
    captions, lens = random_captions([3, 5, 1], 5, 50)
    words, sent = rnn(captions.to("meta"), lens)
    assert words.device.type == sent.device.type == "meta"
    assert words.shape == (3, 32, 5) and sent.shape == (3, 32)


def test_rnn_encoder_rejects_unknown_words_and_bad_lengths():
    rnn = RNN_ENCODER(10, ninput=8, nhidden=8)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 10\)"):
        rnn(torch.tensor([[3, 12]]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"cap_lens must lie in \[1, 2\]"):
        rnn(torch.tensor([[3, 1]]), torch.tensor([0]))
    with pytest.raises(TypeError, match="captions must be torch.int64"):
        rnn(torch.tensor([[3.0, 1.0]]), torch.tensor([2]))


def test_inception_weights_are_read_from_a_local_file(tmp_path):
    source = load_inception_v3()
    path = tmp_path / "inception_v3_google.pth"
    torch.save(source.state_dict(), path)
    encoder = CNN_ENCODER(32, inception_weights=path)
    torch.testing.assert_close(
        encoder.Mixed_7c.branch_pool.conv.weight, source.Mixed_7c.branch_pool.conv.weight
    )
    assert not any(p.requires_grad for n, p in encoder.named_parameters() if not n.startswith("emb_"))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        CNN_ENCODER(32, inception_weights=tmp_path / "nowhere.pth")


def test_inception_image_encoder_forward():
    encoder = build_image_encoder("inception", 32).eval()
    with torch.no_grad():
        regions, code = encoder(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert regions.shape == (1, 32, 17, 17) and code.shape == (1, 32)


def test_small_image_encoder_forward_and_unknown_kind():
    regions, code = SMALL_CNN_ENCODER(24)(torch.randn(2, 3, 128, 128))
    assert regions.shape == (2, 24, 8, 8) and code.shape == (2, 24)
    with pytest.raises(ValueError, match="unknown image encoder 'vit'"):
        build_image_encoder("vit", 24)


def test_generator_sizes_follow_the_config():
    cfg = dataclasses.replace(get_preset("shapes").model, base_size=16, branch_num=2)
    netG = G_NET(cfg)
    imgs, _, _, _ = netG(**g_inputs(cfg))
    assert [i.shape[-1] for i in imgs] == [16, 32]
    with pytest.raises(ValueError, match="base_size"):
        G_NET(dataclasses.replace(cfg, base_size=24))


@pytest.mark.parametrize("size", [8, 16, 32])
def test_small_discriminators_reach_the_4x4_code(size):
    netD = D_NET(size, ndf=4, nef=8)
    code = netD(torch.randn(2, 3, size, size))
    assert code.shape == (2, 32, 4, 4)
    assert netD.COND_DNET(code, torch.randn(2, 8)).numel() == 2  # one logit per image
    with pytest.raises(ValueError, match="power of two >= 8"):
        D_NET(4)
