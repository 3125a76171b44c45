"""Corpus reading, the cached token stream cut into fixed-length samples, and the resumable data sampler.

Corpus kinds (`DataConfig.path`):
- a text file: one document, which must be UTF-8;
- a folder: every regular file under it, recursively and in sorted path order; hidden files and folders (.git)
  and files that are binary (contain NUL bytes) or not UTF-8 are skipped. If the folder holds any `*.parquet`
  file it is read as a parquet folder instead (only its `*.parquet` files, each row one document);
- a `.parquet` file: each non-null value of the string column `text_column` is one document;
- "" (the default): the `.py` sources of the Python standard library, sorted. `site-packages`/`dist-packages`
  (third-party code that differs per machine), `__pycache__` and the test suites (`test`, `tests`, `idle_test`;
  Linux distributions often ship them separately) are left out so the corpus is the same wherever Python is.

The token stream is every document's tokens followed by EOS, stored once per (corpus, tokenizer) as a flat memmap
in the cache directory. Samples are non-overlapping windows of seq_len+1 tokens; the last ones are validation.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from moe_platform.checkpoint.files import atomic_output
from moe_platform.config.schema import DataConfig
from moe_platform.tokenizer import eos_id

_CACHE_FORMAT_VERSION = 1
IGNORE_INDEX = -100  # a target the loss does not count (a prompt token of chat data, padding, a document boundary)
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_ENCODE_CHUNK_BYTES = 1 << 20  # documents are handed to encode_batch in ~1 MiB groups (parallel, bounded memory)


# ---------------------------------------------------------------------------------------------------------------------
# Corpus reading


@dataclass(frozen=True)
class _Corpus:
    kind: str  # "text", "parquet" or "stdlib"
    root: Path
    files: tuple[Path, ...]


def default_corpus_root() -> Path:
    """The standard library directory the default corpus reads."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def walk_sorted(root: Path, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Regular files under `root` in sorted relative-path order, leaving out hidden entries (.git, ...)."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        files.extend(Path(dirpath) / name for name in filenames if not name.startswith("."))
    # os.walk's order is per level; sort the full relative paths so the order never depends on the walk.
    return sorted((f for f in files if f.is_file()), key=lambda f: f.relative_to(root).as_posix())


def _resolve_corpus(path: str) -> _Corpus:
    if path == "":
        root = default_corpus_root()
        files = [f for f in walk_sorted(root, _STDLIB_SKIP_DIRS) if f.suffix == ".py"]
        return _Corpus("stdlib", root, tuple(files))
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path {path!r} does not exist")
    root = root.resolve()
    if root.is_file():
        return _Corpus("parquet" if root.suffix == ".parquet" else "text", root, (root,))
    if not root.is_dir():
        raise ValueError(f"data path {path!r} is neither a regular file nor a folder")
    files = walk_sorted(root)
    parquet = [f for f in files if f.suffix == ".parquet"]
    if parquet:
        return _Corpus("parquet", root, tuple(parquet))
    return _Corpus("text", root, tuple(files))


def _decode_text(data: bytes, truncated: bool) -> str | None:
    """UTF-8 text of `data`, or None for binary/undecodable bytes. A truncated read may end mid-character."""
    if b"\x00" in data:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        # final=False drops an incomplete trailing sequence instead of failing on it.
        return decoder.decode(data, final=not truncated)
    except UnicodeDecodeError:
        return None


