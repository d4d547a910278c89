"""Preemption: a signal sets a flag; all ranks agree on the step to stop at.

SLURM sends ``USR2`` ahead of the time limit (``#SBATCH --signal=USR2@180``);
``SIGTERM`` (scancel, a laptop's kill) is treated the same. The handler only
sets a flag. Each step the ranks take the maximum of their flags, so every
rank stops after the same step; rank 0 then checkpoints and, under SLURM,
requeues the job, which resumes from that checkpoint.

Ctrl-C (``SIGINT``) is a stop signal too, once training has started (:attr:`PreemptionFlag.step` set):
the first one prints "Ctrl-C: checkpointing at step N; press Ctrl-C again to stop at once" and the run
checkpoints at the end of the step it is in; a second one (or one during start-up, or after the last
step) raises ``KeyboardInterrupt`` at once. DataLoader workers ignore ``SIGINT``
(:func:`ignore_interrupt` as their ``worker_init_fn``): a terminal's Ctrl-C reaches them too, and a worker
that stops would stop the loader.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
import torch.distributed as torch_dist

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    """Set by a signal; :meth:`agreed` returns the same answer on every rank.

    ``interrupt``: Ctrl-C checkpoints too (see the module docstring). :attr:`step` is the step a stop would
    checkpoint at, kept up to date by the training loop; None outside the loop (Ctrl-C stops at once).
    """

    def __init__(self, signals=STOP_SIGNALS, interrupt: bool = True):
        self.signum: int | None = None
        self.step: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        if interrupt:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    @property
    def interrupted(self) -> bool:
        """Whether the stop signal was a Ctrl-C."""
        return self.signum == signal.SIGINT

    def close(self) -> None:
        """Put the handlers that were there before back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def _interrupt(self, signum, frame) -> None:
        if self.signum is not None or self.step is None:  # a second Ctrl-C, or not training: stop now
            raise KeyboardInterrupt
        self.signum = signum
        if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_rank() != 0:
            return  # rank 0 says it
        # os.write, not print: a handler may run in the middle of a print to the same stream
        os.write(sys.stderr.fileno(), f"\npretrain: Ctrl-C: checkpointing at step {self.step}; press Ctrl-C again "
                                      f"to stop at once\n".encode())

    def agreed(self, device: torch.device) -> bool:
        """True on all ranks if any rank got a stop signal (one tiny all-reduce)."""
        flag = torch.tensor([1 if self.signum is not None else 0], device=device)
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return bool(flag.item())


def ignore_interrupt(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the DataLoader workers: Ctrl-C is for the main process (which checkpoints)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job; False (with a message) when not under SLURM or it fails."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and (
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    ) or os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"preempt: `scontrol requeue {job}` failed: {proc.stderr.strip()}; "
              "resubmit the job to continue from the checkpoint", file=sys.stderr, flush=True)
        return False
    print(f"preempt: requeued SLURM job {job}", flush=True)
    return True
