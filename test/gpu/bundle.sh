#!/usr/bin/env bash
# npm run gpu:bundle [-- DIR]: packs what a GPU host with nothing installed (no Node.js, no UCX, no
# compiler) needs to run kvwire's GPU suite and GPU bench into one folder (default gpu-bundle/, git-
# ignored), under 64 MiB:
#   node.xz        this machine's Node binary
#   ucx.tar.xz     PyPI's UCX 1.22 with CUDA transports (libucx-cu13: cuda_copy, cuda_ipc), runtime
#                  only (no headers, static libraries or io_demo; the .so symlinks unzip copied are
#                  links again), with ucx_perftest and ucx_info
#   kvwire.tar.xz  the addon built here against that UCX (build-gpu/), dist/, lib/, the VRAM suite and
#                  its fixtures, and the packages vitest needs
#   test-gpu.sh    unpacks them and runs test/gpu/run.sh: `bash gpu-bundle/test-gpu.sh`
# Results land in $KVWIRE_GPU_OUT (default: results/ next to test-gpu.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-gpu-bundle}
cache=.ci-cache/libucx-cu13
if [ ! -f "$cache/libucx/include/ucp/api/ucp.h" ]; then
  mkdir -p "$cache/wheel"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 -d "$cache/wheel" 'libucx-cu13==1.22.0' >&2
  (cd "$cache" && unzip -q -o wheel/*.whl)
fi
ucx="$PWD/$cache"
echo "gpu:bundle: building the addon against UCX 1.22 (libucx-cu13) into build-gpu/" >&2
rm -f build-gpu/CMakeCache.txt
npx cmake-js configure --out build-gpu --CDCMAKE_BUILD_TYPE=Release --CDUCX_HOME="$ucx/libucx" >/dev/null
npx cmake-js build --out build-gpu >/dev/null
npx tsc -p tsconfig.json

rm -rf "$out" && mkdir -p "$out"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# UCX runtime: one real file per library, links for its other names.
mkdir -p "$stage/ucx/libucx/bin" "$stage/ucx/libucx/lib/ucx" "$stage/ucx/libucx_cu13.libs"
cp "$ucx/libucx/bin/ucx_perftest" "$ucx/libucx/bin/ucx_info" "$stage/ucx/libucx/bin/"
cp "$ucx"/libucx_cu13.libs/* "$stage/ucx/libucx_cu13.libs/"
for dir in lib lib/ucx; do
  for real in "$ucx/libucx/$dir"/*.so.*.*.*; do
    [ -e "$real" ] || continue
    file=$(basename "$real")
    cp "$real" "$stage/ucx/libucx/$dir/"
    stem=${file%%.so.*}
    major=${file#"$stem".so.}
    major=${major%%.*}
    ln -sf "$file" "$stage/ucx/libucx/$dir/$stem.so.$major"
    ln -sf "$file" "$stage/ucx/libucx/$dir/$stem.so"
  done
done
tar -C "$stage" -cf - ucx | xz -T2 -6 > "$out/ucx.tar.xz"

# kvwire: what the suite and the bench load.
mkdir -p "$stage/kvwire/build-gpu/Release" "$stage/kvwire/test"
cp build-gpu/Release/kvwire.node "$stage/kvwire/build-gpu/Release/"
cp -r package.json vitest.config.ts dist lib "$stage/kvwire/"
cp -r test/vram.test.ts test/helpers.ts test/fixtures test/gpu "$stage/kvwire/test/"
node test/gpu/closure.cjs vitest node-gyp-build | while read -r dir; do
  mkdir -p "$stage/kvwire/$(dirname "$dir")"
  cp -r "$dir" "$stage/kvwire/$dir"
done
tar -C "$stage" -cf - kvwire | xz -T2 -6 > "$out/kvwire.tar.xz"

xz -T2 -6 -c "$(command -v node)" > "$out/node.xz"

cat > "$out/test-gpu.sh" <<'SCRIPT'
#!/usr/bin/env bash
# kvwire's GPU suite and GPU bench on this host, with nothing installed (made by npm run gpu:bundle).
# Exit 77: no CUDA device here (a skip, not a pass).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${KVWIRE_GPU_WORK:-$(mktemp -d)}
xz -dc "$here/node.xz" > "$work/node" && chmod +x "$work/node" || exit 1
tar -C "$work" -xJf "$here/ucx.tar.xz" && tar -C "$work" -xJf "$here/kvwire.tar.xz" || exit 1
export PATH="$work:$work/ucx/libucx/bin:$PATH"
export LD_LIBRARY_PATH="$work/ucx/libucx/lib:$work/ucx/libucx_cu13.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KVWIRE_ADDON="$work/kvwire/build-gpu/Release/kvwire.node"
export KVWIRE_GPU_OUT="${KVWIRE_GPU_OUT:-$here/results}"
cd "$work/kvwire" && bash test/gpu/run.sh
SCRIPT
chmod +x "$out/test-gpu.sh"
bytes=$(du -cb "$out"/* | tail -1 | cut -f1)
echo "gpu:bundle: $out/ is $((bytes / 1048576)) MiB ($(cd "$out" && ls | tr '\n' ' '))" >&2
if [ "$bytes" -gt $((64 << 20)) ]; then
  echo "gpu:bundle: over 64 MiB, too large to carry to a borrowed GPU host" >&2
  exit 1
fi
