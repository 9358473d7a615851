"""Training callbacks: progress bar, metrics log, checkpoints, LR schedule, early stopping,
gradient-norm warnings.

A callback overrides any of the hooks below; each receives the :class:`~distprop.train.Trainer`
and, where it applies, a ``logs`` dict of reduced (global) metrics. Hooks run on every rank, in
the order the callbacks were given; output is written by rank 0 only (``trainer.is_main``).
A callback with state implements ``state_dict``/``load_state_dict``; the trainer stores that
state in its checkpoints under the callback's ``name``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
import warnings
from pathlib import Path

from distprop import fileio
from distprop.train.checkpoint import CheckpointManager

_log = logging.getLogger(__name__)
CSV_FIELDS = ("kind", "epoch", "step", "loss", "accuracy", "lr", "samples_per_s", "grad_norm",
              "val_loss", "val_accuracy", "time")


class Callback:
    """Base class: every hook does nothing."""

    name: str = ""

    def on_train_begin(self, trainer) -> None: ...

    def on_epoch_begin(self, trainer, epoch: int) -> None: ...

    def on_step_end(self, trainer, logs: dict | None) -> None:
        """After each optimizer step; ``logs`` is set on logging steps (else None)."""

    def on_epoch_end(self, trainer, logs: dict) -> None: ...

    def on_train_end(self, trainer, logs: dict) -> None: ...

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None: ...

    def resume_notes(self) -> list[str]:
        """What changed on resume (after ``load_state_dict``), for the trainer's log line."""
        return []


def _metric_names(trainer) -> list[str]:
    return list(getattr(trainer, "metric_names", ["accuracy"]))


def _metric_parts(trainer, logs: dict, prefix: str) -> list[str]:
    """``acc 97.50%`` for accuracy, ``r2 0.9312`` for other metrics, as in the epoch line."""
    parts = []
    for name in _metric_names(trainer):
        value = logs.get(prefix + name)
        if value is None:
            continue
        if name == "accuracy":
            parts.append(f"{prefix}acc {100 * value:.2f}%")
        else:
            parts.append(f"{prefix}{name} {value:.4f}")
    return parts


class ProgressBar(Callback):
    """A tqdm bar per epoch on rank 0 (quiet when stderr is not a terminal); epoch summary lines
    are printed to stdout on rank 0 either way."""

    name = "progress"

    def __init__(self, print_epochs: bool = True, force_bar: bool | None = None):
        self.print_epochs = print_epochs
        self.force_bar = force_bar
        self._bar = None

    def _use_bar(self) -> bool:
        if self.force_bar is not None:
            return self.force_bar
        return sys.stderr.isatty()

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        if not trainer.is_main or not self._use_bar():
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.step_in_epoch,
                         desc=f"epoch {epoch + 1}/{trainer.epochs}", leave=False,
                         dynamic_ncols=True)

    def on_step_end(self, trainer, logs) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if logs:
                self._bar.set_postfix(loss=f"{logs['loss']:.4f}",
                                      **{n: f"{logs[n]:.3f}" for n in _metric_names(trainer)})

    def on_epoch_end(self, trainer, logs) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if trainer.is_main and self.print_epochs and not trainer.epoch_replayed:
            parts = [f"epoch {logs['epoch'] + 1}/{trainer.epochs}", f"step {logs['step']}",
                     f"loss {logs['loss']:.4f}", *_metric_parts(trainer, logs, "")]
            if logs.get("val_loss") is not None:
                parts += [f"val_loss {logs['val_loss']:.4f}",
                          *_metric_parts(trainer, logs, "val_")]
            parts.append(f"lr {logs['lr']:.4g}")
            if logs.get("samples_per_s") is not None:
                parts.append(f"{logs['samples_per_s']:.0f} samples/s")
            _log.info("  ".join(parts))

    def on_train_end(self, trainer, logs) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def numbered_from_one(logs: dict) -> dict:
    """``logs`` with its ``epoch`` counted from 1, as on the console, in the metrics files and
    in ``summary.json``; the trainer and the callbacks' ``logs`` count epochs from 0."""
    if logs.get("epoch") is None:
        return dict(logs)
    return {**logs, "epoch": logs["epoch"] + 1}


def _file_epoch_base(rows: list[dict], history: list[dict]) -> int:
    """How ``rows`` read back from a metrics file number their epochs: 1 (this version) or 0
    (files written before epochs were counted from 1), told from the first row's epoch and the
    epochs finished before its step (the checkpoint's history, counted from 0)."""
    for row in rows:
        if row.get("epoch") is not None and row.get("step") is not None:
            done = sum(1 for h in history if h.get("step", 0) < row["step"])
            return 0 if row["epoch"] == done else 1
    return 1


