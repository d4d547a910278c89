"""The distributed environment: who am I, how many are we, where is rank 0.

One module owns it (after DINOv2's ``dinov2/distributed``). The environment is read, in order, from

1. torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
2. SLURM (a task started by ``srun``): ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``
   (``SLURM_STEP_NUM_TASKS`` when srun sets it), ``SLURM_JOB_NODELIST``; rank 0 is on the first host
   of the node list (``scontrol show hostnames`` when available, else :func:`parse_nodelist`) and the
   port is ``20000 + SLURM_JOB_ID % 20000`` unless ``MASTER_ADDR`` / ``MASTER_PORT`` are exported;
3. nothing of the above: one process.

A partly set environment (``RANK`` without ``WORLD_SIZE``, ``SLURM_PROCID`` without
``SLURM_NTASKS``, ...) is an error that names what is missing: guessing would start ranks that wait
for each other forever.

Every helper works without an initialised process group (one process: rank 0 of 1), so library code
calls :func:`rank`, :func:`world_size`, :func:`all_gather_tensor` unconditionally.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as torch_dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST")
SLURM_PORT_BASE = 20000  # MASTER_PORT = SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
SLURM_PORT_SPAN = 20000


class DistributedEnvError(RuntimeError):
    """The launcher environment is inconsistent; the message says which variables to set."""


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # torchrun | slurm | single

    def __str__(self) -> str:
        if self.world_size == 1:
            return f"1 process ({self.source})"
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}) via {self.source}, "
                f"master {self.master_addr}:{self.master_port}")


_ENV: DistEnv | None = None  # set by init_distributed


# ---------------------------------------------------------------------------
# Reading the environment.
# ---------------------------------------------------------------------------


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistributedEnvError(f"{name}={value!r} is not an integer") from None


def _expand_ranges(text: str) -> list[str]:
    """``"01-03,7"`` -> ``["01", "02", "03", "7"]`` (zero padding of the range start is kept)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {part!r} in node list")
            width = len(lo) if lo.startswith("0") else 0
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        elif part.isdigit():
            out.append(part)
        else:
            raise ValueError(f"bad range {part!r} in node list")
    return out


