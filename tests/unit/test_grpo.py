"""GRPO on one process: the loss and gradients against TRL's GRPOTrainer on the same rollouts, group advantages, the
built-in rewards, bad reward functions and prompt rows named before the first step, the engine's log-probabilities
against the learner's at step 0 and after every sync, a toy task learned on the CPU, and bitwise resume with the same
rollouts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_platform.config import load_config
from moe_platform.post_train import GRPOTrainer
from moe_platform.post_train.grpo import OLD, REF, group_advantages, token_logps
from moe_platform.rewards import exact_match, final_answer, regex
from tinyrun import chatml_tokenizer, save_tiny_hf_model

# A tiny random Qwen3-MoE without the balancing loss, so that the objective is GRPO's alone on both sides.
NO_AUX = {"router_aux_loss_coef": 0.0, "output_router_logits": False}
GROUP = 4
CHECKSUM = {"grpo.reward": "tinyrun:checksum_reward"}  # non-zero advantages in every group


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grpo-models")
    tok = chatml_tokenizer(root / "tok")
    return {"policy": save_tiny_hf_model("Qwen3MoeForCausalLM", root / "policy", tok, **NO_AUX)[1],
            "reference": save_tiny_hf_model("Qwen3MoeForCausalLM", root / "reference", tok, seed=7, **NO_AUX)[1]}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def count_rows(path: Path, n: int = 16) -> Path:
    """Text prompts of one token length ("Count: 1".."Count: 8" tokenize alike), rewarded for an "e" anywhere (about
    a third of the random model's completions have one)."""
    return write_rows(path, [{"prompt": f"Count: {1 + i % 8}", "pattern": r".*e.*", "answer": str(i)}
                             for i in range(n)])


def grpo_config(models, tmp_path: Path, rows: Path, **extra):
    overrides = {"run.name": "grpo", "run.storage_path": tmp_path / "runs", "init.from_hf": models["policy"],
                 "data.path": rows, "data.format": "prompts", "train.objective": "grpo", "data.val_fraction": 0,
                 "train.steps": 4, "train.warmup": 0, "train.global_batch_size": 2 * GROUP,
                 "train.micro_batch_size": GROUP, "train.seq_len": 48, "train.lr": 1e-2, "train.grad_clip": 0,
                 "checkpoint.interval": 0, "checkpoint.export": "false", "checkpoint.async_save": "false",
                 "grpo.group_size": GROUP, "grpo.max_new_tokens": 8, "grpo.reward": "moe_platform.rewards:regex",
                 "grpo.rollout_workers": 0, **extra}
    return load_config(None, [f"--{k}={v}" for k, v in overrides.items()])


def trainer_for(cfg) -> GRPOTrainer:
    trainer = GRPOTrainer(cfg, progress=False)
    trainer.setup()
    return trainer


# -- the loss against TRL's ---------------------------------------------------------------------------------------


def trl_loss(models, rnd: dict, temperature: float, beta: float, clip_eps: float, loss_type: str,
             old: torch.Tensor | None = None):
    """TRL's GRPOTrainer._compute_loss on our round's completions (prompt tokens, completion tokens, advantages; the
    old log-probabilities when given, the reference's from models["reference"] when beta > 0): (loss, gradients by
    name, TRL's logged metrics)."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    tokens, p_lens, lens = (torch.from_numpy(rnd[k]) for k in ("tokens", "prompt_lens", "lens"))
    assert bool((p_lens == p_lens[0]).all()), "TRL left-pads prompts of other lengths: use prompts of one length"
    p, c, n = int(p_lens[0]), int(lens.max()), len(tokens)
    policy = transformers.AutoModelForCausalLM.from_pretrained(models["policy"], dtype=torch.float32)
    args = GRPOConfig(output_dir=str(models["policy"].parent / "trl"), per_device_train_batch_size=n,
                      num_generations=GROUP, max_completion_length=c, temperature=temperature, beta=beta,
                      epsilon=clip_eps, loss_type=loss_type, use_cpu=True, bf16=False, report_to=[],
                      use_bias_correction_kl=False,  # the k3 estimator as GRPO defines it (DeepSeekMath)
                      save_strategy="no", logging_strategy="no")
    trainer = TRLGRPOTrainer(model=policy, reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(prompts)],
                             args=args, train_dataset=Dataset.from_list([{"prompt": "Count: 1"}] * n),
                             processing_class=transformers.AutoTokenizer.from_pretrained(models["policy"]))
    trainer.current_gradient_accumulation_steps = 1
    completion_mask = (torch.arange(c)[None, :] < lens[:, None]).long()
    inputs = {"prompt_ids": tokens[:, :p], "prompt_mask": torch.ones(n, p, dtype=torch.long),
              "completion_ids": tokens[:, p:p + c], "completion_mask": completion_mask,
              "advantages": torch.from_numpy(rnd["advantages"]).float(),
              "num_items_in_batch": completion_mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta:
        from trl.trainer.utils import add_fused_lm_head

        reference = transformers.AutoModelForCausalLM.from_pretrained(models["reference"], dtype=torch.float32)
        add_fused_lm_head(reference, temperature=temperature)  # as TRL sets up its own reference model
        with torch.no_grad():
            inputs["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
                reference, tokens[:, :p + c], torch.cat([inputs["prompt_mask"], completion_mask], 1), c)[0]
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: q.grad for name, q in trainer.model.named_parameters() if q.grad is not None}
    return float(loss), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def completion_view(rnd: dict, per_target: torch.Tensor) -> torch.Tensor:
    """Per-target values (N, seq_len) -> TRL's per-completion-token layout (N, longest completion), 0 past the end."""
    p, c = int(rnd["prompt_lens"][0]), int(rnd["lens"].max())
    return per_target[:, p - 1:p - 1 + c]


def test_an_on_policy_step_equals_trls_loss_and_gradients(models, tmp_path):
    """Our first step (rollouts from our engine, the learner's own log-probabilities as the old ones: ratio 1) and
    TRL's loss on the same completions and advantages: the loss and every gradient within 1e-5."""
    trainer = trainer_for(grpo_config(models, tmp_path, count_rows(tmp_path / "p.jsonl"), **CHECKSUM))
    grads: dict[str, torch.Tensor] = {}
    trainer.backend.gradient_probe = lambda g: grads.update({k: v.clone() for k, v in g.items()})
    rec = trainer.train_step()
    rnd = trainer.last_round
    assert (np.abs(rnd["advantages"].reshape(-1, GROUP)).sum(1) > 0).all(), "every group prefers some completions"
    loss, trl_grads, trl = trl_loss(models, rnd, 1.0, 0.0, 0.2, "dapo")
    assert abs(rec["loss"] - loss) <= 1e-5, (rec["loss"], loss)
    assert rec["clip_fraction"] == trl["clip_ratio/region_mean"] == 0
    assert grads.keys() == trl_grads.keys()
    for name, g in trl_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("loss_agg, trl_type, temperature, kl_coef", [("token_mean", "dapo", 1.0, 0.0),
                                                                       ("seq_mean", "grpo", 0.7, 0.1),
                                                                       ("token_mean", "dapo", 0.7, 0.05)])
def test_the_clipped_loss_equals_trls(loss_agg, trl_type, temperature, kl_coef, models, tmp_path):
    """The same completions with old log-probabilities that differ from the policy's (so that the ratio is clipped
    both ways), at another temperature, against a reference of other weights: loss, gradients, clip fraction and KL
    equal TRL's."""
    extra = {"grpo.loss_agg": loss_agg, "grpo.temperature": temperature, "grpo.kl_coef": kl_coef,
             "grpo.reference": models["reference"], **CHECKSUM}
    trainer = trainer_for(grpo_config(models, tmp_path, count_rows(tmp_path / "p.jsonl"), **extra))
    rnd = trainer._round(trainer.sampler.next_global_batch())
    assert (np.abs(rnd["advantages"].reshape(-1, GROUP)).sum(1) > 0).all(), "every group prefers some completions"
    inputs, (targets, advantages, side) = batch = trainer._micro_batch(rnd, np.arange(len(rnd["tokens"])))
    model, loss_fn = trainer.model, trainer.backend.loss_fn
    with torch.no_grad():
        logps = token_logps(model(inputs), targets, temperature)
    old = logps + 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))
    side[..., OLD] = old
    if kl_coef:
        side[..., REF] = trainer._reference_logps([batch])[0]
    tokens = int(rnd["lens"].sum())
    loss_fn.scale = 1 / (tokens if loss_agg == "token_mean" else len(targets))
    model.train()
    loss = trainer.backend.forward_loss(batch)
    loss.backward()
    ours = {n: q.grad for n, q in model.named_parameters() if q.grad is not None}
    stats = loss_fn.stats
    trl_value, trl_grads, trl = trl_loss(models, rnd, temperature, kl_coef, 0.2, trl_type,
                                         old=completion_view(rnd, old))
    assert abs(float(loss) - trl_value) <= 1e-5, (float(loss), trl_value)
    clip_fraction = float(stats[4] / stats[1])
    assert 0.1 < clip_fraction < 0.9 and abs(clip_fraction - trl["clip_ratio/region_mean"]) <= 1e-6
    if kl_coef:
        assert abs(float(stats[3] / stats[1]) - trl["kl"]) <= 1e-5
    for name, g in trl_grads.items():
        torch.testing.assert_close(ours[name], g, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("rewards, expected", [
    ([1.0, 0.0, 0.0, 0.0], None),  # TRL's formula: (r - mean) / (std + 1e-4), std with Bessel's correction
    ([0.5, 0.5, 0.5, 0.5], [0.0] * 4),  # nothing to prefer: 0, not 0/1e-4 of rounding noise
    ([0.1] * 4, [0.0] * 4),
    ([3.0, 1.0, 2.0, 2.0], None),
])
def test_advantages_are_normalised_per_group(rewards, expected):
    r = torch.tensor(rewards + [2.0, 0.0, 1.0, 1.0], dtype=torch.float32)  # a second group beside it
    got = group_advantages(r, 4)
    groups = r.view(-1, 4)
    trl = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    torch.testing.assert_close(got[4:], trl[4:])
    torch.testing.assert_close(got[:4], torch.tensor(expected) if expected is not None else trl[:4])


# -- rewards and prompt rows --------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion, answer, score", [
    ("3 plus 4 is seven.", "seven", 1.0), ("The answer is 42", "42", 1.0), ("so \\boxed{1,000.50} done", "1000.5", 1.0),
    ("<answer> Paris </answer> or Rome", "paris", 1.0), ("reasoning...\n#### 72\n", "72", 1.0),
    ("The answer is 41", "42", 0.0), ("", "0", 0.0), ("Answer: $12.", "12", 1.0),
])
def test_exact_match_compares_the_final_answer(completion, answer, score):
    assert exact_match({"answer": answer}, completion) == score, final_answer(completion)


