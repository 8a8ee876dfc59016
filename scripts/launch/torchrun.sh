#!/usr/bin/env bash
# Start `turbolm train` on this node of a (multi-node) job: torchrun with c10d rendezvous.
#
#   NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=node0 scripts/launch/torchrun.sh \
#       -c configs/default.yaml train.deepspeed=configs/deepspeed/zero2.json
#
# Run the same command on every node (any order; the rendezvous assigns node ranks).
# Arguments are passed to `turbolm train` unchanged.
#
# Environment:
#   NNODES          number of nodes, or MIN:MAX for an elastic job      (default 1)
#   NPROC_PER_NODE  worker processes on this node                       (default: "gpu" when
#                   nvidia-smi lists GPUs, else 1)
#   MASTER_ADDR     rendezvous host: one of the nodes, reachable by all (default 127.0.0.1)
#   MASTER_PORT     rendezvous port                                     (default 29500)
#   RDZV_ID         job id shared by all nodes of one job               (default turbolm)
#   MAX_RESTARTS    restarts of the whole worker group after a failure  (default 0); a
#                   restarted worker resumes from the newest complete checkpoint
#   TORCHRUN        torchrun executable                                 (default torchrun)
#   DRY_RUN=1       print the command (one argument per line) instead of running it
set -euo pipefail

die() { echo "torchrun.sh: error: $*" >&2; exit 2; }

nnodes="${NNODES:-1}"
addr="${MASTER_ADDR:-127.0.0.1}"
port="${MASTER_PORT:-29500}"
rdzv_id="${RDZV_ID:-turbolm}"
restarts="${MAX_RESTARTS:-0}"
if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    nproc="$NPROC_PER_NODE"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    nproc=gpu
else
    nproc=1
fi

[[ "$nnodes" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "NNODES must be N or MIN:MAX, got '$nnodes'"
[[ "$nproc" =~ ^([1-9][0-9]*|gpu)$ ]] || die "NPROC_PER_NODE must be a positive integer, got '$nproc'"
[[ "$port" =~ ^[0-9]+$ ]] && (( port > 0 && port < 65536 )) || die "MASTER_PORT must be a port number, got '$port'"
[[ "$restarts" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be an integer >= 0, got '$restarts'"
[[ -n "$addr" && "$addr" != -* ]] || die "MASTER_ADDR must be a host name or address, got '$addr'"
[[ "$rdzv_id" =~ ^[A-Za-z0-9_.-]+$ ]] || die "RDZV_ID may hold letters, digits, '_', '.', '-', got '$rdzv_id'"

cmd=(
    "${TORCHRUN:-torchrun}"
    --nnodes "$nnodes"
    --nproc_per_node "$nproc"
    --rdzv_backend c10d
    --rdzv_endpoint "$addr:$port"
    --rdzv_id "$rdzv_id"
    --max_restarts "$restarts"
    -m turbolm train
    "$@"
)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
