"""Preference data for DPO: rows of TRL's conversational preference format, rendered with the model's own chat template.

A row is `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}` (JSONL or parquet, one file or every
`*.jsonl`/`*.parquet` file under a folder in sorted path order), or the implicit-prompt form: `chosen` and `rejected`
are whole conversations and their shared leading messages are the prompt (as TRL's `extract_prompt` reads them).
Messages are `{"role", "content"}` as in chat data (train/chat_data.py checks them).

Each pair becomes two sequences, prompt + chosen and prompt + rejected, each the tokens of
`apply_chat_template(prompt + response)` (rendered once, tokenized once), one sequence per row of seq_len+1 tokens,
padded after its end. Only the response counts: the tokens after render(prompt, add_generation_prompt=True), the
template's end-of-turn marker included, the same tokens TRL's DPOTrainer scores. A sample is a pair: the sampler
draws pair ids, and `get` returns the chosen sequences of the pairs first and their rejected ones after, so that a
pair's two sequences always share a micro-batch (and a rank).

Bad rows stop the build with their file and line (for parquet, the row number), or are skipped and counted with
`data.on_bad_row = "skip"`: a row that is not a JSON object, no or an empty `chosen`/`rejected`, no shared prompt
(implicit form), a response without an assistant message or with nothing in it, a malformed message, and, under
`data.truncation = "error"`, a sequence longer than seq_len+1 tokens (a prompt that alone fills seq_len+1 tokens is
named as such). With `truncation = "truncate"` long sequences are cut at seq_len+1 tokens, and a pair whose prompt
leaves no response token in either sequence is still a bad row. The encoded pairs are cached once per (data,
tokenizer, template, seq_len, options) beside the other token caches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from moe_platform.checkpoint.files import atomic_output
from moe_platform.config.schema import DataConfig
from moe_platform.tokenizer import ChatTemplate
from moe_platform.train.chat_data import (
    BadRow,
    cached_encoding,
    chat_files,
    check_messages,
    encode_response,
    iter_records,
)
from moe_platform.train.data import IGNORE_INDEX, HeldOutSplit, held_out_count

log = logging.getLogger("moe_platform.post_train")

_CACHE_FORMAT_VERSION = 1
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def split_pair(where: str, row: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) message lists of a row in either form, or BadRow naming what is wrong."""
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if value is None or (isinstance(value, list) and not value):
            raise BadRow(where, f"no {key} response (every row needs non-empty 'chosen' and 'rejected' message "
                                f"lists)")
        if not isinstance(value, list):
            raise BadRow(where, f"'{key}' must be a list of {{'role', 'content'}} messages, got "
                                f"{type(value).__name__} (only the conversational preference format is read)")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row and row["prompt"] is not None:
        prompt = row["prompt"]
        if not isinstance(prompt, list) or not prompt:
            raise BadRow(where, "'prompt' must be a non-empty list of {'role', 'content'} messages")
    else:  # implicit prompt: the messages both conversations start with
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise BadRow(where, "no prompt: the row has no 'prompt', and 'chosen' and 'rejected' do not start with "
                                "the same messages")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise BadRow(where, f"empty {key} response: it holds nothing after the prompt")
    return prompt, chosen, rejected


def _check_response(where: str, key: str, messages: list[dict]) -> None:
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        raise BadRow(where, f"the {key} response has no assistant message")
    if not any(m["content"].strip() for m in replies):
        raise BadRow(where, f"empty {key} response: its assistant message has no content")


def encode_pair(where: str, row: dict, template: ChatTemplate, tokenizer: Tokenizer, width: int,
                truncate: bool) -> tuple[list[np.ndarray], list[np.ndarray], bool]:
    """([chosen ids, rejected ids], [their counted masks], whether one was cut) of a row; sequences of at most
    `width` tokens. Raises BadRow (see the module docstring)."""
    prompt, chosen, rejected = split_pair(where, row)
    ids, masks, cut = [], [], False
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        messages = check_messages(where, prompt + response)
        _check_response(where, key, messages[len(prompt):])
        seq, counted = encode_response(messages[:len(prompt)], messages[len(prompt):], template, tokenizer, where)
        if len(seq) > width:
            prompt_tokens = int(np.argmax(counted)) if counted.any() else len(seq)
            if not truncate:
                what = (f"the prompt alone is {prompt_tokens} tokens, which leaves no room for the response"
                        if prompt_tokens >= width else f"the {key} sequence is {len(seq)} tokens")
                raise BadRow(where, f"{what}: longer than train.seq_len+1 = {width} (raise train.seq_len, or set "
                                    f"data.truncation = 'truncate')")
            seq, counted, cut = seq[:width], counted[:width], True
        if not counted[1:].any():
            raise BadRow(where, f"no {key} response token within the first {width} tokens: the prompt fills them")
        ids.append(seq)
        masks.append(counted)
    return ids, masks, cut


