"""Config values checked by type, and config files: a run's config.json replayed, hand-written ones."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dmgan.config import (
    TINY_OVERRIDES,
    check_type,
    config_from_dict,
    get_preset,
    load_config_file,
    override,
    overrides_as_flags,
)
from dmgan.runtime import RunOptions, describe


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.batch_size", "abc", "train.batch_size: expected int, got 'abc' (str)"),
        ("train.batch_size", 8.0, "train.batch_size: expected int, got 8.0 (float)"),
        ("train.batch_size", True, "train.batch_size: expected int, got True (bool)"),
        ("train.g_lr", "fast", "train.g_lr: expected float, got 'fast' (str)"),
        ("model.legacy_mask", 1, "model.legacy_mask: expected bool (true or false), got 1 (int)"),
        ("model.legacy_mask", "yes", "model.legacy_mask: expected bool (true or false), got 'yes' (str)"),
        ("model.image_encoder", 3, "model.image_encoder: expected str, got 3 (int)"),
        ("train.betas", [0.5], "train.betas: expected tuple[float, float], got [0.5] (list)"),
        ("train.betas", [0.5, "x"], "train.betas: expected tuple[float, float], got [0.5, 'x'] (list)"),
        ("train.betas", 0.5, "train.betas: expected tuple[float, float], got 0.5 (float)"),
    ],
)
def test_override_refuses_a_value_of_the_wrong_type_naming_field_value_and_type(key, value, message):
    with pytest.raises(ValueError) as error:
        override(get_preset("shapes"), **{key: value})
    assert str(error.value) == message


def test_override_converts_where_json_cannot_say_more():
    cfg = override(
        get_preset("shapes"),
        **{
            "train.g_lr": 1,
            "train.betas": [0.5, 1],
            "model.legacy_mask": True,
            "model.image_encoder": "small",
        },
    )
    assert cfg.train.g_lr == 1.0 and isinstance(cfg.train.g_lr, float)
    assert cfg.train.betas == (0.5, 1.0) and all(isinstance(b, float) for b in cfg.train.betas)
    assert cfg.model.legacy_mask is True


def test_override_names_the_run_option_a_field_became():
    with pytest.raises(ValueError, match=r"no field 'memory_backend' \(a run option now: --memory-backend\)"):
        override(get_preset("shapes"), **{"model.memory_backend": "eager"})


def test_check_type_reads_optional_and_dict_annotations():
    assert check_type("eval_every", None, int | None) is None
    assert check_type("eval_every", 5, int | None) == 5
    with pytest.raises(ValueError, match=r"eval_every: expected int or None, got '5' \(str\)"):
        check_type("eval_every", "5", int | None)
    with pytest.raises(ValueError, match="expected dict"):
        check_type("overrides", [1], dict[str, int])


def test_overrides_as_flags_writes_values_that_set_reads_back():
    changes = {
        **TINY_OVERRIDES,
        "train.betas": (0.5, 0.9),
        "model.legacy_mask": True,
        "model.image_encoder": "small",
    }
    flags = overrides_as_flags(changes)
    assert flags[::2] == ["--set"] * len(changes)
    read = {}
    for arg in flags[1::2]:  # as train.py's --set reads a value: JSON, else text
        key, _, text = arg.partition("=")
        try:
            read[key] = json.loads(text)
        except json.JSONDecodeError:
            read[key] = text
    assert override(get_preset("shapes"), **read) == override(get_preset("shapes"), **changes)


def test_config_from_dict_still_reads_old_checkpoints_memory_backend():
    stored = dataclasses.asdict(get_preset("bird"))
    stored["model"]["memory_backend"] = "triton"
    assert config_from_dict(stored) == get_preset("bird")


def _write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2))
    return path


def test_a_runs_config_json_replays_to_the_same_options_and_config(tmp_path):
    asked = RunOptions(
        preset="shapes",
        overrides={"train.batch_size": 8, "model.r_num": 2, "train.g_lr": 1e-3},
        max_steps=3,
        memory_backend="eager",
        seed=7,
    )
    options = asked.resolved(torch.device("cpu"))
    path = _write(tmp_path, describe(options, options.config()))
    values, overrides = load_config_file(path, RunOptions)
    assert "overrides" not in values
    replayed = RunOptions(**values, overrides=overrides)
    assert replayed == options
    assert replayed.config() == options.config()


def test_replay_with_tuples_and_a_record_section_gives_the_same_config_json(tmp_path):
    options = RunOptions(preset="coco", overrides={"train.betas": [0.4, 0.9], "model.legacy_mask": True})
    record = {**describe(options, options.config()), "environment": {"torch": torch.__version__}}
    path = _write(tmp_path, record)
    values, overrides = load_config_file(path, RunOptions)
    replayed = RunOptions(**values, overrides=overrides)
    assert replayed.config() == options.config()
    again = json.loads(json.dumps(describe(replayed, replayed.config())))
    assert again == json.loads(json.dumps(describe(options, options.config())))


def test_the_config_section_decides_where_a_preset_has_changed_since(tmp_path):
    # A run made when the preset's batch size was 12: its config.json says so, its overrides do not.
    options = RunOptions(preset="shapes")
    record = describe(options, override(options.config(), **{"train.batch_size": 12}))
    values, overrides = load_config_file(_write(tmp_path, record), RunOptions)
    assert overrides == {"train.batch_size": 12}
    assert RunOptions(**values, overrides=overrides).config().train.batch_size == 12


def test_overrides_that_disagree_with_the_config_section_are_an_error(tmp_path):
    options = RunOptions(preset="shapes", overrides={"train.batch_size": 8})
    record = describe(options, options.config())
    record["config"]["train"]["batch_size"] = 4  # edited in one place only
    with pytest.raises(ValueError, match=r"options.overrides sets train.batch_size=8 but config holds 4"):
        load_config_file(_write(tmp_path, record), RunOptions)


def test_an_old_config_json_with_the_memory_backend_in_the_model(tmp_path):
    options = RunOptions(preset="shapes", overrides={"model.r_num": 2})
    record = describe(options, options.config())
    del record["options"]["memory_backend"]  # older files: no such option, a model field instead
    record["config"]["model"]["memory_backend"] = "triton"
    values, overrides = load_config_file(_write(tmp_path, record), RunOptions)
    assert values["memory_backend"] == "triton" and "model.memory_backend" not in overrides
    assert RunOptions(**values, overrides=overrides).config() == options.config()


def test_a_hand_written_file_gives_options_and_dotted_overrides(tmp_path):
    path = _write(
        tmp_path,
        {
            "preset": "shapes",
            "max_steps": 100,
            "compile": False,
            "train": {"batch_size": 8, "betas": [0.5, 0.9]},
            "model": {"r_num": 3, "memory_backend": "eager"},
            "overrides": {"text.words_num": 12},
        },
    )
    values, overrides = load_config_file(path, RunOptions)
    assert values == {"preset": "shapes", "max_steps": 100, "compile": False, "memory_backend": "eager"}
    assert overrides == {
        "train.batch_size": 8,
        "train.betas": (0.5, 0.9),
        "model.r_num": 3,
        "text.words_num": 12,
    }
    cfg = RunOptions(**values, overrides=overrides).config()
    assert (cfg.train.batch_size, cfg.model.r_num, cfg.text.words_num) == (8, 3, 12)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_stepz": 3}, r"unknown run options \['max_stepz'\]"),
        ({"train": {"batch_sise": 3}}, "train has no field 'batch_sise'"),
        ({"optim": {"lr": 3}}, r"unknown run options \['optim'\]"),
        ({"train": {"batch_size": "abc"}}, r"train.batch_size: expected int, got 'abc' \(str\)"),
        ({"max_steps": "100"}, r"max_steps: expected int or None, got '100' \(str\)"),
        ({"compile": "yes"}, r"compile: expected bool \(true or false\), got 'yes' \(str\)"),
        ({"train": [1]}, "train: expected an object"),
        ({"overrides": {"train.lr": 1}}, "train has no field 'lr'"),
        ({"train": {"batch_size": 8}, "overrides": {"train.batch_size": 8}}, "set both"),
        ({"options": {}, "extra": 1}, r"unknown keys \['extra'\]"),
        ({"config": {"name": "shapes", "optim": {}}}, r"config: unknown keys \['optim'\]"),
        (
            {"options": {"preset": "bird"}, "config": {"name": "coco"}},
            "options.preset 'bird' and config.name",
        ),
        ({"options": {"stagee": "gan"}, "config": {"name": "shapes"}}, r"unknown run options \['stagee'\]"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_config_file_errors_name_the_file_and_what_is_wrong(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as error:
        load_config_file(path, RunOptions)
    assert str(error.value).startswith(f"{path}: ")


def test_a_file_that_is_not_json_is_an_error_naming_it(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("preset: shapes\n")
    with pytest.raises(ValueError, match="not a readable JSON config file"):
        load_config_file(path, RunOptions)
    with pytest.raises(ValueError, match="missing.json"):
        load_config_file(tmp_path / "missing.json", RunOptions)