def _read_text_file(path: Path, limit: int) -> tuple[str | None, bool]:
    """Read at most `limit` bytes (0 = all) of `path` as UTF-8 text (None if binary or not UTF-8), and whether
    the read stopped before the end of the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit) if limit > 0 else f.read()
            truncated = limit > 0 and len(data) == limit and f.read(1) != b""
    except OSError as e:
        raise ValueError(f"cannot read corpus file {path}: {e}") from e
    return _decode_text(data, truncated), truncated


def _open_parquet(path: Path, text_column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"cannot read parquet file {path}: {e}") from e
    schema = pf.schema_arrow
    if text_column not in schema.names:
        raise ValueError(
            f"parquet file {path} has no column {text_column!r}; available columns: {', '.join(schema.names)} "
            f"(set data.text_column)"
        )
    col_type = schema.field(text_column).type
    string_types = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None))
    if not any(check is not None and check(col_type) for check in string_types):
        raise ValueError(f"column {text_column!r} of parquet file {path} has type {col_type}, expected a string column")
    return pf


def _iter_parquet(path: Path, text_column: str) -> Iterator[str]:
    import pyarrow as pa

    pf = _open_parquet(path, text_column)
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[text_column]):
            for value in batch.column(0).to_pylist():
                if value:
                    yield value
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"corrupt parquet file {path}: {e}") from e


def iter_documents(path: str, text_column: str = "text", max_bytes: int = 0) -> Iterator[str]:
    """Yield the corpus documents at `path` (see the module docstring), at most `max_bytes` UTF-8 bytes in all.

    The document that crosses the budget is cut at a character boundary; 0 means no limit. Raises if the corpus
    holds no text at all.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 (0 = no limit), got {max_bytes}")
    corpus = _resolve_corpus(path)
    where = f"data path {path!r}" if path else f"the default corpus (Python stdlib sources in {corpus.root})"
    used = 0
    yielded = 0
    for file in corpus.files:
        if corpus.kind == "parquet":
            docs: Iterator[str] = _iter_parquet(file, text_column)
        else:
            text, truncated = _read_text_file(file, max_bytes - used if max_bytes else 0)
            if text is None and corpus.kind == "text" and corpus.root == file:
                raise ValueError(f"data path {path!r} is not UTF-8 text (binary file or another encoding)")
            if truncated:  # the budget ends inside this file; a dropped partial character must not let more in
                used = max_bytes - len(text.encode("utf-8")) if text else max_bytes
            docs = iter([text] if text else [])
        for doc in docs:
            size = len(doc.encode("utf-8")) if max_bytes else 0
            if max_bytes and used + size > max_bytes:
                doc = doc.encode("utf-8")[: max_bytes - used].decode("utf-8", errors="ignore")
                size = max_bytes - used
            if doc:
                yielded += 1
                yield doc
            used += size
            if max_bytes and used >= max_bytes:
                break
        if max_bytes and used >= max_bytes:
            break
    if yielded == 0:
        raise ValueError(f"{where} contains no text (no non-empty UTF-8 documents in {len(corpus.files)} files)")


def _corpus_fingerprint(path: str, text_column: str) -> list:
    """Identity of the corpus files for the cache key: path, size and mtime of each, plus parquet row counts."""
    corpus = _resolve_corpus(path)
    entries: list = [corpus.kind, str(corpus.root)]
    for file in corpus.files:
        st = file.stat()
        entry = [
            file.relative_to(corpus.root).as_posix() if file != corpus.root else file.name,
            st.st_size,
            st.st_mtime_ns,
        ]
        if corpus.kind == "parquet":
            pf = _open_parquet(file, text_column)
            entry += [pf.metadata.num_rows, pf.metadata.num_row_groups]
        entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------------------------------
# Token dataset


def held_out_count(num_samples: int, val_fraction: float) -> int:
    """Samples held out for validation: at least one when val_fraction > 0."""
    return max(1, int(num_samples * val_fraction)) if val_fraction > 0 else 0


class HeldOutSplit:
    """Samples [0, train_ids_count) train; the last `val_count` are held out for validation."""

    num_samples: int
    val_count: int

    def __len__(self) -> int:
        return self.num_samples

    @property
    def train_ids_count(self) -> int:
        """Training samples are ids [0, train_ids_count)."""
        return self.num_samples - self.val_count

    def val_ids(self) -> np.ndarray:
        """Ids of the held-out validation samples (empty when val_fraction is 0)."""
        return np.arange(self.train_ids_count, self.num_samples, dtype=np.int64)


