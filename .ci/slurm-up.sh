#!/usr/bin/env bash
# Start the single-node test SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) used by tests/test_launch.py;
# apt-installs slurm-wlm, munge, slurmdbd and mariadb-server first if they are missing. Needs root. Idempotent: a
# running cluster is left as is. Configs, logs and PIDs live in ${MEGAVICTOR_SLURM_DIR:-/tmp/megavictor-slurm}; to
# use sinfo/sbatch/sacct by hand: export SLURM_CONF=${MEGAVICTOR_SLURM_DIR:-/tmp/megavictor-slurm}/etc/slurm.conf
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m tests.slurm_cluster up
