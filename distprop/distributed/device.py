"""One GPU per rank: which device a rank uses, and the mapping printed at start-up.

Each rank picks its GPU from its node-local rank (from the communicator's MPI shared-memory
split, which is right under mpirun, srun and PBS alike) modulo the number of GPUs it can see.
``CUDA_VISIBLE_DEVICES`` is respected: CUDA numbers the visible devices 0..n-1, and the physical
device a rank ends up on is the corresponding entry of the variable. When a launcher gives each
rank its own single GPU (``srun --gpus-per-task=1``), every rank sees one device and uses it.

The mapping rule is the pure function :func:`select_device`, so it can be tested without GPUs;
:func:`assign_device` applies it to the running process and :func:`describe_mapping` renders
the gathered per-rank assignments for ``distprop train``/``launch`` to print.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from distprop import backend


@dataclass(frozen=True)
class DeviceAssignment:
    """Where one rank runs.

    Attributes:
        ordinal: the CUDA device number inside this process (after ``CUDA_VISIBLE_DEVICES``),
            or None for the CPU.
        physical: the entry of ``CUDA_VISIBLE_DEVICES`` it corresponds to (a number, a
            ``GPU-``/``MIG-`` UUID), or the ordinal as a string when the variable is unset.
        visible: how many GPUs the rank sees.
        shared: True when more local ranks than visible GPUs means ranks share GPUs.
    """

    ordinal: int | None
    physical: str | None
    visible: int
    shared: bool = False

    @property
    def device(self) -> str:
        return "cpu" if self.ordinal is None else f"cuda:{self.ordinal}"


def visible_devices(count: int, env: str | None = None) -> list[str]:
    """The physical names of the ``count`` GPUs CUDA shows this process.

    Args:
        count: number of devices the CUDA runtime reports.
        env: the value of ``CUDA_VISIBLE_DEVICES`` (read from the environment when None and the
            variable is set; pass ``""`` explicitly for "set but empty").

    CUDA stops at the first invalid entry and shows at most ``count`` devices; entries beyond
    ``count`` are dropped. With the variable unset the names are ``"0".."count-1"``.
    """
    if env is None:
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(count)]
    names = [part.strip() for part in env.split(",")]
    names = [n for n in names if n]
    return names[:count]


def select_device(local_rank: int, local_size: int, visible: list[str]) -> DeviceAssignment:
    """The device of the rank with node-local rank ``local_rank`` of ``local_size``.

    ``visible`` lists the physical names of the GPUs the rank sees (see
    :func:`visible_devices`); no GPUs means the CPU. Ranks are dealt round-robin:
    ``ordinal = local_rank % len(visible)``.

    Raises:
        ValueError: on a negative ``local_rank`` or a ``local_rank >= local_size``.
    """
    if local_rank < 0 or local_size < 1 or local_rank >= local_size:
        raise ValueError(f"local rank {local_rank} is not a rank of a node with {local_size} "
                         "local rank(s)")
    if not visible:
        return DeviceAssignment(None, None, 0, False)
    ordinal = local_rank % len(visible)
    return DeviceAssignment(ordinal, visible[ordinal], len(visible), local_size > len(visible))


def assign_device(comm, spec: str = "cuda") -> backend.Device:
    """Choose this rank's device and make it CuPy's current device.

    Args:
        comm: the communicator (its ``local_rank``/``local_size`` come from the MPI
            shared-memory split).
        spec: ``"cuda"`` picks by local rank; ``"cuda:N"`` forces device N on every rank;
            ``"cpu"`` returns the CPU.

    Raises:
        RuntimeError: when CUDA is asked for but CuPy or a GPU is missing (saying which).
    """
    dev = backend.device(spec)  # raises, naming what is missing, when CUDA is unusable
    if not dev.is_cuda:
        return dev
    if spec.strip().lower() == "cuda":
        choice = select_device(comm.local_rank, comm.local_size,
                               visible_devices(backend.gpu_count()))
        dev = backend.Device("cuda", choice.ordinal)
    backend.cupy_module().cuda.Device(dev.index).use()
    return dev


def pci_bus_id(dev: backend.Device) -> str | None:
    """The PCI bus id of a CUDA device (None on the CPU or when CUDA cannot say)."""
    if not dev.is_cuda:
        return None
    cp = backend.cupy_module()
    try:
        return str(cp.cuda.Device(dev.index).pci_bus_id)
    except Exception:
        pass
    try:
        return str(cp.cuda.runtime.deviceGetPCIBusId(dev.index))
    except Exception:
        return None


def device_name(dev: backend.Device) -> str:
    """The GPU's product name, or ``"cpu"``."""
    if not dev.is_cuda:
        return "cpu"
    try:
        props = backend.cupy_module().cuda.runtime.getDeviceProperties(dev.index)
        name = props.get("name", b"")
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return f"cuda:{dev.index}"