@dataclass
class TokenDataset(HeldOutSplit):
    """A flat token stream cut into non-overlapping samples of seq_len+1 tokens; the last samples are validation."""

    tokens: np.ndarray  # (num_tokens,) uint16/uint32 memmap
    seq_len: int
    val_fraction: float
    cache_path: Path
    from_cache: bool = False  # True when the stream was read from an existing cache file (no tokenization)
    num_samples: int = field(init=False)
    val_count: int = field(init=False)

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        self.num_samples = len(self.tokens) // (self.seq_len + 1)
        self.val_count = self._val_count_for(self.num_samples)
        if self.num_samples - self.val_count < 2:
            window = self.seq_len + 1
            needed = next(n for n in range(2, 1 << 30) if n - self._val_count_for(n) >= 2) * window
            raise ValueError(
                f"the corpus yields only {len(self.tokens)} tokens = {self.num_samples} samples of seq_len+1={window} "
                f"tokens ({self.val_count} held out for validation); at least 2 training samples need {needed} "
                f"tokens: use a larger corpus or data.max_bytes, or a smaller seq_len"
            )

    def _val_count_for(self, num_samples: int) -> int:
        return held_out_count(num_samples, self.val_fraction)

    def count_targets(self, sample_ids: np.ndarray) -> int:
        """How many targets of these samples the loss counts: all of them in raw text."""
        return len(sample_ids) * self.seq_len

    def get(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 (B, seq_len); targets are the inputs shifted left by one token."""
        ids = np.asarray(sample_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"sample_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise ValueError(f"sample ids must lie in [0, {self.num_samples}), got min {ids.min()} max {ids.max()}")
        window = self.seq_len + 1
        index = ids.astype(np.int64)[:, None] * window + np.arange(window)  # (B, seq_len+1)
        rows = torch.from_numpy(self.tokens[index].astype(np.int64))  # (B, seq_len+1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "moe-platform" / "data"


def token_cache_key(cfg_data: DataConfig, tokenizer: Tokenizer, eos: int | None = None) -> str:
    """sha256 over everything the token stream depends on (not seq_len: samples are cut when reading)."""
    payload = {
        "version": _CACHE_FORMAT_VERSION,
        "corpus": _corpus_fingerprint(cfg_data.path, cfg_data.text_column),
        "text_column": cfg_data.text_column,
        "max_bytes": cfg_data.max_bytes,
        "tokenizer": hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest(),
    }
    if eos is not None:  # an imported model's end-of-text id (ours is implied by the tokenizer)
        payload["eos"] = eos
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _token_dtype(tokenizer: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if tokenizer.get_vocab_size() < 65536 else np.dtype(np.uint32)


def _write_token_stream(cfg_data: DataConfig, tokenizer: Tokenizer, out_path: Path, dtype: np.dtype,
                        eos: int | None = None) -> dict:
    """Tokenize the corpus into `out_path` via a temp file + rename, so a crash never leaves a partial cache."""
    eos = eos_id(tokenizer) if eos is None else eos
    num_tokens = 0
    num_docs = 0
    progress = tqdm(
        total=cfg_data.max_bytes or None,
        unit="B",
        unit_scale=True,
        desc="tokenizing corpus",
        disable=not sys.stderr.isatty(),
    )
    try:
        with atomic_output(out_path) as f:
            chunk: list[str] = []
            chunk_bytes = 0

            def flush() -> None:
                nonlocal num_tokens, num_docs, chunk_bytes
                encodings = tokenizer.encode_batch(chunk, add_special_tokens=False)
                # Each document's ids then EOS, so documents never run into each other.
                ids = np.fromiter(
                    (t for enc in encodings for t in (*enc.ids, eos)),
                    dtype=dtype,
                    count=sum(len(enc.ids) + 1 for enc in encodings),
                )
                f.write(ids.tobytes())
                num_tokens += len(ids)
                num_docs += len(chunk)
                progress.update(chunk_bytes)
                chunk.clear()
                chunk_bytes = 0

            for doc in iter_documents(cfg_data.path, cfg_data.text_column, cfg_data.max_bytes):
                chunk.append(doc)
                chunk_bytes += len(doc.encode("utf-8"))
                if chunk_bytes >= _ENCODE_CHUNK_BYTES:
                    flush()
            if chunk:
                flush()
    finally:
        progress.close()
    return {"num_tokens": num_tokens, "num_documents": num_docs, "dtype": dtype.name}


def write_json_atomic(path: Path, obj: dict) -> None:
    with atomic_output(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def _read_valid_cache(bin_path: Path, meta_path: Path, key: str, dtype: np.dtype) -> dict | None:
    """The cache metadata if the cache files exist, match `key` and agree in size; otherwise None."""
    if not (bin_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("key") != key or meta.get("dtype") != dtype.name:
        return None
    if bin_path.stat().st_size != int(meta.get("num_tokens", -1)) * dtype.itemsize:
        return None
    return meta


def build_token_dataset(
    cfg_data: DataConfig, tokenizer: Tokenizer, seq_len: int, cache_dir: Path | None = None, eos: int | None = None
) -> TokenDataset:
    """Tokenize the corpus once (or reuse the cached stream) and cut it into samples of seq_len+1 tokens; `eos`
    (default: our tokenizer's end-of-text token) ends every document.

    The cache lives in `cache_dir`, else `cfg_data.cache_dir`, else ~/.cache/moe-platform/data.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0.0 <= cfg_data.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {cfg_data.val_fraction}")
    if cfg_data.max_bytes < 0:
        raise ValueError(f"data.max_bytes must be >= 0 (0 = no limit), got {cfg_data.max_bytes}")
    directory = Path(cache_dir or cfg_data.cache_dir or default_cache_dir()).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    key = token_cache_key(cfg_data, tokenizer, eos)
    dtype = _token_dtype(tokenizer)
    bin_path = directory / f"tokens-{key[:24]}.bin"
    meta_path = directory / f"tokens-{key[:24]}.json"

    meta = _read_valid_cache(bin_path, meta_path, key, dtype)
    from_cache = meta is not None
    if meta is None:
        meta = _write_token_stream(cfg_data, tokenizer, bin_path, dtype, eos)
        meta.update(key=key, path=cfg_data.path, text_column=cfg_data.text_column, max_bytes=cfg_data.max_bytes)
        # The metadata is written last: a cache counts only once both files are complete.
        write_json_atomic(meta_path, meta)
    num_tokens = int(meta["num_tokens"])
    if num_tokens == 0:
        tokens = np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    else:
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,))
    return TokenDataset(tokens, seq_len, cfg_data.val_fraction, bin_path, from_cache=from_cache)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


