"""Pooling layers: MaxPool1d/2d, AvgPool1d/2d, AdaptiveAvgPool1d/2d (PyTorch's arguments)."""

from __future__ import annotations

from distprop.nn.module import Module
from distprop.ops import pool


class MaxPool1d(Module):
    """Max over sliding windows of (N, C, L) inputs (stride defaults to kernel_size)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1,
                 return_indices: bool = False, ceil_mode: bool = False):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.dilation = padding, dilation
        self.return_indices, self.ceil_mode = return_indices, ceil_mode

    def forward(self, x):
        return pool.max_pool_nd(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                self.ceil_mode, self.return_indices, 1, self._name())

    def _name(self) -> str:
        return f"{type(self).__name__}(kernel_size={self.kernel_size})"

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class MaxPool2d(MaxPool1d):
    """Max over sliding windows of (N, C, H, W) inputs; the gradient goes to each window's
    first maximum, as in PyTorch."""

    def forward(self, x):
        return pool.max_pool_nd(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                self.ceil_mode, self.return_indices, 2, self._name())


class AvgPool1d(Module):
    """Mean over sliding windows of (N, C, L) inputs."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.ceil_mode = padding, ceil_mode
        self.count_include_pad = count_include_pad

    def forward(self, x):
        return pool.avg_pool_nd(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                self.count_include_pad, None, 1,
                                f"AvgPool1d(kernel_size={self.kernel_size})")

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(Module):
    """Mean over sliding windows of (N, C, H, W) inputs (PyTorch's divisor rules)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: int | None = None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.ceil_mode = padding, ceil_mode
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def forward(self, x):
        return pool.avg_pool_nd(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                self.count_include_pad, self.divisor_override, 2,
                                f"AvgPool2d(kernel_size={self.kernel_size})")

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool1d(Module):
    """Mean over PyTorch's adaptive bins, giving (N, C, output_size)."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x):
        return pool.adaptive_avg_pool_nd(x, self.output_size, 1,
                                         f"AdaptiveAvgPool1d({self.output_size})")

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class AdaptiveAvgPool2d(AdaptiveAvgPool1d):
    """Mean over PyTorch's adaptive bins, giving (N, C, *output_size); a None entry keeps that
    input size."""

    def forward(self, x):
        return pool.adaptive_avg_pool_nd(x, self.output_size, 2,
                                         f"AdaptiveAvgPool2d({self.output_size})")
