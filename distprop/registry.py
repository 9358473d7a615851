"""The registries: every name the CLI, the configuration and the docs accept, declared once.

One :class:`Registry` per kind maps a name to an entry (a description, and a factory where
there is something to build). The CLI's choices, help texts and epilogs, the checks of
:class:`~distprop.train.config.TrainConfig`, ``distprop info`` and the README test read them,
so adding an optimizer (say) is one :meth:`Registry.register` call next to its implementation::

    from distprop import registry
    registry.OPTIMIZERS.register(registry.OptimizerEntry(
        "lion", "Lion (sign of an EMA of gradients)", factory=Lion, default_lr=1e-4))

=================  ===========================================================================
:data:`MODELS`     the model zoo, :data:`distprop.models.MODELS` (name -> ``ModelSpec``, with
                   the size options ``distprop train`` accepts for it)
:data:`OPTIMIZERS` ``--optimizer``: the class, its default learning rate, whether it takes
                   ``--momentum``
:data:`LR_SCHEDULES`  ``--lr-schedule``: the factor of the base rate over the fraction of
                   training done (``plateau``: none, it follows the validation loss)
:data:`TASKS`, :data:`LOSSES`  ``--task`` and ``--loss`` (each loss names its task; the first
                   loss of a task is its default)
:data:`COMMS`      ``--comm``: the communicators, each with the rule that picks it (see
                   :mod:`distprop.distributed.selection`)
:data:`COMPRESSIONS`  ``--compression``: DDP's communication hooks (fp16, bf16, PowerSGD)
:data:`ENV_VARS`   the ``DISTPROP_*`` environment variables read anywhere in distprop
=================  ===========================================================================
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from distprop import optim
from distprop.models import MODELS

__all__ = ["COMMS", "COMPRESSIONS", "ENV_VARS", "LOSSES", "LR_SCHEDULES", "MODELS",
           "OPTIMIZERS", "TASKS", "CommEntry", "Entry", "LossEntry", "OptimizerEntry", "Registry",
           "env_entry", "env_markdown"]


@dataclass(frozen=True)
class Entry:
    """One registered name.

    Attributes:
        name: what the user types (``--optimizer adam``).
        description: one line for help texts, ``distprop info`` and the docs.
        factory: what the name builds: a callable, a ``"module:attribute"`` string imported on
            first use (:meth:`load`), or None when there is nothing to build.
    """

    name: str
    description: str
    factory: Callable[..., Any] | str | None = None

    def load(self) -> Callable[..., Any]:
        """The factory, imported when given as ``"module:attribute"``.

        Raises:
            LookupError: the entry has no factory.
        """
        if self.factory is None:
            raise LookupError(f"{self.name!r} has no factory")
        if isinstance(self.factory, str):
            module, _, attr = self.factory.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.factory


@dataclass(frozen=True)
class OptimizerEntry(Entry):
    """An optimizer: ``factory(params, lr=..., weight_decay=..., [momentum=...])``.

    Attributes:
        default_lr: the learning rate when ``--lr`` is not given.
        momentum: whether ``--momentum`` is passed to the factory.
    """

    default_lr: float = 1e-3
    momentum: bool = False


@dataclass(frozen=True)
class LossEntry(Entry):
    """A loss of ``distprop train``: ``factory()`` returns the loss module; ``task`` is the
    task it belongs to."""

    task: str = "classification"


E = TypeVar("E", bound=Entry)


class Registry(Mapping[str, E], Generic[E]):
    """Names of one kind, in declaration order: a read-only mapping name -> entry, plus
    :meth:`register` / :meth:`unregister`. Iterating yields the names, so
    ``", ".join(registry)`` and ``name in registry`` work."""

    def __init__(self, kind: str, entries: Iterable[E] = ()):
        self.kind = kind
        self._entries: dict[str, E] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: E, replace: bool = False) -> E:
        """Add ``entry`` under ``entry.name`` and return it.

        Raises:
            ValueError: the name is taken (unless ``replace``) or is empty.
        """
        if not entry.name or not isinstance(entry.name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {entry.name!r}")
        if entry.name in self._entries and not replace:
            raise ValueError(f"{self.kind} {entry.name!r} is already registered")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> E:
        """Remove ``name`` and return its entry (KeyError when absent)."""
        return self._entries.pop(name)

    def __getitem__(self, name: str) -> E:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    def names(self) -> tuple[str, ...]:
        """The names, in declaration order."""
        return tuple(self._entries)

    def unknown(self, name: object) -> str:
        """The one-line message for a name that is not registered."""
        return f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}"

    def lookup(self, name: str) -> E:
        """The entry of ``name``.

        Raises:
            ValueError: naming the kind and the valid names.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(self.unknown(name)) from None

    def describe(self, indent: str = "  ") -> str:
        """One ``name  description`` line per entry (for help texts)."""
        width = max((len(n) for n in self._entries), default=0)
        return "\n".join(f"{indent}{name.ljust(width)}  {e.description}"
                         for name, e in self._entries.items())


