"""Training: checkpoints, the ``fit`` loop and its callbacks (``dp.train``)."""

from distprop.train import callbacks
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
from distprop.train.trainer import History, Trainer, fit

__all__ = [
    "EarlyStopping",
    "History",
    "Trainer",
    "callbacks",
    "fit",
    "CheckpointError",
    "CheckpointManager",
    "latest_valid",
    "list_checkpoints",
    "load",
    "save",
    "verify",
]
