"""The ``distprop`` command line: ``launch``, ``train`` and ``info`` (``bench`` lives in bench/).

The commands stay thin: click parses options into a dataclass (:class:`LaunchConfig`,
:class:`TrainConfig`) and calls library code (:mod:`distprop.launcher`, :mod:`distprop.info`,
:mod:`distprop.train.run`). Every bad input is a usage error (exit code 2) raised before anything
starts, printed once: under ``mpirun``/``srun`` only rank 0 prints it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

import click

from distprop import __version__, launcher, trace
from distprop import info as info_mod
from distprop.after_cli import register as register_after_commands
from distprop.bench.cli import bench
from distprop.cli_choices import (
    EnvGroup,
    EpilogCommand,
    LiveHelpOption,
    RegistryChoice,
    SizeOption,
    comm_help,
    compression_help,
    lr_help,
    momentum_help,
    optimizer_help,
    schedule_help,
    size_options_line,
)
from distprop.logconfig import log_level_option
from distprop.registry import COMMS, COMPRESSIONS, LOSSES, LR_SCHEDULES, MODELS, OPTIMIZERS, TASKS
from distprop.train import tasks as tasks_mod
from distprop.train.config import ConfigError, TrainConfig, read_toml

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=EnvGroup, context_settings={**CONTEXT, "auto_envvar_prefix": "DISTPROP"})
@click.version_option(__version__, prog_name="distprop")
def cli() -> None:
    """Synchronous data-parallel training over MPI, on NumPy (CPU) or CuPy (GPU)."""


# --- launch -------------------------------------------------------------------------------------


def _launch_options(func):
    """Options shared by ``launch`` and ``train -n``."""
    options = [
        click.option("-H", "--hosts", help="Hosts and slots: host1:2,host2:2."),
        click.option("--hostfile", type=click.Path(dir_okay=False),
                     help="Hostfile: 'host slots=N' or 'host:N' per line."),
        click.option("--mpi", type=click.Choice(launcher.IMPLEMENTATIONS), default=None,
                     help="Launcher flavour; auto asks mpiexec --version (srun inside Slurm)."),
        click.option("--mpiexec", "mpiexec", default=None,
                     help="Launcher executable (default: the one next to this Python, "
                          "then PATH)."),
        click.option("--threads-per-rank", type=int, default=None,
                     help="BLAS/OpenMP threads per rank [default: cores // ranks, >= 1]."),
        click.option("--mpi-args", default=None, help='Extra launcher arguments, e.g. "-ppn 2".'),
        click.option("--oversubscribe", is_flag=True, default=None,
                     help="Allow more ranks than slots (cores without a host list)."),
        click.option("--dry-run", is_flag=True, default=False,
                     help="Print the launcher command and exit."),
        click.option("--stdin", "forward_stdin", is_flag=True, default=False,
                     help="Forward this process's standard input to rank 0 (default: the "
                          "ranks read /dev/null)."),
        click.option("--max-restarts", type=click.IntRange(min=0), default=0,
                     help="Relaunch a job whose rank or host failed up to N times (train: "
                          "with --resume auto; launch: DISTPROP_RESTART_COUNT=k) [0]."),
        click.option("--restart-delay", type=click.FloatRange(min=0), default=5.0,
                     help="Seconds to wait before a restart [5]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _launch_config(nprocs, command, hosts, hostfile, mpi, mpiexec, threads_per_rank, mpi_args,
                   oversubscribe, forward_stdin=False, extra_env=None) -> launcher.LaunchConfig:
    return launcher.LaunchConfig(
        nprocs=nprocs, command=list(command), hosts=hosts, hostfile=hostfile, mpi=mpi or "auto",
        threads_per_rank=threads_per_rank, mpi_args=mpi_args or "",
        oversubscribe=bool(oversubscribe), mpiexec=mpiexec, extra_env=extra_env or {},
        stdin=bool(forward_stdin))


class Refused(click.ClickException):
    """A request that cannot run as asked (exit 2), printed as one ``Error:`` line."""

    exit_code = 2


def _plan_or_usage_error(cfg: launcher.LaunchConfig) -> launcher.LaunchPlan:
    try:
        return launcher.plan(cfg)
    except launcher.LaunchError as exc:
        raise click.UsageError(str(exc)) from None


def _gpu_note(ranks_on_node: int) -> None:
    """Print the planned rank -> GPU mapping when this node has GPUs (silent on the CPU)."""
    from distprop.distributed.device import launch_note

    note = launch_note(ranks_on_node)
    if note:
        click.echo(f"distprop: {note}", err=True)


def _run_plan(plan: launcher.LaunchPlan, dry_run: bool, resume_hint: str | None = None,
              max_restarts: int = 0, restart_delay: float = 0.0, replan=None) -> int:
    if dry_run:
        click.echo(plan.shell())
        return 0
    click.echo(f"distprop: {plan.implementation} launch, {plan.threads_per_rank} thread(s) per "
               f"rank: {plan.shell()}", err=True)
    try:
        return launcher.run(plan, resume_hint=resume_hint, max_restarts=max_restarts,
                            restart_delay=restart_delay, replan=replan)
    except launcher.LaunchError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command(context_settings={**CONTEXT, "ignore_unknown_options": True,
                               "allow_interspersed_args": False},
             epilog="""\b
