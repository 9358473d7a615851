"""Choosing the communicator for a device: ``--comm``, the names of ``registry.COMMS``.

:func:`choose_comm` applies the choice's rule (``rule_<name>`` below, named by its registry
entry), a pure function of the facts (device, CuPy, NCCL, CUDA-aware
MPI, world size, ranks sharing a GPU), so it is tested without GPUs. :func:`make_comm` gathers
the facts on every rank (agreeing across ranks: NCCL only if every rank has it, CUDA-aware MPI
only if every rank's library says so) and builds the communicator its entry in
:data:`distprop.registry.COMMS` names:

============  =====================================================================
``auto``      NCCL when available and every rank has its own GPU; else CUDA-aware MPI
              when the MPI library reports it; else host staging through pinned buffers.
              A single process, or CPU arrays, use the world communicator as it is.
``nccl``      NCCL; an error naming what is missing without CuPy/NCCL/a GPU. Ranks that
              share a GPU (NCCL refuses them) fall back to ``mpi-host``, saying so.
``mpi-cuda``  device pointers to MPI; an error when the library says it is not
              CUDA-aware (``DISTPROP_MPI_CUDA_AWARE=1`` overrides the query).
``mpi-host``  host staging through pinned buffers (any MPI, any number of ranks per GPU).
``mpi``       the MPI world communicator: CPU arrays as they are; GPU arrays to a CUDA-aware
              library when it says so, else through pinned host buffers.
============  =====================================================================

A new communicator is one ``registry.COMMS.register(CommEntry(name, description, factory,
rule=..., facts=...))`` call: no list here or in the CLI names it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from distprop import backend
from distprop.distributed import world
from distprop.distributed.comm import Communicator
from distprop.registry import COMMS

COMM_CHOICES = COMMS  # the --comm names (a live view of the registry)


@dataclass
class CommFacts:
    """What the choice depends on (identical on every rank after :func:`gather_facts`)."""

    device_is_cuda: bool
    world_size: int
    cupy: bool = False
    cupy_error: str | None = None
    nccl: bool = False
    nccl_info: str = ""
    mpi_cuda_aware: bool | None = None
    mpi_cuda_info: str = ""
    shared_gpus: list = field(default_factory=list)


class CommSelectionError(RuntimeError):
    """A ``--comm`` choice that cannot work here (the message says what is missing)."""


def choose_comm(choice: str, facts: CommFacts) -> tuple[str, str]:
    """``(kind, note)``: kind is ``'host'`` (the world communicator as it is) or the
    :data:`~distprop.registry.COMMS` name of the communicator to build; note explains a
    fallback (empty when there is none). The rule is the choice's registry entry's.

    Raises:
        ValueError: for an unknown choice.
        CommSelectionError: when an explicit choice cannot work, naming what is missing.
    """
    choice = str(choice).lower()
    if choice not in COMM_CHOICES:
        raise ValueError(f"unknown comm {choice!r}: choose one of {', '.join(COMM_CHOICES)}")
    return COMMS[choice].load_rule()(facts)


# -- the rules of the registered choices (registry.COMMS names them) ------------------------------


def _gpu_only(choice: str, facts: CommFacts) -> None:
    """Refuse CPU arrays for a choice that moves device arrays only."""
    if facts.device_is_cuda:
        return
    if not facts.cupy:
        raise CommSelectionError(
            f"--comm {choice} needs GPU arrays, but CuPy is missing "
            f"({facts.cupy_error}); install it (pip install 'distprop[gpu]') and train "
            "with --device cuda, or use --comm auto/mpi-host on the CPU")
    raise CommSelectionError(
        f"--comm {choice} needs GPU arrays: train with --device cuda (the model and "
        "the batches are on the CPU)")


def _mpi_for_device(facts: CommFacts, why: str = "") -> tuple[str, str]:
    """GPU arrays over MPI: CUDA-aware when the library says so, else staged through host."""
    if facts.mpi_cuda_aware:
        return "mpi-cuda", why + "; using CUDA-aware MPI (mpi-cuda)" if why else ""
    return "mpi-host", (why + "; MPI is not known to be CUDA-aware: staging through pinned "
                        "host buffers (mpi-host)") if why else ""


def rule_auto(facts: CommFacts) -> tuple[str, str]:
    """``auto``: NCCL when every rank has it and its own GPU, else :func:`rule_mpi`'s choice."""
    if not facts.device_is_cuda or facts.world_size == 1:
        return "host", ""
    if facts.nccl and not facts.shared_gpus:
        return "nccl", ""
    why = (_shared_note(facts.shared_gpus) if facts.nccl
           else f"NCCL is not available ({facts.nccl_info})")
    return _mpi_for_device(facts, why)


def rule_mpi(facts: CommFacts) -> tuple[str, str]:
    """``mpi``: the MPI world communicator; GPU arrays go to a CUDA-aware library directly,
    else through pinned host buffers."""
    if not facts.device_is_cuda or facts.world_size == 1:
        return "host", ""
    return _mpi_for_device(facts)


def rule_nccl(facts: CommFacts) -> tuple[str, str]:
    """``nccl``: NCCL or a clear error; ranks sharing a GPU fall back to mpi-host."""
    _gpu_only("nccl", facts)
    if not facts.nccl:
        raise CommSelectionError(f"--comm nccl: {facts.nccl_info or 'NCCL is not available'}"
                                 "; use --comm mpi-host (or mpi-cuda with a CUDA-aware MPI)")
    if facts.shared_gpus:
        return "mpi-host", _shared_note(facts.shared_gpus) + "; falling back to mpi-host"
    return "nccl", ""


