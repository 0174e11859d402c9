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
