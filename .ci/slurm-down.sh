#!/usr/bin/env bash
# Cancel all jobs, stop the test SLURM cluster started by .ci/slurm-up.sh (by recorded PIDs) and remove the nodes'
# network namespaces, links and /etc/hosts entries; fails if any of them is left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m tests.slurm_cluster down
