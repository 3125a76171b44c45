"""DPO on one process, against TRL's DPOTrainer as the reference: the same tokens, loss, rewards and gradients at step 1
for each loss type; the reference policy (a frozen copy, or the LoRA base with its adapters off and no second copy of
the weights); preference rows in both of TRL's conversational forms; bad rows named by file and line or skipped and
counted; bitwise resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_platform.config import load_config
from moe_platform.post_train import DPOTrainer
from moe_platform.post_train.preference_data import build_preference_dataset, split_pair
from moe_platform.tokenizer import ChatTemplate, load_tokenizer
from moe_platform.train.data import IGNORE_INDEX
from moe_platform.train.trainer import Trainer
from tinyrun import chatml_tokenizer, preference_rows, save_tiny_hf_model, write_preference_jsonl

PAIRS = 6
# A tiny random Qwen3-MoE without the balancing loss (router_aux_loss_coef = 0), so that the objective is DPO's alone
# on both sides and the gradients compare one to one.
NO_AUX = {"router_aux_loss_coef": 0.0, "output_router_logits": False}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo-models")
    tok = chatml_tokenizer(root / "tok")
    return {"policy": save_tiny_hf_model("Qwen3MoeForCausalLM", root / "policy", tok, **NO_AUX)[1],
            "reference": save_tiny_hf_model("Qwen3MoeForCausalLM", root / "reference", tok, seed=7, **NO_AUX)[1]}


def dpo_config(models, tmp_path: Path, rows: Path, **extra):
    overrides = {"run.name": "dpo", "run.storage_path": tmp_path / "runs", "data.cache_dir": tmp_path / "cache",
                 "init.from_hf": models["policy"], "data.path": rows, "data.format": "preference",
                 "train.objective": "dpo", "data.val_fraction": 0, "train.steps": 4, "train.warmup": 1,
                 "train.global_batch_size": PAIRS, "train.micro_batch_size": 2, "train.seq_len": 96,
                 "train.lr": 3e-3, "train.grad_clip": 0, "checkpoint.interval": 0, "checkpoint.export": "false",
                 "checkpoint.async_save": "false", **extra}
    return load_config(None, [f"--{k}={v}" for k, v in overrides.items()])


def trl_step(models, rows: list[dict], beta: float, loss_type: str, lora: dict | None = None):
    """TRL's DPOTrainer on the transformers models of the same directories: its batch of all `rows`, its loss
    (backpropagated), its logged metrics and the policy's gradients by parameter name (PEFT's names for adapters).
    `lora`: adapters on the attention projections instead of a reference model, with these A matrices (our names)."""
    import transformers
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    policy = transformers.AutoModelForCausalLM.from_pretrained(models["policy"], dtype=torch.float32)
    reference = None if lora else transformers.AutoModelForCausalLM.from_pretrained(models["reference"],
                                                                                    dtype=torch.float32)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                 lora_dropout=0.0)
    args = DPOConfig(output_dir=str(models["policy"].parent / "trl"), per_device_train_batch_size=len(rows),
                     beta=beta, loss_type=[loss_type], max_length=None, report_to=[], use_cpu=True, bf16=False,
                     save_strategy="no", logging_strategy="no", precompute_ref_log_probs=False)
    trainer = TRLDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=transformers.AutoTokenizer.from_pretrained(models["policy"]),
                            peft_config=peft_config)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if ".lora_A." in name:  # ours: model.layers.0.self_attn.lora.q_proj.A
                prefix, target = name.removeprefix("base_model.model.").split(".lora_A.")[0].rsplit(".", 1)
                p.copy_(lora[f"{prefix}.lora.{target}.A"])
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in trainer.model.named_parameters()
             if p.grad is not None}
    return float(loss), metrics, grads, batch


def our_step(cfg) -> tuple[DPOTrainer, dict, dict[str, torch.Tensor]]:
    """Our first step: (the trainer, the step's metrics, the gradients by name; "before": the weights before it)."""
    trainer = DPOTrainer(cfg, progress=False)
    trainer.setup()
    grads: dict[str, torch.Tensor] = {"before": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}}
    trainer.backend.gradient_probe = lambda g: grads.update({k: v.clone() for k, v in g.items()})
    return trainer, trainer.train_step(), grads


