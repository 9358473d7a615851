"""The Optimizer base class: parameter groups, flat state, fused steps over flat buffers.

The constructor puts the parameters into flat buffers (:func:`~distprop.flat.flatten`)
unless they already are. Each group is then cut into *segments*, runs of its parameters that are
consecutive in one FlatBuffer, and each segment keeps its state (``exp_avg``, ...) as flat arrays
in the same layout; ``optimizer.state[p]`` holds views into them, so ``state_dict()`` and user
code see per-parameter state exactly as in PyTorch.

``step()`` updates each segment with a handful of whole-array operations on slices of the flat
buffer (``buf.data[a:b]``, ``buf.grad[a:b]``, the flat state) whenever its parameters' gradients
are in the buffer. A parameter whose gradient is None is skipped, as in PyTorch; one whose
gradient lives elsewhere, or whose scalar state (``step``) differs from its neighbours', is
updated on its own by the same elementwise function, so both paths give identical numbers.
On the CPU the slices are processed in cache-sized chunks, which keeps the temporaries in cache.

Subclasses describe their state and rule through five small hooks (see :class:`Optimizer`).
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from distprop import backend
from distprop.flat import flatten, slot_of
from distprop.optim.layout import Layout, Segment, scalar_dtype
from distprop.tensor import Tensor, as_array, enable_grad

# Elements per chunk of a fused CPU update: 1 MiB per float32 array keeps the few state, gradient
# and scratch arrays of one chunk in the L2/L3 cache. GPU updates use much larger chunks.
_CPU_CHUNK_BYTES = 1 << 20
_GPU_CHUNK_ELEMS = 1 << 24
_N_SCRATCH = 3


class Optimizer:
    """Base class of the optimizers, with PyTorch's interface.

    Args:
        params: an iterable of parameters, or of dicts defining parameter groups (each with a
            ``"params"`` entry and optional per-group hyper-parameters).
        defaults: hyper-parameters used where a group does not set its own.

    Subclasses describe their state and update rule through the public extension hooks below
    (each gets the parameter group, so per-group hyper-parameters apply); wrappers such as
    :class:`~distprop.distributed.ZeroRedundancyOptimizer` call the same hooks on the optimizer
    they wrap:

    * :meth:`check_group`: raise ValueError on bad hyper-parameters;
    * :meth:`array_state`: the per-element state arrays and their initial values;
    * :meth:`scalar_state`: the per-parameter scalars (``step``) and their initial values;
    * :meth:`advance`: this step's scalars and the arguments of the update;
    * :meth:`kernel`: the update, one call of a function of :mod:`distprop.optim.functional` on
      (any slice of) the arrays;
    * :attr:`eager_state`: create the state at construction rather than at the first step.

    :meth:`validate_state_entry` checks one parameter's entry of a loaded state dict against
    these hooks.
    """

    #: Whether state is created for every parameter at construction (Adagrad) or lazily.
    eager_state = False

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self.check_group(self.defaults)
        self.state: defaultdict[Tensor, dict] = defaultdict(dict)
        self.param_groups: list[dict] = []
        self._layouts: list[Layout | None] = []
        self._scratch_cache: dict[tuple, list] = {}
        self._use_flat = True
        if isinstance(params, Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or "
                f"dicts, but got {type(params).__name__}"
            )
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        prepared: list[dict] = []
        pending: set[int] = set()
        for index, group in enumerate(groups):
            prepared.append(self._prepare_group(group, index, pending))
            pending.update(id(p) for p in prepared[-1]["params"])
        self._append_groups(prepared)

    # --- hooks (overridden by the optimizers) -----------------------------------------------

    def check_group(self, group: dict) -> None:
        """Raise ValueError (naming the hyper-parameter) if ``group`` is not valid.

        Called on ``defaults``, on each group added and on each group of a loaded state dict.
        Overrides replace this check of ``lr`` (check it too).
        """
        _check_nonneg(group, "lr", "learning rate")

    def array_state(self, group: dict) -> dict[str, float]:
        """The per-element state of a parameter in ``group``: ``{name: initial value}``.

        Each name becomes an array of the parameter's shape and dtype (``exp_avg``, ...); an
        empty dict means the optimizer keeps no per-element state for this group.
        """
        return {}

    def scalar_state(self, group: dict) -> dict[str, float]:
        """The per-parameter scalars of a parameter in ``group``: ``{name: initial value}``
        (e.g. ``{"step": 0}``)."""
        return {}

    def advance(self, group: dict, scalars: dict[str, float], first: bool):
        """One step's scalars: ``(new_scalars, kernel_args)`` from the parameter's current
        :meth:`scalar_state` values (``first``: its state was just created); ``kernel_args``
        (bias corrections, ...) reach :meth:`kernel` as ``args``."""
        return {}, {}

    def kernel(self, group, param, grad, arrays, args, scratch) -> None:  # pragma: no cover
        """Update ``param`` in place from ``grad``, and the :meth:`array_state` ``arrays``
        with it: equal-shaped arrays (a flat-buffer slice or one parameter) on its device;
        ``args`` from :meth:`advance`, ``scratch`` preallocated temporaries of the same shape."""
        raise NotImplementedError(f"{type(self).__name__} does not define its update")

    # --- groups -----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of parameters with its own hyper-parameters (others from ``defaults``).

        Raises:
            ValueError: on an empty group, a parameter already in another group, or bad
                hyper-parameters.
        """
        group = self._prepare_group(param_group, len(self.param_groups), set())
        self._append_groups([group])

    def _prepare_group(self, param_group: dict, index: int, pending: set[int]) -> dict:
        """Validate a group and fill in the defaults (``pending``: ids of groups not yet added)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, "
                            "but the ordering of tensors in sets will change between runs; "
                            "use a list instead")
        params = list(params) if params is not None else []
        if not params:
            raise ValueError(f"parameter group {index} has an empty parameter list")
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but parameter {i} of "
                                f"group {index} is a {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError(f"can't optimize a non-leaf Tensor (parameter {i} of group "
                                 f"{index})")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"parameter group {index} contains a parameter more than once")
        seen = pending | {id(p) for g in self.param_groups for p in g["params"]}
        shared = [i for i, p in enumerate(params) if id(p) in seen]
        if shared:
            raise ValueError(
                f"some parameters appear in more than one parameter group (parameters {shared} "
                f"of group {index} are already in an earlier group)"
            )
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self.check_group(group)
        group["params"] = params
        return group

    def _append_groups(self, groups: list[dict]) -> None:
        # Flatten, in group order, what is not flat yet (parameters already in a live buffer,
        # e.g. DDP's, stay there).
        loose = [p for g in groups for p in g["params"] if slot_of(p) is None]
        if loose:
            flatten(loose)
        for group in groups:
            self.param_groups.append(group)
            self._layouts.append(None)
            layout = self._layout(len(self.param_groups) - 1)
            if self.eager_state:
                for seg in layout.segments:
                    self._init_state(group, seg, range(len(seg.params)))

    # --- layout ---------------------------------------------------------------------------

    def _layout(self, index: int) -> Layout:
        """The group's segments, rebuilt (keeping state) when its buffers were re-created."""
        group = self.param_groups[index]
        layout = self._layouts[index]
        if layout is not None and not layout.stale(group["params"]):
            return layout
        new = Layout(group["params"])
        if layout is not None:
            self._move_state(group, layout, new)
        self._layouts[index] = new
        return new

    def _move_state(self, group: dict, old: Layout, new: Layout) -> None:
        """Copy every parameter's state from the old segments into the new ones."""
        array_init, scalar_init = self.array_state(group), self.scalar_state(group)
        for seg in new.segments:
            for k, p in enumerate(seg.params):
                found = old.where.get(id(p))
                if found is None or not found[0].inited[found[1]]:
                    continue
                old_seg, old_k = found
                seg.ensure({**array_init, **dict.fromkeys(old_seg.arrays, 0.0)},
                           {**scalar_init, **dict.fromkeys(old_seg.scalars, 0.0)})
                old_arrays, old_scalars = old_seg.views(old_k)
                arrays, scalars = seg.views(k)
                for name, value in old_arrays.items():  # across devices after Module.to()
                    arrays[name][...] = backend.to_device(value, backend.device_of(arrays[name]))
                for name, value in old_scalars.items():
                    scalars[name][...] = value
                seg.inited[k] = True
                self._publish(seg, k)

    def _publish(self, seg: Segment, k: int) -> None:
        """Point ``self.state[p]`` at parameter k's views (scalars first, as in PyTorch)."""
        arrays, scalars = seg.views(k)
        entry = self.state[seg.params[k]]
        entry.clear()
        entry.update(scalars)
        entry.update(arrays)

    def _init_state(self, group: dict, seg: Segment, ks) -> None:
        array_init, scalar_init = self.array_state(group), self.scalar_state(group)
        if not array_init and not scalar_init:
            return
        seg.ensure(array_init, scalar_init)
        for k in ks:
            if seg.inited[k]:
                continue
            arrays, scalars = seg.views(k)
            for name, fill in array_init.items():
                arrays[name][...] = fill
            for name, init in scalar_init.items():
                scalars[name][...] = init
            seg.inited[k] = True
            self._publish(seg, k)

    # --- stepping -------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all optimized parameters (to None, or to zeros in place)."""
        for index, group in enumerate(self.param_groups):
            if set_to_none:
                for p in group["params"]:
                    p.grad = None
                continue
            for seg in self._layout(index).segments:
                if seg.buffer is not None and all(
                    seg.buffer.grad_in_place(seg.first + k) for k in range(len(seg.params))
                ):
                    a, b = seg.buffer.span(seg.first, seg.first + len(seg.params))
                    seg.buffer.grad[a:b] = 0
                    continue
                for p in seg.params:
                    if p.grad is not None:
                        p.grad.data[...] = 0

    def step(self, closure: Callable[[], Tensor] | None = None):
        """Update every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            for seg in self._layout(index).segments:
                self._step_segment(group, seg)
        return loss

    def _step_segment(self, group: dict, seg: Segment) -> None:
        buf = seg.buffer
        n = len(seg.params)
        # 0: no gradient (skip), 1: gradient in the flat buffer, 2: gradient elsewhere.
        kinds = []
        for k, p in enumerate(seg.params):
            if p.grad is None:
                kinds.append(0)
            elif buf is not None and self._use_flat and buf.grad_in_place(seg.first + k):
                kinds.append(1)
            else:
                kinds.append(2)
        if not any(kinds):
            return
        array_init, scalar_init = self.array_state(group), self.scalar_state(group)
        stateful = bool(array_init or scalar_init)
        if stateful:
            seg.ensure(array_init, scalar_init)
        if all(kind == 1 for kind in kinds) and seg.uniform():
            self._step_run(group, seg, 0, n, True, stateful)  # the common case: one slice
            return
        k = 0
        while k < n:
            if kinds[k] == 0:
                k += 1
                continue
            stop = k + 1
            if kinds[k] == 1:
                while stop < n and kinds[stop] == 1 and self._same_scalars(seg, k, stop):
                    stop += 1
            self._step_run(group, seg, k, stop, kinds[k] == 1, stateful)
            k = stop

    @staticmethod
    def _same_scalars(seg: Segment, a: int, b: int) -> bool:
        if seg.inited[a] != seg.inited[b]:
            return False
        return all(s[a] == s[b] for s in seg.scalars.values())

    def _step_run(self, group, seg: Segment, k0: int, k1: int, flat: bool, stateful: bool):
        first = not seg.inited[k0]
        if stateful and first:
            self._init_state(group, seg, range(k0, k1))
        scalars = {name: float(s[k0]) for name, s in seg.scalars.items()}
        new_scalars, args = self.advance(group, scalars, first)
        for name, value in new_scalars.items():
            seg.scalars[name][k0:k1] = value
        if flat:
            a, b = seg.buffer.span(seg.first + k0, seg.first + k1)
            la = seg.offsets[k0]
            arrays = {name: arr[la : la + (b - a)] for name, arr in seg.arrays.items()}
            self._apply(group, seg.buffer.data[a:b], seg.buffer.grad[a:b], arrays, args)
        else:
            p = seg.params[k0]
            arrays, _ = seg.views(k0) if stateful else ({}, {})
            self._apply(group, p.data, p.grad.data, arrays, args)

    def _apply(self, group, param, grad, arrays: dict, args: dict) -> None:
        """Run the kernel over the arrays, in cache-sized chunks on the CPU."""
        xp = backend.get_array_module(param)
        n = int(param.size)
        if n == 0:
            return
        if grad.shape != param.shape:
            raise ValueError(f"gradient of shape {tuple(grad.shape)} does not match its "
                             f"parameter's shape {tuple(param.shape)}")
        contiguous = all(_c_contiguous(a) for a in (param, grad, *arrays.values()))
        if param.ndim != 1 and contiguous:
            param, grad = param.reshape(-1), grad.reshape(-1)
            arrays = {name: a.reshape(-1) for name, a in arrays.items()}
        if xp is np:
            chunk = max(1024, _CPU_CHUNK_BYTES // param.dtype.itemsize)
        else:
            chunk = _GPU_CHUNK_ELEMS
        if param.ndim != 1 or n <= chunk:
            scratch = self._scratch(xp, param, min(n, chunk))
            if param.ndim != 1:
                scratch = [s.reshape(param.shape) for s in scratch]
            self.kernel(group, param, grad, arrays, args, scratch)
            return
        scratch = self._scratch(xp, param, chunk)
        names = list(arrays)
        values = [arrays[name] for name in names]
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            part = dict(zip(names, (v[a:b] for v in values)))
            s = scratch if b - a == chunk else [t[: b - a] for t in scratch]
            self.kernel(group, param[a:b], grad[a:b], part, args, s)

    def _scratch(self, xp, like, n: int) -> list:
        dev = backend.device_of(like)
        key = (xp.__name__, str(dev), like.dtype.str)
        cached = self._scratch_cache.get(key)
        if cached is None or cached[0].size < n:
            with backend.device_context(dev):
                cached = [xp.empty(n, dtype=like.dtype) for _ in range(_N_SCRATCH)]
            self._scratch_cache[key] = cached
        return [c[:n] for c in cached]

    def update_slice(self, data, grad, state: dict, group: int = 0) -> dict:
        """Apply one step of this optimizer's rule to arbitrary arrays, in place.

        For components that keep their own slices of a flat buffer (e.g. a sharded optimizer):
        ``data`` and ``grad`` are same-shaped arrays, ``state`` a dict in the layout of
        ``optimizer.state[p]`` (filled with the initial state when empty). Uses the
        hyper-parameters of ``param_groups[group]``.

        Returns:
            ``state``, updated in place (scalars such as ``step`` as 0-d arrays).
        """
        g = self.param_groups[group]
        array_init, scalar_init = self.array_state(g), self.scalar_state(g)
        first = not state
        xp = backend.get_array_module(data)
        for name, fill in array_init.items():
            if name not in state:
                state[name] = xp.full(data.shape, fill, dtype=data.dtype)
        for name, init in scalar_init.items():
            if name not in state:
                state[name] = np.array(init, dtype=scalar_dtype())
        scalars = {name: float(state[name]) for name in scalar_init}
        new_scalars, args = self.advance(g, scalars, first)
        for name, value in new_scalars.items():
            state[name] = np.array(value, dtype=scalar_dtype())
        self._apply(g, data, grad, {name: state[name] for name in array_init}, args)
        return state

    # --- state_dict -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{'state': {index: {name: array or number}}, 'param_groups': [...]}`` as in PyTorch.

        Parameters are numbered across groups in order; arrays are host NumPy copies, scalar
        state such as ``step`` is a 0-d array (PyTorch keeps a 0-d tensor there).
        """
        index = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            packed["params"] = [index[id(p)] for p in group["params"]]
            groups.append(packed)
        state = {}
        for p, entry in self.state.items():
            if entry and id(p) in index:
                state[index[id(p)]] = {k: _export(v) for k, v in entry.items()}
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state and hyper-parameters saved by :meth:`state_dict` (ours or PyTorch's).

        Raises:
            ValueError: when the saved optimizer had different groups, parameter counts or
                shapes, or state this optimizer does not use.
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("optimizer state_dict must be a dict with 'state' and "
                             "'param_groups' entries")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has a different number of parameter groups: "
                f"{len(saved_groups)} saved, {len(self.param_groups)} in this optimizer"
            )
        id_map = {}
        new_groups = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded state dict contains a parameter group that doesn't match the size "
                    f"of optimizer's group: group {gi} has {len(saved['params'])} parameters "
                    f"saved, {len(group['params'])} here"
                )
            new = {k: v for k, v in saved.items() if k != "params"}
            if isinstance(new.get("betas"), list):
                new["betas"] = tuple(new["betas"])
            for key, value in self.defaults.items():
                new.setdefault(key, value)  # e.g. a PyTorch state dict from an older version
            new["params"] = group["params"]
            self.check_group(new)
            new_groups.append(new)
            for key, p in zip(saved["params"], group["params"]):
                id_map[key] = (gi, p)
        loaded: list[tuple[int, Tensor, dict]] = []
        for key, entry in state_dict["state"].items():
            if key not in id_map:
                key_int = int(key) if isinstance(key, str) and key.isdigit() else key
                if key_int not in id_map:
                    raise ValueError(f"state dict has state for parameter {key!r}, which is "
                                     "in no parameter group")
                key = key_int
            gi, p = id_map[key]
            loaded.append((gi, p, self.validate_state_entry(new_groups[gi], key, p, entry)))
        # Commit: hyper-parameters, then state.
        for group, new in zip(self.param_groups, new_groups):
            group.clear()
            group.update(new)
        self.state.clear()
        for index in range(len(self.param_groups)):
            for seg in self._layout(index).segments:
                seg.inited[:] = False
        for gi, p, entry in loaded:
            seg, k = self._layouts[gi].where[id(p)]
            group = self.param_groups[gi]
            seg.ensure(self.array_state(group), self.scalar_state(group))
            arrays, scalars = seg.views(k)
            for name, value in entry.items():
                target = arrays[name] if name in arrays else scalars[name]
                value = backend.to_device(value, backend.device_of(target))
                target[...] = value.astype(target.dtype, copy=False)
            seg.inited[k] = True
            self._publish(seg, k)
        if self.eager_state:
            for index, group in enumerate(self.param_groups):
                for seg in self._layout(index).segments:
                    self._init_state(group, seg, range(len(seg.params)))

    def validate_state_entry(self, group: dict, key, p: Tensor, entry: dict) -> dict:
        """Check one parameter's entry of a loaded state dict; returns it as arrays.

        Args:
            group: the parameter's group (after loading).
            key: how the state dict names the parameter (used in messages).
            p: the parameter.
            entry: ``{state name: value}`` from the state dict.

        Raises:
            ValueError: a state of the wrong shape, a state this optimizer does not use with
                these settings, or a partial entry.
        """
        array_names = self.array_state(group)
        scalar_names = self.scalar_state(group)
        out = {}
        for name, value in entry.items():
            if value is None:
                continue
            value = as_array(value)
            if name in array_names:
                if tuple(value.shape) != p.shape:
                    raise ValueError(
                        f"state '{name}' of parameter {key} has shape {tuple(value.shape)} but "
                        f"the parameter has shape {p.shape}: is this state dict from a different "
                        "model?"
                    )
            elif name in scalar_names:
                if value.size != 1:
                    raise ValueError(f"state '{name}' of parameter {key} should be a scalar, "
                                     f"got shape {tuple(value.shape)}")
            else:
                raise ValueError(f"state dict has state '{name}' for parameter {key}, which "
                                 f"{type(self).__name__} with these settings does not use")
            out[name] = value
        missing = [n for n in (*scalar_names, *array_names) if n not in out]
        if out and missing:
            raise ValueError(f"state of parameter {key} lacks {missing}, which "
                             f"{type(self).__name__} with these settings needs")
        return out

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(group):
                if key != "params":
                    lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


def _c_contiguous(a) -> bool:
    return bool(a.flags.c_contiguous)


def _export(value):
    """State value -> host NumPy copy (arrays) or the value itself (numbers)."""
    if hasattr(value, "shape"):
        return np.array(backend.to_host(value), copy=True)
    return value


# --- hyper-parameter checks shared by the optimizers ------------------------------------------


def _number(group: dict, key: str, what: str) -> float:
    value = group[key]
    if isinstance(value, Tensor) and value.data.size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {what}: {value!r} (expected a real number)")
    return float(value)


def _check_nonneg(group: dict, key: str, what: str) -> None:
    value = _number(group, key, what)
    if not (0.0 <= value < math.inf):
        raise ValueError(f"Invalid {what}: {group[key]} (must be a finite number >= 0)")


def _check_unit(group: dict, key: str, what: str, closed: bool = False) -> None:
    value = _number(group, key, what)
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"Invalid {what}: {group[key]} (must lie in {interval})")


def _check_betas(group: dict) -> None:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        _check_unit({"b": beta}, "b", f"beta parameter at index {i}")
