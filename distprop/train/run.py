"""``distprop train`` as library code: check a :class:`TrainConfig`, then train from it.

:func:`check` runs in the parent process before anything is launched (dataset readable and
valid, model fits the data, optimizer and device available, resume path usable) and turns every
problem into a :class:`ConfigError`. :func:`main_worker` runs on every rank: it builds the data,
the model, the optimizer and the schedule, calls :func:`~distprop.train.trainer.fit` with the
standard callbacks, and writes ``summary.json`` and ``curves.png`` into ``--out``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from distprop import backend, fileio
from distprop.data import sources
from distprop.registry import OPTIMIZERS
from distprop.train import callbacks as cbs
from distprop.train import checkpoint as ckpt
from distprop.train.config import ConfigError, TrainConfig

_SPLITS_CACHE: dict = {}
_log = logging.getLogger(__name__)


# --- pieces -------------------------------------------------------------------------------------


def load_data(cfg: TrainConfig, validate: bool = True) -> sources.DataSplits:
    """The dataset of ``cfg`` (cached per process, so ``check`` and training load it once)."""
    key = (cfg.dataset, cfg.seed, cfg.val_fraction, cfg.test_fraction, cfg.num_classes,
           cfg.task)
    if key in _SPLITS_CACHE:
        return _SPLITS_CACHE[key]
    if cfg.task == "regression":
        from distprop.train.tasks import load_regression

        fractions = {k: v for k, v in (("val_fraction", cfg.val_fraction),
                                       ("test_fraction", cfg.test_fraction)) if v is not None}
        splits = _SPLITS_CACHE[key] = load_regression(cfg.dataset, seed=cfg.seed, **fractions)
        return splits
    kwargs = {}
    if cfg.num_classes is not None and cfg.dataset not in sources.DATASETS:
        kwargs["num_classes"] = cfg.num_classes
    if cfg.val_fraction is not None:
        kwargs["val_fraction"] = cfg.val_fraction
    if cfg.test_fraction is not None and cfg.dataset != "mnist1d":
        kwargs["test_fraction"] = cfg.test_fraction
    is_named = cfg.dataset in sources.DATASETS
    splits = sources.load(cfg.dataset, seed=cfg.seed,
                          **({} if is_named else {"validate": validate}), **kwargs)
    _SPLITS_CACHE[key] = splits
    return splits


def build_model(cfg: TrainConfig, splits: sources.DataSplits):
    """The model ``cfg.model`` (zoo name, with its size options, or factory) sized for the
    dataset (see :mod:`distprop.train.modelspec` and :mod:`distprop.train.adapt`)."""
    from distprop.train.modelspec import build

    return build(cfg.model, splits.input_shape, splits.num_classes, hidden=cfg.hidden,
                 layers=cfg.layers, channels=cfg.channels)


def base_lr(cfg: TrainConfig) -> float:
    lr = cfg.lr if cfg.lr is not None else OPTIMIZERS.lookup(cfg.optimizer).default_lr
    if cfg.scale_lr:
        lr *= cfg.world_size  # linear scaling rule: k x the batch, k x the learning rate
    return lr


def warmup_epochs(cfg: TrainConfig) -> float:
    if cfg.scale_lr and cfg.warmup_epochs == 0 and cfg.world_size > 1:
        return min(1.0, cfg.epochs / 2)  # Goyal et al.: ramp up to the scaled rate gradually
    return cfg.warmup_epochs


def build_optimizer(cfg: TrainConfig, params):
    """The optimizer ``cfg.optimizer`` (sharded over ranks with ``cfg.zero``), built by its
    entry in :data:`distprop.registry.OPTIMIZERS`."""
    entry = OPTIMIZERS.lookup(cfg.optimizer)
    cls = entry.load()
    kwargs = {"lr": base_lr(cfg), "weight_decay": cfg.weight_decay}
    if entry.momentum:
        kwargs["momentum"] = cfg.momentum
    if cfg.zero:
        from distprop.distributed import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)
    return cls(params, **kwargs)


def build_schedule(cfg: TrainConfig, optimizer):
    """The LR schedule, on the fraction of training done (``plateau``: per epoch on val loss).

    What each name does is in :data:`distprop.registry.LR_SCHEDULES`. ``--warmup-epochs`` ramps
    linearly from 1 % of the rate first. Being defined on the fraction of the run's samples
    consumed (:class:`~distprop.train.schedule.ProgressSchedule`), a schedule ends where it
    should when a run is resumed on another number of ranks or batch size.
    """
    from distprop.optim import lr_scheduler as lrs
    from distprop.train import schedule

    warm = warmup_epochs(cfg) / cfg.epochs
    name = cfg.lr_schedule
    if name == "plateau":
        if warm:
            raise ConfigError("--lr-schedule plateau cannot be combined with warm-up "
                              "(--warmup-epochs / --scale-lr)", "lr-schedule")
        return lrs.ReduceLROnPlateau(optimizer, factor=0.1, patience=2)
    if name == "none" and not warm:
        return None
    return schedule.ProgressSchedule(optimizer, schedule.factor_fn(name, warm),
                                     note="--scale-lr: lr x ranks" if cfg.scale_lr else "")


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / "checkpoints"


def apply_thread_policy(cfg: TrainConfig, comm) -> int:
    """Limit this rank's BLAS/OpenMP pools (threadpoolctl) and set the thread variables for any
    subprocess; returns the thread count.

    The count is ``--threads-per-rank`` when given; else, for N ranks, what the launcher chose
    (``OMP_NUM_THREADS``, set by ``distprop train -n N``), or the node's cores divided by its
    ranks; for a single process, every core (``cores // 1``), the same rule as for N ranks.
    """
    from threadpoolctl import threadpool_limits

    from distprop.launcher import THREAD_VARS, available_cores

    threads = (cfg.launch or {}).get("threads_per_rank")
    if not threads and comm.size > 1:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        threads = int(env) if env.isdigit() and int(env) > 0 else \
            max(1, available_cores() // max(1, comm.local_size))
    threads = int(threads or max(1, available_cores()))
    threadpool_limits(threads)
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    return threads


def _blas_threads() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover - a runtime dependency
        return []
    return [{"api": p.get("internal_api"), "threads": p.get("num_threads")}
            for p in threadpool_info()]


# --- checks before launching --------------------------------------------------------------------


def check_writable_dir(directory, param: str = "out") -> None:
    """Refuse a directory that cannot be created, without creating anything (dry runs).

    Raises:
        ConfigError: naming ``directory`` and the option ``param``.
    """
    existing = Path(directory).absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".distprop-check-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"cannot write the directory {directory}: {exc}", param) from None


def check(cfg: TrainConfig) -> TrainConfig:
    """Everything that can fail before training, as :class:`ConfigError` (the CLI's exit 2)."""
    check_writable_dir(cfg.out)
    try:
        splits = load_data(cfg)
    except sources.DataError as exc:
        raise ConfigError(str(exc), "dataset") from None
    if cfg.num_classes is not None and cfg.num_classes != splits.num_classes:
        raise ConfigError(f"dataset {cfg.dataset} has {splits.num_classes} classes; "
                          f"--num-classes {cfg.num_classes} only applies to dataset files",
                          "num-classes")
    if len(splits.train) < cfg.world_size:
        raise ConfigError(f"the training split has {len(splits.train)} samples, fewer than the "
                          f"{cfg.world_size} ranks", "dataset")
    try:
        dev = backend.device(cfg.device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(str(exc), "device") from None
    if not dev.is_cuda:  # on the CPU, --comm nccl/mpi-cuda cannot work: say so before launching
        from distprop.distributed.selection import (
            CommFacts,
            CommSelectionError,
            choose_comm,
        )

        try:
            choose_comm(cfg.comm, CommFacts(device_is_cuda=False, world_size=cfg.world_size,
                                            cupy=backend.cupy_available(),
                                            cupy_error=backend._cupy_error))
        except CommSelectionError as exc:
            raise ConfigError(str(exc), "comm") from None
    if cfg.zero:
        from distprop import distributed

        if not hasattr(distributed, "ZeroRedundancyOptimizer"):
            raise ConfigError("--zero needs ZeroRedundancyOptimizer, which this build of "
                              "distprop does not have yet", "zero")
    try:
        model = build_model(cfg, splits)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(str(exc), getattr(exc, "param", "model")) from None
    except MemoryError:
        raise ConfigError(f"model {cfg.model!r} for {splits.num_classes} classes and samples of "
                          f"shape {splits.input_shape} does not fit in memory", "model") from None
    from distprop.data import gather
    from distprop.tensor import Tensor, no_grad

    x, _ = gather(splits.train, np.arange(min(2, len(splits.train))))
    try:
        with no_grad():
            model.eval()
            out = model(Tensor(x))
    except Exception as exc:  # a factory's model may raise anything
        raise ConfigError(f"model {cfg.model!r} does not fit dataset {cfg.dataset!r} (samples "
                          f"of shape {splits.input_shape}): {type(exc).__name__}: {exc}",
                          "model") from None
    if not hasattr(out, "ndim") or out.ndim != 2 or out.shape[1] != splits.num_classes:
        what = "classes" if cfg.task == "classification" else "target columns"
        raise ConfigError(f"model {cfg.model!r} gives outputs of shape "
                          f"{getattr(out, 'shape', type(out).__name__)}, expected (batch, "
                          f"{splits.num_classes}) for {splits.num_classes} {what}", "model")
    try:
        optimizer = build_optimizer(cfg.updated(zero=False), model.parameters())
        build_schedule(cfg, optimizer)
    except ValueError as exc:
        raise ConfigError(str(exc), "lr-schedule") from None
    if cfg.resume not in (None, "auto"):
        try:
            check_resume(cfg, cfg.resume, model, optimizer, len(splits.train))
        except ckpt.CheckpointError as exc:
            raise ConfigError(str(exc), "resume") from None
    return cfg


def check_resume(cfg: TrainConfig, path, model, optimizer, n_train: int) -> dict:
    """Load ``path`` and check it whole against this run (model, optimizer, data, ranks).

    Returns:
        The checkpoint's position.

    Raises:
        CheckpointError: the file is unreadable or corrupted, or a field is missing or wrong
            (naming the file and the field).
    """
    from distprop.train import resume

    return resume.check_state(ckpt.load(path), path, model=model, optimizer=optimizer,
                              epoch_samples=n_train, world_size=cfg.world_size,
                              grad_accum=cfg.grad_accum)


# --- training on every rank ---------------------------------------------------------------------


def _latest_usable(cfg: TrainConfig, model, optimizer, n_train: int) -> Path | None:
    """The newest checkpoint in ``--out`` that verifies and fits this run; the others are
    skipped with a message naming the file and what is wrong with it."""
    for path in reversed(ckpt.list_checkpoints(checkpoint_dir(cfg))):
        try:
            check_resume(cfg, path, model, optimizer, n_train)
            return path
        except ckpt.CheckpointError as exc:
            _log.info(f"skipping unusable checkpoint: {exc}; falling back to the previous one")
    return None


def _resume_source(cfg: TrainConfig, comm, model, optimizer, n_train: int) -> str | None:
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        return cfg.resume
    found = None
    if comm.rank == 0:
        found = _latest_usable(cfg, model, optimizer, n_train)
        if found is None:
            _log.info(f"--resume auto: no usable checkpoint in {checkpoint_dir(cfg)}; starting "
                      "from scratch")
        else:
            _log.info(f"--resume auto: continuing from {found}")
    found = comm.broadcast_obj(str(found) if found else None, 0)
    return found


def _read_on_rank0(comm, path: str | None) -> dict | None:
    """The checkpoint ``path`` as rank 0 reads it, sent to every rank over MPI: ranks on other
    hosts need not see ``--out`` (each host may have its own disk)."""
    if path is None:
        return None
    state, error = None, None
    if comm.rank == 0:
        try:
            state = ckpt.load(path)
        except ckpt.CheckpointError as exc:
            error = str(exc)
    error = comm.broadcast_obj(error, 0)
    if error is not None:
        raise ckpt.CheckpointError(error)
    return comm.broadcast_obj(state, 0) if comm.size > 1 else state


def _step_rows(metrics_jsonl: Path) -> list[dict]:
    """The per-step rows of ``metrics.jsonl`` (none when it cannot be read)."""
    try:
        lines = metrics_jsonl.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train" and row.get("lr") is not None:
            rows.append(row)
    return rows


def curves_figure(history: list[dict], steps: list[dict] = (), test: dict | None = None,
                  title: str = ""):
    """The training curves (None without matplotlib): loss and accuracy per epoch (counted
    from 1) for train and val with the test result as a star after the last epoch, and the
    learning rate per optimizer step (``steps``: rows of ``metrics.jsonl``; the epochs' ends
    when there are none) with the epoch ends marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    epochs = [r["epoch"] + 1 for r in history]
    metric = "accuracy" if "accuracy" in history[0] else "r2"  # classification / regression
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o", label="train")
    ax_acc.plot(epochs, [r.get(metric) for r in history], marker="o", label="train")
    if any(r.get("val_loss") is not None for r in history):
        ax_loss.plot(epochs, [r.get("val_loss") for r in history], marker="o", label="val")
        ax_acc.plot(epochs, [r.get(f"val_{metric}") for r in history], marker="o", label="val")
    if test is not None and epochs:
        ax_loss.plot([epochs[-1]], [test["loss"]], "*", markersize=14, label="test")
        if test.get(metric) is not None:
            ax_acc.plot([epochs[-1]], [test[metric]], "*", markersize=14, label="test")
    for ax, name in ((ax_loss, "loss"), (ax_acc, metric)):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_step = {r["step"]: r["lr"] for r in [*steps, *history] if r.get("lr") is not None}
    ax_lr.plot(sorted(by_step), [by_step[s] for s in sorted(by_step)],
               marker="" if steps else "o", label="lr")
    for i, r in enumerate(history):
        ax_lr.axvline(r["step"], color="gray", linestyle=":", linewidth=0.8,
                      label="epoch end" if i == 0 else None)
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_title("learning rate")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plot(history: list[dict], path: Path, test: dict | None = None,
          title: str = "") -> Path | None:
    """Write :func:`curves_figure` to ``path`` (atomically); None without matplotlib."""
    fig = curves_figure(history, _step_rows(path.parent / "metrics.jsonl"), test, title)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    try:
        fileio.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), "plot")
    finally:
        plt.close(fig)
    return path


def _plot_title(cfg: TrainConfig, world: int) -> str:
    return (f"{cfg.model} on {cfg.dataset}: {world} rank(s), {cfg.optimizer} lr "
            f"{base_lr(cfg):.4g} ({cfg.lr_schedule}), {cfg.global_batch_size} samples per step")


def _compression_options(cfg: TrainConfig) -> dict | None:
    """DDP's ``compression_options`` for ``--compression powersgd`` (None for the others)."""
    if cfg.compression != "powersgd":
        return None
    return {"compression_options": {"matrix_approximation_rank": cfg.powersgd_rank,
                                    "start_powerSGD_iter": cfg.powersgd_start,
                                    "random_seed": cfg.seed}}


def train(cfg: TrainConfig, comm=None) -> dict:
    """Train from ``cfg`` on the ranks of ``comm``; returns the summary (on every rank)."""
    from distprop import distributed
    from distprop.backend import manual_seed
    from distprop.train.trainer import Trainer

    comm = comm or distributed.init()
    threads = apply_thread_policy(cfg, comm)
    if comm.size != cfg.world_size:
        cfg = cfg.updated(world_size=comm.size, nprocs=comm.size)
        if cfg.global_batch_size is not None:
            cfg = cfg.updated(global_batch_size=cfg.batch_size * comm.size * cfg.grad_accum)
    started = time.time()
    splits = load_data(cfg, validate=False)
    manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg, splits)
    dev = backend.device(cfg.device)
    if dev.is_cuda:  # one GPU per rank, from the node-local rank; print the mapping
        from distprop.distributed import device as device_mod

        dev = device_mod.assign_device(comm, cfg.device)
        mapping = device_mod.gather_mapping(comm, dev)
        if comm.rank == 0:
            _log.info("distprop train: devices\n" + device_mod.describe_mapping(mapping))
        model.to(dev)
    from distprop.distributed.selection import make_comm

    data_comm = make_comm(cfg.comm, host=comm, device=dev)  # the world comm itself on the CPU
    optimizer = build_optimizer(cfg, model.parameters())
    schedule = build_schedule(cfg, optimizer)
    out = Path(cfg.out)
    callbacks = []
    if schedule is not None:
        callbacks.append(cbs.LRSchedule(schedule, interval="step"))
    callbacks.append(cbs.GradNormMonitor())
    if cfg.early_stopping:
        callbacks.append(cbs.EarlyStoppingCallback(patience=cfg.early_stopping))
    callbacks.append(cbs.MetricsLogger(out))
    checkpointer = cbs.Checkpointer(checkpoint_dir(cfg), every_steps=cfg.checkpoint_every,
                                    keep=cfg.keep_checkpoints)
    callbacks += [checkpointer, cbs.ProgressBar()]
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for directory in (out, checkpoint_dir(cfg)):  # temporary files of a killed writer
            fileio.remove_orphaned_temps(directory, started, log=_log.info)
        n_params = sum(p.numel() for p in model.parameters())
        _log.info(f"distprop train: {cfg.model} ({n_params:,} parameters) on {cfg.dataset} "
                  f"{splits.sizes()}, {comm.size} rank(s) x {threads} BLAS thread(s), batch "
                  f"{cfg.batch_size}/rank x "
                  f"{cfg.grad_accum} accumulation = {cfg.global_batch_size} per step, "
                  f"{cfg.optimizer} lr {base_lr(cfg):.4g}")
    from distprop.train import tasks

    if not dev.is_cuda and cfg.comm in ("mpi", "shm"):  # DDP's intra-node reduction too
        data_comm = cfg.comm
    trainer = Trainer(model, tasks.loss_fn(cfg.task, cfg.loss), optimizer, comm=data_comm,
                      device=dev, metrics=tasks.metrics(cfg.task),
                      clip_grad_norm=cfg.clip_grad_norm, grad_accum=cfg.grad_accum,
                      compression=None if cfg.compression == "none" else cfg.compression,
                      ddp_kwargs=_compression_options(cfg),
                      callbacks=callbacks, seed=cfg.seed, log_every=cfg.log_every,
                      prefetch=cfg.prefetch, amp=None if cfg.amp == "none" else cfg.amp)
    resume = _resume_source(cfg, comm, model, optimizer, len(splits.train))
    history = trainer.fit(splits.train, splits.val, epochs=cfg.epochs,
                          batch_size=cfg.batch_size, resume=_read_on_rank0(comm, resume))
    if resume is not None:
        history.resumed_from = resume
    if history.preempted:  # a checkpoint of the step exists; the run is not over
        return {"preempted": True, "steps": trainer.step, "epochs_run": len(history.epochs),
                "resumed_from": history.resumed_from, "world_size": comm.size}
    test = trainer.evaluate(splits.test) if splits.test is not None else None
    summary = {
        "config": cfg.to_dict(), "world_size": comm.size, "dataset": splits.sizes(),
        "task": cfg.task, "num_outputs": splits.num_classes,
        "num_classes": splits.num_classes if cfg.task == "classification" else None,
        "input_shape": list(splits.input_shape),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "epochs_run": len(history.epochs), "steps": trainer.step,
        "final": cbs.numbered_from_one(history.final), "test": test,
        "resumed_from": history.resumed_from,
        "checkpoints": [str(p) for p in ckpt.list_checkpoints(checkpoint_dir(cfg))],
        "wall_time_s": time.time() - started,
        "threads": {"per_rank": threads, "blas": _blas_threads()},
    }
    if comm.rank == 0:
        plot = _plot(history.epochs, out / "curves.png", test,
                     _plot_title(cfg, comm.size)) if history.epochs else None
        summary["plot"] = str(plot) if plot else None
        fileio.atomic_write_text(out / "summary.json",
                                 json.dumps(summary, indent=2, default=str) + "\n", "summary")
        if test is not None:
            _log.info(f"test: {tasks.describe(test)} ({test['samples']} samples); wrote "
                      f"{out / 'summary.json'}")
    return summary


def main_worker(cfg: TrainConfig) -> int:
    """Entry point of one rank; exceptions end the whole job (MPI abort), printed once."""
    from distprop import distributed

    comm = distributed.init()
    if comm.size > 1:
        from distprop.distributed import guards

        with guards.abort_on_exception(comm):
            return _train_reporting_divergence(cfg, comm)
    return _train_reporting_divergence(cfg, comm)


def _train_reporting_divergence(cfg: TrainConfig, comm) -> int:
    """Run :func:`train`; a diverged run (non-finite gradients) is an error message, exit 1.

    DDP's non-finite guard raises on every rank alike (it checks the averaged gradient), so the
    ranks leave together and no abort is needed; rank 0 prints the message once.
    """
    try:
        summary = train(cfg, comm)
    except FloatingPointError as exc:
        if comm.rank == 0:
            print(f"distprop train: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except fileio.WriteError as exc:  # disk full, no permission: one line, the file named
        where = f" on rank {comm.rank}" if comm.size > 1 else ""
        print(f"distprop train: error{where}: {exc}", file=sys.stderr, flush=True)
        if comm.size > 1:  # the other ranks may be waiting for this one in a collective
            time.sleep(0.5)
            comm.abort(1)
        return 1
    if summary.get("preempted"):
        from distprop.distributed.preemption import EXIT_CODE

        return EXIT_CODE
    return 0