Examples:
  distprop launch -n 4 -- python my_training.py --epochs 3
  distprop launch -n 8 -H node1:4,node2:4 -- distprop train --model cnn
  distprop launch -n 2 --mpi openmpi --dry-run -- python -c 'print(1)'
""")
@click.option("-n", "--nprocs", type=int, required=True, help="Number of ranks.")
@_launch_options
@log_level_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def launch(nprocs, hosts, hostfile, mpi, mpiexec, threads_per_rank, mpi_args, oversubscribe,
           dry_run, forward_stdin, max_restarts, restart_delay, command):
    """Run COMMAND on N MPI ranks with the right launcher and per-rank BLAS threads.

    The ranks read /dev/null as standard input unless --stdin is given. With --max-restarts a
    failed job is relaunched; each launch gets DISTPROP_RESTART_COUNT (0, 1, ...) so the
    script can resume itself.
    """
    if command and command[0] == "--":
        command = command[1:]
    cfg = _launch_config(nprocs, command, hosts, hostfile, mpi, mpiexec, threads_per_rank,
                         mpi_args, oversubscribe, forward_stdin)
    plan = _plan_or_usage_error(cfg)
    if not dry_run:
        try:
            launcher.check_command(cfg, plan)
        except launcher.LaunchError as exc:
            raise Refused(str(exc)) from None
    if not dry_run and not hosts and not hostfile:
        _gpu_note(nprocs)
    sys.exit(_run_plan(plan, dry_run, max_restarts=max_restarts, restart_delay=restart_delay))


# --- info ---------------------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-mpi-init", is_flag=True,
              help="Do not initialise MPI (skips the library version query).")
def info(as_json, no_mpi_init):
    """Versions, MPI library and launcher, GPUs, BLAS threads, and ranks when run under MPI."""
    data = info_mod.report(with_mpi_library=not no_mpi_init)
    if info_mod.under_mpi() and info_mod.launched_rank() not in (0, None):
        return  # rank 0 prints the gathered report
    click.echo(json.dumps(data, indent=2, default=str) if as_json
               else info_mod.format_report(data))


# --- train --------------------------------------------------------------------------------------

def _train_epilog() -> str:
    """The ``train --help`` epilog, from the registries (see :mod:`distprop.registry`)."""
    return f"""\b
Models:       {', '.join(MODELS)}, or package.module:factory
Size options: {size_options_line()}
Datasets:     digits, mnist1d, synthetic, or a path (.npz, .npy, directory with x.npy/y.npy)
Optimizers:   {', '.join(OPTIMIZERS)}
LR schedules: {', '.join(LR_SCHEDULES)}
Tasks:        {', '.join(f"{t} ({', '.join(tasks_mod.losses_of(t))})" for t in TASKS)}

\b
Every option can also come from --config FILE.toml (same names, top level or a [train]
table) or from DISTPROP_TRAIN_<OPTION> environment variables (e.g. DISTPROP_TRAIN_EPOCHS=3);
flags win over the environment, which wins over the file.

\b
Examples:
  distprop train -n 2 --model mlp --dataset digits --epochs 5
  distprop train -n 2 --model cnn --dataset mnist1d --optimizer adam --lr 3e-3 --epochs 20
  distprop train -n 4 --global-batch-size 256 --scale-lr --warmup-epochs 1 --out runs/a
  distprop train -n 2 --out runs/a --resume auto      # continue from the newest good checkpoint
  distprop train -n 2 --model mlp --hidden 256 --layers 3
  distprop train -n 2 --model mymodels:build           # mymodels.py in the current directory
  distprop train -n 2 --task regression --dataset data.npz --loss huber
