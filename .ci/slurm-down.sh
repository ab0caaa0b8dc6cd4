#!/usr/bin/env bash
# Cancel all jobs and stop the test SLURM cluster started by .ci/slurm-up.sh (by recorded PIDs).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m tests.slurm_cluster down
