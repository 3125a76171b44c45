#!/usr/bin/env bash
# Create .venv (if missing) and install moe-platform with its test extras. CPU machines get the CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_req=(torch)          # a GPU machine keeps (or gets) its CUDA build
else
  torch_req=(torch==2.13.0)  # CPU: pinned, so pip does not pull a multi-GB CUDA build
fi
# constraints.txt locks every package at the version the suite last passed with (scripts/refresh-constraints.sh
# writes it). A GPU machine installs with all of it but the torch line: its torch is its own CUDA build.
stamp=.venv/.moe-platform-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  lock=constraints.txt
  if [ "${torch_req[0]}" = torch ]; then
    lock=$(mktemp)
    grep -v '^torch==' constraints.txt > "$lock"
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -c "$lock" "${torch_req[@]}" -e '.[test]'
  [ "$lock" = constraints.txt ] || rm -f "$lock"
  touch "$stamp"
fi
# DeepSpeed compiles its CPU shared-memory communication op on first use (about a minute, cached per machine):
# do it once here rather than inside the first multi-process test.
if [ "${torch_req[0]}" != torch ]; then
  # (a build lock left by a killed process is removed first: torch would wait on it forever)
  timeout 900 .venv/bin/python -c "from moe_platform.deepspeed_compat import clear_stale_build_locks as clear; clear(); \
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
    >/dev/null 2>&1 || echo "warning: could not pre-build DeepSpeed's CPU communication op" >&2
fi
# promtool checks and unit-tests the alert rules (platform/prometheus/alerts.yml) in the test suite. It comes from
# Debian's prometheus package: only the binary is unpacked into .venv/bin (no service is installed or started).
if ! command -v promtool >/dev/null 2>&1 && [ ! -x .venv/bin/promtool ]; then
  if command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1 \
        || { [ "$(id -u)" = 0 ] && apt-get update -q >/dev/null 2>&1 && apt-get download -q prometheus >/dev/null; }) \
       && dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"; then
      install -m 755 "$tmp/x/usr/bin/promtool" .venv/bin/promtool
    else
      echo "warning: could not fetch Debian's prometheus package for promtool (the alert-rule tests need it)" >&2
    fi
    rm -rf "$tmp"
  else
    echo "warning: promtool not found: install Prometheus's promtool (the alert-rule tests need it)" >&2
  fi
fi
# engine.backend = "vllm" and its tests (tests/vllm_backend, run by the suite) need vLLM, whose CPU build pins other versions
# than our lock: it gets a venv of its own, .venv-vllm (a GPU machine installs the vllm extra instead).
if [ "${torch_req[0]}" != torch ]; then
  bash scripts/setup-vllm.sh >/dev/null || echo "warning: could not create .venv-vllm (scripts/setup-vllm.sh): the vllm \
backend's tests will fail" >&2
fi
