"""Corpus reading, the cached token dataset and the layout-independent, resumable data sampler."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moe_platform.config.schema import DataConfig
from moe_platform.tokenizer import eos_id, train_tokenizer
from moe_platform.train.data import DataSampler, build_token_dataset, iter_documents

DOCS = [f"def function_{i}(x):\n    return x * {i} + {i * i}  # document number {i}\n" * 3 for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, 300)


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, doc in enumerate(DOCS):
        folder = [root, root / "sub", root / "sub" / "deeper"][i % 3]
        (folder / f"doc_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return root


def write_parquet(path, texts, column="text", **extra):
    pq.write_table(pa.table({column: texts, **extra}), path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# iter_documents


def test_text_file_is_one_document(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("héllo\nworld\n", encoding="utf-8")
    assert list(iter_documents(str(f), "text", 0)) == ["héllo\nworld\n"]


def test_folder_is_sorted_recursive_and_skips_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "d.txt").write_bytes("latin-1 caf\xe9".encode("latin-1"))  # not UTF-8
    (tmp_path / "e.txt").write_text("")  # empty documents are dropped
    (tmp_path / ".hidden").write_text("hidden")
    (tmp_path / "f.md").write_text("three")
    assert list(iter_documents(str(tmp_path), "text", 0)) == ["one", "two", "three"]


def test_max_bytes_stops_and_cuts_on_a_character_boundary(tmp_path):
    (tmp_path / "a.txt").write_text("abcd")
    (tmp_path / "b.txt").write_text("ééé")  # 6 bytes
    (tmp_path / "c.txt").write_text("never read")
    docs = list(iter_documents(str(tmp_path), "text", 7))
    assert docs == ["abcd", "é"]  # 4 + 2 bytes; the next 'é' would cross the 7-byte budget
    assert sum(len(d.encode()) for d in docs) <= 7
    assert list(iter_documents(str(tmp_path), "text", 10)) == ["abcd", "ééé"]


def test_parquet_file_and_folder(tmp_path):
    write_parquet(tmp_path / "part-0.parquet", ["first", None, "", "second"], ids=[1, 2, 3, 4])
    assert list(iter_documents(str(tmp_path / "part-0.parquet"), "text", 0)) == ["first", "second"]
    write_parquet(tmp_path / "part-1.parquet", ["third"], ids=[5])
    (tmp_path / "README.txt").write_text("ignored: the folder holds parquet files")
    assert list(iter_documents(str(tmp_path), "text", 0)) == ["first", "second", "third"]
    assert list(iter_documents(str(tmp_path), "text", 8)) == ["first", "sec"]


def test_parquet_large_string_column(tmp_path):
    table = pa.table({"body": pa.array(["big string"], type=pa.large_string())})
    pq.write_table(table, tmp_path / "x.parquet")
    assert list(iter_documents(str(tmp_path / "x.parquet"), "body", 0)) == ["big string"]


def test_default_corpus_is_stdlib_python():
    docs = list(iter_documents("", "text", 200_000))
    assert sum(len(d.encode()) for d in docs) == 200_000
    assert any("import" in d for d in docs)
    assert docs == list(iter_documents("", "text", 200_000))


def _write_file(name: str, data: bytes):
    def setup(tmp_path):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    return setup


@pytest.mark.parametrize(
    "setup, column, error, match",
    [
        (lambda p: p / "missing.txt", "text", FileNotFoundError, "missing.txt.*does not exist"),
        (lambda p: p, "text", ValueError, "contains no text"),  # empty folder
        (_write_file("e.txt", b""), "text", ValueError, "contains no text"),
        (_write_file("b.txt", b"\xff\xfe\x00"), "text", ValueError, "not UTF-8 text"),
        (_write_file("bad.parquet", b"PAR1 not parquet PAR1"), "text", ValueError, "cannot read parquet file .*bad"),
        (
            lambda p: write_parquet(p / "c.parquet", ["x"], column="content", n=[1]),
            "text",
            ValueError,
            r"no column 'text'; available columns: content, n",
        ),
        (
            lambda p: write_parquet(p / "n.parquet", [1, 2], column="text"),
            "text",
            ValueError,
            r"column 'text' .* has type int64, expected a string column",
        ),
        (lambda p: write_parquet(p / "z.parquet", [None, ""]), "text", ValueError, "contains no text"),
    ],
    ids=[
        "missing",
        "empty-folder",
        "empty-file",
        "binary-file",
        "corrupt-parquet",
        "missing-column",
        "non-string-column",
        "all-null-parquet",
    ],
)
def test_bad_corpus_raises_naming_the_problem(tmp_path, setup, column, error, match):
    path = setup(tmp_path)
    with pytest.raises(error, match=match):
        list(iter_documents(str(path), column, 0))


def test_negative_max_bytes():
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        list(iter_documents("", "text", -1))


# ---------------------------------------------------------------------------------------------------------------------
# TokenDataset


def test_token_stream_is_documents_plus_eos(tok, text_dir, tmp_path):
    cfg = DataConfig(path=str(text_dir), max_bytes=0, val_fraction=0.1)
    ds = build_token_dataset(cfg, tok, seq_len=32, cache_dir=tmp_path / "cache")
    assert ds.tokens.dtype == np.uint16
    expected = []
    for doc in iter_documents(str(text_dir), "text", 0):
        expected += tok.encode(doc).ids + [eos_id(tok)]
    assert ds.tokens.tolist() == expected
    assert len(ds) == len(expected) // 33
    assert ds.train_ids_count + len(ds.val_ids()) == len(ds)
    assert len(ds.val_ids()) == max(1, int(len(ds) * 0.1))
    assert ds.val_ids().tolist() == list(range(ds.train_ids_count, len(ds)))


def test_get_returns_shifted_windows(tok, text_dir, tmp_path):
    ds = build_token_dataset(DataConfig(path=str(text_dir), max_bytes=0), tok, seq_len=16, cache_dir=tmp_path)
    ids = np.array([3, 0, len(ds) - 1])
    inputs, targets = ds.get(ids)
    assert inputs.shape == targets.shape == (3, 16)
    assert inputs.dtype == targets.dtype == torch.int64
    for row, sample in enumerate(ids):
        window = torch.from_numpy(ds.tokens[sample * 17 : (sample + 1) * 17].astype(np.int64))
        assert torch.equal(inputs[row], window[:-1]) and torch.equal(targets[row], window[1:])
    with pytest.raises(ValueError, match=r"sample ids must lie in \[0, \d+\)"):
        ds.get(np.array([len(ds)]))
    with pytest.raises(ValueError, match="1-D integer array"):
        ds.get(np.array([[0]]))


def test_two_builds_write_identical_token_files(tok, text_dir, tmp_path):
    cfg = DataConfig(path=str(text_dir), max_bytes=0)
    a = build_token_dataset(cfg, tok, seq_len=32, cache_dir=tmp_path / "a")
    b = build_token_dataset(cfg, tok, seq_len=32, cache_dir=tmp_path / "b")
    assert a.cache_path.name == b.cache_path.name
    assert a.cache_path.read_bytes() == b.cache_path.read_bytes()
    assert not a.from_cache and not b.from_cache


def test_cache_is_reused_and_keyed(tok, text_dir, tmp_path):
    cache = tmp_path / "cache"
    cfg = DataConfig(path=str(text_dir), max_bytes=0)
    first = build_token_dataset(cfg, tok, seq_len=32, cache_dir=cache)
    mtime = first.cache_path.stat().st_mtime_ns
    # A different seq_len reads the same stream: samples are cut at read time.
    second = build_token_dataset(cfg, tok, seq_len=8, cache_dir=cache)
    assert second.from_cache and second.cache_path == first.cache_path
    assert second.cache_path.stat().st_mtime_ns == mtime
    assert sorted(p.suffix for p in cache.iterdir()) == [".bin", ".json"]  # no temp files left behind
    # cfg.cache_dir is honoured when no cache_dir argument is given.
    third = build_token_dataset(DataConfig(path=str(text_dir), max_bytes=0, cache_dir=str(cache)), tok, seq_len=8)
    assert third.from_cache
    # Anything the stream depends on changes the key.
    assert build_token_dataset(DataConfig(path=str(text_dir), max_bytes=3000), tok, 8, cache).cache_path != (
        first.cache_path
    )
    other_tok = train_tokenizer(DOCS[:10], 290)
    assert build_token_dataset(cfg, other_tok, 8, cache).cache_path != first.cache_path
    (text_dir / "new.txt").write_text("a new document changes the corpus fingerprint")
    assert not build_token_dataset(cfg, tok, 8, cache).from_cache


def test_incomplete_cache_is_rebuilt(tok, text_dir, tmp_path):
    cfg = DataConfig(path=str(text_dir), max_bytes=0)
    ds = build_token_dataset(cfg, tok, seq_len=32, cache_dir=tmp_path)
    expected = ds.cache_path.read_bytes()
    with open(ds.cache_path, "r+b") as f:  # simulate a torn file: the metadata no longer matches its size
        f.truncate(10)
    again = build_token_dataset(cfg, tok, seq_len=32, cache_dir=tmp_path)
    assert not again.from_cache and again.cache_path.read_bytes() == expected
    meta = json.loads(again.cache_path.with_suffix(".json").read_text())
    assert meta["num_tokens"] * 2 == len(expected)


def test_parquet_dataset(tok, tmp_path):
    path = write_parquet(tmp_path / "docs.parquet", DOCS)
    ds = build_token_dataset(DataConfig(path=str(path), max_bytes=0), tok, seq_len=32, cache_dir=tmp_path / "c")
    expected = []
    for doc in DOCS:
        expected += tok.encode(doc).ids + [eos_id(tok)]
    assert ds.tokens.tolist() == expected


def test_default_corpus_dataset(tok, tmp_path):
    ds = build_token_dataset(DataConfig(path="", max_bytes=200_000), tok, seq_len=64, cache_dir=tmp_path)
    assert ds.train_ids_count > 100
    inputs, _ = ds.get(np.arange(4))
    assert int(inputs.max()) < tok.get_vocab_size()


def test_too_small_corpus_says_what_is_needed(tok, tmp_path):
    (tmp_path / "tiny.txt").write_text("def f(): pass")
    cfg = DataConfig(path=str(tmp_path / "tiny.txt"), max_bytes=0, val_fraction=0.01)
    with pytest.raises(ValueError, match=r"yields only \d+ tokens .* need 387 tokens"):
        build_token_dataset(cfg, tok, seq_len=128, cache_dir=tmp_path / "c")


@pytest.mark.parametrize(
    "changes, match",
    [({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"), ({"max_bytes": -5}, "max_bytes must be >= 0")],
)
def test_bad_data_config(tok, text_dir, tmp_path, changes, match):
    cfg = DataConfig(path=str(text_dir), **changes)
    with pytest.raises(ValueError, match=match):
        build_token_dataset(cfg, tok, seq_len=16, cache_dir=tmp_path)


def test_no_validation_split(tok, text_dir, tmp_path):
    ds = build_token_dataset(DataConfig(path=str(text_dir), max_bytes=0, val_fraction=0.0), tok, 16, tmp_path)
    assert ds.train_ids_count == len(ds) and len(ds.val_ids()) == 0


# ---------------------------------------------------------------------------------------------------------------------
# DataSampler


def test_same_seed_same_batches_and_different_seed_differs():
    a, b, c = DataSampler(50, 8, seed=7), DataSampler(50, 8, seed=7), DataSampler(50, 8, seed=8)
    batches_a = [a.next_global_batch() for _ in range(20)]
    batches_b = [b.next_global_batch() for _ in range(20)]
    assert all(np.array_equal(x, y) for x, y in zip(batches_a, batches_b, strict=True))
    assert not np.array_equal(np.concatenate(batches_a), np.concatenate([c.next_global_batch() for _ in range(20)]))
    assert all(np.array_equal(DataSampler(50, 8, 7).global_batch(k), batches_a[k]) for k in range(20))


@pytest.mark.parametrize("num_samples, global_batch", [(48, 8), (50, 8), (7, 3), (5, 16)])
def test_every_sample_once_per_epoch(num_samples, global_batch):
    sampler = DataSampler(num_samples, global_batch, seed=0)
    steps = -(-3 * num_samples // global_batch)
    stream = np.concatenate([sampler.next_global_batch() for _ in range(steps)])
    for epoch in range(3):
        chunk = stream[epoch * num_samples : (epoch + 1) * num_samples]
        assert sorted(chunk.tolist()) == list(range(num_samples))
        assert np.array_equal(chunk, np.random.default_rng([0, epoch]).permutation(num_samples))
    assert sampler.consumed_samples == steps * global_batch


def test_resume_continues_identically():
    reference = DataSampler(30, 4, seed=3)
    expected = [reference.next_global_batch() for _ in range(25)]
    run = DataSampler(30, 4, seed=3)
    for _ in range(11):
        run.next_global_batch()
    state = json.loads(json.dumps(run.state_dict()))  # must survive JSON (checkpoint manifests)
    resumed = DataSampler(30, 4, seed=3)
    resumed.load_state_dict(state)
    assert all(np.array_equal(resumed.next_global_batch(), expected[k]) for k in range(11, 25))


@pytest.mark.parametrize("old_batch, new_batch", [(4, 6), (6, 4), (5, 10)])
def test_changing_global_batch_on_resume_consumes_no_sample_twice(old_batch, new_batch):
    num_samples = 37
    before = DataSampler(num_samples, old_batch, seed=11)
    seen = [before.next_global_batch() for _ in range(3)]
    after = DataSampler(num_samples, new_batch, seed=11)
    after.load_state_dict(before.state_dict())
    while sum(len(b) for b in seen) < num_samples:
        seen.append(after.next_global_batch())
    epoch0 = np.concatenate(seen)[:num_samples]
    assert sorted(epoch0.tolist()) == list(range(num_samples))


@pytest.mark.parametrize("dp_size, micro", [(1, 2), (2, 2), (4, 1), (8, 1)])
def test_shards_partition_the_global_batch(dp_size, micro):
    sampler = DataSampler(100, 8, seed=0)
    batch = sampler.global_batch(5)
    shards = [DataSampler.shard(batch, rank, dp_size) for rank in range(dp_size)]
    assert np.array_equal(np.concatenate(shards), batch)
    micro_batches = sampler.micro_batches(shards[0], micro)
    assert all(len(m) == micro for m in micro_batches)
    assert np.array_equal(np.concatenate(micro_batches), shards[0])


def test_layout_change_keeps_the_global_batch():
    # Whatever the world size, the union over ranks of step k's data is the same global batch.
    batch = DataSampler(64, 12, seed=1).global_batch(9)
    for dp_size in (1, 2, 3, 4, 6, 12):
        union = np.concatenate([DataSampler.shard(batch, r, dp_size) for r in range(dp_size)])
        assert np.array_equal(union, batch)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: DataSampler.shard(np.arange(8), 0, 3), "not divisible by dp_size=3"),
        (lambda: DataSampler.shard(np.arange(8), 2, 2), r"dp_rank must be in \[0, dp_size\)"),
        (lambda: DataSampler.micro_batches(np.arange(6), 4), "not divisible by micro_batch_size=4"),
        (lambda: DataSampler(0, 4, 0), "num_samples must be >= 1"),
        (lambda: DataSampler(10, 0, 0), "global_batch_size must be >= 1"),
        (lambda: DataSampler(10, 4, -1), "seed must be >= 0"),
        (lambda: DataSampler(10, 4, 0).global_batch(-1), "step must be >= 0"),
    ],
)
def test_sampler_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "state, match",
    [
        ({"consumed_samples": 8, "seed": 2, "num_samples": 40, "global_batch_size": 4}, "saved with seed=2"),
        ({"consumed_samples": 8, "seed": 1, "num_samples": 41, "global_batch_size": 4}, "saved with num_samples=41"),
        ({"seed": 1, "num_samples": 40}, r"lacks \['consumed_samples'\]"),
        ({"consumed_samples": -4, "seed": 1, "num_samples": 40}, "negative consumed_samples"),
    ],
)
def test_load_state_dict_mismatch(state, match):
    with pytest.raises(ValueError, match=match):
        DataSampler(40, 4, seed=1).load_state_dict(state)


def test_state_dict_contents():
    sampler = DataSampler(40, 4, seed=1)
    sampler.next_global_batch()
    sampler.next_global_batch()
    assert sampler.state_dict() == {"consumed_samples": 8, "seed": 1, "num_samples": 40, "global_batch_size": 4}
    assert all(type(v) is int for v in sampler.state_dict().values())