@dataclass
class PreferenceDataset(HeldOutSplit):
    """Encoded pairs: tokens (N, 2, seq_len+1), the chosen sequence first; the last pairs are held out."""

    tokens: np.ndarray  # (N, 2, seq_len+1)
    counted: np.ndarray  # (N, 2, seq_len+1) bool: a response token (scored when it is a target)
    lengths: np.ndarray  # (N, 2): tokens of each sequence before its padding
    seq_len: int
    val_fraction: float
    cache_path: Path
    from_cache: bool = False
    meta: dict = field(default_factory=dict)
    num_samples: int = field(init=False)
    val_count: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_samples = len(self.tokens)
        self.val_count = held_out_count(self.num_samples, self.val_fraction)
        if self.num_samples - self.val_count < 2:
            raise ValueError(f"the preference data holds {self.num_samples} usable pairs ({self.val_count} held out "
                             f"for validation); at least 2 training pairs are needed: add rows or lower "
                             f"data.val_fraction")

    def _rows(self, pair_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(pair_ids, dtype=np.int64)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= self.num_samples)):
            raise ValueError(f"pair ids must be a 1-D array in [0, {self.num_samples}), got {pair_ids!r}")
        # (B, 2, W) -> (2B, W): the B chosen sequences, then the B rejected ones
        tokens = self.tokens[ids].astype(np.int64).transpose(1, 0, 2).reshape(-1, self.seq_len + 1)
        counted = self.counted[ids].transpose(1, 0, 2).reshape(-1, self.seq_len + 1)
        return tokens, counted[:, 1:]

    def get(self, pair_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both (2B, seq_len): rows [0, B) the pairs' chosen sequences, rows [B, 2B) their
        rejected ones; targets that are not response tokens are IGNORE_INDEX."""
        tokens, scored = self._rows(pair_ids)
        inputs = torch.from_numpy(tokens[:, :-1].copy())
        targets = torch.from_numpy(np.where(scored, tokens[:, 1:], IGNORE_INDEX))
        return inputs, targets

    def count_targets(self, pair_ids: np.ndarray) -> int:
        """How many response tokens of these pairs are scored (both sequences)."""
        return int(self._rows(pair_ids)[1].sum())


def preference_cache_key(cfg_data: DataConfig, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int,
                         pad_id: int) -> str:
    payload = {
        "version": _CACHE_FORMAT_VERSION,
        "kind": "preference",
        "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in chat_files(cfg_data.path)],
        "tokenizer": hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest(),
        "template": [template.template, template.special_tokens],
        "seq_len": seq_len,
        "truncation": cfg_data.truncation,
        "on_bad_row": cfg_data.on_bad_row,
        "pad": pad_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def build_preference_dataset(cfg_data: DataConfig, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int,
                             cache_dir: Path | None = None, pad_id: int = 0) -> PreferenceDataset:
    """Encode and check the pairs once (or reuse the cache): see the module docstring."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    key = preference_cache_key(cfg_data, tokenizer, template, seq_len, pad_id)
    arrays, meta, meta_path, from_cache = cached_encoding(
        cfg_data, "preference", key, ("tokens", "counted", "lengths"),
        lambda parts: _encode_pairs(cfg_data, tokenizer, template, seq_len, pad_id, parts), cache_dir)
    return PreferenceDataset(arrays["tokens"], arrays["counted"], arrays["lengths"], seq_len, cfg_data.val_fraction,
                             meta_path, from_cache=from_cache, meta=meta)


def _encode_pairs(cfg_data: DataConfig, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int, pad_id: int,
                  parts: dict[str, Path]) -> dict:
    width = seq_len + 1
    dtype = np.dtype(np.uint16) if tokenizer.get_vocab_size() < 65536 else np.dtype(np.uint32)
    tokens: list[np.ndarray] = []
    counted: list[np.ndarray] = []
    lengths: list[tuple[int, int]] = []
    skipped: list[str] = []
    truncated = scored = 0
    rows = tqdm(iter_records(cfg_data.path, PREFERENCE_COLUMNS, required=("chosen", "rejected")),
                desc="encoding preference rows", unit=" rows", disable=not sys.stderr.isatty())
    for where, row in rows:
        try:
            if isinstance(row, BadRow):
                raise row
            ids, masks, cut = encode_pair(where, row, template, tokenizer, width,
                                          truncate=cfg_data.truncation == "truncate")
        except BadRow as bad:
            if cfg_data.on_bad_row == "error":
                raise ValueError(f"bad preference row {bad} (set data.on_bad_row = 'skip' to skip and count bad "
                                 f"rows)") from None
            skipped.append(str(bad))
            continue
        pair = np.full((2, width), pad_id, dtype=dtype)
        mask = np.zeros((2, width), dtype=bool)
        for i, (seq, m) in enumerate(zip(ids, masks, strict=True)):
            pair[i, :len(seq)] = seq
            mask[i, :len(m)] = m
        tokens.append(pair)
        counted.append(mask)
        lengths.append((len(ids[0]), len(ids[1])))
        truncated += int(cut)
        scored += int(mask[:, 1:].sum())
    if not tokens:
        raise ValueError(f"preference data {cfg_data.path!r} holds no usable pair"
                         + (f" ({len(skipped)} bad rows skipped, e.g. {skipped[0]})" if skipped else ""))
    for name, array in (("tokens", np.stack(tokens)), ("counted", np.stack(counted)),
                        ("lengths", np.asarray(lengths, dtype=np.int32))):
        with atomic_output(parts[name]) as f:
            np.save(f, array)
    return {"path": cfg_data.path, "pairs": len(tokens), "response_tokens": scored, "truncated_rows": truncated,
            "skipped_rows": len(skipped), "skipped_examples": skipped[:5], "seq_len": seq_len}