# --- optimizers ---------------------------------------------------------------------------------

OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer", [
    OptimizerEntry("sgd", "SGD with momentum (--momentum)", optim.SGD, default_lr=0.1,
                   momentum=True),
    OptimizerEntry("adam", "Adam", optim.Adam),
    OptimizerEntry("adamw", "AdamW (decoupled weight decay)", optim.AdamW),
    OptimizerEntry("adagrad", "Adagrad", optim.Adagrad, default_lr=0.01),
    OptimizerEntry("rmsprop", "RMSprop (--momentum)", optim.RMSprop, momentum=True),
    OptimizerEntry("adadelta", "Adadelta", optim.Adadelta, default_lr=1.0),
    OptimizerEntry("nadam", "NAdam", optim.NAdam),
])

# --- learning-rate schedules: factor of the base rate at fraction q of the run (after warm-up) --

LR_SCHEDULES: Registry[Entry] = Registry("lr-schedule", [
    Entry("none", "constant rate", lambda q: 1.0),
    Entry("step", "x0.1 every third of the run", lambda q: 0.1 ** math.floor(3 * q)),
    Entry("multistep", "x0.1 at 50 % and again at 75 % of the run",
          lambda q: 1.0 if q < 0.5 else (0.1 if q < 0.75 else 0.01)),
    Entry("exponential", "to x0.01 over the run", lambda q: 0.01 ** q),
    Entry("cosine", "cosine to 0 over the run", lambda q: (1.0 + math.cos(math.pi * q)) / 2),
    Entry("linear", "linearly to x0.01 over the run", lambda q: 1.0 - 0.99 * q),
    Entry("plateau", "x0.1 after 2 epochs without val-loss improvement (no warm-up)"),
])

# --- tasks and losses ---------------------------------------------------------------------------

TASKS: Registry[Entry] = Registry("task", [
    Entry("classification", "integer labels; accuracy"),
    Entry("regression", ".npz with float targets y of shape (N,) or (N, k); r2 and mae"),
])

LOSSES: Registry[LossEntry] = Registry("loss", [
    LossEntry("cross_entropy", "cross-entropy on logits", "distprop.nn:CrossEntropyLoss",
              task="classification"),
    LossEntry("mse", "mean squared error", "distprop.nn:MSELoss", task="regression"),
    LossEntry("huber", "Huber loss, delta 1", "distprop.nn:HuberLoss", task="regression"),
])

# --- communicators and compression --------------------------------------------------------------

@dataclass(frozen=True)
class CommEntry(Entry):
    """A communicator choice (``--comm``).

    Attributes:
        factory: ``factory(host_comm, device) -> Communicator`` when the rule picks this name
            (None: the world communicator as it is).
        rule: ``rule(facts) -> (kind, note)`` (a callable or ``"module:attribute"``): which
            registered communicator the choice becomes for the facts of
            :class:`distprop.distributed.selection.CommFacts` (kind ``'host'``: the world
            communicator), raising ``CommSelectionError`` when it cannot work.
        facts: the collective fact-finding the rule needs on GPUs: ``"gpu-mapping"`` (which
            ranks share a GPU), ``"mpi-cuda-aware"`` (what the MPI library says).
    """

    rule: Callable[..., Any] | str | None = None
    facts: tuple[str, ...] = ()

    def load_rule(self) -> Callable[..., Any]:
        """The rule, imported when given as ``"module:attribute"``."""
        rule = self.rule
        if isinstance(rule, str):
            module, _, attr = rule.partition(":")
            return getattr(importlib.import_module(module), attr)
        if rule is None:
            raise LookupError(f"comm {self.name!r} has no rule")
        return rule


_SEL = "distprop.distributed.selection:"
COMMS: Registry[CommEntry] = Registry("comm", [
    CommEntry("auto", "NCCL when every rank has its own GPU, else CUDA-aware MPI when the "
              "library reports it, else mpi-host; CPU arrays and one process use MPI as it is",
              rule=_SEL + "rule_auto", facts=("gpu-mapping", "mpi-cuda-aware")),
    CommEntry("nccl", "NCCL (ranks sharing a GPU fall back to mpi-host)",
              "distprop.distributed.nccl:NCCLCommunicator", rule=_SEL + "rule_nccl",
              facts=("gpu-mapping",)),
    CommEntry("mpi-cuda", "device pointers to a CUDA-aware MPI",
              "distprop.distributed.gpucomm:CudaAwareMPICommunicator",
              rule=_SEL + "rule_mpi_cuda", facts=("mpi-cuda-aware",)),
    CommEntry("mpi-host", "staging through pinned host buffers (any MPI, any ranks per GPU)",
              "distprop.distributed.gpucomm:HostStagedCommunicator",
              rule=_SEL + "rule_mpi_host"),
    CommEntry("mpi", "the MPI world communicator (GPU arrays: CUDA-aware when the library "
              "says so, else staged through host buffers)", rule=_SEL + "rule_mpi",
              facts=("mpi-cuda-aware",)),
    CommEntry("shm", "CPU gradients of the ranks of a node in one shared-memory window, "
              "summed there; across nodes hierarchically over MPI (the default on the CPU "
              "where ranks share a node)", rule=_SEL + "rule_shm"),
])