def _expand_host(pattern: str) -> list[str]:
    """One host pattern, possibly with several bracket groups: ``"r[1-2]-n[3,5]"``."""
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        if "[" in pattern or "]" in pattern:
            raise ValueError(f"unbalanced brackets in node list entry {pattern!r}")
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    if "[" in head or "]" in head:
        raise ValueError(f"unbalanced brackets in node list entry {pattern!r}")
    return [head + value + rest for value in _expand_ranges(match.group(1)) for rest in _expand_host(tail)]


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM compressed node list: ``"a1,b[3-4]"`` -> ``["a1", "b3", "b4"]``.

    Handles comma lists, ranges and single values in brackets (``node[1-2,5]``), zero padding
    (``n[01-03]``) and several bracket groups in one name (``r[1-2]-n[1-2]``).
    """
    hosts, depth, start = [], 0, 0
    for i, char in enumerate(nodelist + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in node list {nodelist!r}")
        elif char == "," and depth == 0:
            entry = nodelist[start:i].strip()
            if entry:
                hosts.extend(_expand_host(entry))
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced brackets in node list {nodelist!r}")
    if not hosts:
        raise ValueError(f"empty node list {nodelist!r}")
    return hosts


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` if installed, else :func:`parse_nodelist`."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                    timeout=30)
            names = result.stdout.split()
            if result.returncode == 0 and names:
                return names[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return parse_nodelist(nodelist)[0]


def slurm_port(job_id: int) -> int:
    """A port every task of a job agrees on and concurrent jobs rarely share: 20000 + job_id % 20000."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def read_env(environ: Mapping[str, str] | None = None, use_scontrol: bool = True) -> DistEnv:
    """The :class:`DistEnv` described by ``environ`` (default ``os.environ``); nothing is changed."""
    environ = os.environ if environ is None else environ
    # torchrun sets MASTER_*; SLURM scripts may export them too, so the rank variables decide the launcher.
    rank_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    present = [v for v in rank_vars if v in environ]
    if present:
        missing = [v for v in TORCHRUN_VARS if v not in environ]
        one_process = len(present) == 3 and environ["WORLD_SIZE"] == "1"  # MASTER_* unused then
        if missing and not (one_process and set(missing) <= {"MASTER_ADDR", "MASTER_PORT"}):
            raise DistributedEnvError(
                f"partial torchrun environment: {', '.join(present)} set but {', '.join(missing)} missing; "
                f"launch with torchrun (or srun with none of {', '.join(TORCHRUN_VARS)} exported), "
                f"or set all of {', '.join(TORCHRUN_VARS)}")
        env = DistEnv(rank=_int(environ, "RANK"), world_size=_int(environ, "WORLD_SIZE"),
                      local_rank=_int(environ, "LOCAL_RANK"),
                      master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                      master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 29500,
                      source="torchrun")
    elif any(v in environ for v in SLURM_VARS[:3]):
        # SLURM_JOB_NODELIST alone is set in any allocation (salloc shell); the task variables mean srun.
        missing = [v for v in SLURM_VARS if v not in environ]
        if missing:
            raise DistributedEnvError(
                f"partial SLURM environment: {', '.join(missing)} missing; start one task per rank with srun "
                f"(srun --ntasks=N python ...), or unset the SLURM_* task variables to run one process")
        world = _int(environ, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS")
        if "MASTER_PORT" in environ:
            port = _int(environ, "MASTER_PORT")
        elif "SLURM_JOB_ID" in environ:
            port = slurm_port(_int(environ, "SLURM_JOB_ID"))
        elif world == 1:
            port = 29500
        else:
            raise DistributedEnvError("SLURM_JOB_ID is missing, so no MASTER_PORT can be derived; export MASTER_PORT")
        addr = environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"], use_scontrol=use_scontrol)
        env = DistEnv(rank=_int(environ, "SLURM_PROCID"), world_size=world,
                      local_rank=_int(environ, "SLURM_LOCALID"), master_addr=addr, master_port=port, source="slurm")
    else:
        return DistEnv()
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise DistributedEnvError(f"inconsistent {env.source} environment: rank {env.rank}, "
                                  f"world size {env.world_size}, local rank {env.local_rank}")
    return env


# ---------------------------------------------------------------------------
# Process group.
# ---------------------------------------------------------------------------


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def init_distributed(backend: str | None = None, environ: Mapping[str, str] | None = None,
                     timeout_s: float | None = None) -> DistEnv:
    """Read the environment, export ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and
    start the process group (``nccl`` when CUDA is available, else ``gloo``; ``backend`` overrides).

    With one process no group is started (every helper works without one). Calling it again returns
    the same environment.
    """
    global _ENV
    env = read_env(environ)
    if is_initialized():
        _ENV = dataclasses.replace(env, rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size())
        return _ENV
    _ENV = env
    if env.world_size == 1:
        return env
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port), RANK=str(env.rank),
                      WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    torch_dist.init_process_group(backend=backend, init_method="env://", rank=env.rank,
                                  world_size=env.world_size, **kwargs)
    return env


def cleanup() -> None:
    """Destroy the process group if there is one (safe to call twice or without one)."""
    global _ENV
    if is_initialized():
        torch_dist.destroy_process_group()
    _ENV = None


# ---------------------------------------------------------------------------
# Helpers: all safe without a process group.
# ---------------------------------------------------------------------------


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its node (from the environment read by :func:`init_distributed`; 0 before)."""
    return _ENV.local_rank if _ENV is not None else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        torch_dist.barrier()


@torch.no_grad()
def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order: ``(B, ...)`` -> ``(world * B, ...)``.

    Same shape on every rank required; no gradient flows through. Without a process group (or with
    one rank) it returns ``tensor`` itself.
    """
    if not is_initialized() or world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    torch_dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` from rank ``src`` on every rank (in place); identity without a process group."""
    if is_initialized() and world_size() > 1:
        torch_dist.broadcast(tensor, src=src)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """A list of every rank's picklable ``obj`` in rank order (``[obj]`` without a process group)."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out
