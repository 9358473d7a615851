"""``distprop train`` as library code: check a :class:`TrainConfig`, then train from it.

:func:`check` runs in the parent process before anything is launched (dataset readable and
valid, model fits the data, optimizer and device available, resume path usable) and turns every
problem into a :class:`ConfigError`. :func:`main_worker` runs on every rank: it builds the data,
the model, the optimizer and the schedule, calls :func:`~distprop.train.trainer.fit` with the
standard callbacks, and writes ``summary.json`` and ``curves.png`` into ``--out``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from distprop import backend, fileio
from distprop.data import sources
from distprop.train import callbacks as cbs
from distprop.train import checkpoint as ckpt
from distprop.train.config import ConfigError, TrainConfig

OPTIMIZER_CLASSES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad",
                     "rmsprop": "RMSprop", "adadelta": "Adadelta", "nadam": "NAdam"}
DEFAULT_LR = {"sgd": 0.1, "adadelta": 1.0, "adagrad": 0.01}
_SPLITS_CACHE: dict = {}


# --- pieces -------------------------------------------------------------------------------------


def load_data(cfg: TrainConfig, validate: bool = True) -> sources.DataSplits:
    """The dataset of ``cfg`` (cached per process, so ``check`` and training load it once)."""
    key = (cfg.dataset, cfg.seed, cfg.val_fraction, cfg.test_fraction, cfg.num_classes)
    if key in _SPLITS_CACHE:
        return _SPLITS_CACHE[key]
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
    """The zoo model ``cfg.model`` sized for the dataset (see :mod:`distprop.train.adapt`)."""
    from distprop.train.adapt import model_for  # noqa: PLC0415

    return model_for(cfg.model, splits.input_shape, splits.num_classes)


def base_lr(cfg: TrainConfig) -> float:
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.optimizer, 1e-3)
    if cfg.scale_lr:
        lr *= cfg.world_size  # linear scaling rule: k x the batch, k x the learning rate
    return lr


def warmup_epochs(cfg: TrainConfig) -> float:
    if cfg.scale_lr and cfg.warmup_epochs == 0 and cfg.world_size > 1:
        return min(1.0, cfg.epochs / 2)  # Goyal et al.: ramp up to the scaled rate gradually
    return cfg.warmup_epochs


def build_optimizer(cfg: TrainConfig, params):
    """The optimizer ``cfg.optimizer`` (sharded over ranks with ``cfg.zero``)."""
    from distprop import optim  # noqa: PLC0415

    cls = getattr(optim, OPTIMIZER_CLASSES[cfg.optimizer])
    kwargs = {"lr": base_lr(cfg), "weight_decay": cfg.weight_decay}
    if cfg.optimizer in ("sgd", "rmsprop"):
        kwargs["momentum"] = cfg.momentum
    if cfg.zero:
        from distprop.distributed import ZeroRedundancyOptimizer  # noqa: PLC0415

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)
    return cls(params, **kwargs)


def build_schedule(cfg: TrainConfig, optimizer):
    """The LR schedule, on the fraction of training done (``plateau``: per epoch on val loss).

    ``step``: x0.1 every third of the run; ``multistep``: x0.1 at 50 % and 75 %;
    ``exponential``: x0.01 over the run; ``cosine``: to 0; ``linear``: to 1 % of the rate;
    ``plateau``: x0.1 after 2 epochs without val-loss improvement. ``--warmup-epochs`` ramps
    linearly from 1 % of the rate first. Being defined on the fraction of the run's samples
    consumed (:class:`~distprop.train.schedule.ProgressSchedule`), a schedule ends where it
    should when a run is resumed on another number of ranks or batch size.
    """
    from distprop.optim import lr_scheduler as lrs  # noqa: PLC0415
    from distprop.train import schedule  # noqa: PLC0415

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


def steps_per_epoch(cfg: TrainConfig, n_train: int) -> int:
    per_rank = math.ceil(n_train / cfg.world_size)
    return math.ceil(math.ceil(per_rank / cfg.batch_size) / cfg.grad_accum)


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / "checkpoints"


def apply_thread_policy(cfg: TrainConfig, comm) -> int:
    """Limit this rank's BLAS/OpenMP pools (threadpoolctl) and set the thread variables for any
    subprocess; returns the thread count.

    The count is ``--threads-per-rank`` when given; else, for N ranks, what the launcher chose
    (``OMP_NUM_THREADS``, set by ``distprop train -n N``), or the node's cores divided by its
    ranks; for a single process, every core (``cores // 1``), the same rule as for N ranks.
    """
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    from distprop.launcher import THREAD_VARS, available_cores  # noqa: PLC0415

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
        from threadpoolctl import threadpool_info  # noqa: PLC0415
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
        from distprop.distributed.selection import (  # noqa: PLC0415
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
    try:
        from distprop import optim  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(f"optimizers are not available: {exc}", "optimizer") from None
    if not hasattr(optim, OPTIMIZER_CLASSES[cfg.optimizer]):
        have = [k for k, v in OPTIMIZER_CLASSES.items() if hasattr(optim, v)]
        raise ConfigError(f"optimizer {cfg.optimizer!r} is not available in this build; "
                          f"choose one of {', '.join(have)}", "optimizer")
    if cfg.zero:
        from distprop import distributed  # noqa: PLC0415

        if not hasattr(distributed, "ZeroRedundancyOptimizer"):
            raise ConfigError("--zero needs ZeroRedundancyOptimizer, which this build of "
                              "distprop does not have yet", "zero")
    try:
        model = build_model(cfg, splits)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(str(exc), "model") from None
    except MemoryError:
        raise ConfigError(f"model {cfg.model!r} for {splits.num_classes} classes and samples of "
                          f"shape {splits.input_shape} does not fit in memory", "model") from None
    from distprop.data import gather  # noqa: PLC0415
    from distprop.tensor import Tensor, no_grad  # noqa: PLC0415

    x, _ = gather(splits.train, np.arange(min(2, len(splits.train))))
    try:
        with no_grad():
            model.eval()
            out = model(Tensor(x))
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"model {cfg.model!r} does not fit dataset {cfg.dataset!r} (samples "
                          f"of shape {splits.input_shape}): {exc}", "model") from None
    if out.ndim != 2 or out.shape[1] != splits.num_classes:
        raise ConfigError(f"model {cfg.model!r} gives outputs of shape {out.shape}, expected "
                          f"(batch, {splits.num_classes})", "model")
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
    from distprop.train import resume  # noqa: PLC0415

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
            print(f"skipping unusable checkpoint: {exc}; falling back to the previous one",
                  flush=True)
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
            print(f"--resume auto: no usable checkpoint in {checkpoint_dir(cfg)}; starting "
                  "from scratch", flush=True)
        else:
            print(f"--resume auto: continuing from {found}", flush=True)
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


def _plot(history: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    epochs = [r["epoch"] + 1 for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o", label="train")
    ax_acc.plot(epochs, [r["accuracy"] for r in history], marker="o", label="train")
    if any(r.get("val_loss") is not None for r in history):
        ax_loss.plot(epochs, [r.get("val_loss") for r in history], marker="o", label="val")
        ax_acc.plot(epochs, [r.get("val_accuracy") for r in history], marker="o", label="val")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        fileio.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), "plot")
    finally:
        plt.close(fig)
    return path


def train(cfg: TrainConfig, comm=None) -> dict:
    """Train from ``cfg`` on the ranks of ``comm``; returns the summary (on every rank)."""
    from distprop import distributed, nn  # noqa: PLC0415
    from distprop.backend import manual_seed  # noqa: PLC0415
    from distprop.train.trainer import Trainer  # noqa: PLC0415

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
        from distprop.distributed import device as device_mod  # noqa: PLC0415

        dev = device_mod.assign_device(comm, cfg.device)
        mapping = device_mod.gather_mapping(comm, dev)
        if comm.rank == 0:
            print("distprop train: devices\n" + device_mod.describe_mapping(mapping), flush=True)
        model.to(dev)
    from distprop.distributed.selection import make_comm  # noqa: PLC0415

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
            fileio.remove_orphaned_temps(directory, started, log=lambda m: print(m, flush=True))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"distprop train: {cfg.model} ({n_params:,} parameters) on {cfg.dataset} "
              f"{splits.sizes()}, {comm.size} rank(s) x {threads} BLAS thread(s), batch "
              f"{cfg.batch_size}/rank x "
              f"{cfg.grad_accum} accumulation = {cfg.global_batch_size} per step, "
              f"{cfg.optimizer} lr {base_lr(cfg):.4g}", flush=True)
    trainer = Trainer(model, nn.CrossEntropyLoss(), optimizer, comm=data_comm, device=dev,
                      clip_grad_norm=cfg.clip_grad_norm, grad_accum=cfg.grad_accum,
                      compression=None if cfg.compression == "none" else cfg.compression,
                      callbacks=callbacks, seed=cfg.seed, log_every=cfg.log_every,
                      prefetch=cfg.prefetch, amp=None if cfg.amp == "none" else cfg.amp)
    resume = _resume_source(cfg, comm, model, optimizer, len(splits.train))
    history = trainer.fit(splits.train, splits.val, epochs=cfg.epochs,
                          batch_size=cfg.batch_size, resume=_read_on_rank0(comm, resume))
    if resume is not None:
        history.resumed_from = resume
    test = trainer.evaluate(splits.test) if splits.test is not None else None
    summary = {
        "config": cfg.to_dict(), "world_size": comm.size, "dataset": splits.sizes(),
        "num_classes": splits.num_classes, "input_shape": list(splits.input_shape),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "epochs_run": len(history.epochs), "steps": trainer.step,
        "final": history.final, "test": test, "resumed_from": history.resumed_from,
        "checkpoints": [str(p) for p in ckpt.list_checkpoints(checkpoint_dir(cfg))],
        "wall_time_s": time.time() - started,
        "threads": {"per_rank": threads, "blas": _blas_threads()},
    }
    if comm.rank == 0:
        plot = _plot(history.epochs, out / "curves.png") if history.epochs else None
        summary["plot"] = str(plot) if plot else None
        fileio.atomic_write_text(out / "summary.json",
                                 json.dumps(summary, indent=2, default=str) + "\n", "summary")
        if test is not None:
            print(f"test: loss {test['loss']:.4f}  accuracy {100 * test['accuracy']:.2f}% "
                  f"({test['samples']} samples); wrote {out / 'summary.json'}", flush=True)
    return summary


def main_worker(cfg: TrainConfig) -> int:
    """Entry point of one rank; exceptions end the whole job (MPI abort), printed once."""
    from distprop import distributed  # noqa: PLC0415

    comm = distributed.init()
    if comm.size > 1:
        from distprop.distributed import guards  # noqa: PLC0415

        with guards.abort_on_exception(comm):
            return _train_reporting_divergence(cfg, comm)
    return _train_reporting_divergence(cfg, comm)


def _train_reporting_divergence(cfg: TrainConfig, comm) -> int:
    """Run :func:`train`; a diverged run (non-finite gradients) is an error message, exit 1.

    DDP's non-finite guard raises on every rank alike (it checks the averaged gradient), so the
    ranks leave together and no abort is needed; rank 0 prints the message once.
    """
    try:
        train(cfg, comm)
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
    return 0