def sequences(dataset, scored: bool = False) -> list[tuple[int, ...]]:
    """Every sequence of the dataset (or only its response tokens), sorted."""
    out = []
    for i in range(len(dataset)):
        for j in range(2):
            seq = np.asarray(dataset.tokens[i, j, :dataset.lengths[i, j]])
            out.append(tuple(seq[np.asarray(dataset.counted[i, j, :len(seq)])].tolist() if scored else seq.tolist()))
    return sorted(out)


def oracle_rows() -> list[dict]:
    """PAIRS pairs, every third one reversed, so that the two random models rank some pairs right and some wrong."""
    rows = preference_rows(PAIRS)
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i % 3 == 0 else r for i, r in enumerate(rows)]


# TRL's sigmoid loss has no label smoothing; conservative DPO's, -(1-p) log sigmoid(beta m) - p log sigmoid(-beta m),
# is (1-p) times TRL's sigmoid loss of the pair plus p times TRL's sigmoid loss of the pair reversed.
CASES = {"sigmoid": ("sigmoid", 0.0), "sigmoid-smoothed": ("sigmoid", 0.2), "ipo": ("ipo", 0.0),
         "hinge": ("hinge", 0.0)}


@pytest.mark.parametrize("case", CASES)
def test_loss_rewards_and_gradients_equal_trls(case, models, tmp_path):
    loss_type, smoothing = CASES[case]
    beta = 0.1 if loss_type != "ipo" else 0.5
    rows = oracle_rows()
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dpo_config(models, tmp_path, path,
                     **{"dpo.beta": beta, "dpo.loss_type": loss_type, "dpo.label_smoothing": smoothing,
                        "dpo.reference": models["reference"]})
    trainer, rec, grads = our_step(cfg)
    grads.pop("before")
    trl_loss, trl, trl_grads, batch = trl_step(models, rows, beta, loss_type)
    if smoothing:
        flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
        flipped_loss, _, flipped_grads, _ = trl_step(models, flipped, beta, loss_type)
        trl_loss = (1 - smoothing) * trl_loss + smoothing * flipped_loss
        trl_grads = {k: (1 - smoothing) * g + smoothing * flipped_grads[k] for k, g in trl_grads.items()}
    # the same sequences, and only the response tokens count (TRL's completion mask)
    ids, mask = batch["input_ids"], batch["completion_mask"].bool()
    assert sequences(trainer.dataset) == sorted(tuple(ids[i][batch["attention_mask"][i].bool()].tolist())
                                                for i in range(len(ids)))
    assert sequences(trainer.dataset, scored=True) == sorted(tuple(ids[i][mask[i]].tolist()) for i in range(len(ids)))
    # the step: loss, rewards, log-probabilities within 1e-5
    assert abs(rec["loss"] - trl_loss) <= 1e-5, (rec["loss"], trl_loss)
    for ours_key, trl_key in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                              ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies")):
        assert abs(rec[ours_key] - trl[trl_key]) <= 1e-5, (ours_key, rec[ours_key], trl[trl_key])
    for key in ("logps/chosen", "logps/rejected"):
        assert abs(rec[key] - trl[key]) <= 1e-5 * abs(trl[key]), (key, rec[key], trl[key])
    assert 0 < rec["rewards/accuracy"] < 1 and rec["loss"] > 0, "a degenerate case compares nothing"
    # the gradient of every weight
    assert grads.keys() == trl_grads.keys()
    for name, g in trl_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{case}: gradient of {name}")


def peft_name(ours: str) -> str:
    """model.layers.0.self_attn.lora.q_proj.B -> model.layers.0.self_attn.q_proj.lora_B.default.weight"""
    prefix, rest = ours.split(".lora.")
    target, factor = rest.split(".")
    return f"{prefix}.{target}.lora_{factor}.default.weight"


