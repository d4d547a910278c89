"""Config schemas: YAML + dotted overrides, clear errors for unknown keys."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from sslsky.config import ConfigError, MockConfig, PackConfig, load_config, parse_override, write_config


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "pack.yaml"
    path.write_text("shard_size: 64\ndtype: float16\nmax_bad_fraction: 0.1\n")
    cfg = load_config(PackConfig, path, ["shard_size=8", "fill_value=1"], out="x")
    assert cfg.shard_size == 8  # override beats file
    assert cfg.dtype == "float16"  # file beats default
    assert cfg.max_bad_fraction == 0.1
    assert cfg.fill_value == 1.0 and isinstance(cfg.fill_value, float)  # int accepted for a float
    assert cfg.out == "x"
    assert cfg.stats_sample == PackConfig().stats_sample  # untouched default


def test_misspelled_key_names_key_and_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"'shard_sise'.*did you mean 'shard_size'"):
        load_config(PackConfig, None, ["shard_sise=3"])
    path = tmp_path / "bad.yaml"
    path.write_text("survy: sdss\n")
    with pytest.raises(ConfigError, match=r"'survy'.*'survey'.*bad.yaml"):
        load_config(MockConfig, path)


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="shard_size: expected an integer"):
        load_config(PackConfig, None, ["shard_size=many"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_override("shard_size")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(MockConfig, None, ["n=7", "survey=decals"])
    path = write_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["n"] == 7
    assert load_config(MockConfig, path) == cfg
    assert not list(path.parent.glob(".*tmp*"))  # no temp file left behind


def test_cli_reports_config_error_with_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sslsky", "pack", "--catalog", "c.fits", "--out", str(tmp_path),
                           "shard_sizee=2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'shard_size'" in proc.stderr


def test_nested_pretrain_config_and_exponent_floats(tmp_path):
    from sslsky.config import PretrainConfig

    path = tmp_path / "pretrain.yaml"
    path.write_text("model:\n  arch: resnet18\naugment:\n  psf: {factor_max: 2}\n")
    # YAML 1.1 reads 1e-4 (no dot) as a string; a float field still takes it.
    cfg = load_config(PretrainConfig, path, ["optim.weight_decay=1e-4", "model.moco.dim=64",
                                             "augment.noise.enabled=false"])
    assert cfg.optim.weight_decay == 1e-4 and isinstance(cfg.optim.weight_decay, float)
    assert (cfg.model.arch, cfg.model.moco.dim, cfg.model.moco.queue_size) == ("resnet18", 64, 65536)  # file, override,
    # default; a key of the flat layout before each method had its section names its new place
    with pytest.raises(ConfigError, match=r"'model.queue_size' is now model.moco.queue_size"):
        load_config(PretrainConfig, None, ["model.queue_size=64"])
    assert cfg.augment.psf.factor_max == 2.0 and cfg.augment.psf.factor_min == 1.0
    assert cfg.augment.noise.enabled is False and cfg.augment.reddening.enabled is True
    with pytest.raises(ConfigError, match=r"'augment.geometry.jiter'.*did you mean 'jitter'"):
        load_config(PretrainConfig, None, ["augment.geometry.jiter=2"])
    with pytest.raises(ConfigError, match="optim.base_lr: expected a number"):
        load_config(PretrainConfig, None, ["optim.base_lr=fast"])
