"""torch.nn.functional-style wrappers over ``distprop.ops`` (also ``dp.nn.functional``)."""

from __future__ import annotations

import numpy as np

from distprop.ops.activation import (  # noqa: F401
    dropout,
    elu,
    gelu,
    leaky_relu,
    log_softmax,
    relu,
    sigmoid,
    silu,
    softmax,
    tanh,
)
from distprop.ops.conv import conv1d, conv2d  # noqa: F401
from distprop.ops.linalg import Linear as _Linear
from distprop.ops.loss import (  # noqa: F401
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    huber_loss,
    l1_loss,
    mse_loss,
    nll_loss,
    smooth_l1_loss,
)
from distprop.ops.norm import batch_norm, layer_norm  # noqa: F401
from distprop.ops.pool import (  # noqa: F401
    adaptive_avg_pool1d,
    adaptive_avg_pool2d,
    avg_pool1d,
    avg_pool2d,
    max_pool1d,
    max_pool2d,
)


def linear(input, weight, bias=None):
    """y = input @ weight^T + bias."""
    if bias is None:
        return _Linear.apply(input, weight)
    return _Linear.apply(input, weight, bias)


def embedding(input, weight, padding_idx=None):
    """Rows of ``weight`` picked by the integer ``input``; ``padding_idx`` gets no gradient."""
    from distprop.ops.embedding import Embedding as _Embedding
    from distprop.tensor import Tensor

    if isinstance(input, Tensor):
        indices = input.data
    else:
        indices = input if hasattr(input, "shape") else np.asarray(input)
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must be 2-D (num_embeddings, embedding_dim), got "
                         f"shape {tuple(weight.shape)}")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    return _Embedding.apply(indices, weight, padding_idx=padding_idx)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None):
    """softmax(q k^T * scale + mask) v; fully masked rows give zeros (see ops/attention.py)."""
    from distprop.ops.attention import scaled_dot_product_attention as _sdpa

    return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                 is_causal=is_causal, scale=scale)
