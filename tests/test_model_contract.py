"""The parameter table of the project's founding write-up (its "seed": the description of DM-GAN
this implementation was specified from, with the reference networks' parameter listing; not a
random seed) is a contract: same names, same shapes, same totals; and the state_dict keys of G and
the text encoder are the reference code's, so released checkpoints load."""

from __future__ import annotations

import pytest
import torch

from dmgan.config import get_preset
from dmgan.models import (
    CNN_ENCODER,
    D_NET64,
    D_NET128,
    D_NET256,
    G_NET,
    build_discriminators,
    build_text_encoder,
    count_trainable,
)

# Transcribed from a parameter listing of the reference implementation's networks
# (github.com/MinfengZhu/DM-GAN, code/model.py, as its released netG files hold them); the OCR spaces in some names
# ("h net2.value.0.bias", "img code s64 1.0...", "weight bar") are underscores in the real names.
SEED_G_STAGE1 = """
ca_net.fc.weight 400x256
ca_net.fc.bias 400
h_net1.fc.0.weight 32768x200
h_net1.fc.1.weight 32768
h_net1.fc.1.bias 32768
h_net1.upsample1.1.weight 1024x1024x3x3
h_net1.upsample1.2.weight 1024
h_net1.upsample1.2.bias 1024
h_net1.upsample2.1.weight 512x512x3x3
h_net1.upsample2.2.weight 512
h_net1.upsample2.2.bias 512
h_net1.upsample3.1.weight 256x256x3x3
h_net1.upsample3.2.weight 256
h_net1.upsample3.2.bias 256
h_net1.upsample4.1.weight 128x128x3x3
h_net1.upsample4.2.weight 128
h_net1.upsample4.2.bias 128
img_net1.img.0.weight 3x64x3x3
"""
SEED_G_REFINE = """
h_net{i}.A.weight 1x256
h_net{i}.B.weight 1x64
h_net{i}.M_r.0.weight 128x64x1
h_net{i}.M_r.0.bias 128
h_net{i}.M_w.0.weight 128x256x1
h_net{i}.M_w.0.bias 128
h_net{i}.key.0.weight 64x128x1
h_net{i}.key.0.bias 64
h_net{i}.value.0.weight 64x128x1
h_net{i}.value.0.bias 64
h_net{i}.response_gate.0.weight 1x128x1x1
h_net{i}.response_gate.0.bias 1
h_net{i}.residual.0.block.0.weight 256x128x3x3
h_net{i}.residual.0.block.1.weight 256
h_net{i}.residual.0.block.1.bias 256
h_net{i}.residual.0.block.3.weight 128x128x3x3
h_net{i}.residual.0.block.4.weight 128
h_net{i}.residual.0.block.4.bias 128
h_net{i}.residual.1.block.0.weight 256x128x3x3
h_net{i}.residual.1.block.1.weight 256
h_net{i}.residual.1.block.1.bias 256
h_net{i}.residual.1.block.3.weight 128x128x3x3
h_net{i}.residual.1.block.4.weight 128
h_net{i}.residual.1.block.4.bias 128
h_net{i}.upsample.1.weight 128x128x3x3
h_net{i}.upsample.2.weight 128
h_net{i}.upsample.2.bias 128
img_net{i}.img.0.weight 3x64x3x3
"""
SEED_D256 = """
img_code_s16.0.module.bias 32
img_code_s16.0.module.weight_bar 32x3x4x4
img_code_s16.2.module.bias 64
img_code_s16.2.module.weight_bar 64x32x4x4
img_code_s16.4.module.bias 128
img_code_s16.4.module.weight_bar 128x64x4x4
img_code_s16.6.module.bias 256
img_code_s16.6.module.weight_bar 256x128x4x4
img_code_s32.0.module.bias 512
img_code_s32.0.module.weight_bar 512x256x4x4
img_code_s64.0.module.bias 1024
img_code_s64.0.module.weight_bar 1024x512x4x4
img_code_s64_1.0.module.bias 512
img_code_s64_1.0.module.weight_bar 512x1024x3x3
img_code_s64_2.0.module.bias 256
img_code_s64_2.0.module.weight_bar 256x512x3x3
UNCOND_DNET.outlogits.0.weight 1x256x4x4
UNCOND_DNET.outlogits.0.bias 1
COND_DNET.jointConv.0.module.bias 256
COND_DNET.jointConv.0.module.weight_bar 256x512x3x3
COND_DNET.outlogits.0.weight 1x256x4x4
COND_DNET.outlogits.0.bias 1
"""


def parse_table(text: str) -> dict[str, tuple[int, ...]]:
    rows = (line.split() for line in text.splitlines() if line.strip())
    return {name: tuple(int(d) for d in shape.split("x")) for name, shape in rows}


