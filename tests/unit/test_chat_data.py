"""Chat fine-tuning data: the model's own chat template gives exactly transformers' `apply_chat_template` tokens, the
loss counts only assistant tokens, packed conversations compute what they compute alone, bad rows name their file
and line (or are skipped and counted), and chat runs resume bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from moe_platform.config import load_config
from moe_platform.config.schema import DataConfig
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from moe_platform.tokenizer import ChatTemplate, load_tokenizer
from moe_platform.train.backends import TokenLoss
from moe_platform.train.chat_data import build_chat_dataset, encode_conversation
from moe_platform.train.data import IGNORE_INDEX
from moe_platform.train.trainer import Trainer
from tinyrun import CHAT_ROWS, chatml_tokenizer, tiny_overrides, tiny_tokenizer, write_chat_jsonl


@pytest.fixture(scope="module", params=["chatml", "ours"])
def tokenizer_dir(request, tmp_path_factory) -> Path:
    """An imported model's tokenizer (ChatML template in chat_template.jinja) and our own (CHAT_TEMPLATE)."""
    make = chatml_tokenizer if request.param == "chatml" else tiny_tokenizer
    return make(tmp_path_factory.mktemp(request.param))


def test_tokens_are_apply_chat_template_and_only_assistant_turns_count(tokenizer_dir):
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    template, tok = ChatTemplate.from_dir(tokenizer_dir), load_tokenizer(tokenizer_dir)
    end = "<|im_end|>\n" if (tokenizer_dir / "chat_template.jinja").exists() else "<|endoftext|>\n"
    for messages in CHAT_ROWS:
        ids, counted = encode_conversation(messages, template, tok)
        assert ids.tolist() == hf.apply_chat_template(messages, tokenize=True)["input_ids"]
        for prompt in (True, False):
            assert template.render(messages, prompt) == hf.apply_chat_template(messages, tokenize=False,
                                                                               add_generation_prompt=prompt)
        learned = tok.decode(ids[counted].tolist(), skip_special_tokens=False)
        assert learned == "".join(m["content"] + end for m in messages if m["role"] == "assistant")


def dataset(tokenizer_dir: Path, rows: Path, tmp_path: Path, seq_len: int = 256, **data) -> object:
    cfg = DataConfig(path=str(rows), format="chat", val_fraction=0.0, cache_dir=str(tmp_path / "cache"), **data)
    return build_chat_dataset(cfg, load_tokenizer(tokenizer_dir), ChatTemplate.from_dir(tokenizer_dir), seq_len)


def tiny_model(vocab: int, seq_len: int = 256):
    args = ModelArgs(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48,
                     num_experts=4, top_k=2, max_seq_len=seq_len)
    return build_model(args, seed=0).eval()


def summed_loss(model, ds) -> tuple[torch.Tensor, int]:
    ids = np.arange(len(ds))
    batch = ds.get(ids)
    loss = TokenLoss()
    logits = model(batch[0], segments=batch[2]) if len(batch) > 2 else model(batch[0])
    return loss(logits, batch[1]), ds.count_targets(ids)


def test_packed_conversations_compute_what_they_compute_alone(tokenizer_dir, tmp_path):
    rows = write_chat_jsonl(tmp_path / "chat.jsonl", rows=12)
    packed = dataset(tokenizer_dir, rows, tmp_path)
    padded = dataset(tokenizer_dir, rows, tmp_path, packing=False)
    assert len(padded) == 12 and len(packed) < 12, "several conversations share each packed sequence"
    assert packed.meta["counted_tokens"] == padded.meta["counted_tokens"] > 0
    model = tiny_model(load_tokenizer(tokenizer_dir).get_vocab_size())
    with torch.no_grad():
        (a, n_packed), (b, n_padded) = summed_loss(model, packed), summed_loss(model, padded)
    assert n_packed == n_padded == packed.meta["counted_tokens"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    # Without the per-document mask the same packed rows would attend across conversations and differ.
    batch = packed.get(np.arange(len(packed)))
    with torch.no_grad():
        crossed = TokenLoss()(model(batch[0]), batch[1])
    assert abs(float(crossed) - float(a)) > 1e-3


def test_masked_tokens_change_no_gradient(tokenizer_dir, tmp_path):
    ds = dataset(tokenizer_dir, write_chat_jsonl(tmp_path / "chat.jsonl", rows=6), tmp_path)
    model = tiny_model(load_tokenizer(tokenizer_dir).get_vocab_size())
    tokens, targets, segments = ds.get(np.arange(len(ds)))
    logits = model(tokens, segments=segments)
    logits.retain_grad()
    loss = TokenLoss()
    loss.scale = 1.0 / ds.count_targets(np.arange(len(ds)))
    value = loss(logits, targets)
    value.backward()
    masked = targets == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    assert torch.count_nonzero(logits.grad[masked]) == 0, "a prompt or padding token moved the gradient"
    assert (logits.grad[~masked].abs().sum(-1) > 0).all()
    want = F.cross_entropy(logits[~masked].float(), targets[~masked])
    torch.testing.assert_close(value, want, rtol=1e-6, atol=0)


def test_parquet_rows_give_the_same_sequences(tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = write_chat_jsonl(tmp_path / "chat.jsonl", rows=9)
    messages = [json.loads(line)["messages"] for line in rows.read_text().splitlines()]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"messages": messages}), tmp_path / "pq" / "part-0.parquet")
    a = dataset(tokenizer_dir, rows, tmp_path / "a")
    b = dataset(tokenizer_dir, tmp_path / "pq", tmp_path / "b")
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.counted, b.counted)


