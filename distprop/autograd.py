"""The backward walk: :func:`backward` (the engine behind :meth:`Tensor.backward`) and
:func:`queue_callback`.

:func:`backward` finds the graph nodes (:class:`~distprop.tensor.Function` instances recorded by
``Function.apply``) reachable from the roots, iteratively, in topological order, then runs their
``backward`` in reverse order, summing the gradients of each node's outputs and accumulating
into the leaves' ``.grad`` (post-accumulate hooks fire once a leaf got all of its gradients).
Callbacks queued during the walk run after it. Both names are re-exported by
:mod:`distprop.tensor`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

import distprop.tensor as _tensor  # a cycle: Tensor is looked up when backward runs
from distprop import backend

if TYPE_CHECKING:
    from distprop.tensor import Function, Tensor


_backward_callbacks: list[Callable[[], None]] | None = None


def queue_callback(callback: Callable[[], None]) -> None:
    """Run ``callback()`` once the backward pass now in progress has finished."""
    if _backward_callbacks is None:
        raise RuntimeError("queue_callback() may only be called during backward")
    _backward_callbacks.append(callback)


def backward(
    tensors: Sequence[Tensor], grad_tensors: Sequence | None = None, retain_graph: bool = False
) -> None:
    """Backpropagate from ``tensors`` (the engine behind :meth:`Tensor.backward`)."""
    global _backward_callbacks
    if grad_tensors is None:
        grad_tensors = [None] * len(tensors)
    roots = []
    for t, g in zip(tensors, grad_tensors):
        if not isinstance(t, _tensor.Tensor):
            raise TypeError(f"backward() expects Tensors, got {type(t).__name__}")
        if not t.requires_grad:
            raise RuntimeError(
                "element 0 of tensors does not require grad and does not have a grad_fn: "
                "nothing to differentiate"
            )
        if g is None:
            if t.data.size != 1:
                raise RuntimeError(
                    f"grad can be implicitly created only for scalar outputs; this tensor has "
                    f"shape {t.shape}: pass backward(gradient) with that shape"
                )
            g = backend.get_array_module(t.data).ones_like(t.data)
        else:
            g = g.data if isinstance(g, _tensor.Tensor) else g
            if type(g) is not np.ndarray or type(t.data) is not np.ndarray or g.dtype != t.dtype:
                g = backend.get_array_module(t.data).asarray(g, dtype=t.data.dtype)
            if g.shape != t.data.shape:
                raise RuntimeError(
                    f"gradient has shape {tuple(g.shape)} but the tensor has shape {t.shape}"
                )
        roots.append((t, g))

    # Topological order of graph nodes (Functions), found iteratively (depth first; a node is
    # appended once all the nodes it feeds into, reachable from the roots, were expanded).
    order: list[Function] = []
    # Keyed by id(): a Tensor's == is elementwise, and a Function subclass may define __eq__.
    visited: set[int] = set()
    leaf_edges: dict[int, int] = {}
    stack: list = []
    push = stack.append
    for t, _ in roots:
        if t._ctx is None:
            leaf_edges[id(t)] = leaf_edges.get(id(t), 0) + 1
        else:
            push(t._ctx)
    while stack:
        fn = stack.pop()
        if type(fn) is tuple:  # (fn,): its inputs were all expanded
            order.append(fn[0])
            continue
        if id(fn) in visited:
            continue
        if fn._freed:
            raise RuntimeError(
                "Trying to backward through the graph a second time (or directly access saved "
                "tensors after they have already been freed). Saved intermediate values of the "
                "graph are freed when you call .backward(). Specify retain_graph=True if you "
                "need to backward through the graph a second time."
            )
        visited.add(id(fn))
        push((fn,))
        for inp, needs in zip(fn.inputs, fn.needs_input_grad):
            if not needs or inp is None:
                continue
            ctx = inp._ctx
            if ctx is None:
                leaf_edges[id(inp)] = leaf_edges.get(id(inp), 0) + 1
            elif id(ctx) not in visited:
                push(ctx)

    pending: dict[int, list] = {}
    retained: list[Tensor] = []
    Tensor = _tensor.Tensor

    def deliver(tensor: Tensor, grad) -> None:
        ctx = tensor._ctx
        if ctx is None:
            tensor._accumulate(grad)
            key = id(tensor)
            left = leaf_edges[key] - 1
            leaf_edges[key] = left
            if left == 0 and tensor._post_accumulate_hooks:
                for hook in list(tensor._post_accumulate_hooks):
                    hook(tensor)
            return
        meta = ctx.outputs_meta
        slots = pending.get(id(ctx))
        if slots is None:
            slots = pending[id(ctx)] = [None] * len(meta)
        i = tensor._output_index
        dtype = meta[i][1]
        if grad.dtype != dtype:  # mixed dtypes (autocast): as PyTorch,
            grad = grad.astype(dtype)  # a grad has its tensor's dtype
        prev = slots[i]
        slots[i] = grad if prev is None else prev + grad
        if tensor._retains_grad:
            retained.append(tensor)

    outer_callbacks = _backward_callbacks
    _backward_callbacks = []
    try:
        for t, g in roots:
            deliver(t, g)
        pending_pop = pending.pop
        for fn in reversed(order):
            slots = pending_pop(id(fn), None)
            if slots is None:
                continue
            if len(slots) == 1 and slots[0] is not None:
                grads_out = slots
            else:
                xp = None
                grads_out = []
                for slot, (shape, dtype) in zip(slots, fn.outputs_meta):
                    if slot is None:
                        if xp is None:
                            xp = _array_module_of_fn(fn, slots)
                        slot = xp.zeros(shape, dtype=dtype)
                    grads_out.append(slot)
            # Hand retained non-leaf grads their final value before the node consumes them.
            if retained:
                for tensor in retained:
                    if tensor._ctx is fn:
                        tensor.grad = Tensor._wrap(grads_out[tensor._output_index])
            grads_in = fn.backward(*grads_out)
            if not isinstance(grads_in, tuple):
                grads_in = (grads_in,)
            inputs = fn.inputs
            if len(grads_in) < len(inputs):  # inputs past the end got None
                grads_in += (None,) * (len(inputs) - len(grads_in))
            for inp, needs, g in zip(inputs, fn.needs_input_grad, grads_in):
                if not needs or inp is None:
                    continue
                if g is None:
                    g = backend.get_array_module(inp.data).zeros_like(inp.data)
                deliver(inp, g)
            if not retain_graph:
                fn.release()
        callbacks = _backward_callbacks
    finally:
        _backward_callbacks = outer_callbacks
    for callback in callbacks:
        callback()


def _array_module_of_fn(fn: Function, slots) -> object:
    for s in slots:
        if s is not None:
            return backend.get_array_module(s)
    for inp in fn.inputs:
        if inp is not None:
            return backend.get_array_module(inp.data)
    return np
