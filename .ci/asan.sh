#!/usr/bin/env bash
# npm run test:asan: the addon built with AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/),
# Node itself uninstrumented with the sanitizer runtime preloaded, running the suites that drive the
# native code hardest: transfers, lifecycle, bounds and limits, hostile peers, authenticated
# connections, metadata fuzz, the KV layer, endpoint descriptions (agent.connections). Any sanitizer
# report fails the run: a report aborts the process it happened in (its test fails), and every report is also written under build-asan/reports/,
# which must stay empty. UCX: PyPI's 1.22 (fetched once, as for the smoke test), or UCX_HOME=<prefix>.
# Not Debian's 1.13: under the sanitizer runtime it reads its active-message handler flags wrong
# ("callback registered with ucp_worker_set_am_handler() API does not support rendezvous protocol")
# and drops every rendezvous message, with or without malloc filling — a UCX bug, not kvwire's.
set -euo pipefail
cd "$(dirname "$0")/.."
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
if [ ! -e "$asan" ] || [ ! -e "$ubsan" ]; then
  echo "test:asan: gcc's sanitizer runtimes are missing (apt-get install -y gcc libasan8 libubsan1)" >&2
  exit 1
fi
ucx=${UCX_HOME:-$(bash .ci/fetch-ucx122.sh)}
rm -f build-asan/CMakeCache.txt  # UCX may differ from the last run
npx cmake-js configure --out build-asan --CDCMAKE_BUILD_TYPE=RelWithDebInfo --CDKVWIRE_SANITIZE=ON --CDKVWIRE_HOSTILE=ON --CDUCX_HOME="$ucx" >/dev/null
npx cmake-js build --out build-asan >/dev/null
[ -d dist ] || npx tsc -p tsconfig.json
reports="$PWD/build-asan/reports"
rm -rf "$reports" && mkdir -p "$reports"
export KVWIRE_ADDON="$PWD/build-asan/Release/kvwire.node"
# Leak checking is off: Node and V8 keep allocations alive until exit by design, and an instrumented
# addon in an uninstrumented process cannot tell those from its own.
# quarantine_size_mb=4: freed memory ASan holds back (to catch its reuse) counts in RSS, and the
# hostile flood test bounds the target's RSS growth at 24 MiB (measured under ASan: 11 MiB with 4 MiB
# of quarantine, 28 MiB with 16, 82 MiB with the default 256).
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$reports/asan:allocator_may_return_null=1:quarantine_size_mb=4"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan"
echo "kvwire: sanitizer run of $(LD_PRELOAD="$asan $ubsan" node -e 'console.log(require("./dist").ucxVersion())' 2>/dev/null | sed 's/^/UCX /')"
set +e
# The peer-death soak (fewer rounds) exercises closing an agent whose UCX workers still hold requests
# from killed peers, including workers given up in rebuilds (releaseWorker).
LD_PRELOAD="$asan $ubsan" KVWIRE_SOAK_ROUNDS=${KVWIRE_SOAK_ROUNDS:-20} npx vitest run test/transfer.test.ts test/lifecycle.test.ts \
  test/bounds.test.ts test/limits.test.ts test/hostile.test.ts test/security.test.ts test/rebuild.test.ts test/metadata-fuzz.test.ts \
  test/kv-transfer.test.ts test/kv-early-stop.test.ts test/peer-death-soak.test.ts test/cma.test.ts test/vram.test.ts test/protocols.test.ts test/progress-thread.test.ts "$@"
status=$?
set -e
if compgen -G "$reports/*" >/dev/null; then
  echo "test:asan: sanitizer reports:" >&2
  for f in "$reports"/*; do echo "== $f" >&2; head -60 "$f" >&2; done
  status=1
fi
exit $status
