"""Start a command on N MPI ranks: find the launcher, build its command line, run it.

Used by ``distprop launch`` and ``distprop train -n N``. Three launchers are understood:

* ``mpich``: Hydra's ``mpiexec`` (MPICH, the ``mpich`` wheel, Intel MPI, MVAPICH);
* ``openmpi``: Open MPI's ``mpiexec``/``mpirun`` (adds ``--allow-run-as-root`` when run as root,
  ``--oversubscribe`` when asked);
* ``srun``: Slurm, inside an allocation (nodes come from the allocation).

``auto`` picks ``srun`` inside a Slurm job when ``srun`` exists, else asks the ``mpiexec`` found
(the one next to ``sys.executable`` first, i.e. the ``mpich`` wheel) for ``--version``.
Every rank gets ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS`` set to the
threads per rank (default: this machine's cores // ranks per node, at least 1). The launcher
reads /dev/null as standard input unless ``stdin`` is asked for (then rank 0 gets this
process's), so a launch inside ``while read`` does not eat the loop's input.
:func:`run` supervises the job (:mod:`distprop.supervise`): the ranks die with this process,
and a rank killed by a signal is named, with exit code 128 + the signal.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distprop import restarts

IMPLEMENTATIONS = ("auto", "mpich", "openmpi", "srun")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class LaunchError(ValueError):
    """A launch that cannot work as asked (too many ranks, no launcher, bad host list)."""


@dataclass
class LaunchConfig:
    """What to launch and how.

    Attributes:
        nprocs: number of ranks.
        command: the program and its arguments, run on every rank.
        hosts: ``"host1:2,host2:2"`` (slots after the colon, default 1).
        hostfile: a file with one host per line (``host slots=2`` or ``host:2``; ``#`` comments).
        mpi: ``auto``, ``mpich``, ``openmpi`` or ``srun``.
        threads_per_rank: BLAS/OpenMP threads per rank (None: cores // ranks per node).
        mpi_args: extra launcher arguments, split like a shell would.
        oversubscribe: allow more ranks than slots.
        mpiexec: a specific launcher executable (default: found automatically).
        extra_env: more environment variables for the ranks.
        stdin: forward this process's standard input to rank 0 (default: /dev/null).
    """

    nprocs: int
    command: list[str]
    hosts: str | None = None
    hostfile: str | None = None
    mpi: str = "auto"
    threads_per_rank: int | None = None
    mpi_args: str = ""
    oversubscribe: bool = False
    mpiexec: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    stdin: bool = False


@dataclass
class LaunchPlan:
    """The resolved launch: the argv to run, the environment additions and what was detected."""

    argv: list[str]
    env: dict[str, str]
    implementation: str
    launcher: str
    threads_per_rank: int
    slots: int | None
    stdin: bool = False
    local: bool = True  #: every rank on this machine (no host list, srun or batch allocation)

    def shell(self) -> str:
        return " ".join(shlex.quote(a) for a in self.argv)


# --- detection ----------------------------------------------------------------------------------


def find_mpiexec() -> str | None:
    """The ``mpiexec`` next to ``sys.executable`` (the mpich wheel), else the first on PATH."""
    for name in ("mpiexec", "mpirun"):
        here = Path(sys.executable).parent / name
        if here.exists() and os.access(here, os.X_OK):
            return str(here)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name)
        if found:
            return found
    return None


def parse_version_output(text: str) -> str | None:
    """``mpich`` or ``openmpi`` from a launcher's ``--version`` output (None if unknown)."""
    lowered = text.lower()
    if "open mpi" in lowered or "openrte" in lowered or "open-mpi" in lowered or \
            "prte" in lowered:
        return "openmpi"
    if "hydra" in lowered or "mpich" in lowered or "intel(r) mpi" in lowered or \
            "mvapich" in lowered:
        return "mpich"
    if lowered.startswith("slurm"):
        return "srun"
    return None


def open_mpi_major(text: str) -> int | None:
    """The major version in Open MPI's ``--version`` output ("mpiexec (Open MPI) 5.0.11")."""
    found = re.search(r"open mpi\)?\s+v?(\d+)\.", text, re.IGNORECASE)
    return int(found.group(1)) if found else None


def version_output(executable: str) -> str:
    """What ``executable --version`` prints (``DISTPROP_FAKE_MPI_VERSION`` overrides, for tests)."""
    fake = os.environ.get("DISTPROP_FAKE_MPI_VERSION")
    if fake is not None:
        return fake
    try:
        done = subprocess.run([executable, "--version"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"<{executable} --version failed: {exc}>"
    return (done.stdout or "") + (done.stderr or "")


def in_slurm_allocation() -> bool:
    return "SLURM_JOB_ID" in os.environ and shutil.which("srun") is not None


def detect(mpi: str = "auto", mpiexec: str | None = None) -> tuple[str, str]:
    """Resolve ``(implementation, launcher executable)``.

    Raises:
        LaunchError: when no launcher can be found or its implementation is unknown.
    """
    if mpi not in IMPLEMENTATIONS:
        raise LaunchError(f"unknown MPI implementation {mpi!r}; choose one of "
                          f"{', '.join(IMPLEMENTATIONS)}")
    if mpi == "srun" or (mpi == "auto" and mpiexec is None and in_slurm_allocation()):
        return "srun", mpiexec or shutil.which("srun") or "srun"
    exe = mpiexec or find_mpiexec()
    if exe is None:
        raise LaunchError("no mpiexec found: install the MPI runtime wheel with "
                          "pip install 'distprop[mpich]', or put your MPI's mpiexec on PATH")
    if mpi != "auto":
        return mpi, exe
    found = parse_version_output(version_output(exe))
    if found is None:
        raise LaunchError(f"cannot tell which MPI {exe} belongs to from its --version output; "
                          "pass --mpi mpich|openmpi|srun")
    return found, exe


_BATCH_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "PBS_NODEFILE", "LSB_JOBID", "PE_HOSTFILE",
               "COBALT_JOBID", "FLUX_JOB_ID")


def in_batch_allocation() -> bool:
    """Inside a batch job, where ``mpiexec`` may place ranks on other nodes by itself."""
    return any(var in os.environ for var in _BATCH_VARS)


def running_as_root() -> bool:
    """Whether this process runs as root (``DISTPROP_ASSUME_ROOT=0|1`` overrides, for tests)."""
    forced = os.environ.get("DISTPROP_ASSUME_ROOT")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    return hasattr(os, "geteuid") and os.geteuid() == 0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --- hosts --------------------------------------------------------------------------------------


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    """``"a:2,b:2"`` -> ``[("a", 2), ("b", 2)]`` (a host without a count has 1 slot)."""
    hosts = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, count = item.partition(":")
        if not name or (count and (not count.isdigit() or int(count) < 1)):
            raise LaunchError(f"bad host entry {item!r} in -H {spec!r}: expected host or host:N")
        hosts.append((name, int(count) if count else 1))
    if not hosts:
        raise LaunchError(f"-H {spec!r} names no hosts")
    return hosts


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """Hosts and slots from an Open MPI (``host slots=N``) or MPICH (``host:N``) hostfile."""
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"hostfile {path} does not exist")
    hosts = []
    for lineno, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        name, slots = parts[0], 1
        if ":" in name:
            name, _, count = name.partition(":")
            slots = int(count) if count.isdigit() else -1
        for extra in parts[1:]:
            key, _, value = extra.partition("=")
            if key == "slots":
                slots = int(value) if value.isdigit() else -1
        if slots < 1 or not name:
            raise LaunchError(f"{path}:{lineno}: cannot read {raw.strip()!r}; expected "
                              "'host slots=N' or 'host:N'")
        hosts.append((name, slots))
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no hosts")
    return hosts


# --- planning -----------------------------------------------------------------------------------


def plan(cfg: LaunchConfig) -> LaunchPlan:
    """Check the request and build the launcher command (nothing is started).

    Raises:
        LaunchError: bad rank count, too many ranks for the slots without ``oversubscribe``,
            conflicting or unreadable host lists, no launcher.
    """
    if cfg.nprocs < 1:
        raise LaunchError(f"-n must be at least 1, got {cfg.nprocs}")
    if not cfg.command:
        raise LaunchError("no command to launch: put it after '--', e.g. "
                          "distprop launch -n 2 -- python train.py")
    if cfg.hosts and cfg.hostfile:
        raise LaunchError("give either -H/--hosts or --hostfile, not both")
    if cfg.threads_per_rank is not None and cfg.threads_per_rank < 1:
        raise LaunchError(f"--threads-per-rank must be at least 1, got {cfg.threads_per_rank}")
    impl, exe = detect(cfg.mpi, cfg.mpiexec)
    hosts = None
    if cfg.hosts:
        hosts = parse_hosts(cfg.hosts)
    elif cfg.hostfile:
        hosts = parse_hostfile(cfg.hostfile)
    if impl == "srun" and hosts is not None:
        raise LaunchError("with srun the nodes come from the Slurm allocation: drop -H/--hostfile "
                          "and use sbatch/salloc -N (or --nodelist)")
    if hosts is not None:
        slots, where = sum(s for _, s in hosts), "slots in the host list"
        per_node = max(s for _, s in hosts)
    elif impl == "srun" and os.environ.get("SLURM_NTASKS", "").isdigit():
        slots, where = int(os.environ["SLURM_NTASKS"]), "tasks in this Slurm allocation"
        per_node = max(1, cfg.nprocs // max(1, int(os.environ.get("SLURM_NNODES", "1") or 1)))
    elif impl == "srun":
        slots, where, per_node = None, "", cfg.nprocs
    else:
        slots, where = available_cores(), "CPU cores on this machine"
        per_node = cfg.nprocs
    if slots is not None and cfg.nprocs > slots and not cfg.oversubscribe:
        raise LaunchError(f"-n {cfg.nprocs} is more than the {slots} {where}; pass "
                          "--oversubscribe to run anyway (slower), or lower -n")
    threads = cfg.threads_per_rank or max(1, available_cores() // max(1, min(per_node,
                                                                             cfg.nprocs)))
    env = {var: str(threads) for var in THREAD_VARS}
    env.update(cfg.extra_env)
    try:
        extra = shlex.split(cfg.mpi_args) if cfg.mpi_args else []
    except ValueError as exc:  # e.g. "No closing quotation"
        raise LaunchError(f"--mpi-args {cfg.mpi_args!r} cannot be split like a shell would: "
                          f"{exc}") from None
    argv = [exe]
    if impl == "mpich":
        argv += ["-n", str(cfg.nprocs)]
        if hosts is not None:  # a hostfile too: Hydra cannot read Open MPI's 'host slots=N'
            argv += ["-hosts", ",".join(f"{h}:{s}" for h, s in hosts)]
        for key, value in env.items():
            argv += ["-genv", key, value]
    elif impl == "openmpi":
        argv += ["-n", str(cfg.nprocs)]
        if running_as_root():
            argv.append("--allow-run-as-root")
        if cfg.oversubscribe:
            argv.append("--oversubscribe")
        if hosts is not None:  # a hostfile too: Open MPI cannot read MPICH's 'host:N'
            argv += ["--host", ",".join(f"{h}:{s}" for h, s in hosts)]
        if threads > 1:
            argv += ["--bind-to", "none"]
        for key, value in env.items():
            argv += ["-x", f"{key}={value}"]
    else:  # srun
        argv += ["-n", str(cfg.nprocs), f"--cpus-per-task={threads}",
                 "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items())]
        if cfg.oversubscribe:
            argv.append("--overcommit")
    argv += extra + list(cfg.command)
    return LaunchPlan(argv=argv, env=env, implementation=impl, launcher=exe,
                      threads_per_rank=threads, slots=slots, stdin=cfg.stdin,
                      local=hosts is None and impl != "srun" and not in_batch_allocation())


_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_PYTHON_NAME = re.compile(r"python(\d+(\.\d+)*)?$")
_PYTHON_VALUE_OPTIONS = ("-W", "-X", "--check-hash-based-pycs")
_PYTHON_EXITING_OPTIONS = ("-h", "-?", "--help", "--help-env", "--help-xoptions", "--help-all",
                           "-V", "--version")


def _all_ranks_local(cfg: LaunchConfig, launch: LaunchPlan) -> bool:
    if launch.implementation == "srun":
        return False  # the nodes of the allocation
    spec = cfg.hosts or None
    if spec is None and cfg.hostfile is None:
        return True
    hosts = parse_hosts(spec) if spec else parse_hostfile(cfg.hostfile)
    here = socket.gethostname()
    return all(h in _LOCAL_HOSTS or h == here or h == here.split(".")[0] for h, _ in hosts)


def python_reads_stdin(args: list[str]) -> bool:
    """Whether ``python ARGS`` would read its program from standard input (no script, -c, -m)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-":
            return True
        if arg in _PYTHON_EXITING_OPTIONS:
            return False
        if arg.startswith("--"):
            i += 2 if arg in _PYTHON_VALUE_OPTIONS else 1
            continue
        if not arg.startswith("-"):
            return False  # a script
        for pos, letter in enumerate(arg[1:], 1):  # bundled flags: -uB, -Wignore, -c'code'
            if letter in "cm":
                return False
            if letter in "hV?":
                return False
            if letter in "WX":
                if pos == len(arg) - 1:
                    i += 1  # the value is the next argument
                break
        i += 1
    return True


def check_command(cfg: LaunchConfig, launch: LaunchPlan) -> None:
    """Refuse a command that cannot run, before anything starts.

    A program missing on this machine is refused when every rank runs here (other hosts cannot
    be checked from here); ``python`` without a script, ``-c`` or ``-m`` is refused unless
    standard input is forwarded (it would wait for its program there), and under MPICH with
    more than one rank even then (only rank 0 gets the input; the others would wait for ever).
    ``--stdin`` is refused under Open MPI 5, whose ``prterun`` never passes on the end of the
    input (a rank reading to the end would hang).

    Raises:
        LaunchError: naming the command.
    """
    program = cfg.command[0]
    if cfg.stdin and launch.implementation == "openmpi":
        major = open_mpi_major(version_output(launch.launcher))
        if major is not None and major >= 5:
            raise LaunchError(f"--stdin does not work with Open MPI {major}'s mpiexec: it passes "
                              "the input to rank 0 but never its end, so a rank reading to the "
                              "end would wait for ever; redirect inside the command instead "
                              "(-- sh -c 'prog < input.txt'), or use MPICH")
    if _all_ranks_local(cfg, launch):
        path = cfg.extra_env.get("PATH", os.environ.get("PATH"))
        if shutil.which(program, path=path) is None:
            if os.sep in program and os.path.isfile(program):
                raise LaunchError(f"command not executable: {program}")
            raise LaunchError(f"command not found: {program}")
    if not _PYTHON_NAME.match(os.path.basename(program)) or \
            not python_reads_stdin(cfg.command[1:]):
        return
    if not cfg.stdin:
        raise LaunchError(f"{shlex.join(cfg.command)} names no script, -c or -m, so python "
                          "would wait for a program on standard input, which the ranks do not "
                          "get; name a script, or pass --stdin to forward it to rank 0")
    if cfg.nprocs > 1 and launch.implementation == "mpich":
        raise LaunchError(f"{shlex.join(cfg.command)} names no script, -c or -m: with --stdin "
                          "only rank 0 gets its program, the other ranks would wait for theirs "
                          "for ever (MPICH's mpiexec never closes their standard input); name "
                          "a script or use -n 1")


# --- running ------------------------------------------------------------------------------------


def run(launch: LaunchPlan, resume_hint: str | None = None, max_restarts: int = 0,
        restart_delay: float = 0.0, replan=None) -> int:
    """Run the plan under supervision; returns the job's exit code.

    The ranks are owned by this process: if it dies (any signal), they die with it. SIGINT is
    forwarded to the launcher (exit 130); SIGTERM/SIGUSR1 preempt a training job (every rank
    checkpoints one agreed step, exit 143) and are forwarded otherwise; a rank killed by a
    signal is named (rank, host, PID, signal) and the job returns 128 + the signal, as a shell
    would. ``resume_hint`` is added to that line (``train``: how to continue). A failed job is
    relaunched up to ``max_restarts`` times, ``restart_delay`` seconds apart; ``replan(k)``
    gives the plan of restart ``k`` (default: the same plan). See :mod:`distprop.supervise`.
    """
    def start(attempt: int):
        plan = launch if attempt == 0 or replan is None else replan(attempt)
        env = dict(os.environ)
        env.update(plan.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return plan.argv, env

    try:
        return restarts.run_with_restarts(
            start, launch.implementation, local=launch.local, resume_hint=resume_hint,
            stdin=None if launch.stdin else subprocess.DEVNULL, max_restarts=max_restarts,
            restart_delay=restart_delay)
    except OSError as exc:
        raise LaunchError(f"cannot start {launch.argv[0]}: {exc}") from exc
