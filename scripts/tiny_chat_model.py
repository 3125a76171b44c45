"""Inputs of the fine-tuning example (scripts/finetune-example.sh), made here instead of downloaded: a tiny random
Qwen3-MoE saved by transformers as a Hugging Face model directory (sharded safetensors, a byte-level BPE tokenizer
with ChatML turn markers and chat template, as Qwen models ship them), and a chat JSONL of OpenAI-style messages;
with --preference, preference pairs for DPO (TRL's conversational format: the right answer chosen, an unhelpful one
rejected) and held-out texts for a rollout's quality probe; with --prompts, GRPO prompt rows (the sum asked for in
digits, with its answer and the answer's format); and random LoRA adapters (`random_adapter`) for the
adapter-serving tests and benchmark.

usage: python scripts/tiny_chat_model.py MODEL_DIR CHAT_JSONL [--rows N] [--preference PAIRS_JSONL PROBE_TXT]
       [--prompts PROMPTS_JSONL]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, with a default system turn when a conversation has none (as Qwen's templates add one).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def add_chatml(tokenizer_dir: Path) -> Path:
    """Turn a tokenizer directory written by moe_platform.tokenizer.save_tokenizer into a ChatML one: the turn
    markers as special tokens, <|im_end|> as end of text, and the template in chat_template.jinja (where transformers
    saves it)."""
    from moe_platform.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    tok.add_special_tokens([IM_START, IM_END])
    tok.save(str(tokenizer_dir / "tokenizer.json"))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config.update(eos_token=IM_END, pad_token=IM_END)
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (tokenizer_dir / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    return tokenizer_dir


def chat_rows(n: int) -> list[dict]:
    """`n` conversations of a small task: spell the sum of two digits."""
    rows = []
    for i in range(n):
        a, b = i % 10, (i * 7 + 3) % 10
        answer = spelled(a + b)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}? Answer in words."},
                                  {"role": "assistant", "content": f"{a} plus {b} is {answer}."}]})
    return rows


def spelled(total: int) -> str:
    return NUMBERS[total] if total < 10 else f"one {NUMBERS[total - 10]}"


REFUSALS = ["I do not know.", "Ask someone else.", "That is not something I can answer.", "No idea."]


def preference_rows(n: int) -> list[dict]:
    """`n` DPO pairs on the chat task's questions, one question each (so the last ones, which a run's
    data.val_fraction holds out, are questions no training pair asks): the answer in words chosen, a refusal
    rejected."""
    rows = []
    for i in range(n):
        a, b = i % 10, (i // 10) % 10
        prompt = [{"role": "user", "content": f"What is {a} plus {b}? Answer in words."}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"{a} plus {b} is "
                                                                                   f"{spelled(a + b)}."}],
                     "rejected": [{"role": "assistant", "content": REFUSALS[i % len(REFUSALS)]}]})
    return rows


def prompt_rows(n: int) -> list[dict]:
    """`n` GRPO prompts of the chat task, asking for the sum in digits: `answer` holds it (moe_platform.rewards:
    exact_match), `pattern` the format asked for, an answer that starts with a number (moe_platform.rewards:regex)."""
    rows = []
    for i in range(n):
        a, b = i % 10, (i * 3 + 1) % 10
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}? Answer with the number."}],
                     "answer": str(a + b), "pattern": r"\d+\b.*"})
    return rows


def probe_texts(n: int = 12) -> str:
    """Held-out question-and-answer texts (blank-line separated) for a rollout's quality probe."""
    texts = []
    for i in range(n):
        a, b = (i * 7 + 5) % 10, (i * 3 + 4) % 10
        texts.append(f"What is {a} plus {b}? Answer in words.\n{a} plus {b} is {spelled(a + b)}.")
    return "\n\n".join(texts) + "\n"


def build(model_dir: Path, chat_file: Path, rows: int, hidden: int = 64, layers: int = 2, heads: int = 4,
          experts: int = 8, moe_intermediate: int = 32, vocab: int = 512, max_len: int = 512) -> None:
    import torch
    import transformers

    from moe_platform.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
    from moe_platform.train.data import iter_documents

    model_dir.mkdir(parents=True, exist_ok=True)
    data = chat_rows(rows)
    texts = [m["content"] for r in data for m in r["messages"]] + list(iter_documents("", max_bytes=300_000))
    save_tokenizer(train_tokenizer(texts, vocab), model_dir, model_max_length=max_len)
    add_chatml(model_dir)
    tok = load_tokenizer(model_dir)
    im_end = tok.token_to_id(IM_END)
    config = transformers.Qwen3MoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads // 2, head_dim=hidden // heads, intermediate_size=2 * hidden,
        moe_intermediate_size=moe_intermediate, num_experts=experts, num_experts_per_tok=2, norm_topk_prob=True,
        max_position_embeddings=max_len, tie_word_embeddings=False,
        bos_token_id=im_end, eos_token_id=im_end, pad_token_id=im_end)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = im_end
    model.save_pretrained(model_dir, max_shard_size="200KB")
    chat_file.parent.mkdir(parents=True, exist_ok=True)
    chat_file.write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"tiny Qwen3-MoE in {model_dir} ({sum(p.numel() for p in model.parameters())} parameters, "
          f"{len(list(model_dir.glob('*.safetensors')))} shards); {rows} conversations in {chat_file}")


def random_adapter(args, base_state: dict, targets: tuple[str, ...], rank: int, seed: int, out: Path,
                   tokenizer_dir: Path | None) -> tuple[Path, Path | None]:
    """A random LoRA adapter (A and B random, alpha = 2 * rank) on the base model with weights `base_state`, in
    place of a trained one: (its directory, as a LoRA run exports it; the export of the base model with it merged,
    written only when `tokenizer_dir` is given)."""
    import torch

    from moe_platform.checkpoint.adapters import export_adapters
    from moe_platform.checkpoint.hf import export_hf
    from moe_platform.model.lora import apply_lora, merge_adapters
    from moe_platform.model.transformer import build_model

    model = build_model(args, seed=0)
    model.load_state_dict(base_state)
    apply_lora(model, rank, 2.0 * rank, 0.0, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if ".lora." in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.15)
    state = model.state_dict()
    adapter = export_adapters(state, {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0}, out / "adapter", "base")
    if tokenizer_dir is None:
        return adapter, None
    merged = export_hf(merge_adapters(state, 2.0 * rank, rank), args, out / "merged", tokenizer_dir=tokenizer_dir)
    return adapter, merged



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("chat_jsonl", type=Path)
    parser.add_argument("--rows", type=int, default=400, help="conversations to write (default 400)")
    parser.add_argument("--preference", nargs=2, type=Path, metavar=("PAIRS_JSONL", "PROBE_TXT"),
                        help="also write DPO preference pairs and a quality-probe text file")
    parser.add_argument("--pairs", type=int, default=100, help="preference pairs to write (default 100)")
    parser.add_argument("--prompts", type=Path, metavar="PROMPTS_JSONL",
                        help="also write GRPO prompt rows (the sum asked for in digits, with its answer and format)")
    args = parser.parse_args(argv)
    build(args.model_dir, args.chat_jsonl, args.rows)
    if args.preference:
        pairs, probe = args.preference
        pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(args.pairs)))
        probe.write_text(probe_texts())
        print(f"{args.pairs} preference pairs in {pairs}; quality-probe texts in {probe}")
    if args.prompts:
        args.prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(100)))
        print(f"100 GRPO prompts in {args.prompts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