def rule_mpi_cuda(facts: CommFacts) -> tuple[str, str]:
    """``mpi-cuda``: device pointers to MPI; an error when the library says it cannot."""
    _gpu_only("mpi-cuda", facts)
    if facts.world_size == 1:
        return "host", ""  # one process: nothing to communicate
    if facts.mpi_cuda_aware is False:
        raise CommSelectionError(
            "--comm mpi-cuda: the MPI library does not accept CUDA buffers "
            f"({facts.mpi_cuda_info}); use --comm mpi-host or nccl, or set "
            "DISTPROP_MPI_CUDA_AWARE=1 if you know better")
    note = "" if facts.mpi_cuda_aware else (
        f"cannot tell whether MPI is CUDA-aware ({facts.mpi_cuda_info}); trusting "
        "--comm mpi-cuda")
    return "mpi-cuda", note


def rule_mpi_host(facts: CommFacts) -> tuple[str, str]:
    """``mpi-host``: host staging for GPU arrays (the world communicator for CPU arrays)."""
    if not facts.device_is_cuda or facts.world_size == 1:
        return "host", ""
    return "mpi-host", ""


def rule_shm(facts: CommFacts) -> tuple[str, str]:
    """``shm``: node-shared gradient buffers (:mod:`distprop.distributed.shm`) over the world
    communicator; CPU gradients only."""
    if facts.device_is_cuda:
        raise CommSelectionError(
            "--comm shm reduces CPU (NumPy) gradients in node-shared memory; for --device "
            "cuda use --comm auto, nccl, mpi-cuda or mpi-host")
    return "host", ""


def _shared_note(groups: list) -> str:
    described = "; ".join("ranks " + ", ".join(map(str, g)) for g in groups)
    return f"NCCL refuses two ranks on one GPU ({described} share one)"


def local_facts(dev: backend.Device) -> dict:
    """This rank's facts (cheap; no collective)."""
    from distprop.distributed.nccl import nccl_status

    out = {"cupy": backend.cupy_available(), "cupy_error": backend._cupy_error}
    if dev.is_cuda:
        out["nccl"], out["nccl_info"] = nccl_status()
    else:
        out["nccl"], out["nccl_info"] = False, "not a CUDA device"
    return out


def gather_facts(host: Communicator, dev: backend.Device, need_mapping: bool,
                 need_mpi: bool) -> CommFacts:
    """The facts, agreed across ranks (collective when the world has more than one rank)."""
    from distprop.distributed import device as device_mod

    mine = local_facts(dev)
    if need_mpi and host.size > 1:
        from distprop.distributed.gpucomm import mpi_cuda_support

        mine["mpi_cuda_aware"], mine["mpi_cuda_info"] = mpi_cuda_support()
    else:
        mine["mpi_cuda_aware"], mine["mpi_cuda_info"] = None, "not queried"
    everyone = host.allgather_obj(mine) if host.size > 1 else [mine]
    aware = [f["mpi_cuda_aware"] for f in everyone]
    facts = CommFacts(
        device_is_cuda=dev.is_cuda, world_size=host.size,
        cupy=all(f["cupy"] for f in everyone), cupy_error=mine["cupy_error"],
        nccl=all(f["nccl"] for f in everyone),
        nccl_info=next((f["nccl_info"] for f in everyone if not f["nccl"]), mine["nccl_info"]),
        mpi_cuda_aware=(False if False in aware else (None if None in aware else True)),
        mpi_cuda_info=mine["mpi_cuda_info"],
    )
    if need_mapping and dev.is_cuda and host.size > 1:
        facts.shared_gpus = device_mod.shared_gpus(device_mod.gather_mapping(host, dev))
    return facts


def make_comm(choice: str = "auto", host: Communicator | None = None, device=None,
              verbose: bool = True) -> Communicator:
    """The communicator for ``choice`` on this rank's ``device`` (collective: every rank calls
    it with the same choice).

    Args:
        choice: one of :data:`COMM_CHOICES`.
        host: the world communicator (default: ``dp.distributed.init()``).
        device: where this rank's model lives (``"cpu"``, ``"cuda:N"`` or a Device).
        verbose: print a fallback note on rank 0 (stderr).

    Raises:
        ValueError / CommSelectionError: see :func:`choose_comm`.
    """
    choice = str(choice).lower()
    if choice not in COMM_CHOICES:
        raise ValueError(f"unknown comm {choice!r}: choose one of {', '.join(COMM_CHOICES)}")
    if host is None:
        host = world.init()
    dev = device if isinstance(device, backend.Device) else (
        backend.CPU if device is None else backend.device(device))
    entry = COMMS[choice]
    if dev.is_cuda:
        facts = gather_facts(host, dev, need_mapping="gpu-mapping" in entry.facts,
                             need_mpi="mpi-cuda-aware" in entry.facts)
    else:  # decided from the choice alone (the same on every rank): no collective
        facts = CommFacts(device_is_cuda=False, world_size=host.size,
                          cupy=backend.cupy_available(), cupy_error=backend._cupy_error)
    kind, note = choose_comm(choice, facts)
    if note and verbose and host.rank == 0:
        logging.getLogger(__name__).warning(f"distprop: comm {choice}: {note}")
    if kind == "host" or COMMS[kind].factory is None:
        return host
    return COMMS[kind].load()(host, dev)


def comm_kind(comm: Communicator) -> str:
    """A short name for what a communicator does with device arrays."""
    kind = getattr(comm, "kind", None)
    if kind:
        return kind
    return "single" if comm.size == 1 else "mpi"
