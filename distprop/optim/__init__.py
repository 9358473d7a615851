"""Optimizers over flat parameter buffers, and learning-rate schedules (``dp.optim``)."""

from distprop.flat import FlatBuffer, flatten
from distprop.optim import functional, lr_scheduler
from distprop.optim.adam import Adam, AdamW, NAdam
from distprop.optim.adaptive import Adadelta, Adagrad, RMSprop
from distprop.optim.optimizer import Optimizer
from distprop.optim.sgd import SGD

__all__ = [
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "FlatBuffer",
    "NAdam",
    "Optimizer",
    "RMSprop",
    "flatten",
    "functional",
    "lr_scheduler",
]
