#!/usr/bin/env bash
# Smoke test against a second UCX: PyPI's libucx-cu12 (UCX 1.22, built with CUDA transports).
# Builds the addon (and the hostile-peer tool) against it into build-ucx122/ and runs the transfer,
# lifecycle, early-stop, hostile-peer, authenticated-connection, metadata-fuzz, peer-death soak, address, cma, VRAM (CUDA test double) and endpoint-protocol tests and the demo with that addon. Prints its own closing line.
set -euo pipefail
cd "$(dirname "$0")/.."
ucx=$(bash .ci/fetch-ucx122.sh)
npx cmake-js configure --out build-ucx122 --CDUCX_HOME="$ucx" --CDKVWIRE_HOSTILE=ON >/dev/null
npx cmake-js build --out build-ucx122 >/dev/null
export KVWIRE_ADDON="$PWD/build-ucx122/Release/kvwire.node"
echo "kvwire: smoke-testing against UCX $(node -e 'console.log(require("./dist").ucxVersion())')"
npx vitest run test/transfer.test.ts test/lifecycle.test.ts test/demo.test.ts test/kv-early-stop.test.ts test/hostile.test.ts test/security.test.ts test/rebuild.test.ts test/metadata-fuzz.test.ts test/peer-death-soak.test.ts test/address.test.ts test/cma.test.ts test/vram.test.ts test/protocols.test.ts test/progress-thread.test.ts "$@"
