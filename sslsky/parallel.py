"""MPI when launched under MPI, one process otherwise.

mpi4py is imported only when the environment shows an MPI launcher
(``mpirun``/``mpiexec``/``srun --mpi``), so ``sslsky pack`` runs as a plain
process on a laptop without MPI installed. Everything asks :func:`get_comm`
and uses the small mpi4py subset below (``rank``, ``size``, ``barrier``,
``bcast``, ``gather``, ``allgather``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

#: Variables that MPI launchers set in every rank's environment.
MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")


class SerialComm:
    """The subset of an mpi4py communicator used here, for one process."""

    rank = 0
    size = 1

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py spelling
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def barrier(self) -> None:
        pass

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list:
        return [obj]

    def allgather(self, obj: Any) -> list:
        return [obj]

    def allreduce(self, obj: Any, op: Any = None) -> Any:
        return obj

    def Abort(self, code: int = 1) -> None:  # noqa: N802
        raise SystemExit(code)


def launched_under_mpi() -> bool:
    """True when an MPI launcher started this process."""
    return any(var in os.environ for var in MPI_ENV_VARS)


@lru_cache(maxsize=1)
def get_comm():
    """``MPI.COMM_WORLD`` under an MPI launcher, else a :class:`SerialComm`."""
    if not launched_under_mpi():
        return SerialComm()
    try:
        from mpi4py import MPI
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "this process was started by an MPI launcher but mpi4py cannot be imported "
            f"({err}); install it with `pip install mpi4py` against the system MPI, "
            "or run without mpirun for a single process"
        ) from err
    return MPI.COMM_WORLD


def is_main() -> bool:
    return get_comm().Get_rank() == 0


def split_evenly(n: int, size: int, rank: int) -> range:
    """Contiguous block of ``range(n)`` owned by ``rank`` of ``size`` (sizes differ by at most one)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
