"""GRPO's rollout workers on a real local Ray (one instance for the module): our serving engine in Ray actors, the
learner's weights published through the object store after every step. The workers' rollouts are the in-process
engine's, token for token, and their log-probabilities the learner's within 1e-5 at every step (full weights, or only
the adapters with LoRA); a worker that dies is replaced and its prompts are generated again, with the same result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(600)]

from moe_platform.config import load_config  # noqa: E402
from moe_platform.post_train import GRPOTrainer  # noqa: E402
from tinyrun import chatml_tokenizer, local_ray, run_events, save_tiny_hf_model, scrape_ray_metrics  # noqa: E402

GROUP = 4


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=4) as address:
        yield address


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpo-ray")
    return save_tiny_hf_model("Qwen3MoeForCausalLM", root / "policy", chatml_tokenizer(root / "tok"),
                              router_aux_loss_coef=0.0, output_router_logits=False)[1]


def run(policy: Path, tmp_path: Path, name: str, steps: int = 3, before_round=None, **extra) -> GRPOTrainer:
    rows = tmp_path / "p.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Count: {1 + i % 8}", "pattern": r".*e.*"}) + "\n"
                            for i in range(16)))
    overrides = {"run.name": name, "run.storage_path": tmp_path / "runs", "init.from_hf": policy, "data.path": rows,
                 "data.format": "prompts", "train.objective": "grpo", "data.val_fraction": 0, "train.steps": steps,
                 "train.warmup": 0, "train.global_batch_size": 4 * GROUP, "train.micro_batch_size": 2 * GROUP,
                 "train.seq_len": 48, "train.lr": 1e-2, "checkpoint.interval": 0, "checkpoint.export": "false",
                 "checkpoint.async_save": "false", "grpo.group_size": GROUP, "grpo.max_new_tokens": 8,
                 "grpo.reward": "moe_platform.rewards:regex", "grpo.rollout_resources": "CPU=0.5", **extra}
    trainer = GRPOTrainer(load_config(None, [f"--{k}={v}" for k, v in overrides.items()]), progress=False)
    trainer.setup()
    rounds = trainer.rounds = []
    step = trainer.train_step

    def recording_step():
        if before_round is not None:
            before_round(trainer)
        rec = step()
        rounds.append(trainer.last_round["tokens"].tolist())
        return rec

    trainer.train_step = recording_step
    trainer.fit()
    return trainer


@pytest.mark.parametrize("lora", [False, True])
def test_ray_workers_make_the_in_process_rollouts_and_get_every_sync(lora, ray_cluster, policy, tmp_path):
    extra = {"lora.enabled": "true", "lora.rank": 4, "lora.targets": "attention,experts"} if lora else {}
    local = run(policy, tmp_path, "local", **{"grpo.rollout_workers": 0}, **extra)
    remote = run(policy, tmp_path, "ray", **{"grpo.rollout_workers": 2}, **extra)
    assert remote.rounds == local.rounds  # the same completions, token for token, whichever worker made them
    recs = remote.metrics.read()
    assert all(r["logp_gap"] <= 1e-5 for r in recs), [r["logp_gap"] for r in recs]
    state = remote.model.state_dict()
    moved = sum(t.numel() * t.element_size() for n, t in state.items() if ".lora." in n or not lora)
    assert all(r["sync_bytes"] == moved for r in recs)  # the whole model once per step, or only the adapters
    started = [e for e in run_events(remote.run_dir) if e["event"] == "rollouts"]
    assert started[-1]["workers"] == 2 and started[-1]["sync"] == ("adapters" if lora else "weights")


def test_a_dying_rollout_worker_is_replaced_and_its_prompts_regenerate(ray_cluster, policy, tmp_path):
    """Before the second round, one of the two workers is killed: its share of the round fails, a new worker starts
    from the latest published weights and makes the share again, and the run's rollouts are those of a run where
    nothing died."""
    import ray

    def kill_before_round_2(trainer):
        if trainer.step == 1:
            ray.kill(trainer.rollouts.actors[0], no_restart=True)

    steady = run(policy, tmp_path, "steady", **{"grpo.rollout_workers": 2})
    hit = run(policy, tmp_path, "hit", before_round=kill_before_round_2, **{"grpo.rollout_workers": 2})
    assert hit.rounds == steady.rounds
    recs = hit.metrics.read()
    assert [r["rollout_restarts"] for r in recs] == [0, 1, 1]
    assert all(r["logp_gap"] <= 1e-5 for r in recs)
    replaced = [e for e in run_events(hit.run_dir) if e["event"] == "rollout_worker_replaced"]
    assert [(e["step"], e["total"]) for e in replaced] == [(2, 1)]


def test_grpo_metrics_reach_prometheus(ray_cluster):
    """A GRPO run's step metrics as Prometheus scrapes them: the gauges the Ray Train worker adds for the objective
    (`GRPOTrainer.metric_gauges`: reward, KL, clip fraction, response length, the sync and the step's breakdown)."""
    from moe_platform.train.ray_worker import TrainMetrics

    metrics = TrainMetrics("grpo-metrics-check", 40)
    metrics.add_gauges(GRPOTrainer.metric_gauges)
    step = {"step": 7, "loss": 0.01, "tokens_per_s": 900.0, "mfu": 0.1, "expert_imbalance": 1.1, "step_time_s": 0.5,
            "reward": 0.625, "reward_std": 0.25, "kl": 0.0125, "clip_fraction": 0.125, "response_length": 24.0,
            "logp_gap": 2e-06, "sync_seconds": 0.03125, "sync_bytes": 143360, "rollout_tokens_per_s": 1500.0,
            "learner_tokens_per_s": 4000.0, "generate_seconds": 0.25, "score_seconds": 0.0009765625,
            "learn_seconds": 0.1875, "val_reward": 0.5}
    metrics.record_step(step)
    want = {f"ray_{name}": step[key] for key, (name, _) in GRPOTrainer.metric_gauges.items()}
    assert scrape_ray_metrics(set(want), 'run="grpo-metrics-check"') == want
