"""The launcher's side of a supervised job: it owns its ranks and says why the job ended.

:func:`run_job` is what ``distprop launch`` and ``distprop train -n N`` run (through
:func:`distprop.launcher.run`). Around the MPI launcher (``mpiexec``, ``mpirun``, ``srun``) it sets
up three things:

* **The launcher dies, the job dies.** On Linux the launcher child gets a parent-death signal
  (``prctl(PR_SET_PDEATHSIG, SIGTERM)``): if ``distprop`` is killed by any signal, even SIGKILL,
  the kernel sends SIGTERM to ``mpiexec``, which stops its ranks (Hydra's proxies also kill their
  ranks when ``mpiexec``'s control connection drops, on every host). Ranks that called
  ``dist.init()`` also hold a connection to the launcher (below) and exit when it closes, which
  covers launchers that leave their tasks running. Open MPI's ``prterun`` takes the repeated
  parent-death signal of a dying multi-threaded parent as "abort now" and skips its ranks, so
  it runs under :mod:`distprop.reaper` instead (one SIGTERM when distprop dies, then it stops
  whatever ``prterun`` left behind).
* **A control channel** to the ranks, with preemption and the stall survey: see
  :mod:`distprop.control_channel`.
* **An explanation of the end.** Hydra (MPICH) prints a "BAD TERMINATION" banner with the PID,
  host and signal of a killed process on stdout and exits with the bare signal number; the
  launcher passes Hydra's stdout through, reads that banner, maps the PID to a rank with the
  registrations, prints one line (rank, host, PID, signal by name; for ``train`` that
  ``--resume auto`` continues from the last checkpoint) and returns 128 + the signal as a shell
  would (SIGKILL 137, SIGTERM 143). A rank that exited with a status, ranks that never reached
  ``dist.init()``, and a launcher stopped by SIGINT/SIGTERM (forwarded; 130/143) get their line
  too.

:func:`run_once` is one launch; :mod:`distprop.restarts` relaunches failed jobs
(``--max-restarts``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from distprop.control_channel import ENV_VAR, Supervisor, signal_name
from distprop.hydra_output import Banner, OutputCopier

# --- parent-death signal ------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def parent_death_signal(signum: int = signal.SIGTERM):
    """A ``preexec_fn`` that makes the child receive ``signum`` when this process dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)`` through ctypes); returns None elsewhere or when libc
    cannot be loaded. The signal follows the death of the *thread* that started the child, so
    call ``Popen`` from a thread that lives as long as the job (the launcher's main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), int(signum))

    return preexec


def reaper_path() -> str:
    """The file of :mod:`distprop.reaper`, run as a script (``python -I``) between distprop and
    Open MPI's launcher."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "reaper.py")


# --- running and explaining ---------------------------------------------------------------------


@dataclass
class Outcome:
    """How one launch of the job ended."""

    code: int  #: the exit code to report
    message: str | None  #: one line saying why (None: it simply succeeded)
    restartable: bool  #: a failure that ``--max-restarts`` may retry


def run_job(argv: list[str], env: dict[str, str], implementation: str, local: bool = True,
            resume_hint: str | None = None, stdin=None) -> int:
    """Run the launcher command under supervision; returns the job's exit code.

    Args:
        argv: the launcher command line.
        env: the complete environment for it.
        implementation: ``mpich``, ``openmpi`` or ``srun`` (Hydra's banner is read for mpich;
            Open MPI gets ``-x DISTPROP_SUPERVISOR`` so its ranks see the variable).
        local: every rank runs on this machine (the control channel stays on loopback).
        resume_hint: when a rank was killed, say this too (``train``: resume from checkpoint).
        stdin: the launcher child's stdin, as for ``subprocess.Popen`` (None: inherited).

    SIGINT received by the launcher is forwarded to the launcher child and the job returns 130.
    SIGTERM and SIGUSR1 are a preemption when every rank handles it (the trainer does): the
    ranks are asked over the control channel to stop at an agreed step and checkpoint it, and
    the job returns 143; otherwise they are forwarded too (143, 138). A job whose rank was
    killed by a signal returns 128 + that signal.

    Raises:
        OSError: the launcher cannot be started.
    """
    outcome = run_once(argv, env, implementation, local, stdin)
    _say(_with_hint(outcome, resume_hint))
    return outcome.code


def _with_hint(outcome: Outcome, hint: str | None) -> str | None:
    if outcome.message and hint and outcome.code not in (0, 2, 130) \
            and "--resume auto" not in outcome.message:
        return f"{outcome.message}. {hint}"
    return outcome.message


def _say(message: str | None) -> None:
    if message:
        try:
            sys.stdout.flush()
            print(f"distprop: {message}", file=sys.stderr, flush=True)
        except OSError:
            pass


PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def run_once(argv: list[str], env: dict[str, str], implementation: str, local: bool = True,
             stdin=None) -> Outcome:
    """One supervised launch (see :func:`run_job`); returns its :class:`Outcome` unprinted."""
    try:
        supervisor = Supervisor(local=local)
    except OSError as exc:  # no usable network stack: run unsupervised rather than not at all
        print(f"distprop: cannot open the control channel for the ranks ({exc}); they will not "
              "stop by themselves if this launcher dies", file=sys.stderr, flush=True)
        supervisor = Supervisor(listen=False)
    env = {k: v for k, v in env.items() if k != ENV_VAR}  # not an outer launcher's channel
    env.update(supervisor.env())
    if implementation == "openmpi" and supervisor.env():
        argv = [argv[0], "-x", ENV_VAR, *argv[1:]]
    read_banner = implementation in ("mpich", "openmpi")
    read_stderr = implementation == "openmpi"  # where prterun names a killed process
    keeper = None  # write end of the reaper's pipe: held until the launcher has ended
    if implementation == "openmpi":
        # prterun may leave its ranks running when distprop dies (distprop.reaper explains)
        reader, keeper = os.pipe()
        argv = [sys.executable, "-I", reaper_path(), str(reader), "--", *argv]
        extra = {"pass_fds": (reader,)}
    else:
        extra = {"preexec_fn": parent_death_signal(signal.SIGTERM)}
    try:
        proc = subprocess.Popen(argv, env=env, start_new_session=True, stdin=stdin,
                                stdout=subprocess.PIPE if read_banner else None,
                                stderr=subprocess.PIPE if read_stderr else None, **extra)
    except OSError:
        supervisor.close()
        if keeper is not None:
            os.close(keeper)
        raise
    finally:
        if keeper is not None:
            os.close(reader)
    supervisor.start()
    copier = OutputCopier(proc.stdout).start() if read_banner else None
    err_copier = OutputCopier(proc.stderr, 2).start() if read_stderr else None
    forwarded: list[int] = []
    preempting: list[int] = []

    def forward(signum, _frame):
        if signum in PREEMPT_SIGNALS and not forwarded and not preempting \
                and supervisor.preempt(signum):
            preempting.append(signum)
            print(f"distprop: received {signal_name(signum)}: asked every rank to stop after "
                  "its current step and checkpoint it (send it again to stop at once)",
                  file=sys.stderr, flush=True)
            return
        forwarded.append(signum)
        try:
            proc.send_signal(signal.SIGTERM if preempting and signum != signal.SIGINT
                             else signum)
        except ProcessLookupError:
            pass

    previous = {}
    for sig in (signal.SIGINT, *PREEMPT_SIGNALS):
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if keeper is not None:
            os.close(keeper)
    banner = None
    for reader, stream in ((copier, proc.stdout), (err_copier, proc.stderr)):
        if reader is not None:
            reader.join(5.0)
            stream.close()
            if banner is None or (banner.signal is None and (reader.banner.signal is not None
                                                             or reader.banner.rank is not None)):
                banner = reader.banner
    supervisor.close()
    if err_copier is not None and err_copier.mid_line:  # prterun may end on a bare " "
        try:
            sys.stderr.write("\n")
        except OSError:
            pass
    forwarded_signal = forwarded[0] if forwarded else None
    code, message = explain(code, supervisor, banner, forwarded_signal,
                            preempt_signal=preempting[0] if preempting else None)
    stopped_on_purpose = (forwarded_signal is not None or bool(preempting)
                          or supervisor.preempted() is not None)
    restartable = code not in (0, 2, 130) and not stopped_on_purpose
    return Outcome(code, message, restartable)


def _who(record) -> str:
    return f"rank {record.rank} (PID {record.pid} on {record.host})"


def explain(code: int, supervisor: Supervisor, banner: Banner | None,
            forwarded: int | None, resume_hint: str | None = None,
            preempt_signal: int | None = None) -> tuple[int, str | None]:
    """The job's exit code and one line saying why it ended (None when it simply succeeded).

    ``code`` is the launcher child's return code (negative: killed by that signal).
    ``preempt_signal``: the signal the launcher passed on to the ranks as a preemption.
    """
    stopped = supervisor.preempted()
    if stopped is not None and forwarded is None:
        info = stopped.preempted or {}
        if preempt_signal is not None:
            cause = f"the launcher received {signal_name(preempt_signal)}"
        else:
            cause = str(info.get("cause") or "requested")
        return 143, (f"preempted ({cause}): every rank stopped after step {info.get('step')} "
                     "and wrote its checkpoint; --resume auto continues from it (exit code 143)")
    if preempt_signal is not None and forwarded is None:
        if code == 0:
            return 0, (f"received {signal_name(preempt_signal)} as the job was finishing; it "
                       "completed")
        return 143, (f"received {signal_name(preempt_signal)} and asked the ranks to stop at a "
                     f"step, but the job ended without a preemption checkpoint (launcher "
                     f"status {code}); exit code 143")
    if forwarded is not None:
        return 128 + forwarded, (f"received {signal_name(forwarded)}; forwarded it to the ranks "
                                 f"and stopped the job (exit code {128 + forwarded})")
    if code < 0:  # the launcher child itself was killed
        return 128 - code, (f"the MPI launcher was killed by {signal_name(-code)}; the job "
                            f"ended (exit code {128 - code})")
    if code == 0:
        return 0, None
    timed_out = [r for r in supervisor.ranks.values() if r.timed_out is not None]
    if timed_out:
        size = max((r.size or 0 for r in supervisor.ranks.values()), default=0)
        missing = [r for r in range(size) if r not in supervisor.ranks]
        waited = max(r.timed_out for r in timed_out)
        gave_up = ", ".join(str(r.rank) for r in sorted(timed_out, key=lambda r: r.rank))
        if missing:
            absent = (f"rank(s) {', '.join(map(str, missing))} never reached dist.init() (exited "
                      "or stuck before it)")
        else:
            absent = "some rank never finished MPI initialisation"
        return code, (f"{absent}; rank(s) {gave_up} gave up waiting after {waited:.0f} s "
                      f"(DISTPROP_INIT_TIMEOUT); exit code {code}")
    if supervisor.stall is not None:
        from distprop.distributed.lifeline import missing_ranks

        asker = supervisor.stall["askers"][0]
        phrases = missing_ranks(supervisor.stall, asker)
        who = "; ".join(phrases) if phrases else "no rank stood out (all answered)"
        message = (f"the job stalled: rank {asker}'s stall watchdog fired and ended it; not heard "
                   f"from: {who} (exit code {code})")
        return code, message
    if banner is not None and banner.signal is not None:
        record = supervisor.by_pid(banner.pid, banner.host) if banner.pid else None
        if record is not None:
            who = _who(record)
        else:
            who = (f"a rank (PID {banner.pid} on {banner.host}; which one is unknown: it had "
                   "not registered through dist.init())")
        sig = banner.signal
        what = f"{who} was killed by {signal_name(sig)} (signal {sig})"
        first = supervisor.first_unannounced_drops()
        if record is not None and len(first) == 1 and first[0] is not record:
            # Hydra's banner names the first failed process in rank order, which can be one it
            # stopped after the rank that really died: the lifelines say who went first
            what = (f"{_who(first[0])} died first (killed by a signal; MPI's launcher then "
                    f"reported {signal_name(sig)} for rank {record.rank})")
        elif record is not None and len(first) > 1 and record in first:
            others = ", ".join(_who(r) for r in first if r is not record)
            what += (f", as MPI's launcher reports; {others} stopped at the same moment, so "
                     "which of them died first is unknown")
        elif sig == signal.SIGKILL:
            what += ", e.g. by the out-of-memory killer"
        message = f"{what}; the other ranks were stopped (exit code {128 + sig})"
        if resume_hint:
            message += f". {resume_hint}"
        return 128 + sig, message
    leaver = supervisor.first("exit")
    if leaver is not None and leaver.exit_code:
        return code, (f"{_who(leaver)} exited with status {leaver.exit_code} while other ranks "
                      f"were running; the job was ended (exit code {code})")
    if banner is not None and banner.rank is not None and banner.exit_code and \
            banner.rank not in supervisor.ranks:  # Open MPI's report; it stops the job at once
        when = "before it reached dist.init()" if supervisor.ranks else \
            "(no rank had reached dist.init())"
        return code, (f"rank {banner.rank} exited with status {banner.exit_code} {when}; the "
                      f"other ranks were stopped (exit code {code})")
    return code, None
