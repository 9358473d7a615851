"""The training configuration: one dataclass filled from defaults, a TOML file, env and flags.

Precedence, lowest first: the dataclass defaults, ``--config FILE.toml``, ``DISTPROP_TRAIN_*``
environment variables, command-line flags. ``distprop train -n N`` writes the resolved
configuration to a file unique to the launch, which its ranks read (checked against its
SHA-256), and to ``<out>/config.json``, the record for the user.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from distprop.registry import (  # the names each option accepts, declared once
    COMMS,
    COMPRESSIONS,
    LOSSES,
    LR_SCHEDULES,
    MODELS,
    OPTIMIZERS,
    TASKS,
)

DEVICES = ("cpu", "cuda")
__all__ = ["COMMS", "COMPRESSIONS", "DEVICES", "LOSSES", "LR_SCHEDULES", "MODELS", "OPTIMIZERS",
           "TASKS", "ConfigError", "TrainConfig", "read_toml"]

class ConfigError(ValueError):
    """A configuration that cannot be trained; ``param`` names the option at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class TrainConfig:
    """Everything ``distprop train`` needs; field names match the long options.

    Batch sizes: ``batch_size`` is per rank and per micro-batch; the global batch of one
    optimizer step is ``batch_size * world_size * grad_accum``. Giving ``global_batch_size``
    instead derives ``batch_size`` (it must divide by ``world_size * grad_accum``).

    ``model`` is a zoo name or a factory ``package.module:callable`` (see
    :mod:`distprop.train.modelspec`, which also says which of ``hidden``, ``layers`` and
    ``channels`` each zoo model takes); ``task`` and ``loss`` are described in
    :mod:`distprop.train.tasks`.
    """

    model: str = "mlp"
    dataset: str = "digits"
    task: str = "classification"
    loss: str | None = None
    hidden: int | None = None
    layers: int | None = None
    channels: int | None = None
    epochs: int = 5
    batch_size: int | None = None
    global_batch_size: int | None = None
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    clip_grad_norm: float | None = None
    grad_accum: int = 1
    compression: str = "none"
    powersgd_rank: int = 1
    powersgd_start: int = 1000
    amp: str = "none"
    zero: bool = False
    device: str = "cpu"
    comm: str = "auto"
    seed: int = 0
    out: str = "runs/distprop"
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: str | None = None
    scale_lr: bool = False
    early_stopping: int = 0
    val_fraction: float | None = None
    test_fraction: float | None = None
    num_classes: int | None = None
    log_every: int = 10
    prefetch: int = 1
    nprocs: int = 1
    world_size: int = 1
    launch: dict = field(default_factory=dict)

    # --- building -------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict, source: str = "configuration") -> TrainConfig:
        """Build from a mapping, refusing unknown keys (dashes or underscores accepted)."""
        known = cls.field_names()
        clean = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{source}: unknown option {key!r}; known options: "
                                  + ", ".join(sorted(k.replace('_', '-') for k in known)))
            clean[name] = _checked_type(name, value, source)
        return cls(**clean)

    def updated(self, **values) -> TrainConfig:
        """A copy with the non-None values applied."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The configuration as the JSON text that :meth:`load_json` reads."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_json(self, path) -> Path:
        """Write the configuration atomically (no 0-byte or partial file on a full disk).

        Raises:
            distprop.fileio.WriteError: naming the file and the reason.
        """
        from distprop.fileio import atomic_write_text

        return atomic_write_text(path, self.to_json(), "configuration")

    @classmethod
    def load_json(cls, path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))

    # --- checks ---------------------------------------------------------------------------------

    def _validate_model_and_task(self) -> None:
        """``--model`` (zoo name or factory), size options, ``--task`` and ``--loss``."""
        from distprop.train import modelspec, tasks

        if self.model not in MODELS and not modelspec.is_factory(self.model):
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)} "
                              "or a factory 'package.module:callable'", "model")
        try:
            modelspec.check_sizes(self.model, self.hidden, self.layers, self.channels)
        except modelspec.ModelSpecError as exc:
            raise ConfigError(str(exc), exc.param) from None
        if self.task not in TASKS:
            raise ConfigError(TASKS.unknown(self.task), "task")
        try:
            tasks.check_loss(self.task, self.loss)
        except ValueError as exc:
            raise ConfigError(str(exc), "loss") from None
        if self.task == "regression" and self.num_classes is not None:
            raise ConfigError("--num-classes does not apply to --task regression (the model's "
                              "outputs are the targets' width)", "num-classes")

    def validate(self, world_size: int) -> TrainConfig:
        """Check names, ranges and batch arithmetic for ``world_size`` ranks.

        Returns a copy with ``batch_size``, ``global_batch_size`` and ``world_size`` resolved.

        Raises:
            ConfigError: naming the option and the valid choices or the arithmetic that fails.
        """
        self._validate_model_and_task()
        for name, value, registry in (("optimizer", self.optimizer, OPTIMIZERS),
                                      ("lr-schedule", self.lr_schedule, LR_SCHEDULES),
                                      ("compression", self.compression, COMPRESSIONS),
                                      ("comm", self.comm, COMMS)):
            if value not in registry:
                raise ConfigError(registry.unknown(value), name)
        if self.amp == "bfloat16":
            raise ConfigError("--amp bfloat16 is not available: NumPy and CuPy have no bfloat16 "
                              "dtype; use --amp float16", "amp")
        if self.amp not in ("none", "float16"):
            raise ConfigError(f"unknown amp {self.amp!r}; choose one of none, float16", "amp")
        if self.device.split(":")[0] not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose cpu, cuda or cuda:N",
                              "device")
        for name in ("epochs", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got "
                                  f"{getattr(self, name)}", name.replace("_", "-"))
        for name in ("checkpoint_every", "keep_checkpoints", "early_stopping", "prefetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got "
                                  f"{getattr(self, name)}", name.replace("_", "-"))
        if self.powersgd_rank < 1:
            raise ConfigError(f"--powersgd-rank must be at least 1, got {self.powersgd_rank}",
                              "powersgd-rank")
        if self.powersgd_start < 2:
            raise ConfigError(f"--powersgd-start must be at least 2 (PowerSGD's error feedback "
                              f"starts after plain averaging), got {self.powersgd_start}",
                              "powersgd-start")
        for name in ("momentum", "weight_decay"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got "
                                  f"{getattr(self, name)}", name.replace("_", "-"))
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"--num-classes must be at least 2, got {self.num_classes}",
                              "num-classes")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}", "lr")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"--clip-grad-norm must be positive, got {self.clip_grad_norm}",
                              "clip-grad-norm")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"--warmup-epochs must be in [0, epochs={self.epochs}], got "
                              f"{self.warmup_epochs}", "warmup-epochs")
        per_step = world_size * self.grad_accum
        if self.batch_size is not None and self.global_batch_size is not None:
            raise ConfigError("give --batch-size (per rank) or --global-batch-size, not both",
                              "global-batch-size")
        if self.global_batch_size is not None:
            gbs = self.global_batch_size
            if gbs < world_size:
                raise ConfigError(f"--global-batch-size {gbs} is smaller than the number of "
                                  f"ranks ({world_size}): every rank needs at least one sample",
                                  "global-batch-size")
            if gbs % per_step:
                raise ConfigError(f"--global-batch-size {gbs} is not divisible by ranks x "
                                  f"gradient accumulation = {world_size} x {self.grad_accum} = "
                                  f"{per_step}", "global-batch-size")
            batch = gbs // per_step
        else:
            batch = self.batch_size if self.batch_size is not None else 32
            if batch < 1:
                raise ConfigError(f"--batch-size must be at least 1, got {batch}", "batch-size")
        return dataclasses.replace(self, batch_size=batch, global_batch_size=batch * per_step,
                                   world_size=world_size)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a table"}


def _checked_type(name: str, value, source: str):
    """``value`` if it fits field ``name``'s type (ints pass as floats), else ConfigError."""
    hint = TrainConfig.__dataclass_fields__[name].type  # a string: "int | None", "float", ...
    allowed = [t for t in (int, float, str, bool, dict) if t.__name__ in hint.split(" | ")]
    if value is None and "None" in hint:
        return value
    for typ in allowed:
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
            return value
    want = " or ".join(_TYPE_NAMES[t] for t in allowed)
    raise ConfigError(f"{source}: option {name.replace('_', '-')!r} must be {want}, got "
                      f"{value!r}", name.replace("_", "-"))


def read_toml(path) -> dict:
    """The options in a TOML file: top-level keys, or a ``[train]`` table."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist", "config")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", "config") from exc
    if "train" in data and isinstance(data["train"], dict):
        data = data["train"]
    return data