# Each compression is a communication hook: factory(comm, **options) -> (state, hook), what
# DistributedDataParallel(compression=name) registers (see distprop.distributed.hooks).
COMPRESSIONS: Registry[Entry] = Registry("compression", [
    Entry("none", "float32 gradients", "distprop.distributed.hooks:no_compression"),
    Entry("fp16", "IEEE half on the wire, summed in float32",
          "distprop.distributed.hooks:fp16_compression"),
    Entry("bf16", "bfloat16 on the wire, summed in float32",
          "distprop.distributed.hooks:bf16_compression"),
    Entry("powersgd", "low-rank PowerSGD with error feedback (--powersgd-rank, "
          "--powersgd-start)", "distprop.distributed.powersgd:powersgd_compression"),
])

# --- environment variables ----------------------------------------------------------------------

ENV_VARS: Registry[Entry] = Registry("environment variable", [
    Entry("DISTPROP_BACKEND", "mpi or single: the world of dist.init() (default: MPI exactly "
          "when launched by an MPI launcher)"),
    Entry("DISTPROP_INIT_TIMEOUT", "seconds a rank waits for MPI start-up before exiting 1 "
          "(default 45; 0 disables)"),
    Entry("DISTPROP_STALL_TIMEOUT", "seconds a collective may wait before the job is ended, "
          "naming the ranks (default: 600 until the first step, then max(60, 20 x the "
          "slowest step); 0 disables)"),
    Entry("DISTPROP_LOG_LEVEL", "debug, info, warning, error or critical: distprop's log "
          "level in any program (default info; --log-level sets it for the ranks)"),
    Entry("DISTPROP_RESTART_COUNT", "which attempt this is under --max-restarts (0 for the "
          "first launch; set by distprop launch and train -n)"),
    Entry("DISTPROP_PROGRESS_THREAD", "1, 0 or auto: a thread drives pending gradient "
          "transfers (auto: when the node has a core to spare)"),
    Entry("DISTPROP_PROGRESS_INTERVAL", "seconds between the progress thread's polls "
          "(default 2e-4)"),
    Entry("DISTPROP_INTRA_NODE", "auto, shm or mpi: how DDP reduces CPU gradients among ranks "
          "of one node (shm: node-shared gradient buffers; auto: shm where ranks share a node)"),
    Entry("DISTPROP_MPI_CUDA_AWARE", "1 or 0: whether MPI accepts CUDA buffers, overriding "
          "the library query"),
    Entry("DISTPROP_MALLOC", "keep or system: keep freed heap memory in the process for the "
          "next step (default; no page faults after the first step), or glibc's defaults"),
    Entry("DISTPROP_NO_CUPY", "set: do not import CuPy (CPU only)"),
    Entry("DISTPROP_CUDA_KERNELS", "0: use CuPy's generic operations instead of distprop's "
          "CUDA kernels"),
    Entry("DISTPROP_CACHE_DIR", "where generated datasets are cached (default "
          "~/.cache/distprop)"),
    Entry("DISTPROP_TRACE", "Chrome trace file of each rank (set by distprop train --trace)"),
    Entry("DISTPROP_SUPERVISOR", "host:port:token of the launcher the ranks report to (set "
          "by distprop launch and train -n)"),
    Entry("DISTPROP_<COMMAND>_<OPTION>", "an option of a distprop command, e.g. "
          "DISTPROP_TRAIN_EPOCHS=3 (flags win over the environment, which wins over --config)"),
    Entry("DISTPROP_FAKE_MPI_VERSION", "tests: what mpiexec --version is taken to print"),
    Entry("DISTPROP_ASSUME_ROOT", "tests: 1 or 0, whether to act as if running as root"),
])


def env_entry(name: str, commands: Iterable[str] = ()) -> Entry | None:
    """The :data:`ENV_VARS` entry that describes variable ``name`` (None when distprop does
    not read it); ``DISTPROP_<COMMAND>_<OPTION>`` matches for each command in ``commands``."""
    if name in ENV_VARS and "<" not in name:
        return ENV_VARS[name]
    if any(name.startswith(f"DISTPROP_{c.upper()}_") for c in commands):
        return ENV_VARS["DISTPROP_<COMMAND>_<OPTION>"]
    return None


def env_markdown() -> str:
    """The README's table of environment variables (Markdown)."""
    rows = [f"| `{name}` | {entry.description} |" for name, entry in ENV_VARS.items()]
    return "\n".join(["| Variable | Meaning |", "| --- | --- |", *rows])

