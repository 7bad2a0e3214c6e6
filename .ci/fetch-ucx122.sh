#!/usr/bin/env bash
# Installs PyPI's UCX 1.22 (libucx-cu12: CUDA transports, headers, libraries) under .ci-cache/ once
# and prints its prefix (for UCX_HOME). Used by the UCX 1.22 smoke test and the sanitizer lane.
set -euo pipefail
cd "$(dirname "$0")/.."
target=.ci-cache/libucx-cu12
if [ ! -f "$target/libucx/include/ucp/api/ucp.h" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$target" 'libucx-cu12>=1.22,<1.23' >&2
fi
echo "$PWD/$target/libucx"
