"""Pretraining methods: the registry. A method is one module (:mod:`sslsky.methods.base` is the contract).

Adding one is a new file with a :class:`~sslsky.methods.base.Method` subclass, a line here, its config
section in :class:`sslsky.config.ModelConfig` (when it has settings) and its tests.
"""

from __future__ import annotations

import dataclasses

from sslsky.config import ConfigError, PretrainConfig, config_to_dict
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
}

__all__ = ["BYOL", "METHODS", "HybridBYOL", "Method", "MoCo", "SimCLR", "VoteModel", "check_sections",
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
    """The ``model.*`` sections this config does not read -> why: another method's, another encoder's."""
    own = method_class(cfg.method).section
    out = {}
    for field in dataclasses.fields(cfg.model):
        name = field.name
        if not dataclasses.is_dataclass(getattr(cfg.model, name)):
            continue
        if name in method_sections() and name != own:
            used_by = ", ".join(m for m, c in METHODS.items() if c.section == name)
            out[f"model.{name}"] = f"is read only by method={used_by}, and this run is method={cfg.method}"
        elif name not in method_sections() and name != cfg.model.arch:
            out[f"model.{name}"] = f"is read only by model.arch={name}, and this run is model.arch={cfg.model.arch}"
    return out


def check_sections(cfg: PretrainConfig) -> None:
    """ConfigError when a section of :func:`foreign_sections` differs from its defaults: such a setting would
    silently do nothing."""
    problems = []
    for dotted, why in foreign_sections(cfg).items():
        value = getattr(cfg.model, dotted.split(".")[1])
        defaults = config_to_dict(type(value)())
        changed = [f"{dotted}.{key}={val!r}" for key, val in config_to_dict(value).items() if val != defaults.get(key)]
        if changed:
            problems.append(f"{', '.join(changed)}: {dotted} {why}; remove the setting (or reset the section: "
                            f"{dotted}={{}}), or change the method / arch")
    if problems:
        raise ConfigError("; ".join(problems))
