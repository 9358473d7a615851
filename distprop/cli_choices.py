"""The CLI's view of :mod:`distprop.registry`: choices, help texts and epilogs read when shown.

Nothing here copies a list of names: a name registered after the CLI was built (a plugin, a
test) appears in ``--help`` and is accepted, one unregistered disappears.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping

import click

from distprop import registry


class RegistryChoice(click.Choice):
    """``click.Choice`` over the current names of a :class:`~distprop.registry.Registry`."""

    def __init__(self, names: Mapping, case_sensitive: bool = True):
        self.registry = names
        super().__init__(tuple(names), case_sensitive=case_sensitive)

    @property
    def choices(self) -> tuple:
        return tuple(self.registry)

    @choices.setter
    def choices(self, _value) -> None:  # click's __init__ assigns a copy: keep reading the registry
        pass


class LiveHelpOption(click.Option):
    """An option whose help text is ``help_fn()``, built each time the help is shown."""

    def __init__(self, *args, help_fn: Callable[[], str], **kwargs):
        self.help_fn = help_fn
        super().__init__(*args, **kwargs)

    @property
    def help(self) -> str:
        return self.help_fn()

    @help.setter
    def help(self, _value) -> None:
        pass


def optimizer_help() -> str:
    """``--optimizer``: the registered names."""
    return f"Optimizer: {', '.join(registry.OPTIMIZERS)} [default: sgd]."


def lr_help() -> str:
    """``--lr``: each optimizer's default rate, from the registry."""
    rates: dict[float, list[str]] = {}
    for name, entry in registry.OPTIMIZERS.items():
        rates.setdefault(entry.default_lr, []).append(name)
    return "Learning rate [default: " + "; ".join(
        f"{rate:g} for {', '.join(names)}" for rate, names in rates.items()) + "]."


def momentum_help() -> str:
    """``--momentum``: the optimizers that take it, from the registry."""
    takes = [name for name, entry in registry.OPTIMIZERS.items() if entry.momentum]
    return f"Momentum of {', '.join(takes)} (ignored by the others) [0.9]."


def schedule_help() -> str:
    """``--lr-schedule``: every schedule with what it does."""
    return ("LR schedule, on the fraction of training done: " + "; ".join(
        f"{name}: {entry.description}" for name, entry in registry.LR_SCHEDULES.items())
        + " [default: cosine].")


def compression_help() -> str:
    """``--compression``: every registered communication hook with what it does."""
    return ("Gradient compression (a DDP communication hook): " + "; ".join(
        f"{name}: {entry.description}" for name, entry in registry.COMPRESSIONS.items())
        + " [none].")


def comm_help() -> str:
    """``--comm``: every registered communicator with what it does."""
    return ("How gradients are reduced: " + "; ".join(
        f"{name}: {entry.description}" for name, entry in registry.COMMS.items()) + " [auto].")


class SizeOption(click.Option):
    """``--hidden``/``--layers``/``--channels``: the help lists, from the model registry, what
    the option sets in each zoo model that takes it."""

    def __init__(self, *args, **kwargs):
        self._template = ""
        super().__init__(*args, **kwargs)

    @property
    def help(self) -> str:
        option = getattr(self, "name", None)
        uses = [f"{name}: {spec.size_options[option]}"
                for name, spec in registry.MODELS.items() if option in spec.size_options]
        return f"{self._template} ({'; '.join(uses)})." if uses else self._template

    @help.setter
    def help(self, value) -> None:
        self._template = value or ""


class EpilogCommand(click.Command):
    """A command whose epilog is ``epilog_fn()``, built each time the help is shown."""

    def __init__(self, *args, epilog_fn: Callable[[], str], **kwargs):
        self.epilog_fn = epilog_fn
        super().__init__(*args, **kwargs)

    @property
    def epilog(self) -> str:
        return self.epilog_fn()

    @epilog.setter
    def epilog(self, _value) -> None:
        pass


class EnvGroup(click.Group):
    """A group whose help ends with every ``DISTPROP_*`` environment variable and its meaning
    (:data:`distprop.registry.ENV_VARS`)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        with formatter.section("Environment variables"):
            formatter.write_dl([(name, entry.description)
                                for name, entry in registry.ENV_VARS.items()])


def size_options_line(indent: int = 14, width: int = 96) -> str:
    """``mlp --hidden --layers; cnn --channels; ...; wide none`` from the model registry,
    wrapped at ``width`` with continuation lines indented by ``indent`` spaces."""
    items = [f"{name} " + (" ".join(f"--{o}" for o in spec.size_options) or "none")
             for name, spec in registry.MODELS.items()]
    return textwrap.fill("; ".join(items), width=width - indent,
                         subsequent_indent=" " * indent, break_on_hyphens=False,
                         break_long_words=False)
