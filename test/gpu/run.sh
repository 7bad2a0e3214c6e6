#!/usr/bin/env bash
# npm run test:gpu — the VRAM suite (test/vram.test.ts) against the real CUDA driver, then the GPU
# bench (kvwire bench --memory vram,vram-dram with ucx_perftest -m cuda baselines and the G1-G5
# verdicts). Runs from a checkout (after npm run build) or from a bundle made by npm run gpu:bundle
# (test/gpu/bundle.sh), whose test-gpu.sh sets PATH, LD_LIBRARY_PATH and KVWIRE_ADDON first.
#
# Where there is no CUDA device it prints "skipped: no CUDA device (<reason>)" and exits 77: a skip
# is not a pass. Results go to $KVWIRE_GPU_OUT (default gpu-results/): the suite's JSON report, the
# bench's JSON, kvwire info.

set -uo pipefail
cd "$(dirname "$0")/../.."
out=${KVWIRE_GPU_OUT:-gpu-results}
mkdir -p "$out"
# KVWIRE_GPU_DRY_RUN=1 with KVWIRE_CUDA_DRIVER naming the test double runs the whole script on a
# machine without a GPU, to check the script and the bundle (the suite's "real driver" test fails
# then, as it should, and the bench gives no verdicts).
if [ -n "${KVWIRE_CUDA_DRIVER:-}" ] && [ "${KVWIRE_GPU_DRY_RUN:-}" != 1 ]; then
  echo "test:gpu: KVWIRE_CUDA_DRIVER is set ($KVWIRE_CUDA_DRIVER): unset it to test the real driver" >&2
  exit 2
fi
info=$(node dist/cli/index.js info --json) || { echo "test:gpu: kvwire info failed (npm run build first)" >&2; exit 1; }
echo "$info" > "$out/info.json"
reason=$(node -e 'const c = JSON.parse(require("fs").readFileSync(0, "utf8")).cuda; if (!c.available) console.log(c.reason);' <<<"$info")
if [ -n "$reason" ]; then
  # No driver or no device is a skip; a driver that is there but broken (fails to initialise, lacks
  # an entry point, cannot be loaded) is a failure: a borrowed GPU host must not read as skipped.
  case "$reason" in
    "no CUDA driver: libcuda.so.1 not found"*|"no CUDA device"*)
      echo "skipped: no CUDA device ($reason)"
      exit 77 ;;
    *)
      echo "test:gpu: FAILED: the CUDA driver is present but unusable: $reason" >&2
      exit 1 ;;
  esac
fi
# A device that cannot export CUDA IPC (exclusive-process mode, some containers) or a kvwire bug in the
# export: a failure, never a skip.
problem=$(node -e 'const c = JSON.parse(require("fs").readFileSync(0, "utf8")).cuda; if (c.ipcProblem) console.log(c.ipcProblem);' <<<"$info")
if [ -n "$problem" ]; then
  echo "test:gpu: FAILED: a trial CUDA IPC export on device 0 failed: $problem" >&2
  exit 1
fi
# UCX logs go to files, not into the JSON the demo and the bench print.
export UCX_LOG_FILE="$PWD/$out/ucx.%p.log"
node dist/cli/index.js info
echo "== VRAM suite (test/vram.test.ts) against the real driver"
KVWIRE_GPU=1 node node_modules/vitest/vitest.mjs run test/vram.test.ts --reporter=default --reporter=json --outputFile.json="$out/suite.json"
suite=$?
echo "== kvwire demo --memory vram (prefill KV in VRAM, decode pulls into VRAM, every byte verified)"
node dist/cli/index.js demo --memory vram --requests 100 --json > "$out/demo.json"
demo=$?
cat "$out/demo.json"
echo "== GPU bench"
which ucx_perftest >/dev/null 2>&1 || echo "(ucx_perftest not on PATH: the perftest column will say so)"
node dist/cli/index.js bench --memory vram,vram-dram --transport shm --op write,read --block 4K,64K,1M,4M \
  --runs 3 --latency-samples 500 --idle-seconds 0 --json > "$out/bench.json"
bench=$?
node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  for (const c of r.cells) console.log(`${c.memory} ${c.op} ${c.block} B x ${c.batch}: ${c.gbps} GB/s (${c.path}), vs ${c.vs.perftest.test}: ${c.vs.perftest.ratio ?? c.vs.perftest.skipped}`);
  for (const t of r.targets.filter((t) => t.id.startsWith("G"))) console.log(`${t.id} ${t.case}: ${t.measured} -> ${t.met === null ? "n/a" : t.met ? "met" : "missed"} (${t.target})`);
' "$out/bench.json" || echo "test:gpu: $out/bench.json is not the bench's JSON (see it and $out/ucx.*.log)" >&2
echo "test:gpu: suite exit $suite, demo exit $demo, bench exit $bench; results in $out/"
[ $suite -eq 0 ] && [ $demo -eq 0 ] && [ $bench -eq 0 ]
