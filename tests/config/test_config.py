"""Config loading, overrides, validation and documentation."""

import dataclasses

import pytest

from gs_ray.config import SECTIONS, Config, config_from_dict, describe, field_docs, load_config, preset_names
from gs_ray.core.errors import ConfigError


def test_presets_load_and_validate():
    assert {"demo", "tiny"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(name), Config)


def test_overrides_apply_with_types():
    cfg = load_config("tiny", ["train.num_workers=2", "lora.target_modules=[q_proj, k_proj]", "warmup.learning_rate=1"])
    assert cfg.train.num_workers == 2
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.warmup.learning_rate == 1.0 and isinstance(cfg.warmup.learning_rate, float)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  num_workers: 3\n  micro_batch_size: 2\n")
    cfg = load_config(str(path), ["train.num_workers=4"])
    assert (cfg.train.num_workers, cfg.train.micro_batch_size) == (4, 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.num_worker=2"], "unknown key 'train.num_worker'; did you mean 'train.num_workers'"),
        (["trian.num_workers=2"], "unknown section 'trian'; did you mean 'train'"),
        (["train.num_workers=two"], "train.num_workers expects int, got 'two'"),
        (["train.use_gpu=3"], "train.use_gpu expects bool, got 3"),
        (["train.num_workers"], "expected section.field=value"),
        (["train.zero_stage=3"], "train.zero_stage: must be 0, 1 or 2"),
        (["train.precision=bf16"], "bf16 needs train.use_gpu=true"),
        (["data.warmup_fraction=0.5", "data.val_fraction=0.5"], "must leave a train split"),
        (["data.on_bad_row=ignore"], "data.on_bad_row: must be one of error, skip"),
        (["cluster.k=1"], "cluster.k: must be 0 (automatic) or >= 2"),
        (["cluster.init_coordinates=top3"], "cluster.init_coordinates: must be one of all, top_k, got 'top3'"),
        (["serve.port=70000"], "serve.port: must be a TCP port"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    assert message in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(broken))
    typo = tmp_path / "typo.yaml"
    typo.write_text("warmup:\n  max_step: 5\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'warmup.max_step'; did you mean 'warmup.max_steps'"):
        load_config(str(typo))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")


def test_round_trip_through_dict():
    cfg = load_config("demo", ["cluster.k=4"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_digest_tracks_only_named_sections():
    base = load_config("tiny")
    changed_train = load_config("tiny", ["train.log_every=3"])
    assert base.digest(["data"]) == changed_train.digest(["data"])
    assert base.digest(["train"]) != changed_train.digest(["train"])


def test_every_field_is_documented():
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{section}: undocumented fields {missing}"
    assert "# Ray Train workers" in describe(load_config("tiny"))
