#!/usr/bin/env bash
# Online RL on one cluster, end to end on a local Ray: build a tiny Qwen3-MoE with transformers and GRPO prompt rows
# (scripts/tiny_chat_model.py: "What is a plus b? Answer with the number.", with the answer and the answer's format),
# start a local token-auth Ray head, train LoRA adapters with GRPO through `ray job submit` and jobs/configs/grpo.toml
# on 2 Ray Train learner workers and 1 rollout worker (our serving engine in a Ray actor beside the learner; after
# every step only the adapters travel to it through the object store), report the rewards and the weight sync, then
# deploy Serve from the run's export and ask it with the openai client. Everything it started stops at the end.
# usage: bash scripts/grpo-example.sh [--section.key=value ...]   (overrides of the GRPO job; KEEP=1 keeps the run)
set -euo pipefail
# shellcheck source=scripts/local-run.sh
. "$(dirname "$0")/local-run.sh" grpo
echo "[grpo] 1/5 building a tiny Qwen3-MoE and GRPO prompt rows"
python scripts/tiny_chat_model.py "$work/qwen3-moe" "$work/chat.jsonl" --rows 40 --prompts "$work/prompts.jsonl"

echo "[grpo] 2/5 starting a local Ray head (token auth, dashboard on 127.0.0.1)"
bash scripts/cluster-up.sh "$state" --num-cpus=4  # 2 learner workers + 1 rollout worker, 1 CPU each

echo "[grpo] 3/5 LoRA GRPO with \`ray job submit\`: 2 learner workers, 1 rollout worker"
CONFIG=jobs/configs/grpo.toml bash scripts/submit.sh "$state" --init.from_hf="$work/qwen3-moe" \
  --data.path="$work/prompts.jsonl" --run.storage_path="$work/runs" --run.name=grpo --train.steps=12 \
  --train.seq_len=96 --train.global_batch_size=16 --train.micro_batch_size=4 --train.lr=2e-2 --train.warmup=2 \
  --train.eval_interval=6 --checkpoint.interval=6 --data.val_fraction=0.1 --lora.rank=8 \
  --lora.targets=attention,experts --grpo.max_new_tokens=8 \
  --grpo.reward="moe_platform.rewards:exact_match, moe_platform.rewards:regex" --grpo.reward_weights="1, 0.5" \
  --grpo.rollout_workers=1 --grpo.rollout_resources=CPU=1 --elastic.min_workers=2 --elastic.max_workers=2 "$@"
run_dir=$work/runs/grpo
python - "$run_dir" <<'PY'
import json, sys
run = sys.argv[1]
recs = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
start = next(json.loads(line) for line in open(f"{run}/events.jsonl") if '"event": "rollouts"' in line)
layout = next(json.loads(line) for line in open(f"{run}/events.jsonl") if '"event": "start"' in line)["layout"]
mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
print(f"[grpo] learner {layout} on {recs[-1]['step']} steps; {start['workers']} rollout worker(s), weight sync: "
      f"{start['sync']}")
print(f"[grpo] mean reward, first 5 steps {mean([r['reward'] for r in recs[:5]]):.3f}, last 5 steps "
      f"{mean([r['reward'] for r in recs[-5:]]):.3f}; held-out reward (greedy) "
      + ", ".join(f"step {r['step']}: {r['val_reward']:.3f}" for r in recs if "val_reward" in r))
print(f"[grpo] per step: generate {mean([r['generate_seconds'] for r in recs]):.3f} s, score "
      f"{mean([r['score_seconds'] for r in recs]):.4f} s, learn {mean([r['learn_seconds'] for r in recs]):.3f} s, "
      f"sync {mean([r['sync_seconds'] for r in recs]):.4f} s ({recs[-1]['sync_bytes'] / 2**10:.0f} KiB of adapters)")
worst = max(r["logp_gap"] for r in recs)
print(f"[grpo] largest engine/learner log-probability gap over the run: {worst:.2e}")
if worst > 1e-5:
    sys.exit("[grpo] the rollout engine and the learner disagree: a stale or half-applied sync")
PY

echo "[grpo] 4/5 deploying Ray Serve from $run_dir/export"
bash scripts/deploy.sh "$state" "$run_dir/export"
url=$(cat "$state/serve-url")

echo "[grpo] 5/5 asking $url/v1/chat/completions with the openai client"
python - "$url" <<'PY'
import sys

from openai import OpenAI

client = OpenAI(base_url=f"{sys.argv[1]}/v1", api_key="none")
question = "What is 2 plus 5? Answer with the number."
r = client.chat.completions.create(model="moe-platform", messages=[{"role": "user", "content": question}],
                                   max_tokens=8, temperature=0)
print(f"[grpo] question: {question!r}\n[grpo] answer: {r.choices[0].message.content!r} "
      f"(finish_reason {r.choices[0].finish_reason})")
PY
echo "[grpo] done in $((SECONDS - start)) s (after setup); cleaning up"
