"""SyncBatchNorm: batch normalisation whose statistics span the global batch of every rank.

In training each rank computes, per channel, the sum and the sum of squares of its inputs and its
sample count; one allreduce of those ``2 C + 1`` numbers gives the global mean and (biased)
variance, so N ranks with B/N samples each normalise exactly as one process with B samples.
Backward reduces ``sum(grad_out)`` and ``sum(grad_out * xhat)`` across ranks in one more
allreduce. Weight and bias gradients stay local sums, which DistributedDataParallel then averages
like every other gradient (as in PyTorch). Ranks may hold different numbers of samples (even
none). With one rank, or in eval mode, the layer is an ordinary BatchNorm.

The moments are reduced in float64. Each rank sums its squares about its own mean (two-pass), so
float32 inputs lose no precision; the global variance is ``E[x^2] - E[x]^2`` in float64, which
stays accurate while ``|mean| / std`` is below about 1e4.
"""

from __future__ import annotations

import numpy as np

from distprop.backend import get_array_module
from distprop.distributed import world
from distprop.nn.module import Module
from distprop.nn.normalization import _BatchNorm
from distprop.ops.norm import _channel_shape
from distprop.tensor import Function, Tensor, no_grad


class SyncBatchNormFunction(Function):
    """y = (x - mean) * invstd * w + b, mean/var over all ranks' batches;
    grad: w * invstd * (g - sum(g) / n - xhat * sum(g xhat) / n), both sums over all ranks."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, x, weight=None, bias=None, *, comm, eps, stats_out):
        """Normalise with the global batch statistics; ``stats_out`` receives (mean, var, n)
        as float64 per-channel arrays and the global sample count."""
        xp = get_array_module(x)
        axes = (0, *range(2, x.ndim))
        shape = _channel_shape(x)
        c = x.shape[1]
        local_n = x.size // c if c else 0
        moments = xp.zeros(2 * c + 1, dtype=np.float64)
        if local_n:
            total = x.sum(axis=axes, dtype=np.float64)
            shift = (total / local_n).astype(x.dtype)  # this rank's mean, in x's dtype
            xc = x - shift.reshape(shape)
            centred = xp.square(xc).sum(axis=axes, dtype=np.float64)
            k = shift.astype(np.float64)
            moments[:c] = total
            moments[c:2 * c] = centred + k * (2.0 * total - local_n * k)  # sum of x^2
            moments[2 * c] = local_n
        else:
            shift = xp.zeros(c, dtype=x.dtype)
            xc = x - shift.reshape(shape)
        comm.allreduce(moments, "sum")
        n = float(moments[2 * c])
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{int(n)} over all {comm.size} ranks (input of shape {x.shape} "
                             f"on rank {comm.rank})")
        mean = moments[:c] / n
        var = xp.maximum(moments[c:2 * c] / n - mean * mean, 0.0)
        stats_out.extend((mean, var, n))
        invstd = (1.0 / xp.sqrt(var + eps)).astype(x.dtype)
        xhat = xc
        xhat += (shift - mean.astype(x.dtype)).reshape(shape)
        xhat *= invstd.reshape(shape)
        if weight is None:
            out = xhat.copy() if bias is not None or self.needs_input_grad[0] else xhat
        else:
            out = xhat * weight.reshape(shape)
        if bias is not None:
            out += bias.reshape(shape)
        self.xhat, self.invstd, self.weight, self.comm, self.count = xhat, invstd, weight, comm, n
        self.has_bias = bias is not None
        return out

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        axes = (0, *range(2, grad_out.ndim))
        shape = _channel_shape(grad_out)
        xhat, invstd, weight = self.xhat, self.invstd, self.weight
        gb = grad_out.sum(axis=axes)
        gw = (grad_out * xhat).sum(axis=axes)
        gx = None
        if self.needs_input_grad[0]:
            c = grad_out.shape[1]
            sums = xp.concatenate([gb, gw])
            self.comm.allreduce(sums, "sum")
            scale = invstd if weight is None else invstd * weight
            gx = xhat * (sums[c:] * (1.0 / self.count)).reshape(shape)
            gx += (sums[:c] * (1.0 / self.count)).reshape(shape)
            xp.subtract(grad_out, gx, out=gx)
            gx *= scale.reshape(shape)
        need_w = weight is not None and self.needs_input_grad[1]
        need_b = self.has_bias and self.needs_input_grad[2]
        return gx, (gw if need_w else None), (gb if need_b else None)


class SyncBatchNorm(_BatchNorm):
    """Batch normalisation over the global batch of all ranks (as ``torch.nn.SyncBatchNorm``).

    Takes ``(N, C, *)`` inputs. Parameters, buffers, defaults and ``state_dict`` keys are those
    of BatchNorm1d/2d; running statistics are updated with the global mean and the unbiased
    global variance, identically on every rank.

    Args:
        num_features: the number of channels ``C``.
        eps: added to the variance for numerical stability.
        momentum: running-statistics factor (None: cumulative moving average).
        affine: learn a per-channel weight and bias.
        track_running_stats: keep running statistics (used in eval mode).
        process_group: the communicator whose ranks share statistics (default: the world of
            ``distprop.distributed.init()``, looked up at the first training forward).
        device: where to put parameters and buffers.
        dtype: their dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check(self, x) -> None:
        name = f"SyncBatchNorm({self.num_features})"
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a Tensor input, got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"{name}: expected at least 2D input (N, C, *), got {x.ndim}D "
                             f"input of shape {x.shape}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected input with {self.num_features} channels "
                             f"(N, C, *), got input of shape {x.shape}")
        if x.dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating-point input, got dtype {x.dtype}")

    def _comm(self):
        if self.process_group is None:
            return world.init()
        return self.process_group

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if not self.training or self._comm().size == 1:
            return super().forward(x)  # eval, or a world of one: plain BatchNorm
        factor = 0.0 if self.momentum is None else float(self.momentum)
        if self.track_running_stats:
            self.num_batches_tracked.data += 1
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked.data)
        args = [x, self.weight, self.bias]
        while args[-1] is None and len(args) > 1:
            args.pop()
        stats: list = []
        out = SyncBatchNormFunction.apply(*args, comm=self._comm(), eps=self.eps,
                                          stats_out=stats)
        if self.track_running_stats:
            mean, var, n = stats
            with no_grad():
                rm, rv = self.running_mean.data, self.running_var.data
                rm *= 1.0 - factor
                rm += (factor * mean).astype(rm.dtype, copy=False)
                rv *= 1.0 - factor
                rv += (var * (factor * n / (n - 1))).astype(rv.dtype, copy=False)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.process_group is None
                                       else f", process_group={self.process_group!r}")

    @classmethod
    def convert_sync_batchnorm(cls, module: Module, process_group=None) -> Module:
        """Replace every BatchNorm1d/BatchNorm2d in ``module`` by a SyncBatchNorm.

        The new layers take over the old ones' Parameter and buffer objects (so optimizers and
        flat buffers built before keep working) and their train/eval mode; ``state_dict`` keys
        do not change. Returns the converted module (a new object when ``module`` itself is a
        BatchNorm layer, else ``module``, changed in place).
        """
        if not isinstance(module, Module):
            raise TypeError(f"convert_sync_batchnorm expects a Module, got "
                            f"{type(module).__name__}")
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            new = cls.__new__(cls)
            Module.__init__(new)
            for key in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
                object.__setattr__(new, key, getattr(module, key))
            new.process_group = process_group
            for name, param in module._parameters.items():
                new.register_parameter(name, param)
            for name, buf in module._buffers.items():
                new.register_buffer(name, buf, name not in module._non_persistent_buffers)
            for name, child in module._modules.items():
                new.add_module(name, child)
            new.train(module.training)
            return new
        for name, child in list(module._modules.items()):
            if child is not None:
                converted = cls.convert_sync_batchnorm(child, process_group)
                if converted is not child:
                    module._modules[name] = converted
        return module