class MetricsLogger(Callback):
    """Appends step and epoch metrics to ``metrics.jsonl`` and ``metrics.csv`` (rank 0), with
    epochs counted from 1 as on the console.

    On resume, rows after the resumed step are dropped first, so the files read like one
    uninterrupted run; the row of an epoch whose data was all consumed before the resume is
    kept and not written again. A file written with epochs counted from 0 (older versions) is
    renumbered.
    """

    name = "metrics"

    def __init__(self, directory):
        self.directory = Path(directory)
        self.jsonl = self.directory / "metrics.jsonl"
        self.csv = self.directory / "metrics.csv"
        self._kept_epochs: set[int] = set()
        self._fields = CSV_FIELDS

    def on_train_begin(self, trainer) -> None:
        extra = [n for name in _metric_names(trainer) for n in (name, f"val_{name}")
                 if n not in CSV_FIELDS]
        self._fields = CSV_FIELDS[:-1] + tuple(extra) + CSV_FIELDS[-1:]  # time stays last
        if not trainer.is_main:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        rows = []
        self._kept_epochs = set()
        if trainer.resumed_from is not None and self.jsonl.exists():
            read = []
            for line in self.jsonl.read_text().splitlines():
                try:
                    read.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by the crash
            base = _file_epoch_base(read, getattr(trainer, "_history_records", []))
            for row in read:
                if row.get("epoch") is not None:
                    row["epoch"] -= base  # from 0 while comparing with the trainer
                is_epoch = row.get("kind") == "epoch"
                unfinished = is_epoch and row.get("epoch", 0) >= trainer.epoch
                if unfinished and row.get("epoch") == trainer.epoch and trainer.samples_in_epoch \
                        == trainer.epoch_samples and row.get("step") == trainer.step:
                    unfinished = False  # only its epoch end is left to do: keep the row
                if row.get("step", 0) <= trainer.step and not unfinished:
                    rows.append(numbered_from_one(row))
                    if is_epoch:
                        self._kept_epochs.add(row.get("epoch"))
        fileio.atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows),
                                 "metrics")
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=self._fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        fileio.atomic_write_text(self.csv, table.getvalue(), "metrics")

    def _write(self, row: dict) -> None:
        for path in (self.jsonl, self.csv):
            try:
                with open(path, "a", newline="") as f:
                    if path is self.jsonl:
                        f.write(json.dumps(row) + "\n")
                    else:
                        csv.DictWriter(f, fieldnames=self._fields,
                                       extrasaction="ignore").writerow(row)
            except OSError as exc:
                raise fileio.WriteError(exc.errno, f"cannot write metrics {path}: "
                                        f"{fileio.describe(exc)}") from exc

    def on_step_end(self, trainer, logs) -> None:
        if logs and trainer.is_main:
            self._write({"kind": "train", **numbered_from_one(logs)})

    def on_epoch_end(self, trainer, logs) -> None:
        if trainer.is_main and logs["epoch"] not in self._kept_epochs:
            self._write({"kind": "epoch", **numbered_from_one(logs)})


class Checkpointer(Callback):
    """Saves the full training state every ``every_steps`` steps (0: at each epoch end) and at
    the end of training, keeping the last ``keep`` files in ``directory``.

    A step checkpoint that falls on an epoch's last step is written at that epoch's end instead
    (same file name), so that no checkpoint holds an epoch whose data is done but whose end
    (validation, epoch metrics, early stopping) is not.

    Saving is collective (per-rank RNG states are gathered; a sharded optimizer consolidates its
    state); rank 0 writes the file.
    """

    name = "checkpointer"

    def __init__(self, directory, every_steps: int = 0, keep: int = 3):
        self.manager = CheckpointManager(directory, keep=keep)
        self.every_steps = int(every_steps)
        self._last_saved: tuple[int, int, int] | None = None
        self._deferred = False
        self.saved: list[Path] = []

    @staticmethod
    def _position(trainer) -> tuple[int, int, int]:
        return (trainer.epoch, trainer.step, trainer.samples_in_epoch)

    def _save(self, trainer) -> None:
        if self._position(trainer) == self._last_saved:
            return
        state = trainer.checkpoint_state()
        if trainer.is_main:
            self.saved.append(self.manager.save(state, trainer.step))
        trainer.barrier()
        self._last_saved = self._position(trainer)

    def on_train_begin(self, trainer) -> None:
        self._last_saved = self._position(trainer) if trainer.resumed_from is not None else None
        self._deferred = False

    def on_step_end(self, trainer, logs) -> None:
        if self.every_steps and trainer.step % self.every_steps == 0:
            if trainer.epoch_data_done:
                self._deferred = True  # written at the epoch end, just after this
            else:
                self._save(trainer)

    def on_epoch_end(self, trainer, logs) -> None:
        if not self.every_steps or self._deferred:
            self._deferred = False
            self._save(trainer)

    def on_train_end(self, trainer, logs) -> None:
        self._save(trainer)

    def on_preempt(self, trainer) -> None:
        """The ranks agreed to stop at this step (preemption): write its checkpoint."""
        self._save(trainer)