BAD_ROWS = {
    "not json": ("{'messages': oops", r"not valid JSON"),
    "no messages": (json.dumps({"conversation": []}), r"no 'messages' key"),
    "empty": (json.dumps({"messages": []}), r"messages must be a non-empty list"),
    "unknown role": (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), r"unknown role 'wizard'"),
    "no assistant": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), r"no assistant message"),
    "too long": (json.dumps({"messages": [{"role": "user", "content": "x"},
                                          {"role": "assistant", "content": "word " * 80}]}), r"longer than"),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_a_bad_row_is_named_by_file_and_line(kind, tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    rows = write_chat_jsonl(tmp_path / "chat.jsonl", rows=3)
    line, match = BAD_ROWS[kind]
    with open(rows, "a") as f:
        f.write("\n" + line + "\n")  # a blank line is allowed: the bad row is line 5
    with pytest.raises(ValueError, match=rf"{rows}:5: .*{match}.*data.on_bad_row = 'skip'"):
        dataset(tok, rows, tmp_path, seq_len=128)


def test_bad_rows_are_skipped_and_counted(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    rows = write_chat_jsonl(tmp_path / "chat.jsonl", rows=8)
    with open(rows, "a") as f:
        f.writelines(line + "\n" for line, _ in BAD_ROWS.values())
    ds = dataset(tok, rows, tmp_path, seq_len=128, on_bad_row="skip")
    assert ds.meta["skipped_rows"] == len(BAD_ROWS) and ds.meta["conversations"] == 8
    assert ds.meta["skipped_examples"][0].startswith(f"{rows}:9: not valid JSON")
    cut = dataset(tok, rows, tmp_path / "cut", seq_len=128, on_bad_row="skip", truncation="truncate")
    assert cut.meta["truncated_rows"] == 1 and cut.meta["skipped_rows"] == len(BAD_ROWS) - 1


def chat_trainer(tmp_path, rows: Path, **extra) -> Trainer:
    overrides = {"data.format": "chat", "train.seq_len": 128, "model.max_seq_len": 128, "train.steps": 6,
                 "checkpoint.interval": 3, "checkpoint.async_save": "false", "checkpoint.export": "false",
                 "train.eval_interval": 0, **extra}
    cfg = load_config(None, tiny_overrides(rows, tmp_path, **overrides))
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    return trainer


def test_the_loss_is_the_mean_over_counted_tokens_however_the_batch_is_split(tmp_path):
    rows = write_chat_jsonl(tmp_path / "chat.jsonl", rows=40)
    first = {}
    for mbs in (1, 4):
        trainer = chat_trainer(tmp_path, rows, **{"run.name": f"mbs{mbs}", "train.micro_batch_size": mbs})
        first[mbs] = trainer.train_step()
    assert first[1]["loss_tokens"] == first[4]["loss_tokens"] > 0
    assert abs(first[1]["loss"] - first[4]["loss"]) <= 1e-6 * first[4]["loss"], first


def test_chat_runs_resume_bit_for_bit(tmp_path):
    rows = write_chat_jsonl(tmp_path / "chat.jsonl", rows=40)
    straight = chat_trainer(tmp_path, rows, **{"run.name": "straight"})
    straight.fit()
    stopped = chat_trainer(tmp_path, rows, **{"run.name": "resumed"})
    stopped.fit(stop_after=3)
    resumed = chat_trainer(tmp_path, rows, **{"run.name": "resumed"})
    assert resumed.resumed_from == 3
    resumed.fit()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == [json.loads(line)["loss"] for line in
                                           (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]


def test_an_imported_chat_models_end_of_turn_stops_generation_and_survives_export(tmp_path):
    """A Qwen-style model lists two end-of-text ids (<|im_end|> ends a chat turn, <|endoftext|> a document): serving
    stops at either, fine-tuning pads with the first, and the export keeps both."""
    from moe_platform.checkpoint.export import export_checkpoint
    from moe_platform.serving.engine import Engine
    from tinyrun import save_tiny_hf_model

    tok_dir = chatml_tokenizer(tmp_path / "tok")
    im_end = load_tokenizer(tok_dir).token_to_id("<|im_end|>")
    _, model_dir = save_tiny_hf_model("Qwen3MoeForCausalLM", tmp_path / "model", tok_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, 0]}))
    assert Engine.from_pretrained(model_dir).stop_token_ids == {im_end, 0}
    rows = write_chat_jsonl(tmp_path / "chat.jsonl", rows=12)
    trainer = chat_trainer(tmp_path, rows, **{"init.from_hf": str(model_dir), "train.steps": 1, "train.warmup": 0,
                                              "checkpoint.interval": 0})
    assert trainer.eos_id == im_end
    assert (trainer.dataset.tokens[trainer.dataset.segments == -1] == im_end).all(), "padding is the first eos"
    trainer.fit()
    export = export_checkpoint(trainer.run_dir, tmp_path / "export")
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == [im_end, 0]
    assert (export / "chat_template.jinja").read_text() == (tok_dir / "chat_template.jinja").read_text()
    assert Engine.from_pretrained(export).stop_token_ids == {im_end, 0}
