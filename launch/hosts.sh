#!/usr/bin/env bash
# Several nodes from a hostfile:  launch/hosts.sh HOSTFILE NP CONFIG [train args...]
# HOSTFILE lines are "hostname slots=N" (Horovod's format). Every node needs the same checkout
# at the same path with its .venv installed (launch/install.sh), password-less ssh from this
# node, and the data (DISTBN_DATA_DIR or the cache). --resume needs the run directory on a
# shared filesystem.
#   IFACE=eth0 launch/hosts.sh hosts.txt 8 configs/lenet_syncbn.yaml
# IFACE picks the network interface Gloo uses (horovodrun --network-interface); set it when
# the nodes have several (e.g. docker0 or an IPoIB interface next to Ethernet).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hostfile=${1:?usage: launch/hosts.sh HOSTFILE NP CONFIG [train args...]}
np=${2:?NP}; config=${3:?CONFIG}; shift 3
venv=${DISTBN_VENV:-$here/.venv}
slots=$(awk -F'slots=' 'NR==1 && NF>1 {print $2+0}' "$hostfile")
export DISTBN_LOCAL_WORKERS=${slots:-1}
. "$here/launch/env.sh"
. "$here/launch/job.sh"
iface=()
[ -n "${IFACE:-}" ] && iface=(--network-interface "$IFACE")
# Horovod 0.28.1's Gloo binds its process-set contexts to the address of the host name, whatever
# IFACE says: a name that resolves to loopback makes workers on other hosts fail to connect.
addr=$(getent hosts "$(hostname)" | awk '{print $1; exit}')
case "$addr" in
  127.*|::1) echo "distbn: warning: this host's name $(hostname) resolves to $addr; workers on other" \
                  "hosts will fail to connect to Horovod's Gloo here. Map the name to this host's" \
                  "address on the shared network (/etc/hosts); see the README, 'Several hosts'" >&2 ;;
esac
# Config and run directory checked here first (this host must see the run directory, as rank
# 0 does): a bad one prints its one line without horovodrun's own traceback after it.
"$venv/bin/python" -m distbn.train --config "$config" "$@" --check
# horovodrun (Gloo) starts every worker with this shell's environment, the settings above included.
run_job "$venv/bin/horovodrun" -np "$np" --hostfile "$hostfile" "${iface[@]}" \
  "$venv/bin/python" -m distbn.train --config "$config" "$@"
