"""The training loop: ``fit(model, loss_fn, optimizer, train_data, ...)`` and :class:`Trainer`.

One optimizer step, on every rank: ``grad_accum`` micro-batches from this rank's
:class:`~distprop.data.DistributedSampler` shard go forward and backward through
:class:`~distprop.distributed.DistributedDataParallel` (all but the last inside ``no_sync()``,
so gradients are averaged across ranks once per step), the global gradient norm is clipped, the
optimizer steps, and the callbacks run (LR schedule, metrics, checkpoints, ...). Loss sums,
correct counts and sample counts stay on the device and are reduced across ranks once per log
interval and at epoch ends, not every step (one float64 vector, kept by the trainer so that it
can go into checkpoints; evaluation uses :class:`~distprop.distributed.MetricsReducer`).

The trainer's position (epoch, optimizer step, samples of the epoch's global order consumed),
every rank's RNG state and running metric sums go into checkpoints with the model, optimizer and
callback states, so a run resumed on the same ranks continues exactly as if it had not stopped.
Resumed on another number of ranks, the interrupted epoch continues at the same sample (every
remaining sample seen once); with the same global batch the result is the uninterrupted run's up
to float rounding (see :mod:`distprop.train.resume`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from distprop import amp as _amp
from distprop import backend, trace
from distprop.data import DataLoader, TensorDataset
from distprop.tensor import Tensor, no_grad
from distprop.train.metrics import MetricSums, default_metrics
from distprop.train.trainer_state import TrainerState

_log = logging.getLogger(__name__)


def _default_comm():
    from distprop import distributed

    return distributed.init()


def _sampler(dataset, comm, seed: int, shuffle: bool):
    from distprop.data.sampler import DistributedSampler

    return DistributedSampler(dataset, num_replicas=comm.size, rank=comm.rank, shuffle=shuffle,
                              seed=seed)


def _ddp(model, comm, compression, kwargs):
    from distprop.distributed import DistributedDataParallel

    extra = dict(kwargs or {})
    if compression not in (None, "none"):
        extra["compression"] = compression
    return DistributedDataParallel(model, comm=comm, **extra)


def _check_finite(dataset, name: str) -> None:
    """NaN/inf in an in-memory ``TensorDataset`` is an error before training, on every rank
    (memory-mapped files are checked by :mod:`distprop.data.sources` when they are loaded)."""
    arrays = dataset.arrays if isinstance(dataset, TensorDataset) else ()
    for i, a in enumerate(arrays):
        if isinstance(a, np.ndarray) and not isinstance(a, np.memmap) and a.dtype.kind in "fc":
            rows = a.reshape(a.shape[0], -1)
            step = max(1, (1 << 26) // max(1, rows.shape[1] * a.itemsize))  # ~64 MB at a time
            for start in range(0, rows.shape[0], step):
                finite = np.isfinite(rows[start : start + step]).all(axis=1)
                if finite.all():
                    continue
                row = start + int(np.argmin(finite))
                raise ValueError(f"{name}: tensor {i} of the dataset has a non-finite value "
                                 f"(NaN or inf) in sample {row}; clean the data before training")


def _default_progress(callbacks, progress: bool | None) -> list:
    """The progress reporter ``fit`` adds: none when ``callbacks`` has a ProgressBar or
    ``progress`` is False; with ``progress=None`` only when stderr is a terminal; with True
    always (a tqdm bar when tqdm is installed and stderr is a terminal, epoch lines on stdout;
    rank 0 only)."""
    import sys

    from distprop.train.callbacks import ProgressBar

    if progress is False or any(isinstance(cb, ProgressBar) for cb in callbacks):
        return []
    if progress is None and not sys.stderr.isatty():
        return []
    return [ProgressBar()]


@dataclass
class History:
    """What ``fit`` returns: one record per epoch, the final metrics, and where files went."""

    epochs: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    resumed_from: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    preempted: bool = False  #: stopped early by a preemption (a checkpoint of that step exists)


class Trainer(TrainerState):
    """Runs epochs of data-parallel training; see :func:`fit` for the arguments (``metrics``
    and ``progress`` included)."""

    def __init__(self, model, loss_fn, optimizer, *, comm=None, device="cpu",
                 clip_grad_norm: float | None = None, grad_accum: int = 1,
                 compression: str | None = None, callbacks=(), seed: int = 0,
                 log_every: int = 10, prefetch: int = 1, ddp_kwargs: dict | None = None,
                 amp=None, metrics: dict | None = None, progress: bool | None = None):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.device = backend.device(device)
        # 'mpi' and 'shm' also choose how DDP reduces within a node (CPU gradients)
        ddp_comm = (comm if isinstance(comm, str) and comm in ("mpi", "shm")
                    and not self.device.is_cuda else None)  # on a GPU: the comm built below
        if isinstance(comm, str):  # a --comm choice: a name in registry.COMMS
            from distprop.distributed.selection import make_comm

            comm = make_comm(comm, device=self.device)
        self.comm = comm if comm is not None else _default_comm()
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self.grad_accum = int(grad_accum)
        self.callbacks = list(callbacks) + _default_progress(callbacks, progress)
        # name -> metric (see distprop.train.metrics); None: accuracy, as a classifier
        self.metrics = dict(default_metrics() if metrics is None else metrics)
        self._layout: MetricSums | None = None
        self.seed = int(seed)
        self.log_every = int(log_every)
        self.prefetch = int(prefetch)
        self.ddp = _ddp(model, ddp_comm or self.comm, compression, ddp_kwargs)
        # the replicas start identical (built from one seed, checked by DDP); from here on each
        # rank draws its own dropout masks: SeedSequence(seed).spawn(world)[rank]
        backend.seed_rank(self.seed, self.comm.rank)
        # mixed precision: amp=None/False off; True, 'float16' or dp.float16 on (see dp.amp)
        on = amp is not None and amp is not False
        self.autocast = _amp.autocast(dtype=None if amp is True or not on else amp, enabled=on)
        self.scaler = _amp.GradScaler(enabled=on)
        # position
        self.epoch = 0
        self.epochs = 0
        self.step = 0
        self.batch_in_epoch = 0  # micro-batches since this epoch's loader started
        self.steps_per_epoch = 0  # of a whole epoch
        self.batch_size = 0  # per rank and micro-batch
        self.epoch_samples = 0  # the training set's size
        self.epoch_replayed = False  # this epoch's data was all consumed before this run
        self._start_sample = 0  # where this epoch's loader started in the global order
        self._skipped_steps = 0  # steps of this epoch done before that
        self._epoch_batches = 0
        self._counts = [0.0, 0.0]  # samples this rank processed in this run: epoch, interval
        self.stop_training = False
        self.preempted = False  # stopped at a step all ranks agreed on, after a preemption
        self.resumed_from: str | None = None
        self._sums = None  # this rank's running sums: epoch [loss, metric sums.., n], interval
        self._last_norm: float | None = None
        self.last_grad_norms: dict[str, float] = {}

    # --- facts --------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.comm.rank == 0

    @property
    def step_in_epoch(self) -> int:
        return self._skipped_steps + self.batch_in_epoch // self.grad_accum

    @property
    def samples_in_epoch(self) -> int:
        """Samples of the current epoch's global order consumed (by all ranks together)."""
        done = self._start_sample + self.batch_in_epoch * self.batch_size * self.comm.size
        return min(done, self.epoch_samples)

    @property
    def epoch_data_done(self) -> bool:
        """True once every batch of the current epoch went through (before its epoch end)."""
        return self.batch_in_epoch >= self._epoch_batches

    @property
    def progress(self) -> float:
        """The fraction of training done, in samples: the same on any number of ranks."""
        within = self.samples_in_epoch / self.epoch_samples if self.epoch_samples else 0.0
        return min(1.0, (self.epoch + within) / max(1, self.epochs))

    def barrier(self) -> None:
        self.comm.barrier()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _xp(self):
        return backend.xp_for(self.device)

    @property
    def metric_names(self) -> list[str]:
        """The names of the metrics in the log rows (besides ``loss``)."""
        return list(self.metrics)

    def _set_layout(self, dataset) -> MetricSums:
        """The running sums' layout for ``dataset``'s target shape (from its first sample)."""
        sample = dataset[0] if len(dataset) else None
        target_shape = tuple(sample[1].shape) if isinstance(sample, tuple | list) and \
            len(sample) == 2 and hasattr(sample[1], "shape") else ()
        layout = MetricSums(self.metrics, target_shape)
        if self._layout is None or layout.width != self._layout.width:
            self._sums = None
        self._layout = layout
        return layout

    def _reset_sums(self, epoch: bool = True, interval: bool = True) -> None:
        xp = self._xp()
        w = self._layout.width
        if self._sums is None:
            self._sums = xp.zeros(2 * w, dtype=np.float64)
        if epoch:
            self._sums[:w] = 0
            self._counts[0] = 0.0
        if interval:
            self._sums[w:] = 0
            self._counts[1] = 0.0

    # --- one step -----------------------------------------------------------------------------

    def _to_device(self, batch):
        if isinstance(batch, tuple | list) and len(batch) == 2:
            x, y = batch
        else:
            raise ValueError("training batches must be (inputs, targets) pairs; the dataset gave "
                             f"{type(batch).__name__} of length {len(batch)}")
        if self.device.is_cuda:
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def _accumulate_metrics(self, out: Tensor, y: Tensor, loss: Tensor) -> None:
        n = float(y.shape[0]) if y.ndim else 1.0
        w = self._layout.width
        with no_grad():
            row = self._layout.row(out, y, loss, self._xp())
        self._sums[:w] += row
        self._sums[w:] += row
        self._counts[0] += n
        self._counts[1] += n

    def _grad_norm(self) -> float:
        """Global L2 norm of the (already averaged) gradients, identical on all ranks; the
        per-parameter norms are kept in ``last_grad_norms`` for diagnostics."""
        from distprop.nn.utils import grad_norms

        self.last_grad_norms = grad_norms(self.model)
        return float(math.sqrt(sum(v * v for v in self.last_grad_norms.values())))

    def _optimizer_step(self, log_now: bool) -> float | None:
        """Clip, step and zero the gradients; the global grad norm on logging steps."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # norms and clipping see the true gradients
        norm = self._grad_norm() if log_now else None
        if self.clip_grad_norm is not None:
            from distprop.nn.utils import clip_grad_norm_

            clipped_from = float(clip_grad_norm_(self.model.parameters(), self.clip_grad_norm))
            norm = clipped_from if norm is None else norm
        if self.scaler.is_enabled():  # skips a step with inf/NaN gradients, on every rank
            with trace.span("optimizer.step", step=self.step):
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif getattr(self.ddp, "step_ok", True):
            with trace.span("optimizer.step", step=self.step):
                self.optimizer.step()
        self.optimizer.zero_grad()
        if norm is not None:
            self._last_norm = norm
        return norm

    # --- loops --------------------------------------------------------------------------------

    def _train_loader(self, dataset, batch_size: int):
        sampler = _sampler(dataset, self.comm, self.seed, shuffle=True)
        device = self.device if self.device.is_cuda else None  # copy in the prefetch thread
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          prefetch=self.prefetch, device=device)

    def evaluate(self, dataset, batch_size: int = 256) -> dict:
        """Mean loss and the metrics over ``dataset``; each rank evaluates every size-th sample
        (no padding, so the reduced numbers are exact): ``{"loss", <metric names>, "samples"}``.
        """
        from distprop.data.sampler import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=self.comm.size, rank=self.comm.rank,
                                     shuffle=False, pad=False)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                            device=self.device if self.device.is_cuda else None)
        layout = self._layout if self._layout is not None else self._set_layout(dataset)
        xp = self._xp()
        sums = xp.zeros(layout.width, dtype=np.float64)
        was_training = self.model.training
        self.model.eval()
        with no_grad():
            for batch in loader:
                x, y = self._to_device(batch)
                out = self.model(x)
                sums += layout.row(out, y, self.loss_fn(out, y), xp)
        self.model.train(was_training)
        totals = np.asarray(backend.to_host(sums), dtype=np.float64)
        if self.comm.size > 1:
            totals = self.comm.allreduce(totals, op="sum")
        return {**layout.values(totals), "samples": int(totals[-1])}

    def _log_row(self, epoch_part: bool, norm, elapsed: float) -> dict:
        """Reduced metrics of the epoch (or log interval) so far; the rate counts only the
        samples processed in this run (a resumed epoch's sums include earlier runs')."""
        w = self._layout.width
        lo, hi = (0, w) if epoch_part else (w, 2 * w)
        host = np.asarray(backend.to_host(self._sums[lo:hi]), dtype=np.float64)
        done_here = self._counts[0 if epoch_part else 1]
        total = self.comm.allreduce(np.append(host, done_here), op="sum")
        rate = float(total[w] / elapsed) if elapsed > 0 and total[w] > 0 else None
        return {"epoch": self.epoch, "step": self.step, **self._layout.values(total[:w]),
                "lr": self.lr(), "samples_per_s": rate, "grad_norm": norm, "time": time.time()}

    def fit(self, train_data, val_data=None, epochs: int = 1, batch_size: int = 32,
            resume=None) -> History:
        """Train for ``epochs`` epochs (continuing from ``resume``, a checkpoint path or state)."""
        self.epochs = int(epochs)
        _check_finite(train_data, "train_data")
        if val_data is not None:
            _check_finite(val_data, "val_data")
        loader = self._train_loader(train_data, batch_size)
        self.batch_size, self.epoch_samples = int(batch_size), len(train_data)
        self._start_sample = 0
        self._set_layout(train_data)
        self.steps_per_epoch = math.ceil(len(loader) / self.grad_accum)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training data gives no batches on rank {self.comm.rank} "
                             f"({len(train_data)} samples over {self.comm.size} ranks)")
        self._reset_sums()
        history = History()
        if resume is not None:
            self.load_checkpoint(resume)
            history.resumed_from = self.resumed_from
            history.epochs = list(self._history_records)
        else:
            self._history_records = []
        self.model.train()
        self.optimizer.zero_grad()
        for cb in self.callbacks:
            cb.on_train_begin(self)
        from distprop.distributed import lifeline, preemption

        lifeline.report("preemptible")  # the launcher may pass SIGTERM on as a request to stop
        with preemption.handling():
            self._loop(loader, train_data, val_data, batch_size)
        history.epochs = list(self._history_records)
        if self.preempted:
            history.preempted = True
            history.checkpoints = [str(p) for cb in self.callbacks for p in getattr(cb, "saved",
                                                                                    ())]
            return history
        final = dict(self._history_records[-1]) if self._history_records else {}
        for cb in self.callbacks:
            cb.on_train_end(self, final)
        history.final = final
        for cb in self.callbacks:
            if hasattr(cb, "saved"):
                history.checkpoints = [str(p) for p in cb.saved]
        return history

    def _preempt(self) -> None:
        """Every rank agreed to stop here: checkpoint this step and tell the launcher."""
        from distprop.distributed import lifeline, preemption

        text = preemption.who_asked(getattr(self.comm, "host", self.comm))
        for cb in self.callbacks:
            if hasattr(cb, "on_preempt"):
                cb.on_preempt(self)
        self.preempted = True
        lifeline.report("preempted", step=self.step, epoch=self.epoch, cause=text)
        if self.is_main:
            _log.info(f"distprop train: preempted ({text}): all ranks stopped after step "
                      f"{self.step} (epoch {self.epoch + 1}) and wrote its checkpoint; "
                      "--resume auto continues from it")

    def _loop(self, loader, train_data, val_data, batch_size: int) -> None:
        from distprop.distributed import guards, preemption

        interval_start = time.perf_counter()
        epoch_start = interval_start
        step_end = interval_start
        vote = preemption.StopVote(getattr(self.comm, "host", self.comm))  # any rank preempted?
        while self.epoch < self.epochs and not self.stop_training:
            loader.set_epoch(self.epoch)
            start = self._start_sample  # > 0 only in an epoch resumed mid-way
            loader.sampler.set_start(start)
            if not start:
                self._reset_sums(epoch=True, interval=False)
                epoch_start = time.perf_counter()
            n_batches = self._epoch_batches = len(loader)
            self.batch_in_epoch = 0
            self._skipped_steps = max(0, self.steps_per_epoch
                                      - math.ceil(n_batches / self.grad_accum)) if start else 0
            self.epoch_replayed = start > 0 and n_batches == 0
            for cb in self.callbacks:
                cb.on_epoch_begin(self, self.epoch)
            for batch in loader:
                x, y = self._to_device(batch)
                group_start = (self.batch_in_epoch // self.grad_accum) * self.grad_accum
                group_size = min(self.grad_accum, n_batches - group_start)
                last_micro = self.batch_in_epoch + 1 == group_start + group_size
                sync = contextlib.nullcontext() if last_micro else self.ddp.no_sync()
                with sync:
                    with trace.span("forward", step=self.step), self.autocast:
                        out = self.ddp(x)
                        loss = self.loss_fn(out, y)
                        scaled = loss if group_size == 1 else loss * (1.0 / group_size)
                    with trace.span("backward", step=self.step):
                        self.scaler.scale(scaled).backward()
                self._accumulate_metrics(out, y, loss)
                self.batch_in_epoch += 1
                if not last_micro:
                    continue
                log_now = (self.step + 1) % self.log_every == 0
                norm = self._optimizer_step(log_now)
                self.step += 1
                logs = None
                if log_now:
                    now = time.perf_counter()
                    logs = self._log_row(False, norm, now - interval_start)
                    self._reset_sums(epoch=False, interval=True)
                    interval_start = now
                for cb in self.callbacks:
                    cb.on_step_end(self, logs)
                now = time.perf_counter()
                guards.note_step(now - step_end)  # the stall limit follows the step time
                step_end = now
                # The last step of an epoch is not a place to stop: the epoch end decides.
                if not self.epoch_data_done and vote.step():
                    self._preempt()
                    return
            vote.drain()  # the epoch end votes itself, below
            logs = self._log_row(True, self._last_norm, time.perf_counter() - epoch_start)
            if val_data is not None:
                val = self.evaluate(val_data, batch_size=max(batch_size, 256))
                for name in ("loss", *self.metrics):
                    logs[f"val_{name}"] = val[name]
            self.epoch += 1
            self.batch_in_epoch = self._start_sample = self._skipped_steps = 0
            self._reset_sums(epoch=True, interval=False)
            self._history_records.append(logs)
            for cb in self.callbacks:
                cb.on_epoch_end(self, logs)
            # A callback on one rank may stop, a rank may be preempted: all ranks act together.
            votes = np.array([float(self.stop_training), float(preemption.requested())])
            if self.comm.size > 1:
                votes = getattr(self.comm, "host", self.comm).allreduce(votes, op="sum")
            self.stop_training = bool(votes[0] > 0)
            if votes[1] > 0 and self.epoch < self.epochs and not self.stop_training:
                self._preempt()
                return
def fit(model, loss_fn, optimizer, train_data, val_data=None, epochs: int = 1,
        batch_size: int = 32, *, comm=None, device="cpu", clip_grad_norm: float | None = None,
        grad_accum: int = 1, compression: str | None = None, callbacks=(), seed: int = 0,
        log_every: int = 10, prefetch: int = 1, resume=None,
        ddp_kwargs: dict | None = None, amp=None, metrics: dict | None = None,
        progress: bool | None = None) -> History:
    """Train ``model`` data-parallel over the ranks of ``comm`` (default: ``dp.distributed``).

    Args:
        model: the module (identical on every rank: seed before building it).
        loss_fn: ``loss_fn(outputs, targets) -> scalar Tensor`` (mean over the batch).
        optimizer: built over ``model.parameters()``.
        train_data: an array-backed dataset of ``(x, y)`` samples; each rank reads its
            :class:`~distprop.data.DistributedSampler` shard, reshuffled every epoch by ``seed``.
        val_data: evaluated at each epoch end (``val_loss``/``val_accuracy`` in the logs).
        epochs: total epochs (a resumed run counts the ones already done).
        batch_size: samples per rank per micro-batch.
        comm: the communicator; ``None`` initialises ``dp.distributed``; a name in
            :data:`distprop.registry.COMMS` (``'auto'``, ...) picks how gradients are reduced.
        device: where batches go (``"cpu"``, ``"cuda"``, ``"cuda:N"``).
        clip_grad_norm: clip the global gradient norm (after the allreduce) to this.
        grad_accum: micro-batches per optimizer step (gradients sync only on the last one).
        compression: a :data:`distprop.registry.COMPRESSIONS` name (``"fp16"``, ``"bf16"``,
            ``"powersgd"``): the communication hook DDP registers; its options (e.g.
            ``{"matrix_approximation_rank": 4}``) go in ``ddp_kwargs["compression_options"]``.
            PowerSGD's per-rank memories are saved in checkpoints.
        callbacks: :mod:`distprop.train.callbacks` instances, run in order. A callback that sets
            ``trainer.stop_training`` on any rank stops every rank at the end of that epoch.
        seed: the sampler's shuffling seed, and the root of each rank's random stream: once
            DDP has checked that the replicas are identical, rank r draws dropout masks (and
            anything else from ``dp``'s generator) from ``SeedSequence(seed).spawn(world)[r]``,
            saved per rank in checkpoints (a resume on another number of ranks derives fresh
            streams from ``(seed, rank, step)``).
        log_every: optimizer steps between metric reductions and log rows.
        prefetch: batches prepared ahead by a background thread.
        resume: a checkpoint path (or loaded state) to continue from.
        ddp_kwargs: extra ``DistributedDataParallel`` arguments.
        amp: mixed precision: ``'float16'`` (or True) runs forward and loss under
            :class:`distprop.amp.autocast` and scales the loss with a
            :class:`distprop.amp.GradScaler` (its state goes into checkpoints); None: float32.
        metrics: ``{name: fn or Metric}`` computed on every batch and reduced exactly across
            ranks with the loss (see :mod:`distprop.train.metrics` for the contract: ``fn``
            returns ``(sum, count)`` or a batch mean); they appear in the logs as ``name`` and
            ``val_name``. None: ``{"accuracy": Accuracy()}``; ``{}``: the loss only.
        progress: report progress on rank 0 (a :class:`~distprop.train.callbacks.ProgressBar`:
            a tqdm bar when tqdm is installed and stderr is a terminal, one line per epoch on
            stdout). None: only when stderr is a terminal; True: always; False: never. Not
            added when ``callbacks`` holds a ProgressBar already.

    Preemption: during training SIGTERM/SIGUSR1 (to any rank, or to ``distprop train -n``'s
    launcher) stops every rank after the same optimizer step (an 8-byte non-blocking allreduce per
    step decides it, one step after the signal); a :class:`~distprop.train.callbacks.Checkpointer`
    writes that step's checkpoint, ``on_train_end`` does not run, and the history has
    ``preempted=True`` (``distprop train`` then exits 143). See
    :mod:`distprop.distributed.preemption`.


    Returns:
        A :class:`History` with one record per epoch.
    """
    trainer = Trainer(model, loss_fn, optimizer, comm=comm, device=device,
                      clip_grad_norm=clip_grad_norm, grad_accum=grad_accum,
                      compression=compression, callbacks=callbacks, seed=seed,
                      log_every=log_every, prefetch=prefetch, ddp_kwargs=ddp_kwargs, amp=amp,
                      metrics=metrics, progress=progress)
    return trainer.fit(train_data, val_data, epochs=epochs, batch_size=batch_size, resume=resume)