class LRSchedule(Callback):
    """Steps a learning-rate scheduler after every optimizer step (``interval='step'``), after
    every epoch (``'epoch'``), or with the validation loss (``ReduceLROnPlateau``).

    A scheduler with ``set_progress`` (:class:`distprop.train.schedule.ProgressSchedule`) is
    given the fraction of training done instead, after every step and when training begins,
    so it ends where it should on any number of ranks and batch size.
    """

    name = "lr_schedule"

    def __init__(self, scheduler, interval: str = "step"):
        if interval not in ("step", "epoch"):
            raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
        self.scheduler = scheduler
        self.plateau = type(scheduler).__name__ == "ReduceLROnPlateau"
        self.interval = "epoch" if self.plateau else interval

    def on_step_end(self, trainer, logs) -> None:
        if hasattr(self.scheduler, "set_progress"):
            self.scheduler.set_progress(trainer.progress)
        elif self.interval == "step":
            self.scheduler.step()

    def on_epoch_end(self, trainer, logs) -> None:
        if self.plateau:
            metric = logs.get("val_loss")
            self.scheduler.step(logs["loss"] if metric is None else metric)
        elif self.interval == "epoch":
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def on_train_begin(self, trainer) -> None:
        if hasattr(self.scheduler, "set_progress"):  # a resumed run: the rate of its position
            self.scheduler.set_progress(trainer.progress)

    def resume_notes(self) -> list[str]:
        notes = getattr(self.scheduler, "resume_notes", None)
        return notes() if notes is not None else []


class EarlyStoppingCallback(Callback):
    """Stops training when an epoch metric stops improving, using
    :class:`distprop.train.EarlyStopping` for the decision.

    Every rank sees the same reduced metric, so every rank stops after the same epoch.

    Args:
        patience: epochs without improvement tolerated.
        min_delta: smallest change that counts as an improvement.
        monitor: the epoch-log key to watch (``val_loss``; falls back to ``loss`` without
            validation data).
        mode: ``'min'`` or ``'max'``.
    """

    name = "early_stopping"

    def __init__(self, patience: int = 5, min_delta: float = 0.0, monitor: str = "val_loss",
                 mode: str = "min"):
        from distprop.train.early_stopping import EarlyStopping

        self.stopper = EarlyStopping(patience=patience, min_delta=min_delta, mode=mode)
        self.monitor = monitor
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, trainer, logs) -> None:
        value = logs.get(self.monitor)
        if value is None:
            value = logs.get(self.monitor.replace("val_", ""))
        if value is None:
            return
        if self.stopper.step(value):
            self.stopped_epoch = logs["epoch"]
            trainer.stop_training = True
            if trainer.is_main:
                _log.info(f"early stopping after epoch {logs['epoch'] + 1}: {self.monitor} has "
                          f"not improved for {self.stopper.num_bad_steps} epoch(s) (best "
                          f"{self.stopper.best:.4g})")

    def state_dict(self) -> dict:
        return self.stopper.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stopper.load_state_dict(state)


class GradNormMonitor(Callback):
    """Warns (rank 0) when the global gradient norm vanishes, explodes or is not finite.

    Args:
        low: norms below this are reported as vanishing.
        high: norms above this are reported as exploding.
        max_warnings: stop warning after this many messages.
    """

    name = "grad_norm_monitor"

    def __init__(self, low: float = 1e-7, high: float = 1e3, max_warnings: int = 5):
        self.low, self.high, self.max_warnings = low, high, max_warnings
        self.warned = 0

    def _warn(self, trainer, message: str) -> None:
        if trainer.is_main and self.warned < self.max_warnings:
            self.warned += 1
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            _log.warning(f"warning: {message}")

    def on_step_end(self, trainer, logs) -> None:
        if not logs or logs.get("grad_norm") is None:
            return
        from distprop.nn.utils import classify_grad_norms

        norm, step = logs["grad_norm"], logs["step"]
        report = classify_grad_norms(trainer.last_grad_norms, self.low, self.high) \
            if trainer.last_grad_norms else {"vanishing": [], "exploding": [], "nonfinite": []}
        if report["nonfinite"] or not math.isfinite(norm):
            self._warn(trainer, f"step {step}: non-finite gradient norm ({norm}) in "
                       f"{_names(report['nonfinite'])}; lower --lr or use --clip-grad-norm")
        elif norm > self.high or report["exploding"]:
            self._warn(trainer, f"step {step}: exploding gradients, global norm {norm:.3g} "
                       f"(limit {self.high:g}) in {_names(report['exploding'])}; lower --lr or "
                       "use --clip-grad-norm")
        elif norm < self.low or report["vanishing"]:
            self._warn(trainer, f"step {step}: vanishing gradients, global norm {norm:.3g} "
                       f"(limit {self.low:g}) in {_names(report['vanishing'])}")


def _names(names: list[str], limit: int = 4) -> str:
    if not names:
        return "the model as a whole"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
