"""Learning-rate schedules of ``distprop train``, defined on the fraction of training done.

A step-counting scheduler (``CosineAnnealingLR(T_max=epochs * steps_per_epoch)``) is wrong as
soon as the number of steps changes, e.g. when a run is resumed on another number of ranks with
the per-rank batch fixed: cosine then reaches 0 early and climbs back. :class:`ProgressSchedule`
instead sets ``lr = base_lr * factor(p)`` where ``p`` in ``[0, 1]`` is the fraction of the run's
samples consumed (``Trainer.progress``, given after every optimizer step by
:class:`~distprop.train.callbacks.LRSchedule`), so every schedule ends where it should whatever
the world size, batch size or accumulation, and an interrupted run resumes at the same rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from distprop.registry import LR_SCHEDULES


def progress_schedules() -> tuple[str, ...]:
    """The schedules of :data:`distprop.registry.LR_SCHEDULES` defined on the fraction of the
    run (all but ``plateau``, which follows the validation loss)."""
    return tuple(name for name, entry in LR_SCHEDULES.items() if entry.factory is not None)


def factor_fn(name: str, warmup: float = 0.0) -> Callable[[float], float]:
    """The multiplier of the base rate as a function of the fraction of training done.

    ``warmup`` (a fraction of the run) ramps linearly from 0.01 to 1 first; the schedule
    ``name`` (an entry of :data:`distprop.registry.LR_SCHEDULES`, which says what each does)
    then runs over the rest.

    Raises:
        ValueError: an unknown name or a warm-up outside ``[0, 1]``.
    """
    if name not in progress_schedules():
        raise ValueError(f"unknown LR schedule {name!r}; choose one of "
                         f"{', '.join(progress_schedules())}")
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"the warm-up must be a fraction of the run in [0, 1], got {warmup}")
    main = LR_SCHEDULES[name].load()

    def factor(p: float) -> float:
        p = min(1.0, max(0.0, p))
        if p < warmup:
            return 0.01 + 0.99 * p / warmup
        return main((p - warmup) / (1.0 - warmup) if warmup < 1.0 else 1.0)

    return factor


class ProgressSchedule:
    """Sets every parameter group's ``lr`` to ``base_lr * factor(progress)``.

    Args:
        optimizer: its groups' current ``lr`` are the base rates.
        factor: ``factor(p)`` for ``p`` in ``[0, 1]`` (see :func:`factor_fn`).
        note: said with a changed base rate on resume (e.g. ``"--scale-lr"``).
    """

    def __init__(self, optimizer, factor: Callable[[float], float], note: str = ""):
        self.optimizer = optimizer
        self.factor = factor
        self.note = note
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.progress = 0.0
        self._loaded_base: list | None = None
        self.set_progress(0.0)

    def set_progress(self, fraction: float) -> None:
        """Set the rates for ``fraction`` of training done (clipped to ``[0, 1]``)."""
        self.progress = min(1.0, max(0.0, float(fraction)))
        scale = self.factor(self.progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * scale

    def get_last_lr(self) -> list[float]:
        """The rates set last, one per parameter group."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """The base rates and progress (the progress is set again from the trainer's position)."""
        return {"kind": "progress", "base_lrs": list(self.base_lrs), "progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        """Remember the saved base rates (for :meth:`resume_notes`); this run's stay in force.

        A state of another scheduler (a checkpoint written before schedules followed the
        progress) is accepted and ignored: the rate follows from the resumed position alone.
        """
        base = state.get("base_lrs") if state.get("kind") == "progress" else None
        numbers = isinstance(base, list) and all(
            isinstance(b, int | float) and not isinstance(b, bool) for b in base)
        self._loaded_base = [float(b) for b in base] if numbers else None

    def resume_notes(self) -> list[str]:
        """``lr OLD -> NEW (note)`` when the base rate changed since the checkpoint."""
        old, new = self._loaded_base, self.base_lrs
        if old is None or len(old) != len(new):
            return [f"lr {new[0]:.4g}, scheduled on the fraction of training done"]
        if all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(old, new)):
            return [f"lr {new[0]:.4g} (unchanged, scheduled on the fraction of training done)"]
        why = f" ({self.note})" if self.note else ""
        return [f"lr {old[0]:.4g} -> {new[0]:.4g}{why}, scheduled on the fraction of training "
                "done"]
