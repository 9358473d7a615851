"""Conv1d and Conv2d with PyTorch's arguments, parameter shapes and default initialisation."""

from __future__ import annotations

from distprop.nn.linear import check_dtype, new_parameter, reset_affine
from distprop.nn.module import Module
from distprop.ops.conv import conv_nd, ntuple
from distprop.tensor import Tensor

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class _ConvNd(Module):
    _nd = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        nd = self._nd
        if groups <= 0:
            raise ValueError(f"{name}: groups must be a positive integer, got {groups}")
        if in_channels % groups:
            raise ValueError(f"{name}: in_channels ({in_channels}) must be divisible by groups "
                             f"({groups})")
        if out_channels % groups:
            raise ValueError(f"{name}: out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {list(_PADDING_MODES)}, got "
                             f"{padding_mode!r}")
        if padding_mode != "zeros":
            raise NotImplementedError(
                f"{name}: padding_mode={padding_mode!r} is not implemented; only 'zeros' is")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = ntuple(kernel_size, nd, "kernel_size")
        self.stride = ntuple(stride, nd, "stride")
        self.dilation = ntuple(dilation, nd, "dilation")
        for what, value in (("kernel_size", self.kernel_size), ("stride", self.stride),
                            ("dilation", self.dilation)):
            if min(value) < 1:
                raise ValueError(f"{name}: {what} must be >= 1, got {value}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{name}: invalid padding string {padding!r}, should be one "
                                 "of ['valid', 'same']")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(f"{name}: padding='same' is not supported for strided "
                                 "convolutions")
            self.padding = padding
        else:
            self.padding = ntuple(padding, nd, "padding")
            if min(self.padding) < 0:
                raise ValueError(f"{name}: padding must be >= 0, got {self.padding}")
        self.groups = int(groups)
        self.padding_mode = padding_mode
        self.weight = new_parameter(
            (self.out_channels, self.in_channels // self.groups, *self.kernel_size),
            device, dtype)
        if bias:
            self.bias = new_parameter((self.out_channels,), device, dtype)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self.weight, self.bias)

    def _describe(self) -> str:
        k = self.kernel_size[0] if len(set(self.kernel_size)) == 1 else self.kernel_size
        return f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={k})"

    def forward(self, x: Tensor) -> Tensor:
        nd = self._nd
        name = self._describe()
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a Tensor input, got {type(x).__name__}")
        spatial = ", ".join("HW"[-nd:] if nd == 2 else "L")
        if x.ndim not in (nd + 1, nd + 2) or x.shape[-nd - 1] != self.in_channels:
            raise ValueError(
                f"{name}: expected input of shape (N, {self.in_channels}, {spatial}) or "
                f"({self.in_channels}, {spatial}), got {x.shape}")
        check_dtype(name, x, self.weight)
        return conv_nd(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                       self.groups, nd, name)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0,) * self._nd:
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self._nd:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class Conv1d(_ConvNd):
    """1-D convolution over (N, C_in, L) inputs; weight (C_out, C_in/groups, k).

    Args:
        in_channels, out_channels: channel counts.
        kernel_size, stride, padding, dilation: ints or 1-tuples; padding may be 'valid' or
            'same' (stride 1 only).
        groups: split channels into this many independent convolutions.
        bias: add a learnable per-channel bias.
        padding_mode: only 'zeros' is implemented.
    """

    _nd = 1


class Conv2d(_ConvNd):
    """2-D convolution over (N, C_in, H, W) inputs; weight (C_out, C_in/groups, kh, kw).

    Im2col from a strided view of the input feeding one GEMM per group; the output is a
    channels-last view (its values and shape are PyTorch's, its strides need not be).

    Args:
        in_channels, out_channels: channel counts.
        kernel_size, stride, padding, dilation: ints or 2-tuples; padding may be 'valid' or
            'same' (stride 1 only).
        groups: split channels into this many independent convolutions.
        bias: add a learnable per-channel bias.
        padding_mode: only 'zeros' is implemented.
    """

    _nd = 2
