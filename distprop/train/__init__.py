"""Training: checkpoints, the ``fit`` loop and its callbacks (``dp.train``)."""

from distprop.train import callbacks, metrics
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
from distprop.train.metrics import Accuracy, MeanAbsoluteError, Metric, R2Score
from distprop.train.trainer import History, Trainer, fit

__all__ = [
    "Accuracy",
    "MeanAbsoluteError",
    "Metric",
    "R2Score",
    "metrics",
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
