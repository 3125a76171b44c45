#!/usr/bin/env bash
# Bring your own model, end to end on a local Ray cluster: build a tiny Qwen3-MoE with transformers and a chat JSONL
# (scripts/tiny_chat_model.py; a real run points --init.from_hf at a downloaded model instead), fine-tune it on the
# chat data elastically (1-2 Ray Train workers) with `ray job submit` and jobs/configs/finetune.toml, deploy Serve
# from the export, and ask /v1/chat/completions with the openai client. Everything it started stops at the end.
# usage: bash scripts/finetune-example.sh [--section.key=value ...]   (training overrides; KEEP=1 keeps the run)
set -euo pipefail
# shellcheck source=scripts/local-run.sh
. "$(dirname "$0")/local-run.sh" finetune
echo "[finetune] 1/5 building a tiny Qwen3-MoE and a chat JSONL"
python scripts/tiny_chat_model.py "$work/qwen3-moe" "$work/chat.jsonl"

echo "[finetune] 2/5 starting a local Ray head (token auth, dashboard on 127.0.0.1)"
bash scripts/cluster-up.sh "$state"
# shellcheck disable=SC1091
. "$state/env"

echo "[finetune] 3/5 fine-tuning it on the chat data with \`ray job submit\` (elastic: 1 to 2 workers)"
CONFIG=jobs/configs/finetune.toml bash scripts/submit.sh "$state" --init.from_hf="$work/qwen3-moe" \
  --data.path="$work/chat.jsonl" --run.storage_path="$work/runs" --run.name=finetune --train.steps=40 \
  --train.seq_len=256 --train.global_batch_size=8 --train.micro_batch_size=2 --train.lr=3e-3 --train.warmup=4 \
  --train.eval_interval=20 --checkpoint.interval=20 --elastic.min_workers=1 --elastic.max_workers=2 "$@"
export_dir=$work/runs/finetune/export
python - "$export_dir" <<'PY'
import json, sys
config = json.load(open(f"{sys.argv[1]}/config.json"))
print(f"[finetune] exported architecture: {config['architectures'][0]}")
PY

echo "[finetune] 4/5 deploying Ray Serve from $export_dir"
bash scripts/deploy.sh "$state" "$export_dir"
url=$(cat "$state/serve-url")

echo "[finetune] 5/5 asking $url/v1/chat/completions with the openai client"
python - "$url" <<'PY'
import sys

from openai import OpenAI

client = OpenAI(base_url=f"{sys.argv[1]}/v1", api_key="none")
question = "What is 2 plus 5? Answer in words."
r = client.chat.completions.create(model="moe-platform", messages=[{"role": "user", "content": question}],
                                   max_tokens=16, temperature=0)
print(f"[finetune] question: {question!r}\n[finetune] answer: {r.choices[0].message.content!r} "
      f"(finish_reason {r.choices[0].finish_reason})")
PY
echo "[finetune] done in $((SECONDS - start)) s (after setup); cleaning up"
