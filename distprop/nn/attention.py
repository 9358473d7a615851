"""MultiheadAttention with PyTorch's parameters, masks and return values."""

from __future__ import annotations

from distprop import amp, backend
from distprop.nn import init
from distprop.nn.linear import Linear, new_parameter
from distprop.nn.module import Module
from distprop.ops import permute, reshape
from distprop.ops.attention import (
    Chunk,
    ScaledDotProductAttention,
    _check_broadcast,
    additive_mask,
    causal_mask,
)
from distprop.ops.linalg import Linear as LinearFn
from distprop.ops.mha import HeadsAttention, fast_path_ok
from distprop.tensor import Tensor


def _project(x, weight, bias):
    return LinearFn.apply(x, weight) if bias is None else LinearFn.apply(x, weight, bias)


class MultiheadAttention(Module):
    """Multi-head attention: ``out_proj(concat_h softmax(q_h k_h^T / sqrt(d) + mask) v_h)``.

    Parameters and ``state_dict`` keys match PyTorch: ``in_proj_weight`` (3E, E) and
    ``in_proj_bias`` (or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from
    ``embed_dim``), and the ``out_proj`` Linear. In-projection weights are Xavier-uniform,
    biases zero.

    Args:
        embed_dim: model width E (split across heads).
        num_heads: number of heads; must divide ``embed_dim``.
        dropout: dropout on the attention weights (training only).
        bias: whether the in/out projections have biases.
        add_bias_kv, add_zero_attn: not supported (must be False).
        kdim, vdim: feature sizes of key and value (default ``embed_dim``).
        batch_first: inputs/outputs are ``(N, L, E)`` instead of ``(L, N, E)``.

    A query whose keys are ALL masked (by ``attn_mask`` and/or ``key_padding_mask``) gets an
    output of zero (the out-projection's bias after ``out_proj``), zero attention weights and no
    gradient, where PyTorch's weights path returns NaN.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                f"and num_heads={num_heads} instead"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if add_bias_kv or add_zero_attn:
            raise ValueError("MultiheadAttention: add_bias_kv and add_zero_attn are not "
                             "supported by distprop")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.head_dim = embed_dim // num_heads
        if self._qkv_same_embed_dim:
            self.in_proj_weight = new_parameter((3 * embed_dim, embed_dim), device, dtype)
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = new_parameter((embed_dim, embed_dim), device, dtype)
            self.k_proj_weight = new_parameter((embed_dim, self.kdim), device, dtype)
            self.v_proj_weight = new_parameter((embed_dim, self.vdim), device, dtype)
        if bias:
            self.in_proj_bias = new_parameter((3 * embed_dim,), device, dtype)
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            init.zeros_(self.in_proj_bias)
            init.zeros_(self.out_proj.bias)

    # --- input checks -----------------------------------------------------------------------

    def _check_inputs(self, query, key, value) -> bool:
        name = f"MultiheadAttention({self.embed_dim}, {self.num_heads})"
        for what, t, size in (("query", query, self.embed_dim), ("key", key, self.kdim),
                              ("value", value, self.vdim)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: {what} must be a Tensor, got {type(t).__name__}")
            if t.ndim not in (2, 3) or t.shape[-1] != size:
                layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
                raise ValueError(
                    f"{name}: expected {what} of shape {layout} or unbatched (L, E) with "
                    f"E = {size}, got {t.shape}"
                )
            if t.ndim != query.ndim:
                raise ValueError(f"{name}: query is {query.ndim}-D but {what} is {t.ndim}-D")
            if t.dtype != self.out_proj.weight.dtype and not amp.mixed_ok(
                    t.dtype, self.out_proj.weight.dtype):
                raise TypeError(f"{name}: {what} dtype {t.dtype} does not match the parameters' "
                                f"dtype {self.out_proj.weight.dtype}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"{name}: key {key.shape} and value {value.shape} must have the "
                             "same sequence length and batch size")
        batched = query.ndim == 3
        if batched:
            b = 0 if self.batch_first else 1
            if query.shape[b] != key.shape[b]:
                raise ValueError(f"{name}: query {query.shape} and key {key.shape} have "
                                 "different batch sizes")
        return batched

    def _mask_bias(self, attn_mask, key_padding_mask, is_causal, batch, target, source, dtype,
                   device):
        """Both masks merged into one additive array broadcastable to (N, H, L, S)."""
        name = f"MultiheadAttention({self.embed_dim}, {self.num_heads})"
        bias = additive_mask(attn_mask, dtype, "attn_mask", true_means_masked=True,
                             device=device)
        if bias is None and is_causal:
            bias = causal_mask(target, source, dtype, backend.xp_for(device))
        if bias is not None:
            if bias.ndim == 3 and bias.shape == (batch * self.num_heads, target, source):
                bias = bias.reshape(batch, self.num_heads, target, source)
            elif bias.shape != (target, source):
                raise ValueError(
                    f"{name}: attn_mask must have shape ({target}, {source}) or "
                    f"({batch * self.num_heads}, {target}, {source}) (batch * num_heads, L, S), "
                    f"got {tuple(bias.shape)}"
                )
        pad = additive_mask(key_padding_mask, dtype, "key_padding_mask", true_means_masked=True,
                            device=device)
        if pad is not None:
            if pad.shape != (batch, source):
                raise ValueError(f"{name}: key_padding_mask must have shape ({batch}, {source}) "
                                 f"(N, S), got {tuple(pad.shape)}")
            pad = pad.reshape(batch, 1, 1, source)
            bias = pad if bias is None else bias + pad
        _check_broadcast(bias, (batch, self.num_heads, target, source), "attn_mask")
        return bias

    # --- forward ----------------------------------------------------------------------------

    def _projections(self, query, key, value):
        """Separate q, k, v in-projections (self-attention packs them: see forward)."""
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else Chunk.apply(b, 3, dim=0)
        if self._qkv_same_embed_dim:
            wq, wk, wv = Chunk.apply(self.in_proj_weight, 3, dim=0)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return _project(query, wq, bq), _project(key, wk, bk), _project(value, wv, bv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """Attend from ``query`` to ``key``/``value``; returns ``(output, weights or None)``.

        Args:
            query: ``(L, N, E)`` (``(N, L, E)`` if ``batch_first``) or unbatched ``(L, E)``.
            key, value: ``(S, N, kdim/vdim)`` likewise.
            key_padding_mask: ``(N, S)``, bool (True = ignore that key) or additive float.
            need_weights: also return the attention weights.
            attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)``, bool (True = not allowed) or
                additive float.
            average_attn_weights: average the returned weights over heads ``(N, L, S)``
                instead of ``(N, num_heads, L, S)``.
            is_causal: with no ``attn_mask``, apply a causal mask (keys after the query are
                masked); with one, ``attn_mask`` is used as given.
        """
        batched = self._check_inputs(query, key, value)
        time_major = not (self.batch_first and batched)
        dropout_p = self.dropout if self.training else 0.0
        packed = self._qkv_same_embed_dim and query is key and key is value
        if packed:
            qkv = _project(query, self.in_proj_weight, self.in_proj_bias)
            q = k = v = qkv
        else:
            q, k, v = self._projections(query, key, value)
        if not batched:
            q, k, v = (q.unsqueeze(1),) * 3 if packed else (t.unsqueeze(1) for t in (q, k, v))
        b = 1 if time_major else 0
        batch, target, source = q.shape[b], q.shape[1 - b], k.shape[1 - b]
        if not amp.is_autocast_enabled() and fast_path_ok(q.data, k.data, v.data):
            bias = self._mask_bias(attn_mask, key_padding_mask, is_causal, batch, target,
                                   source, q.dtype, q.device)
            inputs = (q,) if packed else (q, k, v)
            result = HeadsAttention.apply(*inputs, heads=self.num_heads, time_major=time_major,
                                          packed=packed, bias=bias, dropout_p=dropout_p,
                                          need_weights=need_weights)
            out, weights = result if need_weights else (result, None)
        else:
            if packed:
                q, k, v = Chunk.apply(q, 3, dim=-1)
            out, weights = self._heads_composed(q, k, v, time_major, attn_mask, key_padding_mask,
                                                is_causal, dropout_p, need_weights)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def _heads_composed(self, q, k, v, time_major, attn_mask, key_padding_mask, is_causal,
                        dropout_p, need_weights):
        """Heads split/merged by reshape and permute around the generic attention op (CuPy,
        float16 under autocast)."""
        if time_major:  # (L, N, E) -> (N, L, E) views
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        batch, target, source = q.shape[0], q.shape[1], k.shape[1]
        heads, hd = self.num_heads, self.head_dim
        q, k, v = (permute(reshape(t, (batch, t.shape[1], heads, hd)), (0, 2, 1, 3))
                   for t in (q, k, v))
        bias = self._mask_bias(attn_mask, key_padding_mask, is_causal, batch, target, source,
                               q.dtype, q.device)
        result = ScaledDotProductAttention.apply(q, k, v, bias=bias, dropout_p=dropout_p,
                                                 need_weights=need_weights)
        out, weights = result if need_weights else (result, None)
        order = (2, 0, 1, 3) if time_major else (0, 2, 1, 3)
        out = permute(out, order)
        return reshape(out, out.shape[:2] + (self.embed_dim,)), weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")