"""


def _agreed_error(error: ConfigError | None) -> ConfigError | None:
    """The first rank's usage error on every rank (a file missing on one node only would
    otherwise stop that rank alone, unheard, while the others wait for it)."""
    from distprop import distributed

    found = distributed.init().allgather_obj(None if error is None else (str(error), error.param))
    bad = [(rank, e) for rank, e in enumerate(found) if e is not None]
    if not bad:
        return None
    rank, (message, param) = bad[0]
    if len(bad) < len(found) or any(e != bad[0][1] for _, e in bad):
        ranks = ", ".join(str(r) for r, _ in bad)
        message = f"on rank(s) {ranks}: {message}"
    return ConfigError(message, param)


@cli.command(cls=EpilogCommand, context_settings=CONTEXT, epilog_fn=_train_epilog)
@click.option("--model", default=None,
              help="Zoo model, or a factory package.module:callable called as "
                   "factory(input_shape=(...), num_classes=K) -> dp.nn.Module (importable "
                   "from the current directory) [default: mlp].")
@click.option("--hidden", cls=SizeOption, type=int, default=None, help="Hidden width")
@click.option("--layers", cls=SizeOption, type=int, default=None, help="Depth")
@click.option("--channels", cls=SizeOption, type=int, default=None, help="Convolution width")
@click.option("--dataset", default=None, help="digits, mnist1d, synthetic or PATH [default: "
              "digits].")
@click.option("--task", type=RegistryChoice(TASKS), default=None,
              help="classification (integer labels, accuracy) or regression (.npz with float "
                   "targets y of shape (N,) or (N, k); r2 and mae) [classification].")
@click.option("--loss", type=RegistryChoice(LOSSES), default=None,
              help="Loss: cross_entropy (classification); mse or huber (regression) [default: "
                   "cross_entropy / mse].")
@click.option("--epochs", type=int, default=None, help="Training epochs [default: 5].")
@click.option("--batch-size", type=int, default=None,
              help="Samples per rank per micro-batch [default: 32].")
@click.option("--global-batch-size", type=int, default=None,
              help="Samples per optimizer step over all ranks (instead of --batch-size).")
@click.option("--optimizer", cls=LiveHelpOption, help_fn=optimizer_help, default=None)
@click.option("--lr", cls=LiveHelpOption, help_fn=lr_help, type=float, default=None)
@click.option("--momentum", cls=LiveHelpOption, help_fn=momentum_help, type=float, default=None)
@click.option("--weight-decay", type=float, default=None, help="Weight decay [0].")
@click.option("--lr-schedule", cls=LiveHelpOption, help_fn=schedule_help, default=None)
@click.option("--warmup-epochs", type=float, default=None, help="Linear warm-up epochs [0].")
@click.option("--clip-grad-norm", type=float, default=None, help="Clip the global grad norm.")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per step [1].")
@click.option("--compression", type=RegistryChoice(COMPRESSIONS), default=None,
              cls=LiveHelpOption, help_fn=compression_help)
@click.option("--powersgd-rank", type=int, default=None,
              help="Rank of PowerSGD's low-rank approximation [1].")
@click.option("--powersgd-start", type=int, default=None,
              help="Optimizer steps of plain averaging before PowerSGD compresses [1000].")
@click.option("--amp", is_flag=False, flag_value="float16", default=None,
              help="Mixed precision: float16 autocast + dynamic loss scaling; --amp alone "
                   "means float16 [none].")
@click.option("--zero/--no-zero", default=None, help="Shard optimizer state (ZeRO-1).")
@click.option("--device", default=None,
              help="cpu, cuda (one GPU per rank, by node-local rank) or cuda:N [cpu].")
@click.option("--comm", type=RegistryChoice(COMMS), default=None, cls=LiveHelpOption,
              help_fn=comm_help)
@click.option("--seed", type=int, default=None, help="Seed of init, shuffling, splits [0].")
@click.option("--out", default=None, help="Output directory [runs/distprop].")
@click.option("--checkpoint-every", type=int, default=None,
              help="Checkpoint every N optimizer steps (0: at each epoch end) [0].")
@click.option("--keep-checkpoints", type=int, default=None, help="Checkpoints to keep [3].")
@click.option("--resume", default=None, help="Checkpoint PATH, or 'auto' (newest valid in "
              "--out, fresh start if none).")
@click.option("--scale-lr/--no-scale-lr", default=None,
              help="Linear scaling rule: lr x number of ranks, with warm-up.")
@click.option("--early-stopping", type=int, default=None,
              help="Stop after N epochs without val-loss improvement (0: off) [0].")
@click.option("--val-fraction", type=float, default=None, help="Held-out validation part.")
@click.option("--test-fraction", type=float, default=None, help="Held-out test part.")
@click.option("--num-classes", type=int, default=None,
              help="Classes of a dataset file (labels 0..K-1) [default: largest label + 1, "
                   "every class present].")
@click.option("--log-every", type=int, default=None, help="Log metrics every N steps [10].")
@click.option("--prefetch", type=int, default=None, help="Batches prefetched by a thread [1].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file with any of these options.")
@click.option("-n", "--nprocs", type=int, default=None,
              help="Launch this many ranks (re-runs itself under MPI).")
@_launch_options
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False), default=None,
              help="Chrome trace per rank (FILE -> FILE.rank<N>.json): forward, backward, each "
                   "bucket's allreduce, waits, optimizer step. Open in ui.perfetto.dev.")
@log_level_option
@click.option("--worker-config", default=None, hidden=True)
@click.option("--worker-config-sha256", default=None, hidden=True)
def train(config_file, nprocs, hosts, hostfile, mpi, mpiexec, threads_per_rank, mpi_args,
          oversubscribe, dry_run, forward_stdin, trace_file, worker_config, worker_config_sha256,
          **options):
    """Train a zoo model (or your own, --model pkg.mod:factory) on a dataset, data-parallel
    over MPI ranks."""
    from distprop.train import run as run_mod  # heavy imports only when training

    max_restarts, restart_delay = options.pop("max_restarts"), options.pop("restart_delay")

    if trace_file and not worker_config:
        try:
            run_mod.check_writable_dir(os.path.dirname(os.path.abspath(trace_file)), "trace")
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--trace") from None
    if trace_file:  # ranks started below inherit the variable and trace themselves
        os.environ[trace.ENV_VAR] = os.path.abspath(trace_file)
        trace.enable(os.environ[trace.ENV_VAR])

    if worker_config:  # a rank started by `distprop train -n N`: the parent validated everything
        sys.exit(run_mod.main_worker(_launched_config(worker_config, worker_config_sha256)))

    base = TrainConfig()
    if config_file:
        try:
            base = TrainConfig.from_dict(read_toml(config_file), config_file)
        except (ConfigError, TypeError) as exc:
            raise click.BadParameter(str(exc), param_hint="--config") from None
    cfg = base.updated(**options)
    launching = nprocs is not None and nprocs > 1
    world = nprocs if nprocs is not None else info_mod.launched_size()
    if nprocs is not None and nprocs < 1:
        raise click.BadParameter(f"must be at least 1, got {nprocs}", param_hint="-n")
    if threads_per_rank is not None and threads_per_rank < 1:
        raise click.BadParameter(f"must be at least 1, got {threads_per_rank}",
                                 param_hint="--threads-per-rank")
    if max_restarts and not launching:
        raise click.BadParameter("restarts are made by the launcher: use it with -n 2 or more "
                                 "(or your scheduler's requeue with --resume auto)",
                                 param_hint="--max-restarts")
    error = None
    try:
        cfg = cfg.validate(world)
        cfg = run_mod.check(cfg)  # dataset file, shapes, labels, model fit, resume path
    except ConfigError as exc:
        error = exc
    if world > 1 and not launching:  # ranks started by mpiexec: one failing alone would hang
        error = _agreed_error(error)
    if error is not None:
        hint = f"--{error.param}" if error.param else None
        raise click.BadParameter(str(error), param_hint=hint) from None
    cfg.nprocs = world
    if not launching:
        if dry_run:
            click.echo(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
            return
        cfg.launch = {"threads_per_rank": threads_per_rank}  # one process: same thread policy
        with _locked_run_dir(cfg.out, agree=world > 1):  # rank 0 holds it for the ranks
            code = run_mod.main_worker(cfg)
        sys.exit(code)
    cfg.launch = {"mpi": mpi or "auto", "hosts": hosts, "hostfile": hostfile,
                  "threads_per_rank": threads_per_rank}
    out = Path(cfg.out).absolute()
    written: list[Path] = []

    def plan_for(config: TrainConfig) -> launcher.LaunchPlan:
        # The ranks read a file unique to this launch (checked against its digest), never
        # config.json, which is only the record for the user.
        text = config.to_json()
        digest = hashlib.sha256(text.encode()).hexdigest()
        launch_file = out / f"{LAUNCH_CONFIG_PREFIX}{os.getpid()}-{digest[:12]}.json"
        command = [sys.executable, "-m", "distprop", "train", "--worker-config",
                   str(launch_file), "--worker-config-sha256", digest]
        if hosts or hostfile:  # other hosts may not see --out: the configuration rides on argv
            command[5] = INLINE_PREFIX + base64.urlsafe_b64encode(text.encode()).decode()
        lcfg = _launch_config(nprocs, command, hosts, hostfile, mpi, mpiexec, threads_per_rank,
                              mpi_args, oversubscribe, forward_stdin)
        if not dry_run:
            for old in written:
                old.unlink(missing_ok=True)
            _write_text(launch_file, text, "launch configuration")
            written[:] = [launch_file]
        return _plan_or_usage_error(lcfg)

    if dry_run:
        sys.exit(_run_plan(plan_for(cfg), dry_run))
    with _locked_run_dir(out, agree=False):  # before anything is written into --out; held
        for old in out.glob(f"{LAUNCH_CONFIG_PREFIX}*.json"):  # across restarts. Left by
            old.unlink(missing_ok=True)  # killed launchers.
        plan = plan_for(cfg)
        _write_text(out / "config.json", cfg.to_json(), "configuration")
        try:
            if cfg.device.startswith("cuda") and not hosts and not hostfile:
                _gpu_note(nprocs)
            hint = ("Run the same command with --resume auto to continue from the last "
                    f"checkpoint in {out}")
            code = _run_plan(plan, dry_run, resume_hint=hint, max_restarts=max_restarts,
                             restart_delay=restart_delay,
                             replan=lambda _k: plan_for(cfg.updated(resume="auto")))
        finally:
            for old in written:
                old.unlink(missing_ok=True)
    sys.exit(code)


LAUNCH_CONFIG_PREFIX = ".launch-config-"
INLINE_PREFIX = "base64:"  # --worker-config base64:<json>, for ranks on other hosts


def _write_text(path: Path, text: str, what: str) -> None:
    """Write ``text`` atomically; a full disk is one line naming the file, nothing partial."""
    from distprop.fileio import atomic_write_text

    try:
        atomic_write_text(path, text, what)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


def _launched_config(path: str, sha256: str | None) -> TrainConfig:
    """The configuration a rank was launched with; refuses a file changed since the launch."""
    try:
        if path.startswith(INLINE_PREFIX):
            text = base64.urlsafe_b64decode(path[len(INLINE_PREFIX):].encode()).decode()
            path = "the launch configuration on the command line"
        else:
            text = Path(path).read_text()
    except (OSError, ValueError) as exc:
        raise Refused(f"cannot read the launch configuration {path}: {exc}") from None
    if sha256 is not None and hashlib.sha256(text.encode()).hexdigest() != sha256:
        raise Refused(f"the launch configuration {path} was changed after the launch")
    try:
        return TrainConfig.from_dict(json.loads(text), path)
    except (ConfigError, ValueError) as exc:
        raise Refused(str(exc)) from None


@contextlib.contextmanager
def _locked_run_dir(out, agree: bool):
    """Hold the lock on the run directory ``out`` (see :mod:`distprop.train.rundir`).

    With ``agree`` (ranks started by mpiexec/srun) rank 0 takes the lock and every rank learns
    the outcome, so a refusal ends all ranks with exit 2 and rank 0 alone prints it.
    """
    from distprop import distributed
    from distprop.train import rundir

    lock, refusal, failure = None, None, None
    comm = distributed.init() if agree else None
    if comm is None or comm.rank == 0:
        try:
            lock = rundir.RunDirLock.acquire(out, command=["distprop", *sys.argv[1:]])
        except rundir.RunDirBusy as exc:
            refusal = str(exc)
        except OSError as exc:  # a full disk, no permission: not a usage error (exit 1)
            from distprop.fileio import describe

            failure = (f"cannot create the run directory {out} or its lock file: "
                       f"{describe(exc)}")
    if comm is not None:
        refusal, failure = comm.broadcast_obj((refusal, failure), 0)
    if refusal is not None:
        raise Refused(refusal)
    if failure is not None:
        raise click.ClickException(failure)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


cli.add_command(bench)
register_after_commands(cli)  # evaluate, predict, export


# --- entry point --------------------------------------------------------------------------------


def main(argv=None) -> None:
    """Console-script entry point: usage errors exit 2 and print once (rank 0 under MPI)."""
    try:
        cli.main(args=argv, prog_name="distprop", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        if info_mod.launched_rank() in (0, None):
            exc.show()
        sys.exit(exc.exit_code)
    sys.exit(0)


if __name__ == "__main__":
    main()
