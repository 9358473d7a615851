"""Containers: Sequential, ModuleList, ModuleDict."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from distprop.nn.activation import ReLU
from distprop.nn.module import Module
from distprop.nn.pooling import MaxPool1d, MaxPool2d


def _pool_first(module: Module, following: Module) -> bool:
    """Whether ``following(module(x))`` may run as ``module(following(x))``: a ReLU then a max
    pool, neither of them hooked. max(relu(x)) = relu(max(x)) exactly, and both orders send a
    window's gradient to its first maximum when that maximum is positive and nowhere otherwise;
    pooling first leaves the ReLU the pooled tensor (a quarter of the size for a 2x2 pool)."""
    return (type(module) is ReLU and type(following) in (MaxPool1d, MaxPool2d)
            and not following.return_indices
            and not (module._forward_pre_hooks or module._forward_hooks
                     or following._forward_pre_hooks or following._forward_hooks))


class Sequential(Module):
    """Modules applied in order; built from positional modules or an OrderedDict.

    A ``ReLU`` directly followed by a ``MaxPool1d``/``MaxPool2d`` runs pool first, then ReLU:
    the same values and gradients (see :func:`_pool_first`), the ReLU on the pooled tensor.
    Forward hooks on either module turn this off, so hooks see PyTorch's order.
    """

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(modules):
                self.add_module(str(i), m)

    def forward(self, x):
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            if i + 1 < len(modules) and _pool_first(modules[i], modules[i + 1]):
                x = modules[i](modules[i + 1](x))
                i += 2
            else:
                x = modules[i](x)
                i += 1
        return x

    def __getitem__(self, idx):
        mods = list(self._modules.values())
        if isinstance(idx, slice):
            return Sequential(*mods[idx])
        return mods[idx]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self)), module)
        return self


class ModuleList(Module):
    """A list of modules, registered under their indices."""

    def __init__(self, modules: Iterable[Module] | None = None):
        super().__init__()
        if modules is not None:
            for m in modules:
                self.append(m)

    def append(self, module: Module) -> ModuleList:
        self.add_module(str(len(self)), module)
        return self

    def extend(self, modules: Iterable[Module]) -> ModuleList:
        for m in modules:
            self.append(m)
        return self

    def __getitem__(self, idx):
        mods = list(self._modules.values())
        if isinstance(idx, slice):
            return ModuleList(mods[idx])
        return mods[idx]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class ModuleDict(Module):
    """A dict of modules, registered under their keys."""

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            for k, m in dict(modules).items():
                self.add_module(k, m)

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        self.add_module(key, module)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()
