"""Data-parallel training over MPI (``dp.distributed``).

``init()`` returns the world communicator: MPI (mpi4py) when the process was started by an MPI
launcher (``mpiexec``/``mpirun``/``srun``), else a world of one process that never imports MPI.
The module-level functions use that world and accept NumPy/CuPy arrays or Tensors (in place).

This package only re-exports: the world and the functions over it live in
:mod:`distprop.distributed.world`, the communicators in :mod:`~distprop.distributed.comm`, DDP in
:mod:`~distprop.distributed.ddp`, ZeRO in :mod:`~distprop.distributed.zero`.
"""

from distprop.data.sampler import DistributedSampler
from distprop.distributed.comm import (
    Communicator,
    MPICommunicator,
    ReduceOp,
    Request,
    SingleProcessCommunicator,
)
from distprop.distributed.ddp import DistributedDataParallel
from distprop.distributed.metrics import MetricsReducer
from distprop.distributed.sync_batchnorm import SyncBatchNorm
from distprop.distributed.world import (
    all_gather,
    all_gather_object,
    all_reduce,
    all_reduce_object,
    barrier,
    broadcast,
    broadcast_object,
    get_local_rank,
    get_local_size,
    get_rank,
    get_world,
    get_world_size,
    init,
    is_initialized,
    launched_by_mpi,
    reduce_scatter,
)
from distprop.distributed.zero import ZeroRedundancyOptimizer

__all__ = [
    "Communicator", "DistributedDataParallel", "DistributedSampler", "MPICommunicator",
    "MetricsReducer", "ReduceOp", "Request", "SingleProcessCommunicator", "SyncBatchNorm",
    "ZeroRedundancyOptimizer", "all_gather",
    "all_gather_object", "all_reduce", "all_reduce_object", "barrier", "broadcast",
    "broadcast_object", "get_local_rank", "get_local_size", "get_rank", "get_world",
    "get_world_size", "init", "is_initialized", "launched_by_mpi", "reduce_scatter",
]
