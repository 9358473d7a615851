"""Optimizers over flat parameter buffers, and learning-rate schedules (``dp.optim``)."""

from distprop.optim.flat import FlatBuffer, flatten
