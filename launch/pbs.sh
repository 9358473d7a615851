#!/bin/bash
# PBS Pro / Torque: 2 nodes x 4 ranks, 8 cores per rank. Submit with:  qsub launch/pbs.sh
#PBS -N distprop
#PBS -l select=2:ncpus=32:mpiprocs=4
#   (Torque: #PBS -l nodes=2:ppn=32)
#PBS -l walltime=01:00:00
#PBS -j oe
set -euo pipefail
cd "${PBS_O_WORKDIR}"
source "${DISTPROP_VENV:-$HOME/venvs/distprop}/bin/activate"

# $PBS_NODEFILE lists one line per MPI slot; count them for -n.
NPROCS=$(wc -l < "${PBS_NODEFILE}")

# distprop launch picks the launcher (Hydra mpiexec or Open MPI) from `mpiexec --version`,
# passes the node file on, and sets 8 BLAS threads per rank.
distprop launch -n "${NPROCS}" --hostfile "${PBS_NODEFILE}" --threads-per-rank 8 -- \
    distprop train --model mlp --dataset digits --epochs 10 \
        --out "runs/pbs-${PBS_JOBID}" --resume auto
