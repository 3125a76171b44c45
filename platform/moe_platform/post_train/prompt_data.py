"""Prompt data for GRPO (data.format = "prompts"): rows with a `prompt` and whatever fields the reward functions read.

A row (JSONL or parquet, one file or every `*.jsonl`/`*.parquet` file under a folder in sorted path order) is
`{"prompt": [messages] or "text", ...}`: OpenAI-style messages are rendered with the model's own chat template and
its generation prompt (the tokens `apply_chat_template(messages, add_generation_prompt=True)` gives), a text is
tokenized as it is. Every other field of the row is kept as it is and handed to the reward functions with the
completion (e.g. `answer` for `moe_platform.rewards:exact_match`).

A prompt may have at most train.seq_len + 1 - grpo.max_new_tokens tokens, so that it and its longest completion fit
one training sequence. Bad rows stop the build with their file and line (for parquet, the row number), or are
skipped and counted with `data.on_bad_row = "skip"`: a row that is not a JSON object, no or an empty `prompt`, a
prompt that is neither text nor a list of {role, content} messages, one the chat template refuses, and one that is
too long (prompts are never cut: a cut prompt asks another question). The last rows are held out
(`data.val_fraction`) for the held-out reward of eval steps. A sample is a prompt: the sampler draws prompt ids.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from moe_platform.config.schema import DataConfig
from moe_platform.tokenizer import CHAT_ROLES, ChatTemplate
from moe_platform.train.chat_data import BadRow, iter_records
from moe_platform.train.data import HeldOutSplit, held_out_count

log = logging.getLogger("moe_platform.post_train")


def check_path(path: str) -> None:
    if not path:
        raise ValueError("data.format = 'prompts' needs data.path: a JSONL or parquet file of prompt rows, or a folder "
                         "of them")
    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"data.path {path!r} does not exist")


def prompt_ids(where: str, prompt: object, template: ChatTemplate, tokenizer: Tokenizer) -> list[int]:
    """The tokens of a row's prompt (see the module docstring), or BadRow naming what is wrong with it."""
    if isinstance(prompt, str):
        if not prompt:
            raise BadRow(where, "empty prompt")
        return tokenizer.encode(prompt, add_special_tokens=False).ids
    if not isinstance(prompt, list) or not prompt:
        raise BadRow(where, f"'prompt' must be a text or a non-empty list of {{'role', 'content'}} messages, got "
                            f"{type(prompt).__name__ if not isinstance(prompt, list) else 'an empty list'}")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise BadRow(where, f"prompt[{i}] must be an object with a 'role' ({', '.join(CHAT_ROLES)}) and a "
                                f"string 'content'")
    try:
        text = template.render([{"role": m["role"], "content": m["content"]} for m in prompt],
                               add_generation_prompt=True)
    except (TypeError, ValueError) as e:
        raise BadRow(where, f"the chat template refuses the prompt: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False).ids


@dataclass
class PromptDataset(HeldOutSplit):
    """Encoded prompts and their rows; the last ones are held out."""

    ids: list[np.ndarray]  # each prompt's token ids
    rows: list[dict]  # each row as the data holds it, for the reward functions
    where: list[str]  # each row's FILE:LINE
    val_fraction: float
    meta: dict = field(default_factory=dict)
    num_samples: int = field(init=False)
    val_count: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_samples = len(self.ids)
        self.val_count = held_out_count(self.num_samples, self.val_fraction)
        if self.num_samples - self.val_count < 1:
            raise ValueError(f"the prompt data holds {self.num_samples} usable prompts ({self.val_count} held out); "
                             f"add rows or lower data.val_fraction")

    def prompt(self, i: int) -> list[int]:
        return self.ids[int(i)].tolist()


def read_rows(cfg_data: DataConfig, limit: int | None = None) -> tuple[list[dict], list[str]]:
    """(the first `limit` rows that are JSON objects with a prompt, where they are): what reward checks run on."""
    check_path(cfg_data.path)
    rows, where = [], []
    for w, row in itertools.islice(iter_records(cfg_data.path, None, required=("prompt",)), limit):
        if not isinstance(row, BadRow) and row.get("prompt"):
            rows.append(row)
            where.append(w)
    return rows, where


def build_prompt_dataset(cfg_data: DataConfig, tokenizer: Tokenizer, template: ChatTemplate,
                         max_prompt_tokens: int) -> PromptDataset:
    """Read, encode and check every row (see the module docstring)."""
    check_path(cfg_data.path)
    ids, rows, where, skipped = [], [], [], []
    for w, row in iter_records(cfg_data.path, None, required=("prompt",)):
        try:
            if isinstance(row, BadRow):
                raise row
            if row.get("prompt") is None:
                raise BadRow(w, f"no 'prompt' (a row needs a prompt: messages or a text); the row has {sorted(row)}")
            tokens = prompt_ids(w, row["prompt"], template, tokenizer)
            if len(tokens) > max_prompt_tokens:
                raise BadRow(w, f"the prompt is {len(tokens)} tokens, more than the {max_prompt_tokens} that leave "
                                f"room for grpo.max_new_tokens within train.seq_len + 1 (raise train.seq_len or lower "
                                f"grpo.max_new_tokens)")
        except BadRow as bad:
            if cfg_data.on_bad_row == "error":
                raise ValueError(f"bad prompt row {bad} (set data.on_bad_row = 'skip' to skip and count bad rows)"
                                 ) from None
            skipped.append(str(bad))
            continue
        ids.append(np.asarray(tokens, dtype=np.int64))
        rows.append(row)
        where.append(w)
    if not ids:
        raise ValueError(f"prompt data {cfg_data.path!r} holds no usable prompt"
                         + (f" ({len(skipped)} bad rows skipped, e.g. {skipped[0]})" if skipped else ""))
    if skipped:
        log.warning("skipped %d bad prompt rows, e.g. %s", len(skipped), skipped[0])
    meta = {"path": cfg_data.path, "prompts": len(ids), "skipped_rows": len(skipped), "skipped_examples": skipped[:5],
            "max_prompt_tokens": max_prompt_tokens}
    return PromptDataset(ids, rows, where, cfg_data.val_fraction, meta)
