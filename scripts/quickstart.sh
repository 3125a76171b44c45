#!/usr/bin/env bash
# Fresh clone -> a trained, exported tiny MoE answering a prompt. Extra arguments go to `moe-platform demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moe-platform demo "$@"
