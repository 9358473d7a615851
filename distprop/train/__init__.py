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
from distprop.train.early_stopping import EarlyStopping

__all__ = [
    "EarlyStopping",
    "CheckpointError",
    "CheckpointManager",
    "latest_valid",
    "list_checkpoints",
    "load",
    "save",
    "verify",
]
