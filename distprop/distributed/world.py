"""The world: the communicator this process trains in, and functions over it.

``init()`` starts the world once and returns it: MPI (mpi4py) when the process was started by an
MPI launcher (``mpiexec``/``mpirun``/``srun``), else a world of one process that never imports
MPI. ``get_rank()``, ``get_local_rank()``, ... read it; the collective functions (``all_reduce``,
``broadcast``, ...) run on it and accept NumPy/CuPy arrays or Tensors (in place). Everything here
is re-exported by :mod:`distprop.distributed`; other modules of the package take the world from
here (``world.init()``), so none of them needs the package's ``__init__``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from distprop.distributed import lifeline
from distprop.distributed.comm import Communicator, MPICommunicator, SingleProcessCommunicator
from distprop.tensor import Tensor

# Variables set for each process by MPICH/Hydra, Intel MPI, Open MPI, PMIx and Slurm's srun.
_LAUNCHER_VARS = (
    "PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "SLURM_PROCID",
)

_world: Communicator | None = None
_watchdog = None


def launched_by_mpi() -> bool:
    """True when an MPI launcher (or Slurm) started this process, or MPI is already running."""
    if any(v in os.environ for v in _LAUNCHER_VARS):
        return True
    mpi = sys.modules.get("mpi4py.MPI")
    return bool(mpi is not None and mpi.Is_initialized())


def _launcher_size() -> int | None:
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return None


def init(backend: str | None = None, stall_timeout: float | None = None,
         guards: bool = True) -> Communicator:
    """Start (once) and return the world communicator.

    Args:
        backend: ``'mpi'``, ``'single'`` or None (env ``DISTPROP_BACKEND``, else MPI exactly when
            an MPI launcher started the process).
        stall_timeout: seconds a collective may wait before the stall watchdog aborts the job
            (default: env ``DISTPROP_STALL_TIMEOUT``, else 600; 0 disables).
        guards: with more than one rank, install the abort-on-uncaught-exception hook, the
            exit guard (``sys.exit(n)`` with ``n != 0`` on one rank aborts the job with ``n``)
            and the stall watchdog.

    With MPI, before MPI is initialised: under ``distprop launch``/``train -n N`` the rank
    registers with its launcher and exits if the launcher dies
    (:mod:`distprop.distributed.lifeline`); and MPI initialisation must complete within
    ``DISTPROP_INIT_TIMEOUT`` seconds (default 45; 0 disables), else this rank prints that some
    rank did not arrive and exits with status 1 (a rank that died before ``init()`` would
    otherwise leave the others waiting forever).

    Calling it again returns the same communicator.
    """
    global _world, _watchdog
    if _world is not None:
        return _world
    choice = (backend or os.environ.get("DISTPROP_BACKEND") or "").lower() or None
    if choice not in (None, "mpi", "single"):
        raise ValueError(f"backend must be 'mpi' or 'single', got {choice!r}")
    if choice is None:
        choice = "mpi" if launched_by_mpi() else "single"
    if choice == "mpi":
        try:
            import mpi4py  # noqa: F401
        except ImportError as exc:
            size = _launcher_size()
            if backend == "mpi" or (size or 1) > 1:
                raise RuntimeError(
                    f"this process was started by an MPI launcher (world size {size}) but "
                    f"mpi4py is not importable ({exc}); install it: pip install 'distprop[mpich]'"
                ) from exc
            choice = "single"
    if choice == "mpi":
        lifeline.connect()  # before MPI: the launcher learns of ranks that never get through
        timer = lifeline.start_init_timer()
        lifeline.initialize_mpi()  # without the GIL, so that the timer can fire
        world = MPICommunicator()
        if timer is not None:
            timer.done()
        lifeline.report("ready", size=world.size)
    else:
        world = SingleProcessCommunicator()
    _world = world
    if guards and world.size > 1:
        from distprop.distributed import guards as _guards

        _guards.install_excepthook(world)
        _guards.install_exit_guard(world)
        _watchdog = _guards.start_watchdog(world, stall_timeout)
    return world


def is_initialized() -> bool:
    """True once :func:`init` has started the world."""
    return _world is not None


def get_world() -> Communicator:
    """The world communicator (initialising it if needed)."""
    return init()


def get_rank() -> int:
    """This process's rank in the world."""
    return init().rank


def get_world_size() -> int:
    """How many processes the world has."""
    return init().size


def get_local_rank() -> int:
    """Rank among the processes on this node (from an MPI shared-memory split)."""
    return init().local_rank


def get_local_size() -> int:
    """How many processes of the world run on this node."""
    return init().local_size


def barrier() -> None:
    """Wait until every rank of the world gets here."""
    init().barrier()


def _array(x):
    return x.data if isinstance(x, Tensor) else x


def all_reduce(tensor, op: str = "sum", async_op: bool = False):
    """Reduce ``tensor`` (Tensor or array) over all ranks, in place; ``op`` is ``'sum'``,
    ``'mean'``, ``'max'`` or ``'min'``. Returns the tensor, or a request (``.wait()``) when
    ``async_op``."""
    comm = init()
    if async_op:
        return comm.iallreduce(_array(tensor), op)
    comm.allreduce(_array(tensor), op)
    return tensor


def broadcast(tensor, src: int = 0):
    """Overwrite ``tensor`` (in place) with rank ``src``'s values; returns it."""
    init().broadcast(_array(tensor), src)
    return tensor


def all_gather(tensor_list_or_tensor, tensor=None):
    """``all_gather(t)`` returns every rank's ``t`` stacked along a new first axis;
    ``all_gather(tensor_list, t)`` fills the list in place, as in PyTorch."""
    comm = init()
    if isinstance(tensor_list_or_tensor, list):
        if tensor is None:
            raise TypeError("all_gather(tensor_list, tensor): the tensor to send is missing")
        if len(tensor_list_or_tensor) != comm.size:
            raise ValueError(
                f"all_gather: tensor_list has {len(tensor_list_or_tensor)} entries but the world "
                f"has {comm.size} ranks"
            )
        gathered = comm.allgather(_array(tensor))
        for out, part in zip(tensor_list_or_tensor, gathered):
            _array(out)[...] = part
        return tensor_list_or_tensor
    x = tensor_list_or_tensor
    gathered = comm.allgather(_array(x))
    return Tensor._wrap(gathered) if isinstance(x, Tensor) else gathered


def reduce_scatter(tensor, op: str = "sum", out=None):
    """Reduce ``tensor`` over ranks and return this rank's 1/N chunk of the flattened result
    (its size must be a multiple of the world size)."""
    result = init().reduce_scatter(_array(tensor), op, None if out is None else _array(out))
    if out is not None:
        return out
    return Tensor._wrap(result) if isinstance(tensor, Tensor) else result


def all_reduce_object(value: Any, op: str = "sum") -> Any:
    """Reduce a small Python number (or list/tuple of numbers) over ranks."""
    return init().allreduce_obj(value, op)


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` (any picklable object), on every rank."""
    return init().broadcast_obj(value, src)


def all_gather_object(value: Any) -> list:
    """Every rank's ``value``, as a list indexed by rank."""
    return init().allgather_obj(value)
