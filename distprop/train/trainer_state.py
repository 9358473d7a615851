"""The trainer's checkpoint side: what goes into a checkpoint and how a run continues from one.

:class:`TrainerState` is the part of :class:`~distprop.train.trainer.Trainer` that writes and
reads its state: :meth:`~TrainerState.checkpoint_state` (model, optimizer, callbacks, the
position in the epoch, every rank's RNG state and running metric sums) and
:meth:`~TrainerState.load_checkpoint` (checked whole by :func:`distprop.train.resume.check_state`
before anything is restored; another number of ranks continues the interrupted epoch at the same
sample). It works on the trainer's attributes and is not used on its own.
"""

from __future__ import annotations

import logging

import numpy as np

from distprop import backend
from distprop.train import checkpoint as ckpt
from distprop.train import resume as resume_mod

_log = logging.getLogger("distprop.train.trainer")


def _hook_state(ddp):
    """The communication hook's per-rank state (host arrays), or None when it keeps none."""
    state = getattr(ddp, "comm_hook_state", None)
    return state.state_dict() if hasattr(state, "state_dict") else None


def _optimizer_state(optimizer) -> dict:
    """The full optimizer state on rank 0 (ZeRO shards consolidated when the optimizer has them).

    Collective when the optimizer is sharded: every rank must call it.
    """
    if hasattr(optimizer, "consolidate_state_dict"):
        optimizer.consolidate_state_dict(to=0)
        if getattr(optimizer, "comm", None) is not None and optimizer.comm.rank != 0:
            return {}  # the full state exists on rank 0 only, which writes the checkpoint
    return optimizer.state_dict()


