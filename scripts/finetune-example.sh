#!/usr/bin/env bash
# Bring your own model, end to end on a local Ray cluster: build a tiny Qwen3-MoE with transformers, a chat JSONL and
# preference pairs (scripts/tiny_chat_model.py; a real run points --init.from_hf at a downloaded model instead),
# fine-tune it on the chat data elastically (1-2 Ray Train workers) with `ray job submit` and
# jobs/configs/finetune.toml, align that export with LoRA DPO on the preference pairs (jobs/configs/dpo.toml, the
# reference being the base with the adapters off) and report its held-out preference accuracy, deploy Serve from the
# fine-tuned export and ask /v1/chat/completions with the openai client, then roll the DPO export out to the live
# app (blue-green, behind the quality probe) until it serves. Everything it started stops at the end.
# usage: bash scripts/finetune-example.sh [--section.key=value ...]   (overrides of the fine-tuning job; DPO_ARGS
# overrides the DPO job's; KEEP=1 keeps the run)
set -euo pipefail
# shellcheck source=scripts/local-run.sh
. "$(dirname "$0")/local-run.sh" finetune
echo "[finetune] 1/7 building a tiny Qwen3-MoE, a chat JSONL and preference pairs"
python scripts/tiny_chat_model.py "$work/qwen3-moe" "$work/chat.jsonl" --preference "$work/pairs.jsonl" \
  "$work/probe.txt"

echo "[finetune] 2/7 starting a local Ray head (token auth, dashboard on 127.0.0.1)"
bash scripts/cluster-up.sh "$state"
# shellcheck disable=SC1091
. "$state/env"

echo "[finetune] 3/7 fine-tuning it on the chat data with \`ray job submit\` (elastic: 1 to 2 workers)"
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

echo "[finetune] 4/7 aligning it with LoRA DPO on preference pairs with \`ray job submit\` (reference: the base)"
# shellcheck disable=SC2086
CONFIG=jobs/configs/dpo.toml bash scripts/submit.sh "$state" --init.from_hf="$export_dir" \
  --data.path="$work/pairs.jsonl" --run.storage_path="$work/runs" --run.name=dpo --train.steps=20 \
  --train.seq_len=96 --train.global_batch_size=8 --train.micro_batch_size=2 --train.lr=2e-3 --train.warmup=3 \
  --train.eval_interval=5 --checkpoint.interval=10 --data.val_fraction=0.2 --lora.rank=8 --elastic.max_workers=2 \
  ${DPO_ARGS:-}
dpo_dir=$work/runs/dpo
python - "$dpo_dir" <<'PY'
import json, sys
run = sys.argv[1]
start = next(json.loads(line) for line in open(f"{run}/events.jsonl") if '"start_eval"' in line)
evals = [(0, start)] + [(r["step"], r) for r in map(json.loads, open(f"{run}/metrics.jsonl")) if "val_loss" in r]
print("[finetune] held-out preference accuracy (reward margin): " + ", ".join(
    f"step {s}: {r['val_rewards/accuracy']:.2f} ({r['val_rewards/margin']:+.3f})" for s, r in evals))
first, last = evals[0][1], evals[-1][1]
if not (last["val_rewards/accuracy"] > first["val_rewards/accuracy"] and
        last["val_rewards/margin"] > first["val_rewards/margin"]):
    sys.exit("[finetune] DPO did not raise the held-out preference accuracy")
print(f"[finetune] DPO raised the held-out preference accuracy from {first['val_rewards/accuracy']:.2f} to "
      f"{last['val_rewards/accuracy']:.2f} over {last['val_pairs']} held-out pairs")
PY

echo "[finetune] 5/7 deploying Ray Serve from $export_dir"
bash scripts/deploy.sh "$state" "$export_dir"
url=$(cat "$state/serve-url")

echo "[finetune] 6/7 asking $url/v1/chat/completions with the openai client"
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
echo "[finetune] 7/7 rolling the DPO export out to the live app: blue-green, behind the quality probe"
moe-platform rollout start --address "$MOE_GCS_ADDRESS" --to dpo --source "$dpo_dir/export" --blue-green \
  --dwell 0s --min-requests 4 --probe-file "$work/probe.txt" > "$work/rollout-start.json"
echo "[finetune] rollout of version dpo started: the replicas load it beside the running one"
python - "$url" "$MOE_GCS_ADDRESS" <<'PY'
import json, subprocess, sys, time

from openai import OpenAI

url, address = sys.argv[1:]
client = OpenAI(base_url=f"{url}/v1", api_key="none")
question = [{"role": "user", "content": "What is 3 plus 9? Answer in words."}]
end = time.monotonic() + 300
while True:  # traffic for the new version's gates (it needs 4 finished requests) until the rollout ends
    status = json.loads(subprocess.run(["moe-platform", "rollout", "status", "--address", address], check=True,
                                       capture_output=True, text=True).stdout)
    if status["state"] != "running" or time.monotonic() > end:
        break
    client.chat.completions.create(model="moe-platform", messages=question, max_tokens=12, temperature=0)
print(f"[finetune] rollout {status['state']}: {status.get('reason')}; traffic {status.get('weights')}")
losses = status.get("losses") or {}
print("[finetune] quality probe, mean loss on held-out texts (nats/token): "
      + ", ".join(f"{version} {loss:.3f}" for version, loss in losses.items()))
if status["state"] != "promoted":
    sys.exit(f"[finetune] the rollout of the DPO export did not complete: {json.dumps(status)[:2000]}")
raw = client.chat.completions.with_raw_response.create(model="moe-platform", messages=question, max_tokens=16,
                                                       temperature=0)
answer = raw.parse()
print(f"[finetune] live version {raw.headers.get('x-model-version')!r} answers {question[0]['content']!r}: "
      f"{answer.choices[0].message.content!r}")
PY
echo "[finetune] done in $((SECONDS - start)) s (after setup); cleaning up"
