#!/usr/bin/env bash
# Start `turbolm train` on the hosts of a DeepSpeed hostfile with the `deepspeed` launcher.
#
#   scripts/launch/deepspeed_multinode.sh HOSTFILE [turbolm train arguments...]
#
# HOSTFILE lists one node per line as `HOST slots=N` (N = processes, usually GPUs, on it);
# blank lines and `# comments` are allowed. It is checked first: a bad line stops here with
# one message naming the line.
#
# Two modes:
#   * ssh (default): run once, on the first host; the launcher reaches the other hosts
#     through passwordless ssh (pdsh) and starts `deepspeed.launcher.launch` on each.
#   * no ssh: set NODE_RANK and run the same command on every host, NODE_RANK=0 on the
#     first host of the hostfile, 1 on the second, ...
#
# Environment:
#   MASTER_ADDR  address of the first host, reachable from all  (default: its hostfile name)
#   MASTER_PORT  port for the process group                     (default 29500)
#   NODE_RANK    this host's line in the hostfile, from 0: switches to no-ssh mode
#   DEEPSPEED    deepspeed launcher executable                  (default deepspeed)
#   PYTHON       python with turbolm installed                  (default python3)
#   DRY_RUN=1    print the command (one argument per line) instead of running it
set -euo pipefail

die() { echo "deepspeed_multinode.sh: error: $*" >&2; exit 2; }

(( $# >= 1 )) || die "usage: $0 HOSTFILE [turbolm train arguments...]"
hostfile="$1"
shift
python="${PYTHON:-python3}"

# Validate the hostfile (one clear message on a bad line) and read its hosts.
hosts_text="$("$python" -m turbolm.train.distributed hostfile "$hostfile" 2>&1)" \
    || die "${hosts_text#error: }"
mapfile -t hosts <<<"$hosts_text"
first_host="${hosts[0]%% *}"

addr="${MASTER_ADDR:-$first_host}"
port="${MASTER_PORT:-29500}"
[[ "$port" =~ ^[0-9]+$ ]] && (( port > 0 && port < 65536 )) || die "MASTER_PORT must be a port number, got '$port'"
[[ -n "$addr" && "$addr" != -* ]] || die "MASTER_ADDR must be a host name or address, got '$addr'"

cmd=("${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --master_addr "$addr" --master_port "$port")
if [[ -n "${NODE_RANK:-}" ]]; then
    [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < ${#hosts[@]} )) \
        || die "NODE_RANK must be 0..$(( ${#hosts[@]} - 1 )) (the hostfile lists ${#hosts[@]} hosts), got '$NODE_RANK'"
    cmd+=(--no_ssh --node_rank "$NODE_RANK")
fi
# turbolm reads its rank from the environment: no --local_rank argument.
cmd+=(--no_local_rank --module turbolm train "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
