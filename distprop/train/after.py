"""After training: evaluate, predict with and export the model of a ``distprop train`` run.

A run directory (the ``--out`` of ``distprop train``) holds ``summary.json`` (written at the end:
configuration, sample shape, class count, test metrics) and/or ``config.json`` (written before a
launch with ``-n``), and ``checkpoints/checkpoint-<step>.npz``. :func:`open_run` reads the
configuration; :func:`load_model` rebuilds the model exactly as training built it
(:func:`distprop.train.adapt.model_for` with the run's model name, sample shape and class count)
and loads a checkpoint into it, the newest one that verifies unless another is named.

* :func:`evaluate` -- loss and accuracy on the run's own test split (same dataset, seed,
  fractions and preprocessing, through :func:`distprop.train.run.load_data`), reduced over the
  ranks by :meth:`distprop.train.trainer.Trainer.evaluate`: on the last checkpoint it gives the
  test numbers of ``summary.json``.
* :func:`predict` -- logits or softmax probabilities for new samples, float32.
* :func:`export` -- the weights alone as safetensors or ``.npz``, with PyTorch's keys and dtypes.

Every problem a user can cause (not a run directory, no usable checkpoint, a dataset or input of
another shape) raises :class:`RunError` with one line naming it; the CLI exits 2 on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distprop import fileio
from distprop.data import sources
from distprop.train import checkpoint as ckpt
from distprop.train.config import ConfigError, TrainConfig

SPLITS = ("test", "val", "train")
FORMATS = ("safetensors", "npz")


class RunError(ValueError):
    """A run directory, checkpoint, dataset or input that cannot be used (a usage error)."""


@dataclass
class Run:
    """What a run directory says about its model and data.

    Attributes:
        directory: the run directory.
        config: the training configuration (from ``summary.json``, else ``config.json``).
        summary: ``summary.json`` when the run finished, else None.
        input_shape: one sample's shape, None until known (from the summary or the data).
        num_classes: the model's outputs (classes, or target columns of a regression run),
            None until known.
    """

    directory: Path
    config: TrainConfig
    summary: dict | None
    input_shape: tuple[int, ...] | None
    num_classes: int | None

    @property
    def checkpoint_dir(self) -> Path:
        return self.directory / "checkpoints"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise RunError(f"{path} does not hold a JSON object")
    return value


def open_run(run_dir) -> Run:
    """Read a run directory's configuration and, when present, its summary.

    Raises:
        RunError: not a directory, or neither ``summary.json`` nor ``config.json`` in it, or
            either is unreadable.
    """
    directory = Path(run_dir)
    if not directory.is_dir():
        raise RunError(f"{directory} is not a directory; expected a run directory (the --out of "
                       "distprop train)")
    summary_path, config_path = directory / "summary.json", directory / "config.json"
    if not summary_path.is_file() and not config_path.is_file():
        raise RunError(f"{directory} is not a distprop run directory: it holds neither "
                       "summary.json nor config.json (distprop train writes them into --out)")
    summary = _read_json(summary_path) if summary_path.is_file() else None
    source = summary_path if summary is not None else config_path
    values = summary.get("config") if summary is not None else _read_json(config_path)
    if not isinstance(values, dict):
        raise RunError(f"{source} holds no training configuration")
    try:
        config = TrainConfig.from_dict(values, str(source))
    except (ConfigError, TypeError) as exc:
        raise RunError(str(exc)) from None
    shape = classes = None
    if summary is not None:
        try:
            shape = tuple(int(s) for s in summary["input_shape"])
            outputs = summary.get("num_outputs")  # regression runs: the targets' width
            classes = int(outputs if outputs is not None else summary["num_classes"])
        except (KeyError, TypeError, ValueError):
            raise RunError(f"{summary_path} lacks a valid input_shape/num_classes") from None
    return Run(directory, config, summary, shape, classes)


def load_data(run: Run, dataset: str | None = None) -> sources.DataSplits:
    """The run's dataset (or ``dataset`` instead), split as in training; fills in the run's
    sample shape and class count when the summary did not have them.

    Raises:
        RunError: the dataset cannot be read, or its samples or classes do not fit the model.
    """
    from distprop.train import run as run_mod

    cfg = run.config
    if dataset is not None:
        cfg = cfg.updated(dataset=dataset)
        if run.num_classes is not None and dataset not in sources.DATASETS:
            cfg = cfg.updated(num_classes=run.num_classes)  # labels checked against the model
    try:
        splits = run_mod.load_data(cfg)
    except sources.DataError as exc:
        hint = "" if dataset is not None else " (the run's dataset; pass --dataset to use another)"
        raise RunError(f"{exc}{hint}") from None
    if run.input_shape is None:
        run.input_shape, run.num_classes = tuple(splits.input_shape), int(splits.num_classes)
    if tuple(splits.input_shape) != run.input_shape:
        raise RunError(f"dataset {cfg.dataset} has samples of shape {tuple(splits.input_shape)}; "
                       f"the run's model takes {run.input_shape}")
    if cfg.task == "regression" and splits.num_classes != run.num_classes:
        raise RunError(f"dataset {cfg.dataset} has {splits.num_classes} target column(s); the "
                       f"run's model has {run.num_classes} outputs")
    if splits.num_classes > run.num_classes:
        raise RunError(f"dataset {cfg.dataset} has {splits.num_classes} classes; the run's model "
                       f"has {run.num_classes} outputs")
    return splits


def find_checkpoint(run: Run, path=None, log=None) -> Path:
    """``path``, or the newest checkpoint of the run that verifies (damaged ones are skipped
    with a message through ``log``).

    Raises:
        RunError: ``path`` does not exist, or the run has no usable checkpoint.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RunError(f"checkpoint {path} does not exist")
        return path
    found = ckpt.latest_valid(run.checkpoint_dir, log=log)
    if found is None:
        held = len(ckpt.list_checkpoints(run.checkpoint_dir))
        why = f"none of its {held} checkpoint(s) verifies" if held else "it has no checkpoints"
        raise RunError(f"no valid checkpoint in {run.checkpoint_dir}: {why}")
    return found


