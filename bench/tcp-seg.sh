#!/usr/bin/env bash
# Why kvwire over tcp was 3x slower on UCX 1.22 than on 1.13, and what UCX_TCP_TX_SEG_SIZE=64k (kvwire's
# default since) changes. Per UCX build: ucx_perftest tag_bw at 1 MiB without and with peer error
# handling (-e, the mode kvwire's endpoints use), each with UCX's 8 KiB and with 64 KiB tcp send
# segments; then `kvwire bench` over tcp with the old (8k, forced through the environment) and the new
# default. Needs build/ (UCX 1.13) and, for 1.22, build-ucx122/ (.ci/ucx-smoke.sh builds it).
#   bash bench/tcp-seg.sh [--runs 3]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
[ "${1:-}" = "--runs" ] && runs=$2
u122=$(bash .ci/fetch-ucx122.sh)
export UCX_TLS=tcp UCX_WARN_UNUSED_ENV_VARS=n NODE_NO_WARNINGS=1
port=13400
perftest() { # <perftest binary> <libdir> <extra args...>: median MB/s of $runs
  local bin=$1 lib=$2; shift 2
  for _ in $(seq "$runs"); do
    port=$((port + 1))
    LD_LIBRARY_PATH=$lib "$bin" -t tag_bw -s 1048576 -n 2000 -p $port "$@" >/dev/null 2>&1 &
    sleep 1.5
    LD_LIBRARY_PATH=$lib timeout 60 "$bin" -t tag_bw -s 1048576 -n 2000 -p $port "$@" 127.0.0.1 2>/dev/null | awk '/Final/ {print $6}'
    wait
  done | sort -n | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)] / 1000}'
}
for build in "1.13 build ucx_perftest /nonexistent" "1.22 build-ucx122 $u122/bin/ucx_perftest $u122/lib"; do
  set -- $build
  [ -f "$2/Release/kvwire.node" ] || { echo "UCX $1: $2/Release/kvwire.node not built, skipped"; continue; }
  echo "UCX $1, ucx_perftest tag_bw 1 MiB over tcp (GB/s, median of $runs):"
  echo "  no error handling: 8k $(UCX_TCP_TX_SEG_SIZE=8k perftest $3 $4)  64k $(UCX_TCP_TX_SEG_SIZE=64k perftest $3 $4)"
  echo "  -e (peer errors):  8k $(UCX_TCP_TX_SEG_SIZE=8k perftest $3 $4 -e)  64k $(UCX_TCP_TX_SEG_SIZE=64k perftest $3 $4 -e)"
  for seg in 8k default; do
    echo "UCX $1, kvwire bench over tcp, send segments $seg:"
    env $([ $seg = 8k ] && echo UCX_TCP_TX_SEG_SIZE=8k) KVWIRE_ADDON=$PWD/$2/Release/kvwire.node \
      node dist/cli/index.js bench --transport tcp --memory allocated,registered --op write,read --block 64K,1M,4M \
      --runs "$runs" --idle-seconds 0 --latency-samples 10 --no-baselines 2>&1 | grep -E '^\s+\['
  done
done
