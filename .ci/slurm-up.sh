#!/usr/bin/env bash
# Start the test SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, one slurmd per node) used by tests/test_launch.py
# and tests/test_multinode.py; apt-installs slurm-wlm, munge, slurmdbd and mariadb-server first if they are missing.
# Needs root.   bash .ci/slurm-up.sh [--nodes N]   (default 1: slurmd on this machine; N > 1: nodes mvnode1..N, each
# a network namespace with its own address, see tests/slurm_network.py). Idempotent: a running cluster of N nodes is
# left as is, one of another size is restarted. Configs, logs and PIDs live in ${MEGAVICTOR_SLURM_DIR:-/tmp/megavictor-slurm};
# to use sinfo/sbatch/sacct by hand: export SLURM_CONF=${MEGAVICTOR_SLURM_DIR:-/tmp/megavictor-slurm}/etc/slurm.conf
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m tests.slurm_cluster up "$@"
