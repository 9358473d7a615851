"""Training: checkpoints, the ``fit`` loop and its callbacks (``dp.train``)."""

from distprop.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    latest_valid,
    list_checkpoints,
    load,
    save,
    verify,
)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "latest_valid",
    "list_checkpoints",
    "load",
    "save",
    "verify",
]