class TrainerState:
    """Checkpoint and resume for :class:`~distprop.train.trainer.Trainer` (a base class)."""

    def checkpoint_state(self) -> dict:
        """Everything needed to continue exactly; collective (call on every rank).

        Rank 0's return value is the one to write; other ranks get a partial dict.
        """
        per_rank = {"rng": backend.get_rng_state(), "numpy_global_rng": np.random.get_state(),
                    "sums": backend.to_host(self._sums).tolist()}
        hook_state = _hook_state(self.ddp)
        if hook_state is not None:  # PowerSGD's error feedback and Q memories (per rank)
            per_rank["comm_hook"] = hook_state
        gathered = self.comm.allgather_obj(per_rank)
        optimizer_state = _optimizer_state(self.optimizer)
        return {
            "kind": "distprop-trainer",
            "model": {k: backend.to_host(v.data).copy()
                      for k, v in self.model.state_dict().items()},
            "optimizer": optimizer_state,
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks
                          if cb.name and cb.state_dict() is not None},
            "position": {"epoch": self.epoch, "step": self.step,
                         "samples_in_epoch": self.samples_in_epoch,
                         "epoch_samples": self.epoch_samples, "batch_size": self.batch_size,
                         "grad_accum": self.grad_accum, "world_size": self.comm.size,
                         "steps_per_epoch": self.steps_per_epoch, "sampler_epoch": self.epoch,
                         "seed": self.seed, "stopped": self.stop_training},
            "ranks": gathered,
            "history": list(self._history_records),
            **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
        }

    def _restore_hook_state(self, ranks: list, old_world: int, where: str) -> None:
        """Give the communication hook (PowerSGD) this rank's saved memories; on another
        number of ranks, or from a checkpoint without them, it starts fresh (said on rank 0)."""
        state = getattr(self.ddp, "comm_hook_state", None)
        if not hasattr(state, "load_state_dict"):
            return
        saved = [r.get("comm_hook") if isinstance(r, dict) else None for r in ranks]
        if old_world == self.comm.size and saved[self.comm.rank] is not None:
            try:
                state.load_state_dict(saved[self.comm.rank], device=self.device)
            except (ValueError, KeyError, TypeError) as exc:
                raise ckpt.CheckpointError(f"checkpoint {where} is not usable: ranks["
                                           f"{self.comm.rank}].comm_hook: {exc}") from None
            return
        if saved[0] is not None and isinstance(saved[0].get("iter"), int):
            state.iter = saved[0]["iter"]  # keep compressing if it had started
        if self.is_main:
            why = (f"written by {old_world} rank(s), now {self.comm.size}"
                   if old_world != self.comm.size else "it holds none")
            _log.warning(f"resume: the communication hook's per-rank memories (PowerSGD error "
                         f"feedback, warm-start Q) start fresh ({why})")

    def _check_sums(self, state, where: str) -> None:
        """Refuse a checkpoint whose running metric sums do not fit this trainer's metrics."""
        if self._layout is None or not isinstance(state, dict):
            return
        want = 2 * self._layout.width
        for r, entry in enumerate(state.get("ranks") or []):
            sums = entry.get("sums") if isinstance(entry, dict) else None
            if isinstance(sums, list) and len(sums) != want:
                raise ckpt.CheckpointError(
                    f"checkpoint {where} is not usable: ranks[{r}].sums has {len(sums)} "
                    f"entries; this trainer's metrics ({', '.join(self.metrics) or 'none'}) "
                    f"keep {want} (was it written with other metrics?)")

    def load_checkpoint(self, source) -> None:
        """Restore model, optimizer, callbacks, position, RNG and metric sums.

        ``source`` is a path or an already loaded state; it is checked whole by
        :func:`distprop.train.resume.check_state` before anything is restored. Different world
        sizes, batch sizes and accumulation are allowed (parameters and optimizer state do not
        depend on them) and are reported on rank 0: the interrupted epoch continues at the same
        sample of its global order, so every remaining sample is seen once.

        Raises:
            CheckpointError: naming the file and the field that is missing or wrong.
        """
        path = None
        if not isinstance(source, dict):
            path = str(source)
            state = ckpt.load(source)
        else:
            state = source
        where = path or "state"
        self._check_sums(state, where)
        pos = resume_mod.check_state(state, where, model=self.model, optimizer=self.optimizer,
                                     epoch_samples=self.epoch_samples or None,
                                     world_size=self.comm.size, grad_accum=self.grad_accum)
        self.model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler.is_enabled() and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {where} is not usable: optimizer or loss "
                                       f"scaler {exc}") from None
        for cb in self.callbacks:
            if cb.name in state.get("callbacks", {}):
                try:
                    cb.load_state_dict(state["callbacks"][cb.name])
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise ckpt.CheckpointError(f"checkpoint {where} is not usable: callbacks"
                                               f"[{cb.name!r}] {exc}") from None
        self.epoch, self.step = pos["epoch"], pos["step"]
        self.stop_training = bool(pos.get("stopped", False))  # e.g. early stopping had fired
        self._start_sample = resume_mod.start_sample(pos, self.batch_size, self.comm.size,
                                                     self.epoch_samples)
        old_world = pos["world_size"]
        ranks = state["ranks"]
        self._reset_sums()
        xp = self._xp()
        if old_world == self.comm.size:
            mine = ranks[self.comm.rank]
            self._sums[...] = xp.asarray(mine["sums"], dtype=np.float64)
        else:
            if self.comm.rank == 0:
                self._sums[...] = xp.asarray(np.sum([r["sums"] for r in ranks], axis=0))
            mine = ranks[self.comm.rank % old_world]
        line = resume_mod.describe_change(
            pos, world_size=self.comm.size, batch_size=self.batch_size,
            grad_accum=self.grad_accum, steps_per_epoch=self.steps_per_epoch,
            start=self._start_sample, epoch_samples=self.epoch_samples,
            notes=[n for cb in self.callbacks for n in cb.resume_notes()])
        if line and self.is_main:
            _log.info(line)
        if old_world == self.comm.size:
            backend.set_rng_state(mine["rng"])
        else:  # fresh streams: rank r of the old run is not rank r of this one
            backend.seed_rank(self.seed, self.comm.rank, pos["step"])
        np.random.set_state(tuple(mine["numpy_global_rng"]))
        self._restore_hook_state(ranks, old_world, where)
        self._history_records = list(state.get("history", []))
        self.resumed_from = where
