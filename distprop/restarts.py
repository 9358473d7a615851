"""``--max-restarts``: relaunch a failed job, as torchrun does.

:func:`run_with_restarts` wraps :func:`distprop.supervise.run_once`: a rank or host that fails
(any non-zero exit but a usage error, a user interrupt or a preemption) ends the job, and the
launcher waits ``--restart-delay`` seconds and launches it again (``distprop train``: with
``--resume auto``; every launch gets ``DISTPROP_RESTART_COUNT=k``). The caller holds the run
directory's lock across the attempts.
"""

from __future__ import annotations

import signal
import threading

from distprop.control_channel import signal_name
from distprop.supervise import PREEMPT_SIGNALS, _say, _with_hint, run_once

RESTART_COUNT_VAR = "DISTPROP_RESTART_COUNT"


def run_with_restarts(start, implementation: str, local: bool = True,
                      resume_hint: str | None = None, stdin=None, max_restarts: int = 0,
                      restart_delay: float = 0.0) -> int:
    """Run the job, relaunching it up to ``max_restarts`` times after a failure.

    ``start(k)`` gives ``(argv, env)`` of attempt ``k`` (0 is the first launch; ``env`` gets
    ``DISTPROP_RESTART_COUNT=k``). A failure is a non-zero exit that is not a usage error (2),
    not a user interrupt (SIGINT, 130; a signal the launcher forwarded) and not a preemption
    (the job was asked to stop). Before each restart the launcher prints which restart it is
    and the previous failure's line, waits ``restart_delay`` seconds (SIGINT/SIGTERM during the
    wait stop it: 130/143), and launches again. Returns the last attempt's exit code.
    """
    attempt = 0
    while True:
        argv, env = start(attempt)
        env = {**env, RESTART_COUNT_VAR: str(attempt)}
        outcome = run_once(argv, env, implementation, local, stdin)
        if not outcome.restartable or attempt >= max_restarts:
            _say(_with_hint(outcome, resume_hint))
            if outcome.restartable and max_restarts:
                _say(f"gave up after {max_restarts} restart(s) (--max-restarts)")
            return outcome.code
        attempt += 1
        reason = outcome.message or f"the job exited with status {outcome.code}"
        stopped = _interruptible_sleep(  # the handlers are in place before the line is out
            restart_delay, f"restart {attempt} of {max_restarts} in {restart_delay:g} s "
            f"(--max-restarts) after: {reason}")
        if stopped is not None:
            _say(f"received {signal_name(stopped)} while waiting to restart; not restarting "
                 f"(exit code {128 + stopped})")
            return 128 + stopped


def _interruptible_sleep(seconds: float, announce: str) -> int | None:
    """Say ``announce``, then sleep; a SIGINT/SIGTERM/SIGUSR1 ends it early and is returned
    (else None). The signal handlers are installed before the line is printed, so a signal
    sent on seeing it is never lost."""
    got: list[int] = []
    woke = threading.Event()

    def handler(signum, _frame):
        got.append(signum)
        woke.set()

    previous = {}
    for sig in (signal.SIGINT, *PREEMPT_SIGNALS):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:
            pass
    try:
        _say(announce)
        woke.wait(max(0.0, seconds))
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return got[0] if got else None
