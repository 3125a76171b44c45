#!/usr/bin/env bash
# Fresh clone -> the whole platform on a local Ray cluster, and back: set up .venv, start a token-auth Ray head
# (cluster-up.sh), train a tiny MoE with `ray job submit` (submit.sh), deploy Serve from its export (deploy.sh), ask it
# with the openai client, print the answer and the dashboard URL, then stop everything it started (serve shutdown,
# cluster-down.sh) and delete its files. `moe-platform demo` does the same in-process, without a cluster.
# usage: bash scripts/quickstart.sh [--section.key=value ...]   (training overrides; KEEP=1 keeps the trained run)
set -euo pipefail
# shellcheck source=scripts/local-run.sh
. "$(dirname "$0")/local-run.sh" quickstart
echo "[quickstart] 1/4 starting a local Ray head (token auth, dashboard on 127.0.0.1)"
bash scripts/cluster-up.sh "$state"
# shellcheck disable=SC1091
. "$state/env"
echo "[quickstart] dashboard: $MOE_DASHBOARD_URL (it asks for the token in $RAY_AUTH_TOKEN_PATH)"

echo "[quickstart] 2/4 training a tiny 16-expert MoE with \`ray job submit\`"
cpus=$(nproc)
bash scripts/submit.sh "$state" --run.name=quickstart --run.storage_path="$work/runs" --train.steps=80 \
  --train.eval_interval=40 --checkpoint.interval=40 --data.max_bytes=3000000 \
  --elastic.cpus_per_worker=$((cpus < 4 ? cpus : 4)) "$@"
export_dir=$work/runs/quickstart/export

echo "[quickstart] 3/4 deploying Ray Serve from $export_dir"
bash scripts/deploy.sh "$state" "$export_dir"
url=$(cat "$state/serve-url")

echo "[quickstart] 4/4 asking $url/v1 with the openai client"
python - "$url" <<'EOF'
import sys

from openai import OpenAI

client = OpenAI(base_url=f"{sys.argv[1]}/v1", api_key="none")  # the app needs no key unless args.api_key is set
prompt = "def main():\n"
r = client.completions.create(model="moe-platform", prompt=prompt, max_tokens=48, temperature=0)
print(f"[quickstart] prompt: {prompt!r}\n[quickstart] answer: {r.choices[0].text!r}")
EOF
echo "[quickstart] done in $((SECONDS - start)) s (after setup); dashboard was $MOE_DASHBOARD_URL; cleaning up"
