"""Issue 30's changes for the shapes preset: counterfactual captions, caption-consistent DAMSM
masks, counterfactual negatives in the DAMSM and D losses, CA-Net's noise scale, the coordinate
image encoder, the evaluation's counterfactual R-precision and stage agreement, and the
shapes-grammar options switching themselves off on another dataset."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dmgan.attributes import ATTRIBUTES, attribute_targets, read_layout, stage_agreement
from dmgan.config import TINY_OVERRIDES, get_preset, override
from dmgan.counterfactual import CaptionEditor
from dmgan.data import Vocabulary
from dmgan.data import shapes as shapes_data
from dmgan.losses import Counterfactuals, _word_scores, discriminator_loss, sent_loss, words_loss
from dmgan.models import D_NET, G_NET, SMALL_CNN_ENCODER, build_image_encoder


def grammar_captions(count: int, seed: int = 0) -> list[tuple[shapes_data.Scene, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        scene = shapes_data.sample_scene(rng)
        out.append((scene, shapes_data.describe(scene, rng)))
    return out


def scene_record(scene: shapes_data.Scene) -> dict[str, str]:
    main = scene.objects[0]
    return {"colour": main.colour, "shape": main.shape, "size": main.size, "position": main.position} | {
        "background": scene.background
    }


# --------------------------------------------------------------------------------------------
# The grammar


def test_caption_values_name_what_named_attributes_names_with_the_scenes_values():
    for scene, caption in grammar_captions(2000):
        values = shapes_data.caption_values(caption.split())
        assert set(values) == shapes_data.named_attributes(caption), caption
        record = scene_record(scene)
        assert values == {k: record[k] for k in values}, caption


def test_a_counterfactual_differs_from_its_caption_in_exactly_one_named_attribute():
    rng = random.Random(1)
    changed_counts: dict[str, int] = {}
    for _, caption in grammar_captions(2000, seed=1):
        words = caption.split()
        edited, changed = shapes_data.counterfactual_caption(words, rng)  # type: ignore[misc]
        before, after = shapes_data.caption_values(words), shapes_data.caption_values(edited)
        assert set(before) == set(after), (caption, edited)
        differ = [name for name in before if before[name] != after[name]]
        assert differ == [changed], (caption, edited)
        # Only that attribute's phrase changed: the words around it are the caption's.
        start, end, _ = shapes_data.find_attribute(words, changed)  # type: ignore[misc]
        new_start, new_end, _ = shapes_data.find_attribute(edited, changed)  # type: ignore[misc]
        assert words[:start] == edited[:new_start] and words[end:] == edited[new_end:]
        changed_counts[changed] = changed_counts.get(changed, 0) + 1
    # Drawn by the weights among the named ones: position and background the most often.
    assert changed_counts["position"] > changed_counts["colour"] * 3
    assert changed_counts["background"] > changed_counts["colour"] * 2


def test_a_second_objects_words_are_not_the_main_objects():
    words = "a red circle at the upper left and a small blue square".split()
    assert shapes_data.caption_values(words) == {"colour": "red", "shape": "circle", "position": "top left"}
    assert shapes_data.with_value(words, "colour", "green")[:3] == ["a", "green", "circle"]
    assert shapes_data.with_value(words, "colour", "green")[-2:] == ["blue", "square"]
    assert shapes_data.counterfactual_caption("a picture of a dog".split(), random.Random(0)) is None


def editor_for(
    captions: list[str], records: dict[str, dict[str, str]]
) -> tuple[CaptionEditor, torch.Tensor, torch.Tensor]:
    words = sorted({w for c in captions for w in c.split()} | shapes_data.grammar_words())
    vocab = Vocabulary.from_list(["<end>", *words])
    editor = CaptionEditor(vocab, records)
    indices, lengths = editor.indices([c.split() for c in captions])
    return editor, indices, lengths


def test_the_consistent_mask_keeps_a_same_class_pair_differing_in_a_named_position_as_a_negative():
    records = {
        "a": {
            "colour": "red",
            "shape": "circle",
            "size": "small",
            "position": "top left",
            "background": "gray",
        },
        "b": {
            "colour": "red",
            "shape": "circle",
            "size": "small",
            "position": "bottom right",
            "background": "gray",
        },
        "c": {
            "colour": "red",
            "shape": "circle",
            "size": "large",
            "position": "center",
            "background": "black",
        },
    }
    captions = ["a red circle in the top left", "a red circle in the bottom right", "a red circle"]
    editor, indices, lengths = editor_for(captions, records)
    pairs = editor.consistent_pairs(indices, lengths, ["a", "b", "c"])
    # All three share the (colour, shape) class, so the class mask leaves no negative at all.
    assert pairs.tolist() == [[False, False, False], [False, False, False], [True, True, False]]


def test_counterfactuals_of_a_batch_encode_back_to_one_changed_attribute():
    captions = ["a large red circle in the top left on a gray background", "a picture"]
    editor, indices, lengths = editor_for(captions, {})
    edited = editor.counterfactuals(indices, lengths, random.Random(0))
    assert edited.valid.tolist() == [True, False]
    new, old = editor.words(edited.captions, edited.cap_lens)[0], captions[0].split()
    before, after = shapes_data.caption_values(old), shapes_data.caption_values(new)
    assert sum(before[k] != after[k] for k in before) == 1


# --------------------------------------------------------------------------------------------
# The losses


def test_paired_word_scores_are_the_diagonal_of_the_all_pairs_scores():
    torch.manual_seed(0)
    words, regions = torch.randn(5, 8, 7), torch.randn(5, 8, 16)
    lengths = torch.tensor([7, 3, 5, 1, 6])
    every, _ = _word_scores(words, regions, lengths, 4.0, 5.0, 10.0, "idt,jdr->ijtr")
    paired, _ = _word_scores(words, regions, lengths, 4.0, 5.0, 10.0, "idt,idr->itr")
    torch.testing.assert_close(paired, every.diagonal())


def test_the_consistent_mask_replaces_the_class_mask_in_both_damsm_losses():
    torch.manual_seed(0)
    image, sentence = torch.randn(3, 8), torch.randn(3, 8)
    labels, classes = torch.arange(3), torch.tensor([1, 1, 2])
    nothing = torch.zeros(3, 3, dtype=torch.bool)
    masked = sent_loss(image, sentence, labels, classes)
    kept = sent_loss(image, sentence, labels, classes, pair_mask=nothing)
    torch.testing.assert_close(kept, sent_loss(image, sentence, labels, None))
    assert kept[0] > masked[0]  # the same-class pair is a negative again
    regions, words = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 5)
    lengths = torch.tensor([5, 4, 3])
    w_masked = words_loss(regions, words, labels, lengths, classes)[:2]
    w_kept = words_loss(regions, words, labels, lengths, classes, pair_mask=nothing)[:2]
    assert w_kept[0] > w_masked[0] and w_kept[1] > w_masked[1]


def test_counterfactual_negatives_raise_the_image_to_caption_losses_and_invalid_ones_do_nothing():
    torch.manual_seed(0)
    image, sentence = torch.randn(4, 8), torch.randn(4, 8)
    labels = torch.arange(4)
    regions, words = torch.randn(4, 8, 4, 4), torch.randn(4, 8, 5)
    lengths = torch.tensor([5, 4, 3, 5])
    cf_words, cf_lengths = torch.randn(4, 8, 6), torch.tensor([6, 2, 3, 4])
    plain_s = sent_loss(image, sentence, labels, None)
    plain_w = words_loss(regions, words, labels, lengths, None)[:2]
    for valid, compare in (
        (torch.ones(4, dtype=torch.bool), "above"),
        (torch.zeros(4, dtype=torch.bool), "same"),
    ):
        cf = Counterfactuals(cf_words, image.clone(), cf_lengths, valid)  # a counterfactual the image likes
        with_s = sent_loss(image, sentence, labels, None, counterfactual=cf)
        with_w = words_loss(regions, words, labels, lengths, None, counterfactual=cf)[:2]
        assert with_s[1] == plain_s[1] and with_w[1] == plain_w[1]  # caption -> image: unchanged
        if compare == "above":
            assert with_s[0] > plain_s[0] and with_w[0] > plain_w[0]
        else:
            torch.testing.assert_close(with_s[0], plain_s[0])
            torch.testing.assert_close(with_w[0], plain_w[0])


def test_d_counterfactual_pairs_are_mismatched_pairs_and_invalid_ones_count_for_nothing():
    torch.manual_seed(0)
    netD = D_NET(8, 4, 16)
    real, fake, sentences = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 16)
    plain = discriminator_loss(netD, real, fake, sentences)
    none_valid = discriminator_loss(
        netD, real, fake, sentences, (torch.randn(4, 16), torch.zeros(4, dtype=torch.bool))
    )
    torch.testing.assert_close(none_valid, plain)
    # Counterfactuals b = 0, 1 valid: cond_wrong becomes the mean over the 3 reference pairs and
    # these 2 (real image b with counterfactual b).
    others = torch.randn(4, 16)
    valid = torch.tensor([True, True, False, False])
    with_two = discriminator_loss(netD, real, fake, sentences, (others, valid))
    bce = lambda logits: torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.zeros_like(logits), reduction="none"
    )
    codes = netD(real)
    old_pairs = bce(netD.COND_DNET(codes[:3], sentences[1:]))
    new_pairs = bce(netD.COND_DNET(codes[:2], others[:2]))
    expected = plain - old_pairs.mean() / 3 + torch.cat([old_pairs, new_pairs]).mean() / 3
    torch.testing.assert_close(with_two, expected)


# --------------------------------------------------------------------------------------------
# CA-Net's noise scale and the coordinate encoder


def test_ca_noise_scale_scales_only_the_noise():
    cfg = override(get_preset("shapes"), **TINY_OVERRIDES)
    nets = {s: G_NET(override(cfg, **{"model.ca_noise_scale": s}).model) for s in (1.0, 0.1, 0.0)}
    for net in nets.values():
        net.load_state_dict(nets[1.0].state_dict())
    sentence = torch.randn(3, cfg.model.embedding_dim)
    outs = {}
    for scale, net in nets.items():
        torch.manual_seed(1)
        outs[scale] = net.ca_net(sentence)
    c1, mu, _ = outs[1.0]
    torch.testing.assert_close(outs[0.0][0], mu)
    torch.testing.assert_close(outs[0.1][0] - mu, 0.1 * (c1 - mu))
    assert get_preset("bird").model.ca_noise_scale == 1.0 and get_preset("coco").model.ca_noise_scale == 1.0


def test_seeded_sampling_applies_the_noise_scale():
    from dmgan.pipeline import _with_ca_noise

    ca = G_NET(override(get_preset("shapes"), **TINY_OVERRIDES).model).ca_net
    eps = torch.ones(2, ca.c_dim)
    hook = ca.register_forward_hook(_with_ca_noise(eps))
    c, mu, logvar = ca(torch.randn(2, ca.t_dim))
    hook.remove()
    torch.testing.assert_close(c, mu + ca.noise_scale * torch.exp(0.5 * logvar))


def test_the_coordinate_encoder_sees_where_a_flat_image_is_and_the_old_one_still_loads():
    torch.manual_seed(0)
    flat = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        plain = SMALL_CNN_ENCODER(16).eval()(flat)[0][0]
        coord = SMALL_CNN_ENCODER(16, coordinates=True).eval()(flat)[0][0]
    # Inside the zero padding's reach a flat image looks the same everywhere to the plain encoder.
    torch.testing.assert_close(plain[:, 3, 3], plain[:, 4, 4])
    assert not torch.allclose(coord[:, 3, 3], coord[:, 4, 4])
    assert build_image_encoder("small_coord", 16).trunk[0][0].in_channels == 5
    old = build_image_encoder("small", 16)
    old.load_state_dict(SMALL_CNN_ENCODER(16).state_dict())  # a checkpoint of the old encoder
    assert old.trunk[0][0].in_channels == 3
    assert get_preset("bird").model.image_encoder == "inception"


def test_the_paper_presets_keep_every_shapes_option_off():
    for name in ("bird", "coco", "custom"):
        t = get_preset(name).train
        assert not (t.damsm_consistent_mask or t.damsm_counterfactuals or t.d_counterfactuals)
        assert t.stage_consistency == 0
    t = get_preset("shapes").train
    assert t.damsm_consistent_mask and t.damsm_counterfactuals and t.d_counterfactuals
    assert t.stage_consistency > 0


# --------------------------------------------------------------------------------------------
# The evaluation's readings


def real_scenes(count: int, seed: int = 3) -> tuple[torch.Tensor, list[dict[str, str]]]:
    rng = random.Random(seed)
    images, records = [], []
    for _ in range(count):
        scene = shapes_data.sample_scene(rng, second_object_prob=0.0)
        picture = shapes_data.draw_scene(scene, rng).resize((32, 32))
        array = torch.from_numpy(np.asarray(picture, dtype=np.float32).copy())
        images.append(array.permute(2, 0, 1) / 127.5 - 1)
        records.append(scene_record(scene))
    return torch.stack(images), records


def test_the_layout_reading_reads_real_images_right_and_stage_agreement_counts_it():
    images, records = real_scenes(200)
    targets = attribute_targets(records)
    layout = read_layout(images)
    for name in ("background", "position", "colour"):
        assert (layout[name] == targets[name]).float().mean() >= 0.95, name
    small = read_layout(torch.nn.functional.interpolate(images, size=8, mode="bilinear", antialias=True))
    named = [set(ATTRIBUTES)] * len(records)
    report = stage_agreement([small, layout], targets, named)
    assert report["each_stage_with_the_one_before"][0]["background"] >= 0.95
    assert report["each_stage_with_the_one_before"][0]["centroid"] >= 0.9
    flipped = read_layout(images.flip(-1))  # every object moved to the other side
    moved = stage_agreement([layout, flipped], targets, named)["each_stage_with_the_one_before"][0]
    assert moved["background"] >= 0.95 and moved["centroid"] < 0.4


class StubPipe:
    """Sentence codes that spell the position word; what counterfactual R-precision needs."""

    def __init__(self) -> None:
        self.cfg = get_preset("shapes")

    def tokenize(self, texts: list[str], words_num: int | None = None):
        self.texts = texts
        return type("Tokens", (), {"indices": torch.zeros(len(texts), 1), "lengths": torch.ones(len(texts))})

    def encode(self, indices, lengths):
        codes = torch.zeros(len(self.texts), len(shapes_data.POSITIONS) + 1)
        for row, text in enumerate(self.texts):
            where = shapes_data.find_attribute(text.split(), "position")
            codes[row, shapes_data.POSITIONS.index(where[2]) if where else -1] = 1.0
            codes[row, -1] += 0.1  # never a zero vector
        return None, codes


def test_counterfactual_r_precision_sees_an_image_placed_wrong():
    from dmgan.evaluate import counterfactual_r_precision

    texts = ["a red circle in the top left", "a blue square at the bottom right", "a red circle"]
    right = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]])
    wrong = right.roll(1, dims=1)
    for codes, expected in ((right, 1.0), (wrong, 0.0)):
        result = counterfactual_r_precision(StubPipe(), codes, texts)  # type: ignore[arg-type]
        assert result["position"] == {"accuracy": expected, "captions": 2, "chance": 0.2}
        assert result["background"]["captions"] == 0


# --------------------------------------------------------------------------------------------
# Another dataset: the options switch themselves off and training goes on


def other_grammar_dataset(root: Path) -> Path:
    """An AttnGAN-layout dataset with no attributes.json and captions of another grammar."""
    data = shapes_data.generate(root, num_train=24, num_test=12, seed=5)
    (data / "attributes.json").unlink()
    (data / "captions.pickle").unlink(missing_ok=True)
    rng = random.Random(0)
    for path in sorted((data / "text").glob("*.txt")):
        lines = [
            f"photo {rng.randrange(5)} of some {rng.choice(['thing', 'object', 'item'])}" for _ in range(10)
        ]
        path.write_text("\n".join(lines) + "\n")
    with open(data / "train" / "filenames.pickle", "rb") as f:
        assert len(pickle.load(f)) == 24
    return data


@pytest.mark.slow
def test_the_shapes_preset_trains_on_another_dataset_with_the_grammar_options_off(tmp_path, capsys):
    from dmgan.train import main as train_main
    from tests.tiny import TINY

    data = other_grammar_dataset(tmp_path / "other")
    train_main(
        [
            "--data-dir",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--set",
            "train.encoder_max_epoch=1",
            "--max-steps",
            "2",
            *TINY,
        ]
    )
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("shapes-grammar options off")]
    assert len(lines) == 1, out
    assert "train.d_counterfactuals" in lines[0] and "no attributes.json" in lines[0]
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").is_file()


def test_a_training_step_with_every_shapes_option_on_uses_the_counterfactuals(tmp_path):
    from dmgan.data import collate, dataset_for
    from dmgan.training_step import TrainingState

    cfg = override(get_preset("shapes"), **TINY_OVERRIDES)
    data = shapes_data.generate(tmp_path / "shapes", num_train=16, num_test=4, seed=1)
    dataset = dataset_for(cfg, data, "train", train=True)
    batch = collate([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    state = TrainingState.build(cfg, len(dataset.vocab))
    state.editor = CaptionEditor.for_dataset(data, dataset.vocab, cfg)
    assert state.editor is not None
    mb = state._generate(batch, keep_graph=False)
    assert mb.counterfactual is not None and mb.pair_mask is not None
    assert mb.counterfactual.valid.all()
    assert not torch.equal(mb.counterfactual.sentence, mb.sentence)
    logs = state.step(batch)
    assert float(logs["nonfinite"]) == 0.0
