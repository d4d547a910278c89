"""Which device and which autocast dtype a command runs with: one rule for every command.

``device``: ``auto`` (cuda where a GPU is visible, else cpu), ``cpu``, ``cuda`` (under DDP: this rank's
local GPU) or ``cuda:N``. ``amp``: ``auto`` (bf16 on a GPU, none on the CPU), ``bf16``, ``fp16`` (only
where the caller scales the loss: pretraining) or ``none``. Anything else, or cuda where no GPU is
visible, is a :class:`~sslsky.errors.ConfigError` naming the key and the choices.
"""

from __future__ import annotations

import torch

from sslsky.errors import ConfigError

AMP_MODES = ("auto", "bf16", "fp16", "none")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_device(name: str, key: str = "device", allow_auto: bool = True) -> torch.device:
    """The ``torch.device`` of ``key=name`` (see the module docstring)."""
    auto = "auto, " if allow_auto else ""
    if name == "auto" and allow_auto:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={name!r}: choose {auto}cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but no CUDA GPU is visible here; use {key}=cpu"
                          + (" or auto" if allow_auto else ""))
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name} but only {torch.cuda.device_count()} GPU(s) are visible here "
                          f"(cuda:0 ...); use {key}=cuda or {key}=cpu")
    return device


def rank_device(name: str, local_rank: int, key: str = "device") -> torch.device:
    """:func:`resolve_device`, with plain ``cuda`` meaning this rank's local GPU (which becomes the current one)."""
    device = resolve_device(name, key)
    if device.type == "cuda" and device.index is None:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def autocast_dtype(amp: str, device: torch.device, key: str = "amp", fp16: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``key=amp`` on ``device`` (None: full precision). ``fp16`` only where the caller
    scales the loss (``fp16=True``); otherwise it is refused with the choices."""
    allowed = [m for m in AMP_MODES if fp16 or m != "fp16"]
    if amp not in allowed:
        raise ConfigError(f"{key}={amp!r}: choose {', '.join(allowed)}")
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return _AMP_DTYPES[amp]