def load_weights(path) -> dict:
    """The model weights in ``path``: a training checkpoint (``.npz`` written by distprop train)
    or a ``.safetensors`` file. Raises :class:`RunError` naming the file otherwise."""
    from distprop import weights

    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return weights.load_safetensors(path)
        except (weights.WeightsError, ImportError) as exc:
            raise RunError(str(exc)) from None
    try:
        state = ckpt.load(path)
    except ckpt.CheckpointError as exc:
        raise RunError(str(exc)) from None
    if not isinstance(state, dict) or state.get("kind") != "distprop-trainer" or \
            not isinstance(state.get("model"), dict):
        raise RunError(f"{path} is a distprop checkpoint but not one of a training run (no model "
                       "state in it)")
    return state["model"]


def build_model(run: Run):
    """The run's model, freshly initialised (as ``distprop train`` built it: zoo model with the
    run's size options, or the run's factory, which must still be importable)."""
    from distprop.train.modelspec import build, is_factory

    if run.input_shape is None:
        load_data(run)  # an unfinished run: the data tell the sample shape and class count
    cfg = run.config
    try:
        return build(cfg.model, run.input_shape, run.num_classes, hidden=cfg.hidden,
                     layers=cfg.layers, channels=cfg.channels)
    except ValueError as exc:
        hint = " (a factory is imported from the current directory or PYTHONPATH, as in " \
            "training)" if is_factory(cfg.model) else ""
        raise RunError(f"cannot rebuild the run's model: {exc}{hint}") from None


def load_model(run: Run, checkpoint=None, log=None):
    """The run's model with the weights of ``checkpoint`` (default: newest valid), in eval mode.

    Returns:
        ``(model, checkpoint_path)``.

    Raises:
        RunError: no usable checkpoint, or one holding another model.
    """
    path = find_checkpoint(run, checkpoint, log=log)
    state = load_weights(path)
    model = build_model(run)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise RunError(f"{path} holds a different model than the run's {run.config.model} for "
                       f"samples {run.input_shape} and {run.num_classes} classes ({detail})") \
            from None
    model.eval()
    return model, path


def evaluate(run: Run, checkpoint=None, dataset: str | None = None, split: str = "test",
             batch_size: int = 256, comm=None, log=None) -> dict:
    """Loss and metrics of the run's model on a split of its dataset, over the ranks of
    ``comm`` (default: the world; one process is a world of one), with the run's loss.

    Returns:
        ``{"loss", "accuracy", "samples", "split", "dataset", "checkpoint"}`` (a regression
        run: ``"r2"`` and ``"mae"`` instead of ``"accuracy"``).

    Raises:
        RunError: see :func:`load_model` and :func:`load_data`; an empty split.
    """
    from distprop import optim
    from distprop.train import tasks
    from distprop.train.trainer import Trainer

    if split not in SPLITS:
        raise RunError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise RunError(f"batch size must be at least 1, got {batch_size}")
    splits = load_data(run, dataset)
    part = getattr(splits, split)
    if part is None or len(part) == 0:
        raise RunError(f"dataset {dataset or run.config.dataset} has no {split} split with the "
                       "run's fractions")
    model, path = load_model(run, checkpoint, log=log)
    # A Trainer only for its evaluate(), which reduces the sums over the ranks; lr 0, no steps.
    cfg = run.config
    trainer = Trainer(model, tasks.loss_fn(cfg.task, cfg.loss),
                      optim.SGD(model.parameters(), lr=0.0), comm=comm, seed=cfg.seed,
                      metrics=tasks.metrics(cfg.task), progress=False)
    result = trainer.evaluate(part, batch_size=batch_size)
    result.update(split=split, dataset=dataset or run.config.dataset, checkpoint=str(path))
    return result


