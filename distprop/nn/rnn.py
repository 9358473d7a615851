"""Recurrent layers RNN, LSTM and GRU with PyTorch's API, on fused BPTT ops (``ops/rnn.py``)."""

from __future__ import annotations

import math
import warnings

import numpy as np

from distprop import amp, backend
from distprop.nn import init
from distprop.nn.linear import new_parameter
from distprop.nn.module import Module
from distprop.ops import arith, cat, getitem, stack, transpose
from distprop.ops.rnn import GRULayer, LSTMLayer, RNNLayer
from distprop.tensor import Tensor

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _lengths_array(lengths, batch: int, steps: int, layer: str) -> np.ndarray:
    """``lengths`` (list, NumPy array or Tensor) as a host int64 array, validated."""
    if isinstance(lengths, Tensor):
        lengths = lengths.numpy()
    arr = np.asarray(backend.to_host(lengths) if hasattr(lengths, "shape") else lengths)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{layer}: lengths must be integers, got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(
            f"{layer}: lengths must have one entry per batch row, shape ({batch},), "
            f"got shape {arr.shape}"
        )
    if batch and (arr.min() < 0 or arr.max() > steps):
        raise ValueError(
            f"{layer}: lengths must lie in [0, {steps}] (the sequence length), got min "
            f"{int(arr.min())} and max {int(arr.max())}"
        )
    return arr.astype(np.int64)


class RNNBase(Module):
    """Shared machinery of RNN, LSTM and GRU: parameters, shape checks and the layer loop."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        if isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(
                f"dropout should be a number in range [0, 1] representing the probability of "
                f"an element being zeroed, got {dropout!r}"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=3,
            )
        self.mode = mode
        self.input_size, self.hidden_size = int(input_size), hidden_size
        self.num_layers, self.bias, self.batch_first = num_layers, bool(bias), bool(batch_first)
        self.dropout, self.bidirectional = float(dropout), bool(bidirectional)
        gates = _GATES[mode] * hidden_size
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input = self.input_size if layer == 0 else hidden_size * directions
            for direction in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                setattr(self, "weight_ih" + sfx, new_parameter((gates, layer_input), device, dtype))
                setattr(self, "weight_hh" + sfx, new_parameter((gates, hidden_size), device, dtype))
                if bias:
                    setattr(self, "bias_ih" + sfx, new_parameter((gates,), device, dtype))
                    setattr(self, "bias_hh" + sfx, new_parameter((gates,), device, dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every weight and bias from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as PyTorch."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            init.uniform_(p, -bound, bound)

    def _layer_params(self, layer: int, direction: int):
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        w_ih, w_hh = getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx)
        if self.bias:
            return w_ih, w_hh, getattr(self, "bias_ih" + sfx), getattr(self, "bias_hh" + sfx)
        return w_ih, w_hh, None, None

    def _name(self) -> str:
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size})"

    def _check_input(self, x) -> bool:
        """Validate the input; returns whether it is batched (3-D)."""
        name = self._name()
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a Tensor input, got {type(x).__name__}")
        layout = "(B, T, input_size)" if self.batch_first else "(T, B, input_size)"
        if x.ndim not in (2, 3) or x.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: expected input of shape {layout} or unbatched (T, {self.input_size}), "
                f"got {x.shape}"
            )
        if x.dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating-point input, got dtype {x.dtype}")
        param = self.weight_ih_l0
        if x.dtype != param.dtype and not amp.mixed_ok(x.dtype, param.dtype):
            raise TypeError(
                f"{name}: input dtype {x.dtype} does not match the parameters' dtype "
                f"{param.dtype} (convert the input or call .to({x.dtype}) on the module)"
            )
        return x.ndim == 3

    def _check_state(self, h, batched: bool, batch: int, what: str) -> Tensor:
        directions = 2 if self.bidirectional else 1
        expected = (self.num_layers * directions, batch, self.hidden_size)
        if not batched:
            expected = (expected[0], expected[2])
        if not isinstance(h, Tensor):
            raise TypeError(f"{self._name()}: {what} must be a Tensor, got {type(h).__name__}")
        if h.shape != expected:
            raise ValueError(f"{self._name()}: expected {what} of shape {expected}, got {h.shape}")
        if h.dtype != self.weight_ih_l0.dtype and not amp.mixed_ok(h.dtype,
                                                                   self.weight_ih_l0.dtype):
            raise TypeError(
                f"{self._name()}: {what} dtype {h.dtype} does not match the parameters' dtype "
                f"{self.weight_ih_l0.dtype}"
            )
        return h if batched else h.unsqueeze(1)

    def _run(self, x: Tensor, states: list, lengths):
        """Apply every layer and direction; x is time-major (T, B, I). Returns out, finals."""
        directions = 2 if self.bidirectional else 1
        finals: list[list[Tensor]] = [[] for _ in states]
        for layer in range(self.num_layers):
            outs = []
            for direction in range(directions):
                index = layer * directions + direction
                init_states = [s[index] for s in states]
                result = self._cell(x, init_states, self._layer_params(layer, direction),
                                    direction == 1, lengths)
                outs.append(result[0])
                for store, value in zip(finals, result[1:]):
                    store.append(value)
            x = outs[0] if directions == 1 else cat(outs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                keep = 1.0 - self.dropout
                mask = backend.bernoulli_mask(x.shape, keep, x.dtype, x.device)
                if keep > 0:
                    mask *= 1.0 / keep
                x = arith.Mul.apply(x, Tensor._wrap(mask))
        return x, [stack(f, dim=0) for f in finals]

    def _cell(self, x, init_states, params, reverse, lengths):
        if self.mode == "LSTM":
            return LSTMLayer.apply(x, *init_states, *params, reverse=reverse, lengths=lengths)
        if self.mode == "GRU":
            return GRULayer.apply(x, *init_states, *params, reverse=reverse, lengths=lengths)
        act = "relu" if self.mode == "RNN_RELU" else "tanh"
        return RNNLayer.apply(x, *init_states, *params, nonlinearity=act, reverse=reverse,
                              lengths=lengths)

    def _forward(self, x: Tensor, hx, lengths, n_states: int):
        batched = self._check_input(x)
        if not batched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = transpose(x, 0, 1)
        steps, batch = x.shape[0], x.shape[1]
        if lengths is not None:
            lengths = _lengths_array(lengths, batch, steps, self._name())
        directions = 2 if self.bidirectional else 1
        if hx is None:
            xp = backend.get_array_module(x.data)
            zeros = xp.zeros((self.num_layers * directions, batch, self.hidden_size), x.dtype)
            per_layer = [[Tensor._wrap(zeros[i]) for i in range(zeros.shape[0])]] * n_states
        else:
            names = ["h0", "c0"] if n_states == 2 else ["hx"]
            states = [self._check_state(h, batched, batch, n) for h, n in zip(hx, names)]
            per_layer = [[getitem(s, i) for i in range(s.shape[0])] for s in states]
        out, finals = self._run(x, per_layer, lengths)
        if not batched:
            return out.squeeze(1), [f.squeeze(1) for f in finals]
        if self.batch_first:
            out = transpose(out, 0, 1)
        return out, finals

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.mode == "RNN_RELU":
            s += ", nonlinearity='relu'"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s


_LENGTHS_DOC = """
    ``lengths`` (a distprop extension) makes a padded batch variable-length: a sequence of ``B``
    integers in ``[0, T]``. Row ``b``'s steps ``t >= lengths[b]`` do not change its state and get
    no gradient, its outputs there are zero, and a reverse direction starts at its last valid
    step: the same results as ``pack_padded_sequence(x, lengths)`` followed by
    ``pad_packed_sequence(out, total_length=T)`` in PyTorch, without sorting.