def test_lora_with_the_base_as_reference_equals_trl_with_peft(models, tmp_path):
    """LoRA with dpo.reference = base: the reference is the base model with the adapters switched off, as TRL does
    with a PEFT model. With the same adapters (B = 0 at the start), the policy is the base at step 1: the same
    log-probabilities on both sides, the loss log 2, and the same adapter gradients."""
    rows = oracle_rows()
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dpo_config(models, tmp_path, path, **{"lora.enabled": "true", "lora.rank": 4, "lora.alpha": 8})
    trainer, rec, grads = our_step(cfg)
    adapters = {k: v for k, v in grads.pop("before").items() if ".lora." in k}
    trl_loss, trl, trl_grads, _ = trl_step(models, rows, 0.1, "sigmoid", lora=adapters)
    assert abs(rec["loss"] - np.log(2)) <= 1e-6 and abs(trl_loss - np.log(2)) <= 1e-6
    assert rec["rewards/chosen"] == rec["rewards/rejected"] == 0 == trl["rewards/chosen"] == trl["rewards/rejected"]
    for key in ("logps/chosen", "logps/rejected"):
        assert abs(rec[key] - trl[key]) <= 1e-5 * abs(trl[key]), (key, rec[key], trl[key])
        assert rec[key] == rec[f"ref_{key}"]
    assert {peft_name(k) for k in grads} == set(trl_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, trl_grads[peft_name(name)], rtol=1e-4, atol=1e-6, msg=name)


# -- preference data ---------------------------------------------------------------------------------------------


def preference_dataset(models, path: Path, cache: Path, seq_len: int = 96, **data):
    cfg = load_config(None, [f"--{k}={v}" for k, v in {
        "data.path": path, "data.format": "preference", "train.objective": "dpo", "init.from_hf": models["policy"],
        "data.val_fraction": 0, "train.seq_len": seq_len, **{f"data.{k}": v for k, v in data.items()}}.items()])
    tok = load_tokenizer(models["policy"])
    return build_preference_dataset(cfg.data, tok, ChatTemplate.from_dir(models["policy"]), seq_len, cache,
                                    pad_id=tok.token_to_id("<|im_end|>"))


def test_the_implicit_prompt_form_reads_as_trls_extract_prompt(models, tmp_path):
    """Whole chosen and rejected conversations: the shared leading messages are the prompt (TRL's extract_prompt),
    and the pairs are the very tokens of the explicit form."""
    from trl.data_utils import extract_prompt

    explicit = preference_rows(8)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    for row in implicit:
        assert dict(zip(("prompt", "chosen", "rejected"), split_pair("row", row), strict=True)) == extract_prompt(row)
    a = preference_dataset(models, write_preference_jsonl(tmp_path / "explicit.jsonl", 8), tmp_path / "a")
    path = tmp_path / "implicit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in implicit))
    b = preference_dataset(models, path, tmp_path / "b")
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.counted, b.counted)


def test_parquet_rows_give_the_same_pairs(models, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = preference_rows(8, implicit_every=3)  # a parquet file has one schema: implicit rows have prompt = null
    pq.write_table(pa.Table.from_pylist([{"prompt": r.get("prompt"), **r} for r in rows]), tmp_path / "p.parquet")
    a = preference_dataset(models, write_preference_jsonl(tmp_path / "p.jsonl", 8, implicit_every=3), tmp_path / "a")
    b = preference_dataset(models, tmp_path / "p.parquet", tmp_path / "b")
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.counted, b.counted) and len(a) == 8


def test_a_pairs_two_sequences_share_a_micro_batch(models, tmp_path):
    """`get` returns the chosen sequences first and the rejected ones after: sequence i and B + i are one pair (the
    same prompt tokens), and only response tokens are targets."""
    ds = preference_dataset(models, write_preference_jsonl(tmp_path / "p.jsonl", 8), tmp_path / "c")
    ids = np.array([5, 2, 7])
    inputs, targets = ds.get(ids)
    assert inputs.shape == targets.shape == (6, 96)
    for i, pair in enumerate(ids):
        for j, row in ((0, i), (1, 3 + i)):
            n = int(ds.lengths[pair, j])
            assert torch.equal(inputs[row, :n - 1], torch.from_numpy(ds.tokens[pair, j, :n - 1].astype(np.int64)))
            scored = torch.from_numpy(np.asarray(ds.counted[pair, j, 1:]))
            assert torch.equal(targets[row] != IGNORE_INDEX, scored) and scored.any()
        prompt = int(np.argmax(ds.counted[pair, 0]))
        assert prompt == int(np.argmax(ds.counted[pair, 1])) > 0
        assert torch.equal(inputs[i, :prompt], inputs[3 + i, :prompt])


