"""The autograd core's fast paths keep their semantics: grad-mode context managers (also as
decorators, nested, re-entered, on exceptions), the root gradient's dtype/shape handling, and
nodes whose backward returns fewer gradients than inputs or gets a missing output gradient."""

from __future__ import annotations

import numpy as np
import pytest

import distprop as dp
from distprop.tensor import Function, enable_grad, is_grad_enabled, no_grad


def test_no_grad_decorator_nested_and_reentrant():
    @no_grad()
    def inner(depth):
        assert not is_grad_enabled()
        with enable_grad():
            assert is_grad_enabled()
        assert not is_grad_enabled()
        return inner(depth - 1) if depth else 0

    assert is_grad_enabled()
    inner(3)
    inner(1)  # the same decorated function, used again
    assert is_grad_enabled()
    with no_grad():
        with no_grad():
            assert not is_grad_enabled()
        assert not is_grad_enabled()
        with enable_grad():
            a = dp.tensor([1.0, 2.0], requires_grad=True)
            assert (a * 2).requires_grad
    assert is_grad_enabled()


def test_grad_mode_restored_after_exception():
    with pytest.raises(ValueError):
        with no_grad():
            raise ValueError("boom")
    assert is_grad_enabled()


@pytest.mark.parametrize(
    "grad", [np.array([1.0, 2.0]), [1.0, 2.0], np.array([1, 2], np.int64), None]
)
def test_root_gradient_takes_the_tensor_dtype(grad):
    a = dp.tensor([3.0, 4.0], requires_grad=True)
    y = a * 2
    if grad is None:
        y.sum().backward()
        expected = [2.0, 2.0]
    else:
        y.backward(grad)
        expected = [2.0, 4.0]
    assert a.grad.dtype == np.float32
    np.testing.assert_allclose(a.grad.numpy(), expected)


def test_root_gradient_shape_mismatch_is_one_clear_error():
    a = dp.tensor([3.0, 4.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"gradient has shape \(3,\) but the tensor has shape"):
        (a * 2).backward(np.ones(3, np.float32))


class _SplitFirst(Function):
    """Two outputs; backward returns a gradient for the first input only (a short tuple)."""

    def forward(self, a, b):
        return a * 2, a + b

    def backward(self, g0, g1):
        self.seen = (g0.copy(), g1.copy())
        _LOG.append(self.seen)
        return (2 * g0 + g1,)


_LOG: list = []


def test_missing_output_gradient_and_short_backward_tuple():
    _LOG.clear()
    a = dp.tensor([1.0, 2.0], requires_grad=True)
    b = dp.tensor([5.0, 6.0], requires_grad=True)
    first, _second = _SplitFirst.apply(a, b)
    first.sum().backward()  # the second output got no gradient: zeros of its shape and dtype
    g0, g1 = _LOG[0]
    np.testing.assert_array_equal(g1, np.zeros(2, np.float32))
    assert g1.dtype == np.float32
    np.testing.assert_allclose(a.grad.numpy(), [2.0, 2.0])
    np.testing.assert_array_equal(b.grad.numpy(), [0.0, 0.0])  # past the tuple's end: zeros


class _Unhashable(Function):
    """A node whose class defines == (so it is unhashable): the walk must key nodes by id."""

    def __eq__(self, other):
        return True

    __hash__ = None

    def forward(self, a):
        return a * 3

    def backward(self, g):
        return g * 3


def test_walk_does_not_hash_or_compare_nodes():
    a = dp.tensor([1.0, 2.0], requires_grad=True)
    y = _Unhashable.apply(_Unhashable.apply(a)) + _Unhashable.apply(a)
    y.sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), [12.0, 12.0])


def test_one_no_grad_object_entered_inside_itself_restores_grad_mode():
    guard = dp.no_grad()
    with guard:
        with guard:
            assert not dp.is_grad_enabled()
        assert not dp.is_grad_enabled()
    assert dp.is_grad_enabled()
