#!/bin/bash
# Plain mpirun on several nodes without a scheduler: passwordless ssh between the nodes, the same
# Python environment at the same path on every node (shared file system or identical installs).
#   bash launch/mpirun-multinode.sh node01 node02
set -euo pipefail
HOSTS=("$@")
RANKS_PER_NODE=${RANKS_PER_NODE:-2}
THREADS=${THREADS:-$(( $(nproc) / RANKS_PER_NODE ))}
HOSTLIST=$(printf "%s:${RANKS_PER_NODE}," "${HOSTS[@]}"); HOSTLIST=${HOSTLIST%,}
N=$(( ${#HOSTS[@]} * RANKS_PER_NODE ))

# Print the launcher command first (Hydra: -hosts/-genv; Open MPI: --host/-x), then run it.
distprop launch -n "${N}" -H "${HOSTLIST}" --threads-per-rank "${THREADS}" --dry-run -- \
    distprop train --model mlp --dataset digits --epochs 5 --out runs/multinode
distprop launch -n "${N}" -H "${HOSTLIST}" --threads-per-rank "${THREADS}" -- \
    distprop train --model mlp --dataset digits --epochs 5 --out runs/multinode

# The same thing with mpirun directly (Open MPI shown; for MPICH use -hosts and -genv):
#   mpirun -n 4 --host node01:2,node02:2 -x OMP_NUM_THREADS=4 -x OPENBLAS_NUM_THREADS=4 \
#       distprop train --model mlp --dataset digits --epochs 5 --out runs/multinode
