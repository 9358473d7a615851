"""Flat parameter/gradient buffers: views, in-place accumulation, offsets, re-flattening."""

import gc
import weakref

import numpy as np
import pytest

import distprop as dp
from distprop.flat import FlatBuffer, contiguous_range, flatten, slot_of
from distprop.nn import Parameter


def params(*shapes, dtype=np.float64):
    return [Parameter(dp.randn(*s, dtype=dtype)) for s in shapes]


def test_views_share_memory_and_keep_values():
    ps = params((3, 4), (4,), (2, 2))
    before = [p.numpy().copy() for p in ps]
    (buf,) = flatten(ps)
    assert buf.numel == 12 + 4 + 4
    for p, old in zip(ps, before):
        np.testing.assert_array_equal(p.numpy(), old)
        assert np.shares_memory(p.data, buf.data)
        assert np.shares_memory(p._grad_buffer, buf.grad)
    buf.data[:] = 7.0
    assert all((p.numpy() == 7.0).all() for p in ps)
    ps[1].data[...] = -1.0
    np.testing.assert_array_equal(buf.data[12:16], -1.0)


def test_offsets_sizes_and_span():
    ps = params((3, 4), (4,), (2, 5))
    (buf,) = flatten(ps)
    assert buf.offsets == [0, 12, 16]
    assert buf.sizes == [12, 4, 10]
    assert buf.span(1, 3) == (12, 26)
    assert buf.span() == (0, 26)
    s = slot_of(ps[2])
    assert (s.index, s.offset, s.numel, s.shape) == (2, 16, 10, (2, 5))
    assert s.buffer is buf
    np.testing.assert_array_equal(buf.data[s.offset : s.offset + s.numel],
                                  ps[2].numpy().ravel())
    with pytest.raises(IndexError, match="outside"):
        buf.span(2, 4)


def test_backward_accumulates_in_place_into_flat_grad():
    w, b = params((3, 2), (3,))
    (buf,) = flatten([w, b])
    x = dp.randn(5, 2, dtype=np.float64)
    (x @ w.T + b).sum().backward()
    assert w.grad.data is buf.grad_views[0]
    grad_before = buf.grad.copy()
    (x @ w.T + b).sum().backward()  # accumulates
    np.testing.assert_allclose(buf.grad, 2 * grad_before)
    np.testing.assert_allclose(b.grad.numpy(), np.full(3, 10.0))
    assert buf.grads_present()
    np.testing.assert_allclose(buf.grad[6:9], b.grad.numpy())


def test_flatten_is_idempotent():
    ps = params((2, 3), (3,))
    first = flatten(ps)
    data = first[0].data
    second = flatten(ps)
    assert second[0] is first[0]
    assert ps[0].data.base is data or np.shares_memory(ps[0].data, data)
    assert contiguous_range(ps) == (first[0], 0, 2)


def test_reflattening_invalidates_old_buffer():
    ps = params((2, 3), (3,), (4,))
    (old,) = flatten(ps)
    (new,) = flatten([ps[2], ps[0]])  # another grouping: re-homes these
    assert not old.valid and new.valid
    assert slot_of(ps[0]).buffer is new
    assert slot_of(ps[0]).index == 1
    assert slot_of(ps[1]) is None  # its buffer is stale
    assert contiguous_range(ps) is None
    assert contiguous_range([ps[2], ps[0]]) == (new, 0, 2)
    ps[0].data[...] = 3.0
    np.testing.assert_array_equal(new.data[4:10], 3.0)


def test_moved_parameter_is_no_longer_flat():
    (p,) = params((3,))
    (buf,) = flatten([p])
    p.data = p.data.astype(np.float32)  # what Module.to(dtype) does
    assert slot_of(p) is None
    assert not buf.in_place(0)


def test_parameters_keep_their_buffer_alive_and_a_dropped_model_frees_it():
    ps = params((3,), (2,))
    bufs = flatten(ps)
    buf_ref = weakref.ref(bufs[0])
    del bufs
    gc.collect()
    assert slot_of(ps[0]).buffer is buf_ref()
    assert flatten(ps)[0] is buf_ref()  # still idempotent
    del ps
    gc.collect()
    assert buf_ref() is None


def test_existing_grads_are_copied_in_and_frozen_params():
    w, b = params((2, 2), (2,))
    w.grad = dp.tensor(np.ones((2, 2)))
    frozen = Parameter(dp.randn(3, dtype=np.float64), requires_grad=False)
    (buf,) = flatten([w, frozen, b])
    np.testing.assert_array_equal(buf.grad[:4], 1.0)
    assert w.grad.data is buf.grad_views[0]
    assert frozen.grad is None and b.grad is None
    assert not buf.grads_present() and buf.grads_present(0, 1)
    (w.sum() * 2.0).backward()  # frozen gets no gradient
    assert frozen.grad is None
    np.testing.assert_array_equal(buf.grad[:4], 3.0)
    buf.materialize_grads()
    assert buf.grads_present()
    np.testing.assert_array_equal(frozen.grad.numpy(), 0.0)
    buf.zero_grad(set_to_none=False)
    assert (buf.grad == 0).all() and w.grad is not None
    buf.zero_grad()
    assert w.grad is None


def test_mixed_dtypes_give_two_buffers():
    a = Parameter(dp.randn(3, dtype=np.float32))
    b = Parameter(dp.randn(2, dtype=np.float64))
    c = Parameter(dp.randn(4, dtype=np.float32))
    bufs = flatten([a, b, c])
    assert [buf.dtype for buf in bufs] == [np.float32, np.float64]
    assert bufs[0].params == [a, c] and bufs[1].params == [b]
    assert a.dtype == np.float32 and b.dtype == np.float64


def test_errors():
    with pytest.raises(ValueError, match="at least one"):
        FlatBuffer([])
    a = Parameter(dp.randn(3, dtype=np.float32))
    b = Parameter(dp.randn(2, dtype=np.float64))
    with pytest.raises(ValueError, match="share dtype"):
        FlatBuffer([a, b])
