"""A tiny per-rank Chrome-trace recorder.

Wrap the phases of a step in spans and load the file in a trace viewer (``chrome://tracing`` or
https://ui.perfetto.dev) to see where the time goes and how much communication overlaps compute::

    from distprop import trace

    trace.enable("trace.json")              # one file per rank: trace.rank0.json, ...
    with trace.span("forward"):
        out = model(x)
    with trace.span("wait", stream="comm", bucket=3):
        handle.wait()
    trace.save()

Each rank is one process row (``pid`` = rank); each stream is one thread row: ``compute`` for
forward/backward/optimizer, ``comm`` for communication. Blocking spans are what the calling thread
spent in a phase; *async* intervals (:func:`complete` with ``blocking=False``) mark work in flight
that the thread did not wait for, such as a bucket's allreduce from launch to completion.

When tracing is disabled (the default) :func:`span` returns a shared no-op context manager, so an
instrumented hot path pays one function call and one flag test per span.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

_STREAMS = {"compute": 0, "comm": 1}
#: Events kept per process; later ones are dropped (a long run would otherwise grow unbounded).
MAX_EVENTS = 2_000_000
#: Set to a path to trace every process that imports distprop.trace (``distprop train --trace``).
ENV_VAR = "DISTPROP_TRACE"


class _State:
    def __init__(self) -> None:
        self.enabled = False
        self.path: str | None = None
        self.rank = 0
        self.events: list[dict] = []
        self.origin_ns = time.perf_counter_ns()
        self.wall_origin_us = time.time_ns() / 1000.0
        self.lock = threading.Lock()


_state = _State()


def now_ns() -> int:
    """The clock spans use (``time.perf_counter_ns``)."""
    return time.perf_counter_ns()


def _us(t_ns: int) -> float:
    # Wall-clock microseconds, so traces of different ranks on one machine line up.
    return _state.wall_origin_us + (t_ns - _state.origin_ns) / 1000.0


def _tid(stream: str) -> int:
    tid = _STREAMS.get(stream)
    if tid is None:
        tid = _STREAMS[stream] = len(_STREAMS)
    return tid


def rank_from_env() -> int:
    """The MPI rank the launcher put in the environment (0 outside a launcher)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def rank_path(path: str | os.PathLike, rank: int) -> str:
    """The per-rank file for ``path``: ``{rank}`` is substituted, else ``.rank<N>`` is inserted
    before the suffix (``trace.json`` -> ``trace.rank1.json``)."""
    text = str(path)
    if "{rank}" in text:
        return text.format(rank=rank)
    p = Path(text)
    suffix = p.suffix or ".json"
    return str(p.with_name(f"{p.stem if p.suffix else p.name}.rank{rank}{suffix}"))


def enable(path: str | os.PathLike | None = None, rank: int | None = None) -> None:
    """Start recording. Events are kept in memory and, when ``path`` is given, written to the
    rank's file (see :func:`rank_path`) by :func:`save` or at interpreter exit.

    Args:
        path: where to write; None keeps events in memory only (see :func:`events`).
        rank: the process row; defaults to the MPI rank found in the launcher's environment.
    """
    _state.rank = rank_from_env() if rank is None else int(rank)
    _state.path = None if path is None else rank_path(path, _state.rank)
    _state.enabled = True


def disable() -> None:
    """Stop recording (events recorded so far are kept until :func:`clear`)."""
    _state.enabled = False


def is_enabled() -> bool:
    return _state.enabled


def clear() -> None:
    """Drop the events recorded so far."""
    with _state.lock:
        _state.events = []


def events() -> list[dict]:
    """A copy of the events recorded so far (Chrome-trace dicts, ``ts``/``dur`` in us)."""
    with _state.lock:
        return list(_state.events)


def take_events() -> list[dict]:
    """Return the events recorded so far and forget them."""
    with _state.lock:
        out, _state.events = _state.events, []
    return out


def complete(name: str, start_ns: int, end_ns: int, stream: str = "compute",
             blocking: bool = True, **args) -> None:
    """Record an interval measured by the caller with :func:`now_ns`.

    Args:
        name: the event name.
        start_ns, end_ns: ``now_ns()`` at its start and end.
        stream: the thread row (``"compute"`` or ``"comm"``).
        blocking: False for work in flight that the calling thread did not wait for.
        **args: shown in the viewer's detail pane.
    """
    if not _state.enabled or len(_state.events) >= MAX_EVENTS:
        return
    event = {"name": name, "ph": "X", "ts": _us(start_ns), "dur": (end_ns - start_ns) / 1000.0,
             "pid": _state.rank, "tid": _tid(stream), "cat": "blocking" if blocking else "async"}
    if args:
        event["args"] = args
    _state.events.append(event)


def instant(name: str, stream: str = "compute", **args) -> None:
    """Record a point in time."""
    if not _state.enabled:
        return
    event = {"name": name, "ph": "i", "s": "t", "ts": _us(now_ns()), "pid": _state.rank,
             "tid": _tid(stream)}
    if args:
        event["args"] = args
    _state.events.append(event)


class _Span:
    __slots__ = ("name", "stream", "args", "start")

    def __init__(self, name: str, stream: str, args: dict):
        self.name, self.stream, self.args = name, stream, args

    def __enter__(self):
        self.start = time.perf_counter_ns()
        return self

    def __exit__(self, *exc):
        complete(self.name, self.start, time.perf_counter_ns(), self.stream, True, **self.args)
        return False


class _NullSpan:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _NullSpan()


def span(name: str, stream: str = "compute", **args):
    """A context manager recording the time spent inside it as one blocking event."""
    if not _state.enabled:
        return _NULL
    return _Span(name, stream, args)


def _metadata(rank: int, tids: Iterable[int]) -> list[dict]:
    names = {v: k for k, v in _STREAMS.items()}
    meta = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}},
            {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}}]
    for tid in sorted(set(tids)):
        meta.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                     "args": {"name": names.get(tid, str(tid))}})
    return meta


def save(path: str | os.PathLike | None = None, events_: list[dict] | None = None) -> str | None:
    """Write ``{"traceEvents": [...]}`` to ``path`` (default: the path given to :func:`enable`).

    ``events_`` replaces the recorded events (e.g. the steps a benchmark kept).

    Returns the file written, or None when there is no path. The write is atomic (temporary file,
    then rename), so a viewer never sees half a file.
    """
    target = str(path) if path is not None else _state.path
    if target is None:
        return None
    evs = events() if events_ is None else events_
    doc = {"traceEvents": _metadata(_state.rank, [e["tid"] for e in evs if "tid" in e]) + evs,
           "displayTimeUnit": "ms"}
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{target}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, target)
    return target


def merge(paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> str:
    """Concatenate per-rank trace files into one file showing every rank (one row per rank)."""
    merged: list[dict] = []
    for p in paths:
        with open(p) as f:
            merged.extend(json.load(f)["traceEvents"])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump({"traceEvents": merged, "displayTimeUnit": "ms"}, f)
    return str(out)


def _save_at_exit() -> None:
    if _state.enabled and _state.path is not None and _state.events:
        try:
            save()
        except OSError as exc:  # never fail the program over its trace, but say it is missing
            logging.getLogger(__name__).warning(f"distprop trace: could not write "
                                                f"{_state.path}: {exc}")


atexit.register(_save_at_exit)

if os.environ.get(ENV_VAR):
    enable(os.environ[ENV_VAR])