SEED_G = parse_table(SEED_G_STAGE1 + SEED_G_REFINE.format(i=2) + SEED_G_REFINE.format(i=3))


def trainable_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def bird_generator() -> G_NET:
    return G_NET(get_preset("bird").model)


def test_bird_generator_is_exactly_the_seed_table(bird_generator):
    assert count_trainable(bird_generator) == 21_449_042
    assert sum(torch.Size(s).numel() for s in SEED_G.values()) == 21_449_042
    assert trainable_shapes(bird_generator) == SEED_G


def test_bird_d256_is_exactly_the_seed_table():
    netD = D_NET256(ndf=32, nef=256)
    assert count_trainable(netD) == 18_264_546
    assert trainable_shapes(netD) == parse_table(SEED_D256)


def test_discriminator_totals():
    ds = build_discriminators(get_preset("bird").model)
    assert [count_trainable(d) for d in ds] == [1_878_242, 5_155_810, 18_264_546]
    assert sum(count_trainable(d) for d in ds) == 25_298_598
    assert [type(d).__name__ for d in ds] == ["D_NET"] * 3
    assert [d.image_size for d in (D_NET64(), D_NET128(), D_NET256())] == [64, 128, 256]


def test_coco_generator_total():
    assert count_trainable(G_NET(get_preset("coco").model)) == 22_335_314


def reference_g_keys(r_num: int = 2) -> set[str]:
    """G_NET's state_dict keys as the reference code names them (parameters and BN buffers)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"ca_net.fc.weight", "ca_net.fc.bias", "h_net1.fc.0.weight"}
    keys |= {f"h_net1.fc.1.{k}" for k in bn}
    for u in range(1, 5):
        keys |= {f"h_net1.upsample{u}.1.weight"} | {f"h_net1.upsample{u}.2.{k}" for k in bn}
    for i in (2, 3):
        p = f"h_net{i}"
        keys |= {f"{p}.A.weight", f"{p}.B.weight", f"{p}.response_gate.0.weight", f"{p}.response_gate.0.bias"}
        keys |= {f"{p}.{m}.0.{k}" for m in ("M_r", "M_w", "key", "value") for k in ("weight", "bias")}
        for r in range(r_num):
            keys |= {f"{p}.residual.{r}.block.0.weight", f"{p}.residual.{r}.block.3.weight"}
            keys |= {f"{p}.residual.{r}.block.{j}.{k}" for j in (1, 4) for k in bn}
        keys |= {f"{p}.upsample.1.weight"} | {f"{p}.upsample.2.{k}" for k in bn}
    keys |= {f"img_net{i}.img.0.weight" for i in (1, 2, 3)}
    return keys


def test_generator_state_dict_keys_are_the_references(bird_generator):
    assert set(bird_generator.state_dict()) == reference_g_keys(r_num=2)
    assert set(G_NET(get_preset("coco").model).state_dict()) == reference_g_keys(r_num=3)


def test_released_style_generator_checkpoint_loads_strictly(bird_generator):
    """A checkpoint written by the reference (PyTorch 0.4 keys, here without num_batches_tracked and
    without version metadata, as the oldest ones) loads with strict=True and sets every tensor."""
    released = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in bird_generator.state_dict().items()}
    released = {k: v for k, v in released.items() if not k.endswith("num_batches_tracked")}
    fresh = G_NET(get_preset("bird").model)
    fresh.load_state_dict(dict(released), strict=True)
    for k, v in released.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_text_encoder_keys_shapes_and_count():
    te = build_text_encoder(get_preset("bird").model, vocab_size=5450)
    want = {"encoder.weight": (5450, 300)}
    for suffix in ("", "_reverse"):
        want |= {
            f"rnn.weight_ih_l0{suffix}": (512, 300),
            f"rnn.weight_hh_l0{suffix}": (512, 128),
            f"rnn.bias_ih_l0{suffix}": (512,),
            f"rnn.bias_hh_l0{suffix}": (512,),
        }
    assert {k: tuple(v.shape) for k, v in te.state_dict().items()} == want
    assert count_trainable(te) == 2_075_320  # embedding 1,635,000 + LSTM 440,320


def test_image_encoder_keys_and_trainable_count():
    encoder = CNN_ENCODER(256)
    keys = set(encoder.state_dict())
    assert {"emb_features.weight", "emb_cnn_code.weight", "emb_cnn_code.bias"} <= keys
    assert "Mixed_6e.branch7x7dbl_5.conv.weight" in keys and "Mixed_7c.branch_pool.bn.running_var" in keys
    assert not any(k.startswith(("AuxLogits", "fc.")) for k in keys)
    assert count_trainable(encoder) == 721_152  # 768*256 + 2048*256 + 256
