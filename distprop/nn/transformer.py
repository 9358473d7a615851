"""TransformerEncoderLayer and TransformerEncoder with PyTorch's submodules and state_dict keys."""

from __future__ import annotations

import copy
from collections.abc import Callable

from distprop import amp
from distprop import functional as F
from distprop.nn.activation import Dropout
from distprop.nn.attention import MultiheadAttention
from distprop.nn.container import ModuleList
from distprop.nn.linear import Linear
from distprop.nn.module import Module
from distprop.nn.normalization import LayerNorm
from distprop.ops.norm import LayerNorm as LayerNormFn
from distprop.tensor import Tensor

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _add_norm(norm: Module, x: Tensor, y: Tensor) -> Tensor:
    """``norm(x + y)``; a plain LayerNorm (no hooks) normalises the sum in one op, without
    a separate sum Tensor (same values and gradients)."""
    if (type(norm) is not LayerNorm or norm._forward_pre_hooks or norm._forward_hooks
            or x.shape != y.shape or x.dtype != y.dtype or amp.is_autocast_enabled()
            or (norm.weight is not None and norm.weight.dtype != x.dtype)):
        return norm(x + y)
    return LayerNormFn.apply(x, norm.weight, norm.bias, y, ndim=len(norm.normalized_shape),
                             eps=norm.eps)


class TransformerEncoderLayer(Module):
    """Self-attention then a feed-forward block, each with a residual connection and LayerNorm.

    Post-norm (default): ``x = norm1(x + sa(x)); x = norm2(x + ff(x))``;
    with ``norm_first``: ``x = x + sa(norm1(x)); x = x + ff(norm2(x))``, where
    ``ff(x) = dropout2(linear2(dropout(activation(linear1(x)))))`` and ``sa`` is
    ``dropout1(self_attn(x, x, x))``.

    Args:
        d_model: model width.
        nhead: attention heads.
        dim_feedforward: hidden width of the feed-forward block.
        dropout: dropout probability (attention weights, feed-forward and both residuals).
        activation: ``'relu'``, ``'gelu'`` or a callable on Tensors.
        layer_norm_eps: LayerNorm epsilon.
        batch_first: inputs are ``(N, L, E)`` instead of ``(L, N, E)``.
        norm_first: pre-norm instead of post-norm.
        bias: biases in the linear layers, attention and LayerNorms.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str | Callable[[Tensor], Tensor] = "relu",
                 layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, **kw)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, **kw)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, **kw)
        self.norm_first = bool(norm_first)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise RuntimeError(f"activation should be relu/gelu, not {activation}")
            activation = _ACTIVATIONS[activation]
        elif not callable(activation):
            raise TypeError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
        self.activation = activation

    def forward(self, src: Tensor, src_mask=None, src_key_padding_mask=None,
                is_causal: bool = False) -> Tensor:
        """Encode ``src``; masks follow :class:`MultiheadAttention` (bool True = masked out).

        Args:
            src: ``(L, N, E)`` (``(N, L, E)`` if ``batch_first``) or unbatched ``(L, E)``.
            src_mask: ``(L, L)`` or ``(N * nhead, L, L)`` attention mask.
            src_key_padding_mask: ``(N, L)``, True (or -inf) at padding positions.
            is_causal: apply a causal mask (used when ``src_mask`` is None).
        """
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = _add_norm(self.norm1, x,
                          self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = _add_norm(self.norm2, x, self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout2(x)


class TransformerEncoder(Module):
    """A stack of ``num_layers`` deep copies of ``encoder_layer``, then an optional ``norm``.

    ``state_dict`` keys are ``layers.{i}.…`` and ``norm.…``, as in PyTorch.
    """

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int,
                 norm: Module | None = None, enable_nested_tensor: bool = True,
                 mask_check: bool = True):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        self.layers = ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, mask=None, src_key_padding_mask=None,
                is_causal: bool | None = None) -> Tensor:
        """Run every layer with the same masks (see :meth:`TransformerEncoderLayer.forward`)."""
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                      is_causal=bool(is_causal))
        if self.norm is not None:
            x = self.norm(x)
        return x
