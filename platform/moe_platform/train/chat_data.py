"""Chat fine-tuning data: OpenAI-style conversations rendered with the model's own chat template, with the loss on
assistant tokens only, packed into training sequences in which each conversation attends only to itself (or, with
`data.packing = false`, one conversation per sequence, padded).

Rows come from JSONL (one JSON object per line; blank lines are allowed) or parquet, read from one file or from every
`*.jsonl`/`*.parquet` file under a folder in sorted path order. A row holds its conversation under
`data.messages_column` (default "messages"): a list of {"role", "content"} with roles system, developer, user,
assistant or tool and string content.

The tokens of a conversation are exactly `tokenizer.apply_chat_template(messages)`: the template renders the whole
conversation and the text is tokenized once. The assistant tokens are found by rendering growing prefixes: assistant
message i covers the characters from the end of render(messages[:i], add_generation_prompt=True) to the end of
render(messages[:i+1]), so it includes the template's end-of-turn marker and the model learns to stop. A token is a
counted target when its first character lies in such a span.

Bad rows (not JSON, no messages, an unknown role, no assistant message, longer than seq_len+1 tokens under
`data.truncation = "error"`) stop the build with their file and line (for parquet, the row number), or are skipped and
counted with `data.on_bad_row = "skip"`. The packed rows are cached once per (data, tokenizer, template, seq_len,
options) next to the text token caches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from moe_platform.checkpoint.files import atomic_output
from moe_platform.config.schema import DataConfig
from moe_platform.tokenizer import ChatTemplate
from moe_platform.train.data import (
    IGNORE_INDEX,
    HeldOutSplit,
    default_cache_dir,
    held_out_count,
    walk_sorted,
    write_json_atomic,
)

log = logging.getLogger("moe_platform.train")

_CACHE_FORMAT_VERSION = 1
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_ROW_SUFFIXES = (".jsonl", ".parquet")


class BadRow(ValueError):
    """A row that cannot become a training sample; `where` is FILE:LINE."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------------
# Reading rows


def chat_files(path: str) -> list[Path]:
    """The JSONL/parquet files of chat data at `path`: the file itself, or every such file under the folder."""
    if not path:
        raise ValueError("data.format = 'chat' needs data.path: a JSONL or parquet file, or a folder of them")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path {path!r} does not exist")
    if root.is_file():
        if root.suffix not in _ROW_SUFFIXES:
            raise ValueError(f"chat data {path!r} must be a .jsonl or .parquet file (or a folder of them)")
        return [root.resolve()]
    files = [f for f in walk_sorted(root.resolve()) if f.suffix in _ROW_SUFFIXES]
    if not files:
        raise ValueError(f"chat data folder {path!r} holds no .jsonl or .parquet file")
    return files


def iter_rows(path: str, column: str) -> Iterator[tuple[str, object]]:
    """(FILE:LINE, the row's messages value) for every row; a row that cannot be read yields a BadRow as value."""
    for where, obj in iter_records(path, (column,), hint="set data.messages_column"):
        if isinstance(obj, BadRow) or column in obj:
            yield where, obj if isinstance(obj, BadRow) else obj[column]
        else:
            yield where, BadRow(where, f"no {column!r} key (set data.messages_column if the messages are under "
                                       f"another key)")


def iter_records(path: str, columns: tuple[str, ...] | None, required: tuple[str, ...] | None = None,
                 hint: str = "") -> Iterator[tuple[str, dict | BadRow]]:
    """(FILE:LINE, {column: value} of the columns a row has; every column with `columns` None) for every row of the
    JSONL/parquet files at `path`; a JSONL line that is not a JSON object yields a BadRow. A parquet file lacking a
    `required` column (default: all of `columns`) is an error naming its columns, and `hint`."""
    required = (columns or ()) if required is None else required
    for file in chat_files(path):
        if file.suffix == ".parquet":
            yield from _parquet_rows(file, columns, required, hint)
            continue
        with open(file, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{file}:{lineno}"
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield where, BadRow(where, "not UTF-8 text")
                    continue
                except json.JSONDecodeError as e:
                    yield where, BadRow(where, f"not valid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(obj, dict):
                    yield where, BadRow(where, f"a row must be a JSON object with {' and '.join(map(repr, required))}"
                                               f", got {type(obj).__name__}")
                    continue
                yield where, obj if columns is None else {k: obj[k] for k in columns if k in obj}


def _parquet_rows(file: Path, columns: tuple[str, ...] | None, required: tuple[str, ...],
                  hint: str) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"cannot read parquet file {file}: {e}") from e
    names = pf.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"parquet file {file} has no column {missing[0]!r}; available columns: {', '.join(names)}"
                         + (f" ({hint})" if hint else ""))
    present = names if columns is None else [c for c in columns if c in names]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=present):
            for value in batch.to_pylist():
                row += 1
                yield f"{file}:{row}", value
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"corrupt parquet file {file} after row {row}: {e}") from e


