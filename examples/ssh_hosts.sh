#!/bin/bash
# A sweep (or an ablation) on a few workstations over ssh: one worker per host.
#
#   HOSTS="gpu1 gpu2 gpu3" examples/ssh_hosts.sh              # sweep workers sharing one study
#   JOB=ablate HOSTS="gpu1 gpu2" examples/ssh_hosts.sh        # ablation workers sharing the variants
#
# Every host needs: this checkout at the same path (REPO) with its .venv, the one shared
# directory SHARED mounted at the same path, and (for the sweep) the one database DB_URL
# reachable. Each worker generates with vLLM on its host's GPUs and fine-tunes there. Its log
# goes to SHARED/logs/<host>.log; rerunning the script resumes (finished trials and variants
# are not run again; a dead host's trial or variant is taken over after --lease seconds).
set -euo pipefail

HOSTS="${HOSTS:-gpu1 gpu2}"
REPO="${REPO:-$(cd "$(dirname "$0")/.." && pwd)}"
SHARED="${SHARED:-/shared/codedistill}"
DB_URL="${DB_URL:-postgresql://codedistill:change-me@db-host:5432/codedistill}"
CONFIG="${CONFIG:-configs/btp_qwen2.5-coder.yaml}"
JOB="${JOB:-sweep}"
TRIALS="${TRIALS:-32}"
GPUS="${GPUS:-1}"

NODE="--set backend=vllm --set 'serving={tensor_parallel_size: $GPUS}' --set num_processes=$GPUS"
case "$JOB" in
  sweep) CMD="codedistill sweep $CONFIG --trials $TRIALS --storage '$DB_URL' --output-dir '$SHARED/sweep' --lease 600 $NODE" ;;
  ablate) CMD="codedistill ablate $CONFIG --variants all --worker --output-dir '$SHARED/ablation' --lease 600 $NODE" ;;
  *) echo "JOB must be sweep or ablate, not $JOB" >&2; exit 2 ;;
esac

mkdir -p "$SHARED/logs"
pids=()
for host in $HOSTS; do
  echo "starting a $JOB worker on $host"
  ssh "$host" "cd '$REPO' && { [ -n \"\${VIRTUAL_ENV:-}\" ] || . .venv/bin/activate; } && $CMD" \
    >"$SHARED/logs/$host.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
echo "all workers finished (status $status); logs in $SHARED/logs/"
exit $status