BAD_ROWS = {
    "not json": ("{oops", r"not valid JSON"),
    "no chosen": (json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                              "rejected": [{"role": "assistant", "content": "no"}]}), r"no chosen response"),
    "empty rejected": (json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": [
        {"role": "assistant", "content": "yes"}], "rejected": []}), r"no rejected response"),
    "empty response": (json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": [
        {"role": "assistant", "content": "  "}], "rejected": [{"role": "assistant", "content": "no"}]}),
        r"empty chosen response: its assistant message has no content"),
    "no shared prompt": (json.dumps({"chosen": [{"role": "user", "content": "a"},
                                                {"role": "assistant", "content": "b"}],
                                     "rejected": [{"role": "user", "content": "c"},
                                                  {"role": "assistant", "content": "d"}]}), r"no prompt"),
    "unknown role": (json.dumps({"prompt": [{"role": "wizard", "content": "hi"}], "chosen": [
        {"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}),
        r"unknown role 'wizard'"),
    "prompt too long": (json.dumps({"prompt": [{"role": "user", "content": "word " * 80}], "chosen": [
        {"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}),
        r"the prompt alone is \d+ tokens, which leaves no room for the response: longer than train.seq_len\+1 = 97"),
    "response too long": (json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": [
        {"role": "assistant", "content": "word " * 80}], "rejected": [{"role": "assistant", "content": "no"}]}),
        r"the chosen sequence is \d+ tokens: longer than train.seq_len\+1 = 97"),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_a_bad_row_is_named_by_file_and_line(kind, models, tmp_path):
    rows = write_preference_jsonl(tmp_path / "p.jsonl", 3)
    line, match = BAD_ROWS[kind]
    with open(rows, "a") as f:
        f.write("\n" + line + "\n")  # a blank line is allowed: the bad row is line 5
    with pytest.raises(ValueError, match=rf"bad preference row {rows}:5: .*{match}.*data.on_bad_row = 'skip'"):
        preference_dataset(models, rows, tmp_path / "c")


def test_bad_rows_are_skipped_and_counted_and_long_ones_cut(models, tmp_path):
    rows = write_preference_jsonl(tmp_path / "p.jsonl", 6)
    with open(rows, "a") as f:
        f.writelines(line + "\n" for line, _ in BAD_ROWS.values())
    ds = preference_dataset(models, rows, tmp_path / "a", on_bad_row="skip")
    assert ds.meta["skipped_rows"] == len(BAD_ROWS) and ds.meta["pairs"] == len(ds) == 6
    assert ds.meta["skipped_examples"][0].startswith(f"{rows}:7: not valid JSON")
    cut = preference_dataset(models, rows, tmp_path / "b", on_bad_row="skip", truncation="truncate")
    # the long response is cut to fit; a prompt that fills the sequence leaves no response token: still bad
    assert cut.meta["truncated_rows"] == 1 and cut.meta["skipped_rows"] == len(BAD_ROWS) - 1 and len(cut) == 7
    assert cut.lengths.max() == 97
    long_prompt = write_preference_jsonl(tmp_path / "long.jsonl", 3)
    with open(long_prompt, "a") as f:
        f.write(BAD_ROWS["prompt too long"][0] + "\n")
    with pytest.raises(ValueError, match=r"long.jsonl:4: no chosen response token within the first 97 tokens"):
        preference_dataset(models, long_prompt, tmp_path / "c", truncation="truncate")


# -- the reference policy, the objective's wiring, resume --------------------------------------------------------


def test_lora_reference_is_the_base_without_a_second_copy_of_the_weights(models, tmp_path):
    """LoRA with dpo.reference = base holds no reference weights of its own (full fine-tuning holds a copy of every
    trained weight), and the reference it computes is the base model: at step 0 the policy's held-out
    log-probabilities, which stay the reference's while the policy moves."""
    rows = write_preference_jsonl(tmp_path / "p.jsonl", 24)
    common = {"data.val_fraction": 0.25, "train.eval_interval": 2, "train.global_batch_size": 4}
    lora = DPOTrainer(dpo_config(models, tmp_path, rows, **common, **{"run.name": "lora", "lora.enabled": "true"}),
                      progress=False)
    lora.setup()
    full = DPOTrainer(dpo_config(models, tmp_path, rows, **common, **{"run.name": "full"}), progress=False)
    full.setup()
    trained = sum(p.numel() for p in full.model.parameters() if p.requires_grad)
    assert lora.reference.copied_numel == 0 and lora.reference.copied_bytes == 0
    assert full.reference.copied_numel == trained == sum(p.numel() for p in full.model.parameters())
    start = lora.eval_record()
    assert start["val_rewards/margin"] == 0 and start["val_logps/chosen"] == start["val_ref_logps/chosen"]
    lora.fit()
    evals = [r for r in lora.metrics.read() if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["val_ref_logps/chosen"] == start["val_logps/chosen"]
        assert r["val_ref_logps/rejected"] == start["val_logps/rejected"]
    assert evals[-1]["val_logps/chosen"] != start["val_logps/chosen"]
    assert evals[-1]["val_rewards/accuracy"] > start["val_rewards/accuracy"] == 0


def test_the_lm_trainer_refuses_a_dpo_config_and_the_cli_picks_dpo(models, tmp_path):
    from moe_platform.cli import main as cli_main

    rows = write_preference_jsonl(tmp_path / "p.jsonl", 8)
    cfg = dpo_config(models, tmp_path, rows, **{"train.steps": 2})
    with pytest.raises(ValueError, match=r"train.objective = 'dpo' is not trained by Trainer \('lm'\).*trainer_cls"):
        Trainer(cfg, progress=False)
    from moe_platform.train.launch import launch_local

    scratch = dpo_config(models, tmp_path, rows, **{"init.from_hf": "", "parallel.dp": 2, "run.name": "scratch"})
    with pytest.raises(ValueError, match=r"'dpo' fine-tunes a trained model: set init.from_hf"):
        launch_local(scratch, progress=False, trainer_cls=DPOTrainer)
    assert not (tmp_path / "runs" / "scratch").exists(), "refused before any process starts"
    config = tmp_path / "dpo.toml"
    config.write_text("[train]\nobjective = 'dpo'\nsteps = 2\nwarmup = 1\n[data]\nformat = 'preference'\n")
    overrides = [f"--{k}={v}" for k, v in {
        "init.from_hf": models["policy"], "data.path": rows, "run.storage_path": tmp_path / "cli",
        "run.name": "cli", "train.seq_len": 96, "train.global_batch_size": 4, "train.micro_batch_size": 2,
        "data.cache_dir": tmp_path / "cache", "checkpoint.export": "false"}.items()]
    assert cli_main(["train", "--config", str(config), "--no-progress", *overrides]) == 0
    recs = [json.loads(line) for line in (tmp_path / "cli" / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all("rewards/accuracy" in r for r in recs)


def test_dpo_runs_resume_bit_for_bit(models, tmp_path):
    """Full fine-tuning, the reference a frozen copy read again from init.from_hf on resume: 6 steps straight equal 3,
    a stop, and 3 more, in every weight and every logged number."""
    rows = write_preference_jsonl(tmp_path / "p.jsonl", 24)
    common = {"train.steps": 6, "checkpoint.interval": 3, "train.global_batch_size": 4, "train.grad_clip": 1.0}

    def run(name, stop_after=None):
        trainer = DPOTrainer(dpo_config(models, tmp_path, rows, **common, **{"run.name": name}), progress=False)
        trainer.setup()
        trainer.fit(stop_after=stop_after)
        return trainer

    straight = run("straight")
    run("resumed", stop_after=3)
    resumed = run("resumed")
    assert resumed.resumed_from == 3
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    drop = ("time", "step_time_s", "tokens_per_s", "mfu")
    logged = [[{k: v for k, v in r.items() if k not in drop} for r in t.metrics.read()] for t in (straight, resumed)]
    assert logged[0] == logged[1] and [r["step"] for r in logged[1]] == list(range(1, 7))
