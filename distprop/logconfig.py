"""distprop's console messages through the standard :mod:`logging` module.

Every module logs to a child of the ``distprop`` logger (``logging.getLogger(__name__)``). The
``distprop`` logger carries one handler of its own, :class:`ConsoleHandler`: INFO and below go
to stdout, WARNING and above to stderr, each record filtered by :class:`RankFilter` (INFO from
rank 0 only, WARNING and above from every rank) and prefixed ``[rank r]`` when the job has more
than one rank; records do not propagate further, so the output is the same in every program.
An application that wants distprop's records in its own handlers calls
``configure(console=False)``: the console handler goes and the records propagate (add
:class:`RankFilter` to the application's handlers to keep the rank rules).

The level comes from :func:`configure` (``--log-level`` on the command line), else from the
``DISTPROP_LOG_LEVEL`` environment variable (inherited by the ranks of ``distprop train -n N``),
else INFO.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "distprop"
ENV_VAR = "DISTPROP_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error", "critical")


def launched_rank_and_size() -> tuple[int, int]:
    """This process's ``(rank, world size)`` from the launcher's environment ((0, 1) alone)."""
    from distprop.info import launched_rank, launched_size

    return launched_rank() or 0, launched_size()


def parse_level(value: str | int | None) -> int | None:
    """A level name (any case) or number as a :mod:`logging` level; None for None/empty.

    Raises:
        ValueError: an unknown name, naming the accepted ones.
    """
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    name = str(value).strip().lower()
    if name.isdigit():
        return int(name)
    if name not in LEVELS:
        raise ValueError(f"unknown log level {value!r}; choose one of {', '.join(LEVELS)}")
    return getattr(logging, name.upper())


class RankFilter(logging.Filter):
    """Keeps INFO and below from rank 0 only (every rank with ``all_ranks``) and WARNING and
    above from every rank; sets ``record.rank`` and ``record.rank_prefix`` (``"[rank r] "``
    when the world has more than one rank, else ``""``).

    Args:
        rank: this process's rank (default: from the launcher's environment).
        world_size: the number of ranks (default: from the launcher's environment).
        all_ranks: let INFO and below through on every rank.
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None,
                 all_ranks: bool = False):
        super().__init__()
        env_rank, env_size = launched_rank_and_size()
        self.rank = env_rank if rank is None else int(rank)
        self.world_size = env_size if world_size is None else int(world_size)
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        record.rank_prefix = f"[rank {self.rank}] " if self.world_size > 1 else ""
        return record.levelno >= logging.WARNING or self.all_ranks or self.rank == 0


class ConsoleHandler(logging.Handler):
    """INFO and below to ``sys.stdout``, WARNING and above to ``sys.stderr`` (looked up at each
    record, so redirections made later are followed), flushed after each record, filtered and
    prefixed by a :class:`RankFilter`."""

    def __init__(self, all_ranks: bool = False):
        super().__init__()
        self.setFormatter(logging.Formatter("%(rank_prefix)s%(message)s"))
        self.addFilter(RankFilter(all_ranks=all_ranks))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never end the program
            self.handleError(record)


def _handler(logger: logging.Logger) -> ConsoleHandler | None:
    return next((h for h in logger.handlers if isinstance(h, ConsoleHandler)), None)


def configure(level: str | int | None = None, *, all_ranks: bool = False,
              console: bool = True) -> logging.Logger:
    """Set up (or update) the ``distprop`` logger; returns it.

    Args:
        level: a name from :data:`LEVELS` or a :mod:`logging` level; None: ``DISTPROP_LOG_LEVEL``
            from the environment, else INFO.
        all_ranks: show INFO and below from every rank, not only rank 0.
        console: print through distprop's :class:`ConsoleHandler` (records do not propagate);
            False: no handler of distprop's own, records propagate to the application's.

    Raises:
        ValueError: an unknown level name (from the argument or the environment).
    """
    logger = logging.getLogger(LOGGER_NAME)
    resolved = parse_level(level)
    if resolved is None:
        resolved = parse_level(os.environ.get(ENV_VAR)) or logging.INFO
    logger.setLevel(resolved)
    old = _handler(logger)
    if old is not None:
        logger.removeHandler(old)
    if console:
        logger.addHandler(ConsoleHandler(all_ranks=all_ranks))
    logger.propagate = not console
    return logger


def _configure_default() -> None:
    """At import: the console handler at the environment's level (INFO when unset or bad)."""
    try:
        configure()
    except ValueError:
        configure(logging.INFO)


def log_level_option(func):
    """The ``--log-level`` click option (also ``DISTPROP_LOG_LEVEL``), for any command.

    Applied when parsed: it configures the ``distprop`` logger and exports the level to the
    environment, so that ranks launched by the command log at the same level.
    """
    import click

    def apply(ctx, param, value):
        level = value.lower() if value else None
        if level:
            os.environ[ENV_VAR] = level
        configure(level)

    return click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False),
                        default=None, envvar=ENV_VAR, expose_value=False, callback=apply,
                        help="Least severe console messages shown (INFO and below from rank 0 "
                             "only) [info; env DISTPROP_LOG_LEVEL].")(func)


_configure_default()  # on import (``import distprop``): the handler, at the environment's level
