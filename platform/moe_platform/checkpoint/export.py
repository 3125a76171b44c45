"""Export any training checkpoint, from any layout, as a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

from moe_platform.checkpoint.adapters import export_adapters
from moe_platform.checkpoint.hf import export_hf
from moe_platform.checkpoint.sharded import ShardedReader
from moe_platform.checkpoint.store import load_json, resolve_checkpoint
from moe_platform.model.args import ModelArgs
from moe_platform.model.lora import is_lora_name, merge_adapters


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, merge: bool = False) -> Path:
    """Checkpoint dir (or run dir: its latest valid checkpoint) -> HF directory that transformers loads.

    A LoRA run's checkpoint exports its adapters (PEFT format, checkpoint/adapters.py), or with `merge` the model
    with the adapters folded in."""
    ckpt = resolve_checkpoint(checkpoint)
    trainer = load_json(ckpt, "trainer.json")
    args = ModelArgs.from_dict(trainer["model_args"])
    state = ShardedReader(ckpt).full_state_dict()
    if any(is_lora_name(k) for k in state):
        config = trainer.get("config", {})
        lora = config.get("lora", {})
        if not merge:
            return export_adapters(state, lora, out_dir, base_model=config.get("init", {}).get("from_hf", ""),
                                   args=args)
        state = merge_adapters(state, lora["alpha"], lora["rank"])
    tok_dir = ckpt / "tokenizer"
    eos: list[int] = [0]
    if (tok_dir / "tokenizer.json").exists():
        from moe_platform.tokenizer import load_tokenizer, model_stop_ids

        eos = model_stop_ids(load_tokenizer(tok_dir), tok_dir)
    return export_hf(state, args, out_dir, tok_dir if tok_dir.exists() else None, eos_id=eos)
