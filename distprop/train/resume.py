"""What a trainer checkpoint must hold before any of it is used, and where a resume starts.

:func:`check_state` is the one schema check of a loaded trainer checkpoint (after
:func:`distprop.train.checkpoint.load` has verified the file's checksum): kinds, types and
ranges of every field the trainer reads, the position's own consistency, and, when they are
given, the fit with the model, the optimizer, the training set and the world size of the run
that wants to resume. Every problem is a :class:`~distprop.train.checkpoint.CheckpointError`
naming the file and the field, e.g. ``checkpoint ck.npz is not usable: position.world_size
must be an integer >= 1, got 0``.

The position inside an epoch is kept in samples of the epoch's global order
(``samples_in_epoch``), which means the same on any number of ranks (see
:meth:`distprop.data.DistributedSampler.set_start`). Checkpoints written before that kept it in
micro-batches (``batch_in_epoch``) without the batch size: :func:`start_sample` converts them on
the same world size and gradient accumulation, and :func:`check_state` refuses them mid-epoch on
another one.
"""

from __future__ import annotations

import math

import numpy as np

from distprop.tensor import Tensor
from distprop.train.checkpoint import CheckpointError

KIND = "distprop-trainer"
# position fields: name -> smallest valid value (None: any integer)
_POSITION_INTS = {"epoch": 0, "step": 0, "world_size": 1, "grad_accum": 1, "seed": None}
_POSITION_NEW = {"samples_in_epoch": 0, "epoch_samples": 1, "batch_size": 1,
                 "steps_per_epoch": 1}


