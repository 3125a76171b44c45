#!/usr/bin/env bash
# Create .venv-guidellm (if missing or out of date) holding guidellm, the benchmark tool for OpenAI-compatible
# servers that bench/guidellm.py and bench/serve_vs_vllm.py drive. It is a venv of its own because guidellm pins
# other versions (click ~= 8.4) than moe-platform's lock; nothing of moe-platform is installed in it, and the
# benchmarks run its `guidellm` executable.
#   bash scripts/setup-guidellm.sh            # prints the guidellm executable when it is ready
#   GUIDELLM_VENV=/path/to/venv bash scripts/setup-guidellm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=${GUIDELLM_VENV:-.venv-guidellm}
want="torch==2.13.0 guidellm==0.8.1"  # torch 2.13.0 (CPU) lies on disk: unpinned, a dependency pulls a multi-GB CUDA build
stamp="$venv/.moe-platform-guidellm"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $want  # shellcheck disable=SC2086
  "$venv/bin/guidellm" --version >/dev/null || { echo "setup-guidellm: guidellm does not run in $venv" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "$venv/bin/guidellm"
