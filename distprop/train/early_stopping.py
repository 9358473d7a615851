"""Early stopping: stop training when a monitored metric stops improving."""

from __future__ import annotations

import math


class EarlyStopping:
    """Count steps (epochs) without improvement of a metric and say when to stop.

    A metric improves when it beats the best so far by more than ``min_delta`` (lower is better
    in ``'min'`` mode, higher in ``'max'`` mode). ``step`` returns True once ``patience``
    consecutive steps brought no improvement, or, with ``check_finite``, as soon as the metric
    is NaN or infinite.

    Args:
        patience: steps without improvement tolerated before stopping (0 stops at the first).
        min_delta: smallest change that counts as an improvement (>= 0).
        mode: ``'min'`` or ``'max'``.
        check_finite: stop at once on a non-finite metric.

    Example:
        >>> stopper = EarlyStopping(patience=3)
        >>> for epoch in range(100):
        ...     val_loss = evaluate()
        ...     if stopper.step(val_loss):
        ...         break
    """

    def __init__(self, patience: int, min_delta: float = 0.0, mode: str = "min",
                 check_finite: bool = True):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping patience must be an integer >= 0, got {patience!r}")
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise ValueError(f"EarlyStopping min_delta must be a number >= 0, got {min_delta!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = mode
        self.check_finite = check_finite
        self.best = math.inf if mode == "min" else -math.inf
        self.best_step: int | None = None
        self.num_bad_steps = 0
        self.steps = 0
        self.should_stop = False

    def improves(self, metric: float) -> bool:
        """Whether ``metric`` beats the best so far by more than ``min_delta``."""
        if self.mode == "min":
            return metric < self.best - self.min_delta
        return metric > self.best + self.min_delta

    def step(self, metric) -> bool:
        """Record this step's metric; returns True when training should stop."""
        value = float(metric)
        self.steps += 1
        if self.check_finite and not math.isfinite(value):
            self.should_stop = True
        elif self.improves(value):
            self.best = value
            self.best_step = self.steps - 1
            self.num_bad_steps = 0
        else:
            self.num_bad_steps += 1
            if self.num_bad_steps >= self.patience:
                self.should_stop = True
        return self.should_stop

    def state_dict(self) -> dict:
        """Settings and counters as plain Python values."""
        return {"patience": self.patience, "min_delta": self.min_delta, "mode": self.mode,
                "check_finite": self.check_finite, "best": self.best,
                "best_step": self.best_step, "num_bad_steps": self.num_bad_steps,
                "steps": self.steps, "should_stop": self.should_stop}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise ValueError(f"EarlyStopping state has unknown keys {sorted(unknown)}")
        if state.get("mode", self.mode) not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', got {state['mode']!r}")
        for key, value in state.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return (f"EarlyStopping(patience={self.patience}, min_delta={self.min_delta}, "
                f"mode={self.mode!r}, best={self.best}, bad_steps={self.num_bad_steps})")
