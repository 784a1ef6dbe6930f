#!/usr/bin/env bash
# Two "nodes" on one machine: network namespaces hs-node0 (10.77.0.1) and hs-node1 (10.77.0.2)
# joined by a veth pair, and an rsh agent for mpirun that starts a host's processes inside its
# namespace. Then: two processes per node train together over TCP.
#
#   sudo scripts/netns-two-nodes.sh up                      # create the namespaces (root)
#   scripts/netns-two-nodes.sh run hotspa train --model …   # mpirun -np 4 across both
#   sudo scripts/netns-two-nodes.sh down
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
case "${1:-}" in
  up)
    ip netns add hs-node0
    ip netns add hs-node1
    ip link add hs-veth0 type veth peer name hs-veth1
    ip link set hs-veth0 netns hs-node0
    ip link set hs-veth1 netns hs-node1
    ip -n hs-node0 addr add 10.77.0.1/24 dev hs-veth0
    ip -n hs-node1 addr add 10.77.0.2/24 dev hs-veth1
    for n in 0 1; do
      ip -n hs-node$n link set lo up
      ip -n hs-node$n link set hs-veth$n up
    done
    ;;
  down)
    ip netns del hs-node0 2>/dev/null || true
    ip netns del hs-node1 2>/dev/null || true
    ;;
  rsh)
    # mpirun's launch agent: `rsh HOST COMMAND…` runs COMMAND inside HOST's namespace.
    host="$2"; shift 2
    case "$host" in
      10.77.0.1) ns=hs-node0 ;;
      10.77.0.2) ns=hs-node1 ;;
      *) echo "unknown host $host" >&2; exit 1 ;;
    esac
    # A host name of its own too (a UTS namespace), as a real node would have.
    exec ip netns exec "$ns" unshare --uts sh -c "hostname $ns && $*"
    ;;
  run)
    shift
    exec ip netns exec hs-node0 unshare --uts sh -c 'hostname hs-node0 && exec "$@"' sh \
      mpirun --allow-run-as-root \
      --mca plm_rsh_agent "$here/netns-two-nodes.sh rsh" \
      --mca btl tcp,self --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24 \
      --host 10.77.0.1:2,10.77.0.2:2 -np 4 -x HOTSPA_COMM_TIMEOUT_SECS "$@"
    ;;
  *)
    echo "usage: $0 up | run COMMAND… | down" >&2
    exit 2
    ;;
esac