def check_messages(where: str, messages: object) -> list[dict]:
    """The conversation as a list of {"role", "content"} dicts, or BadRow naming what is wrong with it."""
    if isinstance(messages, BadRow):
        raise messages
    if not isinstance(messages, list) or not messages:
        raise BadRow(where, f"messages must be a non-empty list of {{'role', 'content'}} objects, got "
                            f"{type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise BadRow(where, f"messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise BadRow(where, f"messages[{i}] has unknown role {m['role']!r}; expected one of "
                                f"{', '.join(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise BadRow(where, f"messages[{i}]['content'] must be a string, got {type(m['content']).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow(where, "no assistant message: nothing to learn from")
    return out


def encode_conversation(messages: list[dict], template: ChatTemplate, tokenizer: Tokenizer,
                        where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """(token ids, counted) of a conversation: the ids `apply_chat_template(messages)` gives, and True for each token
    of an assistant turn (see the module docstring)."""
    try:
        text = template.render(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = template.render(messages[:i], add_generation_prompt=True) if i else ""
            through = template.render(messages[: i + 1], add_generation_prompt=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise BadRow(where, "the chat template does not render this conversation's turns as prefixes of "
                                    "each other, so its assistant tokens cannot be told apart")
            spans.append((len(before), len(through)))
    except (TypeError, ValueError) as e:
        raise e if isinstance(e, BadRow) else BadRow(where, str(e)) from None
    return _tokens_in_spans(text, spans, tokenizer)


def encode_response(prompt: list[dict], response: list[dict], template: ChatTemplate, tokenizer: Tokenizer,
                    where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """(token ids, counted) of `prompt + response` rendered as one conversation (the ids `apply_chat_template` gives),
    with True for each token of the response: everything after render(prompt, add_generation_prompt=True), its
    end-of-turn marker included (preference data: only the response is scored)."""
    try:
        before = template.render(prompt, add_generation_prompt=True)
        text = template.render(prompt + response, add_generation_prompt=False)
    except (TypeError, ValueError) as e:
        raise BadRow(where, str(e)) from None
    if not text.startswith(before):
        raise BadRow(where, "the chat template does not render the prompt (with its generation prompt) as a prefix of "
                            "the whole conversation, so the response tokens cannot be told apart")
    return _tokens_in_spans(text, [(len(before), len(text))], tokenizer)


def _tokens_in_spans(text: str, spans: list[tuple[int, int]], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The ids of `text`, tokenized once, and True for each token whose first character lies in one of `spans`."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(enc.ids))
    counted = np.zeros(len(enc.ids), dtype=bool)
    for lo, hi in spans:
        counted |= (starts >= lo) & (starts < hi)
    return np.asarray(enc.ids, dtype=np.int64), counted


def iter_chat_texts(cfg_data: DataConfig) -> Iterator[str]:
    """The message contents of the readable rows (what a tokenizer trained from scratch learns from)."""
    for where, value in iter_rows(cfg_data.path, cfg_data.messages_column):
        try:
            messages = check_messages(where, value)
        except BadRow:
            continue
        for m in messages:
            if m["content"]:
                yield m["content"]


# ---------------------------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class ChatDataset(HeldOutSplit):
    """Rows of seq_len+1 tokens holding whole conversations; the last rows are validation."""

    tokens: np.ndarray  # (N, seq_len+1)
    counted: np.ndarray  # (N, seq_len+1) bool: this token is a target the loss counts (an assistant token)
    segments: np.ndarray  # (N, seq_len+1) int16: the conversation each token belongs to within its row; padding -1
    seq_len: int
    val_fraction: float
    packed: bool
    cache_path: Path
    from_cache: bool = False
    meta: dict = field(default_factory=dict)
    num_samples: int = field(init=False)
    val_count: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_samples = len(self.tokens)
        self.val_count = held_out_count(self.num_samples, self.val_fraction)
        if self.num_samples - self.val_count < 2:
            raise ValueError(
                f"the chat data packs into only {self.num_samples} sequences of seq_len+1={self.seq_len + 1} tokens "
                f"({self.val_count} held out for validation); at least 2 training sequences are needed: add rows, or "
                f"lower train.seq_len or data.val_fraction")

    def _rows(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.asarray(sample_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise ValueError(f"sample ids must lie in [0, {self.num_samples}), got min {ids.min()} max {ids.max()}")
        seg = self.segments[ids].astype(np.int64)
        # A target counts when it is an assistant token of the same conversation as the token predicting it.
        ok = self.counted[ids][:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
        return self.tokens[ids].astype(np.int64), ok, seg

    def get(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(inputs, targets), plus the conversation ids of the inputs when packed; targets that do not count are
        IGNORE_INDEX."""
        rows, ok, seg = self._rows(sample_ids)
        inputs = torch.from_numpy(rows[:, :-1].copy())
        targets = torch.from_numpy(np.where(ok, rows[:, 1:], IGNORE_INDEX))
        if not self.packed:  # one conversation per row, padding after it: the causal mask is enough
            return inputs, targets
        return inputs, targets, torch.from_numpy(seg[:, :-1].copy())

    def count_targets(self, sample_ids: np.ndarray) -> int:
        """How many targets of these samples the loss counts."""
        return int(self._rows(sample_ids)[1].sum())


def _fingerprint(files: list[Path]) -> list:
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def chat_cache_key(cfg_data: DataConfig, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int,
                   pad_id: int) -> str:
    payload = {
        "version": _CACHE_FORMAT_VERSION,
        "files": _fingerprint(chat_files(cfg_data.path)),
        "column": cfg_data.messages_column,
        "tokenizer": hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest(),
        "template": [template.template, template.special_tokens],
        "seq_len": seq_len,
        "packing": cfg_data.packing,
        "truncation": cfg_data.truncation,
        "on_bad_row": cfg_data.on_bad_row,
        "pad": pad_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


class _Packer:
    """Places conversations into rows of `width` tokens in arrival order: a conversation goes into the current row
    if it fits, else it starts the next one."""

    def __init__(self, width: int, pad_id: int, packed: bool, dtype: np.dtype):
        self.width, self.pad_id, self.packed, self.dtype = width, pad_id, packed, dtype
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.used = self.width  # no open row yet

    def add(self, ids: np.ndarray, counted: np.ndarray) -> None:
        n = len(ids)
        if not self.packed or self.used + n > self.width:
            self.rows.append((np.full(self.width, self.pad_id, dtype=self.dtype), np.zeros(self.width, dtype=bool),
                              np.full(self.width, -1, dtype=np.int16)))
            self.used = 0
        tokens, mask, seg = self.rows[-1]
        tokens[self.used:self.used + n] = ids
        mask[self.used:self.used + n] = counted
        seg[self.used:self.used + n] = int(seg.max()) + 1
        self.used += n

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.rows:
            return (np.zeros((0, self.width), self.dtype), np.zeros((0, self.width), bool),
                    np.zeros((0, self.width), np.int16))
        return tuple(np.stack(parts) for parts in zip(*self.rows, strict=True))


def cached_encoding(cfg_data: DataConfig, kind: str, key: str, names: tuple[str, ...], encode,
                    cache_dir: Path | None = None) -> tuple[dict[str, np.ndarray], dict, Path, bool]:
    """The arrays `names` of a data set encoded once under cache `key` ({kind}-{key}.{name}.npy beside a .json of
    its metadata, written last so that the cache counts only once every array is complete), memory-mapped: `encode
    (parts)` writes them when they are missing and returns the metadata. Returns (arrays, metadata, its path,
    whether it came from the cache); bad rows that were skipped are logged."""
    directory = Path(cache_dir or cfg_data.cache_dir or default_cache_dir()).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{kind}-{key[:24]}"
    parts = {name: stem.with_name(f"{stem.name}.{name}.npy") for name in names}
    meta_path = stem.with_suffix(".json")
    meta = None
    if meta_path.is_file() and all(p.is_file() for p in parts.values()):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = None
        if meta is not None and meta.get("key") != key:
            meta = None
    from_cache = meta is not None
    if meta is None:
        meta = encode(parts)
        meta["key"] = key
        write_json_atomic(meta_path, meta)
    arrays = {name: np.load(p, mmap_mode="r") for name, p in parts.items()}
    if meta["skipped_rows"]:
        log.warning("%s data %s: skipped %d bad rows (data.on_bad_row = 'skip'), e.g. %s", kind, cfg_data.path,
                    meta["skipped_rows"], "; ".join(meta["skipped_examples"]))
    return arrays, meta, meta_path, from_cache


def build_chat_dataset(cfg_data: DataConfig, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int,
                       cache_dir: Path | None = None, pad_id: int = 0) -> ChatDataset:
    """Encode, check and pack the chat rows once (or reuse the cache): see the module docstring."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    key = chat_cache_key(cfg_data, tokenizer, template, seq_len, pad_id)
    arrays, meta, meta_path, from_cache = cached_encoding(
        cfg_data, "chat", key, ("tokens", "counted", "segments"),
        lambda parts: _encode_rows(cfg_data, tokenizer, template, seq_len, pad_id, parts), cache_dir)
    return ChatDataset(arrays["tokens"], arrays["counted"], arrays["segments"], seq_len, cfg_data.val_fraction,
                       cfg_data.packing, meta_path, from_cache=from_cache, meta=meta)


def _encode_rows(cfg_data: DataConfig, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int, pad_id: int,
                 parts: dict[str, Path]) -> dict:
    width = seq_len + 1
    dtype = np.dtype(np.uint16) if tokenizer.get_vocab_size() < 65536 else np.dtype(np.uint32)
    packer = _Packer(width, pad_id, cfg_data.packing, dtype)
    skipped: list[str] = []
    conversations = counted_tokens = truncated = 0
    rows = tqdm(iter_rows(cfg_data.path, cfg_data.messages_column), desc="encoding chat rows", unit=" rows",
                disable=not sys.stderr.isatty())
    for where, value in rows:
        try:
            messages = check_messages(where, value)
            ids, counted = encode_conversation(messages, template, tokenizer, where)
            if len(ids) > width:
                if cfg_data.truncation == "error":
                    raise BadRow(where, f"{len(ids)} tokens, longer than train.seq_len+1 = {width} (raise "
                                        f"train.seq_len, or set data.truncation = 'truncate')")
                ids, counted = ids[:width], counted[:width]
                truncated += 1
            if not counted[1:].any():
                raise BadRow(where, f"no assistant token within the first {width} tokens")
        except BadRow as bad:
            if cfg_data.on_bad_row == "error":
                raise ValueError(f"bad chat row {bad} (set data.on_bad_row = 'skip' to skip and count bad rows)") \
                    from None
            skipped.append(str(bad))
            continue
        packer.add(ids, counted)
        conversations += 1
        counted_tokens += int(counted[1:].sum())
    if conversations == 0:
        raise ValueError(f"chat data {cfg_data.path!r} holds no usable conversation"
                         + (f" ({len(skipped)} bad rows skipped, e.g. {skipped[0]})" if skipped else ""))
    tokens, counted_arr, segments = packer.arrays()
    for name, array in (("tokens", tokens), ("counted", counted_arr), ("segments", segments)):
        with atomic_output(parts[name]) as f:
            np.save(f, array)
    return {"path": cfg_data.path, "conversations": conversations, "sequences": len(tokens),
            "counted_tokens": counted_tokens, "truncated_rows": truncated, "skipped_rows": len(skipped),
            "skipped_examples": skipped[:5], "packing": cfg_data.packing, "seq_len": seq_len}