class DataSampler:
    """Deterministic sample order that does not depend on the parallel layout.

    The stream of sample ids is the concatenation of per-epoch permutations
    `np.random.default_rng([seed, epoch]).permutation(num_samples)`. A global batch is a contiguous run of that
    stream; ranks take contiguous shards of it. The position in the stream (`consumed_samples`) is the whole
    state, so a run resumes exactly and may change its world size or global batch size on resume.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.consumed_samples = 0
        self._perms: dict[int, np.ndarray] = {}

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            if len(self._perms) >= 2:  # a batch spans at most a few epochs; keep memory bounded
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def ids_at(self, start: int, count: int) -> np.ndarray:
        """Sample ids at stream positions [start, start+count), spanning epochs as needed."""
        if start < 0 or count < 0:
            raise ValueError(f"stream positions must be >= 0, got start={start} count={count}")
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(start + filled, self.num_samples)
            take = min(count - filled, self.num_samples - offset)
            out[filled : filled + take] = self._epoch_perm(epoch)[offset : offset + take]
            filled += take
        return out

    def global_batch(self, step: int) -> np.ndarray:
        """The global batch of `step` when every step so far used this global_batch_size: positions [k*G, (k+1)*G)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.ids_at(step * self.global_batch_size, self.global_batch_size)

    def next_global_batch(self) -> np.ndarray:
        """The next global_batch_size ids from the current position; advances consumed_samples."""
        ids = self.ids_at(self.consumed_samples, self.global_batch_size)
        self.consumed_samples += self.global_batch_size
        return ids

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    @staticmethod
    def shard(ids: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
        """The contiguous slice of `ids` that data-parallel rank `dp_rank` of `dp_size` trains on."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"dp_rank must be in [0, dp_size) with dp_size >= 1, got dp_rank={dp_rank} dp_size={dp_size}"
            )
        if len(ids) % dp_size != 0:
            raise ValueError(f"global batch of {len(ids)} samples is not divisible by dp_size={dp_size}")
        per_rank = len(ids) // dp_size
        return ids[dp_rank * per_rank : (dp_rank + 1) * per_rank]

    @staticmethod
    def micro_batches(ids: np.ndarray, micro_batch_size: int) -> list[np.ndarray]:
        """Split a rank's ids into consecutive micro batches of exactly micro_batch_size."""
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if len(ids) % micro_batch_size != 0:
            raise ValueError(
                f"a rank's batch of {len(ids)} samples is not divisible by micro_batch_size={micro_batch_size}"
            )
        return [ids[i : i + micro_batch_size] for i in range(0, len(ids), micro_batch_size)]

    def state_dict(self) -> dict[str, int]:
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. seed and num_samples must match; the global batch size may differ."""
        missing = [k for k in ("consumed_samples", "seed", "num_samples") if k not in state]
        if missing:
            raise ValueError(f"data sampler state lacks {missing}; got keys {sorted(state)}")
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"data sampler state was saved with seed={state['seed']} but this run uses seed={self.seed}; "
                f"resuming would replay a different sample order"
            )
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"data sampler state was saved with num_samples={state['num_samples']} but the dataset now has "
                f"{self.num_samples} training samples (corpus, tokenizer, seq_len or val_fraction changed)"
            )
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"data sampler state has negative consumed_samples={consumed}")
        self.consumed_samples = consumed
