#!/usr/bin/env bash
# Everything a fresh Debian 12 machine needs to build and run kvwire: system packages, npm
# packages, the native addon and the TypeScript. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
need=()
# python3-pip: the UCX 1.22 wheel (smoke and sanitizer lanes); libasan8, libubsan1: the sanitizer lane.
for pkg in libucx-dev ucx-utils pkg-config cmake g++ make libgtest-dev python3-pip libasan8 libubsan1; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "kvwire setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
npm ci --no-audit --no-fund --loglevel=error
npm run build --silent