"""


class RNN(RNNBase):
    """Elman RNN: h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), act tanh or relu.

    Args:
        input_size: features per time step.
        hidden_size: features of the hidden state.
        num_layers: stacked layers.
        nonlinearity: ``'tanh'`` or ``'relu'``.
        bias: whether to use ``bias_ih``/``bias_hh``.
        batch_first: input and output are ``(B, T, F)`` instead of ``(T, B, F)``.
        dropout: dropout on each layer's output except the last (training only).
        bidirectional: add a reverse direction; outputs are concatenated on the feature axis.

    ``forward(input, hx=None, lengths=None)`` returns ``(output, h_n)`` exactly as PyTorch.
    """

    __doc__ += _LENGTHS_DOC

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size,
                         hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None, lengths=None):
        out, (h_n,) = self._forward(input, None if hx is None else (hx,), lengths, 1)
        return out, h_n


class GRU(RNNBase):
    """Gated recurrent unit with PyTorch's gate order (r, z, n) and equations.

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z likewise,
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.

    Takes the same arguments as :class:`RNN` except ``nonlinearity``;
    ``forward(input, hx=None, lengths=None)`` returns ``(output, h_n)``.
    """

    __doc__ += _LENGTHS_DOC

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None, lengths=None):
        out, (h_n,) = self._forward(input, None if hx is None else (hx,), lengths, 1)
        return out, h_n


class LSTM(RNNBase):
    """Long short-term memory with PyTorch's gate order (i, f, g, o).

    c' = f * c + i * g, h' = o * tanh(c'), with i, f, o sigmoid gates and g a tanh gate.

    Takes the same arguments as :class:`RNN` except ``nonlinearity``;
    ``forward(input, hx=None, lengths=None)`` with ``hx = (h_0, c_0)`` returns
    ``(output, (h_n, c_n))``.
    """

    __doc__ += _LENGTHS_DOC

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None):
        if proj_size:
            raise NotImplementedError(
                f"LSTM(proj_size={proj_size}): projected LSTMs are not supported; use "
                "proj_size=0 and a Linear layer on the output"
            )
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None, lengths=None):
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(f"{self._name()}: hx must be a tuple (h_0, c_0)")
        out, (h_n, c_n) = self._forward(input, hx, lengths, 2)
        return out, (h_n, c_n)