def prepare_inputs(run: Run, x, source: str = "input") -> np.ndarray:
    """What training fed the model: samples of the run's shape as float32 (as
    :class:`~distprop.data.TensorDataset` casts them); the model itself reshapes (adapt's views).

    Raises:
        RunError: not numeric, another sample shape (naming both shapes), or NaN/inf.
    """
    if run.input_shape is None:
        load_data(run)
    x = np.asarray(x)
    want = (-1, *run.input_shape)
    shown = "(N, " + ", ".join(str(s) for s in run.input_shape) + ")"
    if x.dtype.kind not in "biuf":
        raise RunError(f"{source} has dtype {x.dtype}; expected numbers")
    if x.ndim != len(want) or tuple(x.shape[1:]) != tuple(run.input_shape):
        extra = "; add a batch dimension for one sample" if tuple(x.shape) == run.input_shape \
            else ""
        raise RunError(f"{source} has shape {tuple(x.shape)}; the run's model takes {shown}"
                       f"{extra}")
    x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    if bad.any():
        raise RunError(f"{source} has a non-finite value (NaN or inf) in sample "
                       f"{int(np.argmax(bad))}")
    return x


def predict(model, x: np.ndarray, probs: bool = False, batch_size: int = 256) -> np.ndarray:
    """The model's logits (or softmax probabilities) for prepared inputs, float32, (N, classes)."""
    from distprop import backend
    from distprop.ops import softmax
    from distprop.tensor import Tensor, no_grad

    model.eval()
    outputs = []
    with no_grad():
        for start in range(0, x.shape[0], batch_size):
            out = model(Tensor(x[start : start + batch_size]))
            if probs:
                out = softmax(out, dim=-1)
            outputs.append(np.asarray(backend.to_host(out.data), dtype=np.float32))
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs, axis=0)


def read_inputs(path) -> np.ndarray:
    """An ``.npy`` input file, header checked against the size first, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"input file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            fileio.read_npy_layout(fh, path.stat().st_size, str(path))
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise RunError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None


def write_array(path, array: np.ndarray, what: str = "predictions") -> Path:
    """Write ``array`` as ``.npy`` atomically (a failed write leaves no partial file)."""
    return fileio.atomic_write(Path(path), lambda f: np.save(f, array, allow_pickle=False), what)


def export(run: Run, out, fmt: str | None = None, checkpoint=None, log=None) -> tuple[Path, Path]:
    """Write the run's model weights (no optimizer state) as ``safetensors`` or ``npz``.

    Keys and dtypes are those of ``model.state_dict()``, which follow PyTorch. The safetensors
    header also records the model name, sample shape, class count and architecture.

    Returns:
        ``(written_file, checkpoint_used)``.

    Raises:
        RunError: unknown format, no usable checkpoint, a checkpoint of another model.
        ImportError: safetensors requested but the package is missing.
        distprop.fileio.WriteError: the file cannot be written.
    """
    from distprop import weights

    out = Path(out)
    if fmt is None:
        fmt = out.suffix.lstrip(".")
        if fmt not in FORMATS:
            raise RunError(f"cannot tell the format from {out.name!r}; pass --format "
                           f"{' or '.join(FORMATS)} (or name the file .safetensors / .npz)")
    if fmt not in FORMATS:
        raise RunError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "safetensors":
        weights._safetensors()  # the ImportError before any work
    model, path = load_model(run, checkpoint, log=log)
    state = {k: np.ascontiguousarray(v.numpy()) for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        meta = {"distprop_model": run.config.model, "task": run.config.task,
                "input_shape": json.dumps(list(run.input_shape)),
                "num_classes": str(run.num_classes), "checkpoint": path.name,
                "architecture": repr(model)}
        return weights.save_safetensors(state, out, metadata=meta), path
    written = fileio.atomic_write(out, lambda f: np.savez(f, **state), "weights")
    return written, path
