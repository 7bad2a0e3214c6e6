#!/usr/bin/env bash
# kvwire over tcp between two "hosts" on this machine (target T3): two network namespaces joined by
# a veth pair, each process in its own IPC and mount namespace with a private /dev/shm, so the only
# way between them is the veth link. The target side runs `kvwire bench --serve` (region, socket
# baseline server, ucx_perftest server); the initiator side runs `kvwire bench --peer`.
#   sudo bash bench/two-hosts.sh [kvwire bench options, e.g. --block 1M,4M --json --svg FILE]
# Needs root, iproute2 and util-linux (unshare); run `npm run build` first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "two-hosts.sh: needs root (ip netns, unshare)" >&2; exit 1; }
[ -f dist/cli/index.js ] || { echo "two-hosts.sh: run 'npm run build' first" >&2; exit 1; }
A=kvw-host-a
B=kvw-host-b
dir=$(mktemp -d)
server=
cleanup() {
  # The target runs a few execs below the background shell: stop it by its command line.
  [ -n "$server" ] && pkill -TERM -f -- "--serve $dir/target.json" && wait "$server" 2>/dev/null
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
ip netns del "$A" 2>/dev/null || true
ip netns del "$B" 2>/dev/null || true
ip netns add "$A"
ip netns add "$B"
ip link add kvw-a netns "$A" type veth peer name kvw-b netns "$B"
ip -n "$A" addr add 10.77.0.1/24 dev kvw-a
ip -n "$B" addr add 10.77.0.2/24 dev kvw-b
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set kvw-a up
ip -n "$B" link set kvw-b up
# UCX only lists interfaces that are running: wait for the link's carrier.
for _ in $(seq 100); do
  ip -n "$A" link show kvw-a | grep -q 'state UP' && ip -n "$B" link show kvw-b | grep -q 'state UP' && break
  sleep 0.1
done

# Each side: own IPC namespace (no SysV shm in common) and a fresh tmpfs on /dev/shm (no POSIX shm).
isolated() { local ns=$1 dev=$2; shift 2; ip netns exec "$ns" unshare --ipc --mount --propagation private \
  env UCX_NET_DEVICES="$dev" sh -c 'mount -t tmpfs tmpfs /dev/shm && exec "$@"' sh "$@"; }

# The target sizes its region for the sweep it will serve: pass the same --block/--batch to both.
serve_args=()
while [ $# -gt 0 ]; do
  case "$1" in --block|--batch|--memory|--progress) serve_args+=("$1" "$2"); shift 2 ;; *) break ;; esac
done
isolated "$B" kvw-b node dist/cli/index.js bench --serve "$dir/target.json" --host 10.77.0.2 "${serve_args[@]}" &
server=$!
for _ in $(seq 100); do [ -s "$dir/target.json" ] && break; sleep 0.1; done
[ -s "$dir/target.json" ] || { echo "two-hosts.sh: the target did not start" >&2; exit 1; }
isolated "$A" kvw-a node dist/cli/index.js bench --peer "$dir/target.json" "${serve_args[@]}" "$@"