def test_regex_matches_the_whole_completion_and_fields_are_named():
    row = {"pattern": r"<think>.*</think>\s*\d+"}
    assert regex(row, " <think>a\nb</think> 42\n") == 1.0 and regex(row, "42 <think></think>") == 0.0
    with pytest.raises(KeyError, match=r"exact_match reads the row's 'answer' field; this row has \['pattern'\]"):
        exact_match(row, "x")
    with pytest.raises(ValueError, match=r"the row's pattern '\(' is not a regular expression"):
        regex({"pattern": "("}, "x")


BAD_REWARDS = '''
import math
def raises(row, completion):
    return 1.0 / len(completion)
def nan(row, completion):
    return math.nan
def text(row, completion):
    return "good"
def none(row, completion):
    return None
NOT_A_FUNCTION = 3
'''


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_here:f", r"grpo.reward 'no_such_module_here:f' cannot be imported: ModuleNotFoundError"),
    ("bad_rewards:missing", r"grpo.reward 'bad_rewards:missing': module 'bad_rewards' has no 'missing'"),
    ("bad_rewards:NOT_A_FUNCTION", r"grpo.reward 'bad_rewards:NOT_A_FUNCTION' is a int, not a function"),
    ("bad_rewards:raises", r"grpo.reward 'bad_rewards:raises' raised ZeroDivisionError: float division by zero \(row "
                           r".*p.jsonl:1, completion ''\)"),
    ("bad_rewards:nan", r"grpo.reward 'bad_rewards:nan' returned nan, not a finite number"),
    ("bad_rewards:text", r"grpo.reward 'bad_rewards:text' returned 'good' \(str\), not a number"),
    ("moe_platform.rewards:regex, bad_rewards:none", r"grpo.reward 'bad_rewards:none' returned None \(NoneType\)"),
])
def test_a_bad_reward_function_fails_before_any_step_naming_it(spec, match, models, tmp_path, monkeypatch):
    from moe_platform.train.launch import launch_local

    (tmp_path / "bad_rewards.py").write_text(BAD_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = grpo_config(models, tmp_path, count_rows(tmp_path / "p.jsonl"),
                      **{"grpo.reward": spec, "parallel.dp": 2, "train.global_batch_size": 4 * GROUP})
    with pytest.raises(ValueError, match=match):
        launch_local(cfg, progress=False, trainer_cls=GRPOTrainer)
    assert not (tmp_path / "runs").exists(), "refused before any process starts"


def test_prompt_rows_text_messages_and_bad_rows_by_line(models, tmp_path):
    from moe_platform.post_train.prompt_data import build_prompt_dataset
    from moe_platform.tokenizer import ChatTemplate, load_tokenizer

    tok, template = load_tokenizer(models["policy"]), ChatTemplate.from_dir(models["policy"])
    good = [{"prompt": "Count: 3", "answer": "3"}, {"prompt": [{"role": "user", "content": "Hi?"}], "answer": "x"}]
    cfg = grpo_config(models, tmp_path, write_rows(tmp_path / "ok.jsonl", good)).data
    data = build_prompt_dataset(cfg, tok, template, 60)
    messages = template.render([{"role": "user", "content": "Hi?"}], add_generation_prompt=True)
    assert data.prompt(0) == tok.encode("Count: 3", add_special_tokens=False).ids
    assert data.prompt(1) == tok.encode(messages, add_special_tokens=False).ids
    assert data.rows[1]["answer"] == "x" and data.where[1].endswith("ok.jsonl:2")
    for line, (bad, why) in enumerate([
        ("[1, 2]", r"a row must be a JSON object with 'prompt'"),
        ('{"answer": 1}', r"no 'prompt' \(a row needs a prompt"),
        ('{"prompt": 7}', r"'prompt' must be a text or a non-empty list"),
        ('{"prompt": [{"role": "robot", "content": "x"}]}', r"prompt\[0\] must be an object with a 'role'"),
        (json.dumps({"prompt": "word " * 80}), r"the prompt is \d+ tokens, more than the 60 that leave room"),
    ]):
        path = tmp_path / f"bad{line}.jsonl"
        path.write_text('{"prompt": "Count: 1"}\n' + bad + "\n")
        with pytest.raises(ValueError, match=rf"bad prompt row .*bad{line}.jsonl:2: {why}"):
            build_prompt_dataset(load_config(None, [f"--data.path={path}", "--data.format=prompts",
                                                    "--train.objective=grpo"]).data, tok, template, 60)
    skip = load_config(None, [f"--data.path={path}", "--data.format=prompts", "--train.objective=grpo",
                              "--data.on_bad_row=skip", "--data.val_fraction=0"]).data
    data = build_prompt_dataset(skip, tok, template, 60)
    assert len(data) == 1 and data.meta["skipped_rows"] == 1


# -- the engine's log-probabilities and the learner's --------------------------------------------------------------


def learner_logps(trainer: GRPOTrainer, rnd: dict, state: dict | None = None) -> torch.Tensor:
    """The learner's log-probability (temperature 1) of every sampled token of a round, under its current weights or
    under `state` (loaded into the model for the forward)."""
    model = trainer.model
    saved = None
    if state is not None:
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
    inputs, (targets, _, side) = trainer._micro_batch(rnd, np.arange(len(rnd["tokens"])))
    with torch.no_grad():
        logps = token_logps(model(inputs), targets)
    if saved is not None:
        model.load_state_dict(saved)
    counted = ~torch.isnan(side[..., 2])
    return logps[counted], side[..., 2][counted]


@pytest.mark.parametrize("lora", [False, True])
def test_engine_and_learner_logps_agree_at_step_0_and_after_every_sync(lora, models, tmp_path):
    """Every sampled token's log-probability from the rollout engine equals the learner's for the same weights
    within 1e-5 (fp32): at step 0 and after each of 3 syncs (full weights, or only the adapters with LoRA). The check
    has teeth: the same tokens scored with the weights from before the last sync differ by far more."""
    extra = {"lora.enabled": "true", "lora.rank": 4, "lora.targets": "attention,experts", "train.lr": 5e-2} if lora \
        else {}
    trainer = trainer_for(grpo_config(models, tmp_path, count_rows(tmp_path / "p.jsonl"), **extra))
    weights = [{k: v.clone() for k, v in trainer.model.state_dict().items()}]  # what the engine holds at each round
    for step in range(4):
        rec = trainer.train_step()
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        ours, engine = learner_logps(trainer, trainer.last_round, weights[step])
        assert float((ours - engine).abs().max()) <= 1e-5 and rec["logp_gap"] <= 1e-5, (step, rec["logp_gap"])
        if step:
            stale, _ = learner_logps(trainer, trainer.last_round, weights[step - 1])
            assert float((stale - engine).abs().max()) > 1e-3, "weights from before the sync score differently"
    trainer.close_rollouts()
    lora_bytes = sum(v.numel() * v.element_size() for k, v in trainer.model.state_dict().items() if ".lora." in k)
    all_bytes = sum(v.numel() * v.element_size() for v in trainer.model.state_dict().values())
    assert rec["sync_bytes"] == (lora_bytes if lora else all_bytes)  # with LoRA only the adapters travel


# -- shown working ------------------------------------------------------------------------------------------------


def test_a_tiny_model_learns_to_answer_in_a_format_on_the_cpu(models, tmp_path):
    """The toy task: rewarded by moe_platform.rewards:regex for a completion that starts with a digit, which the
    random model's samples almost never do at first. With a fixed seed, 20 steps of GRPO (32 completions each, about
    a minute on 2 CPU cores) lift the mean reward of the last 5 steps at least 0.5 above that of the first 5."""
    rows = write_rows(tmp_path / "toy.jsonl", [{"prompt": f"Say a number ({i}): ", "pattern": r"\d.*"}
                                               for i in range(64)])
    cfg = grpo_config(models, tmp_path, rows, **{"train.steps": 20, "train.global_batch_size": 32,
                                                 "train.micro_batch_size": 8, "grpo.group_size": 8,
                                                 "train.min_lr_ratio": 1.0, "train.seq_len": 64})
    trainer = trainer_for(cfg)
    trainer.fit()
    rewards = [r["reward"] for r in trainer.metrics.read()]
    assert len(rewards) == 20
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last >= first + 0.5, rewards
    assert all(r["logp_gap"] <= 1e-5 for r in trainer.metrics.read())


def test_grpo_runs_resume_bit_for_bit_with_the_same_rollouts(models, tmp_path):
    """6 steps straight equal 3, a stop, and 3 more: every weight, every logged number, and the rollouts themselves
    (the sampler's position and the rollout generator are in the checkpoint; the engine restarts from its weights)."""
    rows = count_rows(tmp_path / "p.jsonl", 24)
    common = {"train.steps": 6, "checkpoint.interval": 3, "grpo.kl_coef": 0.05}

    def run(name, stop_after=None):
        trainer = GRPOTrainer(grpo_config(models, tmp_path, rows, **common, **{"run.name": name}), progress=False)
        trainer.setup()
        seen = []
        fit_step = trainer.train_step

        def recording_step():
            rec = fit_step()
            seen.append((trainer.last_round["seeds"].tolist(), trainer.last_round["tokens"].tolist()))
            return rec

        trainer.train_step = recording_step
        trainer.fit(stop_after=stop_after)
        return trainer, seen

    straight, straight_rounds = run("straight")
    _, first_half = run("resumed", stop_after=3)
    resumed, second_half = run("resumed")
    assert resumed.resumed_from == 3
    assert first_half + second_half == straight_rounds
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    drop = ("time", "step_time_s", "tokens_per_s", "mfu", "generate_seconds", "score_seconds", "learn_seconds",
            "sync_seconds", "rollout_tokens_per_s", "learner_tokens_per_s")
    logged = [[{k: v for k, v in r.items() if k not in drop} for r in t.metrics.read()] for t in (straight, resumed)]
    assert logged[0] == logged[1] and [r["step"] for r in logged[1]] == list(range(1, 7))
    assert all(math.isfinite(r["kl"]) for r in logged[1])
