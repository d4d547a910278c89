"""Pretraining methods: the registry. A method is one module (:mod:`sslsky.methods.base` is the contract).

Adding one is a new file with a :class:`~sslsky.methods.base.Method` subclass, a line here, its config
section in :class:`sslsky.config.ModelConfig` (when it has settings) and its tests.
"""

from __future__ import annotations

import dataclasses

from sslsky.config import ConfigError, PretrainConfig, config_to_dict
from sslsky.methods.align import Align
from sslsky.methods.base import Method, encoder_prefix
from sslsky.methods.byol import BYOL
from sslsky.methods.hybrid import HybridBYOL
from sslsky.methods.moco import MoCo
from sslsky.methods.simclr import SimCLR
from sslsky.methods.votes import VoteModel

#: ``method:`` name -> the method's class.
METHODS: dict[str, type[Method]] = {
    "moco": MoCo,
    "byol": BYOL,
    "hybrid": HybridBYOL,
    "votes": VoteModel,
    "simclr": SimCLR,
    "align": Align,
}

__all__ = ["BYOL", "METHODS", "Align", "HybridBYOL", "Method", "MoCo", "SimCLR", "VoteModel", "check_sections",
           "encoder_prefix", "foreign_sections", "method_class"]


def method_class(name: str) -> type[Method]:
    """The class of ``method=name``; a ConfigError naming the choices for anything else."""
    if name not in METHODS:
        raise ConfigError(f"method={name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_sections() -> set[str]:
    """The ``model.*`` sections that belong to some method."""
    return {cls.section for cls in METHODS.values() if cls.section}


def foreign_sections(cfg: PretrainConfig) -> dict[str, str]:
    """The config sections and keys this config does not read -> why: another method's ``model.*`` section,
    another encoder's, ``votes`` for a method without vote counts, ``votes.weight`` for one that does not weigh
    them (:attr:`~sslsky.methods.base.Method.reads`)."""
    cls = method_class(cfg.method)
    out = {}
    for field in dataclasses.fields(cfg.model):
        name = field.name
        if not dataclasses.is_dataclass(getattr(cfg.model, name)):
            continue
        if name in method_sections() and name != cls.section:
            used_by = ", ".join(m for m, c in METHODS.items() if c.section == name)
            out[f"model.{name}"] = f"is read only by method={used_by}, and this run is method={cfg.method}"
        elif name not in method_sections() and name != cfg.model.arch:
            out[f"model.{name}"] = f"is read only by model.arch={name}, and this run is model.arch={cfg.model.arch}"
    if "votes" not in cls.batch_keys_for(cfg):
        out["votes"] = f"is read only by methods that use vote counts, and method={cfg.method} does not"
    else:
        for key in ("votes.weight",):
            if key not in cls.reads:
                users = ", ".join(m for m, c in METHODS.items() if key in c.reads)
                out[key] = f"is read only by method={users}, and this run is method={cfg.method}"
    return out


def _at(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_sections(cfg: PretrainConfig) -> None:
    """ConfigError when a section or key of :func:`foreign_sections` differs from its default: such a setting
    would silently do nothing."""
    problems = []
    defaults = PretrainConfig()
    for dotted, why in foreign_sections(cfg).items():
        value, default = _at(cfg, dotted), _at(defaults, dotted)
        if dataclasses.is_dataclass(value):
            own, base = config_to_dict(value), config_to_dict(default)
            changed = [f"{dotted}.{key}={val!r}" for key, val in own.items() if val != base.get(key)]
        else:
            changed = [f"{dotted}={value!r}"] if value != default else []
        if changed:
            reset = f" (or reset the section: {dotted}={{}})" if dataclasses.is_dataclass(value) else ""
            problems.append(f"{', '.join(changed)}: {dotted} {why}; remove the setting{reset}, or change the "
                            f"method / arch")
    if problems:
        raise ConfigError("; ".join(problems))