class _Bad(Exception):
    """One problem, as ``field``, ``message``; turned into a CheckpointError naming the file."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.field, self.message = field, message


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(mapping: dict, where: str, name: str, minimum: int | None):
    if name not in mapping:
        raise _Bad(f"{where}.{name}", "is missing")
    value = mapping[name]
    if not _is_int(value) or (minimum is not None and value < minimum):
        want = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise _Bad(f"{where}.{name}", f"must be {want}, got {value!r}")
    return value


def _mapping(state: dict, name: str, required: bool = True) -> dict:
    if name not in state:
        if required:
            raise _Bad(name, "is missing")
        return {}
    value = state[name]
    if not isinstance(value, dict):
        raise _Bad(name, f"must be a mapping, got {type(value).__name__}")
    return value


def _array_shape(value, field: str) -> tuple:
    if isinstance(value, Tensor):
        value = value.data
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise _Bad(field, f"must be a numeric array, got {type(value).__name__}")
    return tuple(value.shape)


def _check_model(saved: dict, model) -> None:
    for key, value in saved.items():
        _array_shape(value, f"model[{key!r}]")
    if model is None:
        return
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"has {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} "
                         "that this model does not")
        raise _Bad("model", "is a different model (another architecture): it "
                   + "; it ".join(parts))
    for key, shape in own.items():
        theirs = _array_shape(saved[key], f"model[{key!r}]")
        if theirs != shape:
            raise _Bad(f"model[{key!r}]", f"has shape {theirs}, this model {shape}: the "
                       "checkpoint holds a model of another shape (other --model or dataset?)")


def _check_optimizer(saved: dict, optimizer) -> None:
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise _Bad("optimizer.param_groups", "must be a list of mappings")
    if not isinstance(state, dict):
        raise _Bad("optimizer.state", "must be a mapping")
    for i, group in enumerate(groups):
        params = group.get("params")
        if not isinstance(params, list) or not all(_is_int(p) for p in params):
            raise _Bad(f"optimizer.param_groups[{i}].params", "must be a list of integers")
    if optimizer is None:
        return
    own = optimizer.param_groups
    if len(groups) != len(own):
        raise _Bad("optimizer.param_groups", f"has {len(groups)} group(s), this optimizer "
                   f"{len(own)}")
    shapes = {}
    for i, (group, mine) in enumerate(zip(groups, own)):
        if len(group["params"]) != len(mine["params"]):
            raise _Bad(f"optimizer.param_groups[{i}].params", f"has {len(group['params'])} "
                       f"parameters, this optimizer {len(mine['params'])}")
        shapes.update({key: tuple(p.shape) for key, p in zip(group["params"], mine["params"])})
    for key, entry in state.items():
        if key not in shapes or not isinstance(entry, dict):
            raise _Bad(f"optimizer.state[{key!r}]", "is not the state of one of the parameters")
        for name, value in entry.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                continue
            shape = _array_shape(value, f"optimizer.state[{key!r}][{name!r}]")
            if shape != shapes[key] and math.prod(shape) > 1:
                raise _Bad(f"optimizer.state[{key!r}][{name!r}]", f"has shape {shape}, its "
                           f"parameter {shapes[key]}")


def _check_ranks(ranks, world: int) -> None:
    if not isinstance(ranks, list) or len(ranks) != world:
        got = f"{len(ranks)} entries" if isinstance(ranks, list) else type(ranks).__name__
        raise _Bad("ranks", f"must be a list of one entry per rank of the {world} that wrote "
                   f"it, got {got}")
    for r, entry in enumerate(ranks):
        if not isinstance(entry, dict):
            raise _Bad(f"ranks[{r}]", "must be a mapping")
        sums = entry.get("sums")
        # running sums, epoch and interval: [loss, metric sums..., samples] each; an inf loss is
        # legitimate (a step skipped by the loss scaler)
        if not isinstance(sums, list) or len(sums) < 4 or len(sums) % 2 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in sums):
            raise _Bad(f"ranks[{r}].sums", "must be a list of an even number (at least 4) of "
                       "numbers")
        try:  # on scratch generators: nothing of this process's random state is touched
            np.random.default_rng().bit_generator.state = entry.get("rng")
            np.random.RandomState().set_state(tuple(entry.get("numpy_global_rng")))
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
            raise _Bad(f"ranks[{r}].rng", f"is not a valid generator state ({exc})") from None


def _check_position(pos: dict, history: list, *, epoch_samples, world_size, grad_accum) -> None:
    for name, minimum in _POSITION_INTS.items():
        _int(pos, "position", name, minimum)
    if not isinstance(pos.get("stopped", False), bool):
        raise _Bad("position.stopped", f"must be true or false, got {pos['stopped']!r}")
    if "samples_in_epoch" in pos:
        for name, minimum in _POSITION_NEW.items():
            _int(pos, "position", name, minimum)
        done, size = pos["samples_in_epoch"], pos["epoch_samples"]
        if done > size:
            raise _Bad("position.samples_in_epoch", f"is {done}, more than the {size} samples "
                       "of an epoch")
        if done and epoch_samples is not None and size != epoch_samples:
            raise _Bad("position.epoch_samples", f"is {size}, but this training set has "
                       f"{epoch_samples} samples: a run stopped mid-epoch can only continue on "
                       "the same data")
    else:  # written before the position was kept in samples
        done = _int(pos, "position", "batch_in_epoch", 0)
        same = (world_size in (None, pos["world_size"])
                and grad_accum in (None, pos["grad_accum"]))
        if done and not same:
            raise _Bad("position.batch_in_epoch", "counts micro-batches (written by an older "
                       "distprop that did not record the batch size), so this mid-epoch "
                       f"checkpoint can only be resumed on {pos['world_size']} rank(s) with "
                       f"--grad-accum {pos['grad_accum']}")
    least = pos["epoch"] + (1 if done else 0)  # every epoch, and a started one, took a step
    if pos["step"] < least:
        started = " and one started" if done else ""
        raise _Bad("position.step", f"is {pos['step']}, fewer than the {least} optimizer "
                   f"step(s) that {pos['epoch']} finished epoch(s){started} took at least")
    if len(history) != pos["epoch"]:
        raise _Bad("history", f"has {len(history)} epoch record(s), but position.epoch is "
                   f"{pos['epoch']}")


def check_state(state, source, *, model=None, optimizer=None, epoch_samples: int | None = None,
                world_size: int | None = None, grad_accum: int | None = None) -> dict:
    """Validate a loaded trainer checkpoint before anything of it is used; returns its position.

    Args:
        state: what :func:`distprop.train.checkpoint.load` returned.
        source: the file (or a name) for the messages.
        model, optimizer: when given, the checkpoint must hold their parameter names, shapes
            and groups.
        epoch_samples: the training set's size (a mid-epoch position needs the same one).
        world_size, grad_accum: the resuming run's (an old-format mid-epoch position needs the
            same ones).

    Raises:
        CheckpointError: ``checkpoint SOURCE is not usable: FIELD PROBLEM``.
    """
    try:
        if not isinstance(state, dict) or state.get("kind") != KIND:
            kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise _Bad("kind", f"is {kind!r}: a checkpoint, but not of a training run")
        model_state = _mapping(state, "model")
        _check_model(model_state, model)
        _check_optimizer(_mapping(state, "optimizer"), optimizer)
        for name, value in _mapping(state, "callbacks", required=False).items():
            if not isinstance(value, dict):
                raise _Bad(f"callbacks[{name!r}]", f"must be a mapping, got "
                           f"{type(value).__name__}")
        history = state.get("history", [])
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise _Bad("history", "must be a list of epoch records")
        pos = _mapping(state, "position")
        _check_position(pos, history, epoch_samples=epoch_samples, world_size=world_size,
                        grad_accum=grad_accum)
        if "ranks" not in state:
            raise _Bad("ranks", "is missing")
        _check_ranks(state["ranks"], pos["world_size"])
    except _Bad as bad:
        raise CheckpointError(f"checkpoint {source} is not usable: {bad.field} "
                              f"{bad.message}") from None
    return pos


def start_sample(pos: dict, batch_size: int, world_size: int, epoch_samples: int) -> int:
    """Samples of the epoch's global order consumed at ``pos`` (a checked position).

    An old-format position (micro-batches) is converted with this run's batch size and world
    size, which :func:`check_state` has made sure are the writer's when it is mid-epoch.
    """
    if "samples_in_epoch" in pos:
        return int(pos["samples_in_epoch"])
    return min(int(pos["batch_in_epoch"]) * batch_size * world_size, epoch_samples)


def describe_change(pos: dict, *, world_size: int, batch_size: int, grad_accum: int,
                    steps_per_epoch: int, start: int, epoch_samples: int,
                    notes: list[str]) -> str | None:
    """The resume log line when the run's geometry differs from the checkpoint's, else None."""
    old_world, old_accum = pos["world_size"], pos["grad_accum"]
    old_batch = pos.get("batch_size")
    new_global = batch_size * world_size * grad_accum
    old_global = None if old_batch is None else old_batch * old_world * old_accum
    if (old_world, old_accum) == (world_size, grad_accum) and old_batch in (None, batch_size):
        return None  # an old-format checkpoint did not record its batch: assumed unchanged

    def change(name, old, new):
        if old is None:
            return f"{name} {new}"
        return f"{name} {old} -> {new}" if old != new else f"{name} {new} (unchanged)"

    parts = [change("global batch", old_global, new_global),
             change("steps per epoch", pos.get("steps_per_epoch"), steps_per_epoch),
             *notes]
    where = (f"epoch {pos['epoch'] + 1} continues at sample {start} of {epoch_samples}, each "
             "remaining sample once" if start else f"from the start of epoch {pos['epoch'] + 1}")
    return (f"resuming on {world_size} rank(s) (grad_accum {grad_accum}) from a checkpoint "
            f"written by {old_world} rank(s) (grad_accum {old_accum}): {', '.join(parts)}; "
            f"{where}; each rank's random stream (dropout) starts afresh from (seed, rank, "
            f"step {pos['step']})")