def local_entry(comm, dev: backend.Device) -> dict:
    """This rank's line of the mapping (host, ranks, device, physical id, PCI bus id)."""
    physical = None
    if dev.is_cuda:
        names = visible_devices(backend.gpu_count())
        physical = names[dev.index] if dev.index < len(names) else str(dev.index)
    return {"rank": comm.rank, "host": socket.gethostname(), "local_rank": comm.local_rank,
            "local_size": comm.local_size, "device": str(dev), "physical": physical,
            "pci": pci_bus_id(dev), "name": device_name(dev)}


def gather_mapping(comm, dev: backend.Device) -> list[dict]:
    """Every rank's :func:`local_entry`, indexed by rank (collective)."""
    mine = local_entry(comm, dev)
    return comm.allgather_obj(mine) if comm.size > 1 else [mine]


def shared_gpus(entries: list[dict]) -> list[list[int]]:
    """Groups of ranks that share one GPU (same host and PCI bus id, or physical id when the
    bus id is unknown); empty when every rank has its own."""
    groups: dict[tuple, list[int]] = {}
    for e in entries:
        if not str(e.get("device", "cpu")).startswith("cuda"):
            continue
        ident = e.get("pci") or e.get("physical") or e.get("device")
        groups.setdefault((e.get("host"), ident), []).append(int(e["rank"]))
    return [ranks for ranks in groups.values() if len(ranks) > 1]


def describe_mapping(entries: list[dict]) -> str:
    """Human-readable rank -> device lines, one per rank, plus a note on shared GPUs."""
    lines = []
    for e in entries:
        where = e["device"]
        if where != "cpu":
            extra = [e.get("name") or ""]
            if e.get("physical") is not None and str(e["physical"]) != where.split(":")[-1]:
                extra.append(f"CUDA_VISIBLE_DEVICES entry {e['physical']}")
            if e.get("pci"):
                extra.append(f"PCI {e['pci']}")
            where += " (" + ", ".join(x for x in extra if x) + ")"
        lines.append(f"rank {e['rank']} on {e['host']} (local rank {e['local_rank']}/"
                     f"{e['local_size']}) -> {where}")
    for ranks in shared_gpus(entries):
        lines.append(f"note: ranks {', '.join(map(str, ranks))} share one GPU")
    return "\n".join(lines)


def planned_mapping(ranks_on_node: int, visible: list[str]) -> str:
    """What :func:`select_device` will give the ranks of one node, for a launcher to print
    before starting them (``visible``: the physical GPU names this node shows)."""
    if not visible:
        return "no GPU visible: every rank runs on the CPU unless it asks for cuda"
    parts = []
    for local_rank in range(ranks_on_node):
        choice = select_device(local_rank, ranks_on_node, visible)
        name = choice.device if choice.physical == str(choice.ordinal) else (
            f"{choice.device} (CUDA_VISIBLE_DEVICES entry {choice.physical})")
        parts.append(f"local rank {local_rank} -> {name}")
    text = "; ".join(parts)
    if ranks_on_node > len(visible):
        text += f" ({ranks_on_node} ranks share {len(visible)} GPU(s): use --comm mpi-host)"
    return text


def launch_note(ranks_on_node: int) -> str | None:
    """The GPU mapping line ``distprop launch`` prints, or None without CuPy or GPUs (so a CPU
    launch prints nothing extra and never imports more than it needs)."""
    if os.environ.get("DISTPROP_NO_CUPY") or backend.cupy_module() is None:
        return None
    count = backend.gpu_count()
    if count == 0:
        return None
    return ("GPU mapping (with --device cuda; per node, by local rank): "
            + planned_mapping(ranks_on_node, visible_devices(count)))
