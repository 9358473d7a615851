"""BatchNorm1d, BatchNorm2d and LayerNorm with PyTorch's buffers, defaults and train/eval rules."""

from __future__ import annotations

import numpy as np

from distprop import backend
from distprop.nn import init
from distprop.nn.linear import check_dtype, new_parameter
from distprop.nn.module import Module
from distprop.ops.norm import checked_batch_norm, layer_norm
from distprop.tensor import Tensor, get_default_dtype


class _BatchNorm(Module):
    _dims: tuple[int, ...] = ()
    _layout = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None):
        super().__init__()
        self.num_features = int(num_features)
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = new_parameter((self.num_features,), device, dtype)
            self.bias = new_parameter((self.num_features,), device, dtype)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            dev = backend.device(device)
            dt = np.dtype(dtype) if dtype is not None else get_default_dtype()
            xp = backend.xp_for(dev)
            with backend.device_context(dev):
                self.register_buffer("running_mean", Tensor(xp.zeros(self.num_features, dt)))
                self.register_buffer("running_var", Tensor(xp.ones(self.num_features, dt)))
                self.register_buffer("num_batches_tracked",
                                     Tensor(xp.zeros((), dtype=np.int64)))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.data[...] = 0
            self.running_var.data[...] = 1
            self.num_batches_tracked.data[...] = 0

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            init.zeros_(self.bias)

    def _check(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self._name()}: expected a Tensor input, got {type(x).__name__}")
        if x.ndim not in self._dims:
            dims = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(f"{self._name()}: expected {dims} input {self._layout}, got "
                             f"{x.ndim}D input of shape {x.shape}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{self._name()}: expected input with {self.num_features} "
                             f"channels {self._layout}, got input of shape {x.shape}")
        if x.dtype.kind != "f":
            raise TypeError(f"{self._name()}: expected a floating-point input, got dtype "
                            f"{x.dtype}")
        ref = self._parameters.get("weight")
        if ref is None:
            ref = self._buffers.get("running_mean")
        if ref is not None and ref.dtype != x.dtype:
            check_dtype(self._name(), x, ref)

    def _name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        # parameters and buffers straight from their dicts (Module.__getattr__ per name costs
        # as much as an elementwise op on a small input)
        params, buffers = self._parameters, self._buffers
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        tracked = buffers.get("num_batches_tracked")
        training = self.training
        factor = 0.0 if self.momentum is None else self.momentum
        use_batch = training or (running_mean is None and running_var is None)
        if use_batch and x.data.size // x.shape[1] <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"input size {x.shape}")
        if training and self.track_running_stats and tracked is not None:
            tracked.data += 1
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(tracked.data)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        # _check made batch_norm's checks (running buffers: the module's own, num_features)
        return checked_batch_norm(x, running_mean, running_var, params.get("weight"),
                                  params.get("bias"), use_batch, factor, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) inputs over N (and L).

    Training normalises with the batch statistics and updates ``running_mean`` /
    ``running_var`` (unbiased) with ``momentum`` (None: cumulative average) and counts
    ``num_batches_tracked``; eval normalises with the running statistics.
    """

    _dims = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) inputs over N, H and W (see BatchNorm1d)."""

    _dims = (4,)
    _layout = "(N, C, H, W)"


class LayerNorm(Module):
    """Normalise over the trailing ``normalized_shape`` dims, with optional affine weight/bias."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        if elementwise_affine:
            self.weight = new_parameter(self.normalized_shape, device, dtype)
            if bias:
                self.bias = new_parameter(self.normalized_shape, device, dtype)
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"LayerNorm: expected a Tensor input, got {type(x).__name__}")
        k = len(self.normalized_shape)
        if x.ndim < k or tuple(x.shape[x.ndim - k:]) != self.normalized_shape:
            raise ValueError(
                f"LayerNorm({self.normalized_shape}): expected input of shape "
                f"(*, {', '.join(map(str, self.normalized_shape))}), got {x.shape}")
        check_dtype(f"LayerNorm({self.normalized_shape})", x, self.weight)
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")
