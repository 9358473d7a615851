"""Layers, losses, initialisers and utilities with PyTorch's names (``dp.nn``)."""

import sys as _sys

from distprop import functional
from distprop.nn import init, utils
from distprop.nn.activation import (
    ELU,
    GELU,
    Dropout,
    LeakyReLU,
    LogSoftmax,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
)
from distprop.nn.attention import MultiheadAttention
from distprop.nn.container import ModuleDict, ModuleList, Sequential
from distprop.nn.conv import Conv1d, Conv2d
from distprop.nn.linear import Flatten, Identity, Linear
from distprop.nn.loss import (
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    HuberLoss,
    L1Loss,
    MSELoss,
    NLLLoss,
    SmoothL1Loss,
)
from distprop.nn.module import Module, Parameter
from distprop.nn.normalization import BatchNorm1d, BatchNorm2d, LayerNorm
from distprop.nn.pooling import (
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AvgPool1d,
    AvgPool2d,
    MaxPool1d,
    MaxPool2d,
)
from distprop.nn.rnn import GRU, LSTM, RNN, RNNBase
from distprop.nn.sparse import Embedding
from distprop.nn.transformer import TransformerEncoder, TransformerEncoderLayer

# ``dp.nn.functional`` is the same module as ``dp.functional`` (as torch.nn.functional).
_sys.modules[__name__ + ".functional"] = functional


def __getattr__(name: str):
    # SyncBatchNorm lives in distprop.distributed (it needs the communicators); lazy, no cycle.
    if name == "SyncBatchNorm":
        from distprop.distributed.sync_batchnorm import SyncBatchNorm

        return SyncBatchNorm
    raise AttributeError(f"module 'distprop.nn' has no attribute {name!r}")
