"""The engine's model loader: weights, tokenizer, end-of-text ids and chat template, from an export directory on
disk or from in-memory parts (a registry version's state dict and small files), placed on the engine's device and
dtype and quantized. No Ray here (`loader.load_engine` resolves registry versions to these parts)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_platform.checkpoint.hf import load_hf
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import MoETransformer, build_model
from moe_platform.serving.chat import ChatTemplate
from moe_platform.serving.quant import quantize_model


@dataclass
class LoadedModel:
    model: MoETransformer
    tokenizer: object  # a `tokenizers.Tokenizer`
    eos_token_ids: list[int]
    chat_template: ChatTemplate
    source: str


def load_export(model_dir: str | Path, device: torch.device, dtype: torch.dtype, quantization: str) -> LoadedModel:
    """An export directory (config.json, model.safetensors, tokenizer files)."""
    from moe_platform.tokenizer import load_tokenizer, model_stop_ids

    model_dir = Path(model_dir)
    args, state = load_hf(model_dir)
    model = build_model(args, device=device, dtype=dtype, seed=0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not match the model config (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    quantize_model(model, quantization)
    tokenizer = load_tokenizer(model_dir)
    return LoadedModel(model, tokenizer, model_stop_ids(tokenizer, model_dir), ChatTemplate.from_dir(model_dir),
                       str(model_dir))


def load_parts(args: ModelArgs, state: Mapping[str, torch.Tensor], files: Mapping[str, bytes | str], source: str,
               device: torch.device, dtype: torch.dtype, quantization: str) -> LoadedModel:
    """In-memory parts: our state dict (`MoETransformer.state_dict()` names, stacked experts) and the export's small
    files by name (tokenizer.json required; tokenizer_config.json, generation_config.json, config.json optional).
    `source` names the model in errors.

    The tensors become the parameters themselves (`assign=True`), not copies: a CPU tensor that already has the
    engine's dtype is used in place, so read-only views into shared memory (a Ray object-store buffer) are served
    from without a copy. The model never writes its weights at inference; writing to such a view would crash.
    A dtype or device conversion (e.g. float32 weights served as bfloat16) copies that tensor.
    """
    from tokenizers import Tokenizer

    from moe_platform.tokenizer import MODEL_CONFIG_FILES, stop_token_ids

    if "tokenizer.json" not in files:
        raise ValueError(f"{source}: no tokenizer.json among the model files {sorted(files)}")
    state = dict(state)
    if args.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = build_model(args, device=device, dtype=dtype, seed=0)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad_shapes = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or bad_shapes:
        raise ValueError(f"{source}: weights do not match the model args (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape {bad_shapes[:5]})")
    placed = {k: t if (t.dtype, t.device) == (expected[k].dtype, expected[k].device) else t.to(expected[k])
              for k, t in state.items()}
    model.load_state_dict(placed, strict=True, assign=True)
    quantize_model(model, quantization)
    tokenizer = Tokenizer.from_str(_text(files["tokenizer.json"]))
    eos = stop_token_ids(tokenizer, [json.loads(_text(files[n])) for n in MODEL_CONFIG_FILES if n in files], source)
    tok_config = json.loads(_text(files["tokenizer_config.json"])) if "tokenizer_config.json" in files else {}
    if "chat_template.jinja" in files:
        tok_config["chat_template"] = _text(files["chat_template.jinja"])
    return LoadedModel(model, tokenizer, eos, ChatTemplate.from_config(tok_config), source)


def write_export(args: ModelArgs, state: Mapping[str, torch.Tensor], files: Mapping[str, bytes | str], source: str,
                 prefix: str) -> Path:
    """In-memory parts (as `load_parts` takes them) written out as an export directory, in a new temporary directory
    named `prefix`...: for an engine core that reads its model from disk. The caller removes it when done."""
    from moe_platform.checkpoint.hf import export_hf

    if "tokenizer.json" not in files:
        raise ValueError(f"{source}: no tokenizer.json among the model files {sorted(files)}")
    out = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        export_hf(dict(state), args, out)
        for name, data in files.items():  # the export's own config, tokenizer and generation files
            (out / Path(name).name).write_bytes(data.encode() if isinstance(data, str) else data)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _text(data: bytes | str) -> str:
    return data.decode("utf-8") if isinstance(data, bytes) else data


__all__ = ["LoadedModel", "load_export", "load_parts", "write_export"]
