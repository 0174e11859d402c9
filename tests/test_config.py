"""Typed configs: unknown keys, wrong types, missing files, unsafe YAML are clear errors."""

from __future__ import annotations

import pytest

from mlforce.config import load_config
from mlforce.errors import ConfigError
from tests.conftest import ROOT


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.cutoff > 0


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  featurs: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "model.featurs" in msg and "unknown key" in msg
    assert "\n" not in msg


def test_wrong_type_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"training\.batch_size"):
        load_config(path)


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_overrides_are_validated(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("model:\n  features: 32\n")
    cfg = load_config(path, {"training.max_epochs": 3})
    assert cfg.training.max_epochs == 3 and cfg.model.features == 32
    with pytest.raises(ConfigError, match=r"training\.nonsense: unknown key"):
        load_config(path, {"training.nonsense": 1})


def test_a_run_resumes_after_an_upgrade_added_settings_but_not_after_a_change(tmp_path):
    """A snapshot written before a setting existed (an older mlforce) still resumes with the
    same config; a config that differs in a real setting is still refused."""
    import json

    import yaml

    from mlforce.campaign import check_resumable, config_hash, prepare_run_dir

    config = load_config(ROOT / "configs" / "tiny.yaml")
    prepare_run_dir(config, tmp_path / "run")
    snapshot = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del snapshot["uncertainty"]["label_samples"]  # as an older version wrote it
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(snapshot))
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    state["config_hash"] = "0123456789abcdef"  # that version's hash of its own resolved config
    (tmp_path / "run" / "state.json").write_text(json.dumps(state))
    check_resumable(config, tmp_path / "run")  # no error
    changed = config.model_copy(deep=True)
    changed.md.steps += 1
    assert config_hash(changed) != config_hash(config)
    with pytest.raises(ConfigError, match="different config"):
        check_resumable(changed, tmp_path / "run")
    snapshot["md"]["steps"] = 999  # a snapshot that differs in a real setting: refused too
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(snapshot))
    with pytest.raises(ConfigError, match="different config"):
        check_resumable(config, tmp_path / "run")
