"""Checkpoint store and training-state round trips: damage detection, fallback, atomicity, no pickle."""

from __future__ import annotations

import json
import math
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_platform.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    CheckpointWriter,
    capture_rng_state,
    checkpoint_step,
    cleanup_checkpoints,
    flatten_optimizer_state,
    flatten_state,
    from_jsonable,
    latest_checkpoint,
    list_checkpoints,
    load_json,
    load_tensors,
    read_state,
    resolve_checkpoint,
    restore_rng_state,
    restore_scheduler_state,
    scheduler_state,
    to_jsonable,
    unflatten_optimizer_state,
    unflatten_state,
    verify_checkpoint,
    write_state,
)


def make_checkpoint(run_dir: Path, step: int, value: float = 1.0) -> Path:
    with CheckpointWriter(run_dir, step, meta={"world_size": 2, "layout": {"dp": 2, "tp": 1}}) as w:
        w.save_tensors("model.safetensors", {"w": torch.full((64, 64), value), "b": torch.arange(8.0)})
        w.save_tensors("rank0/optim.safetensors", {"state.0.exp_avg": torch.ones(16) * value})
        w.save_json("trainer.json", {"step": step, "tokens": 1234})
    return w.final_dir


# -- damage table ---------------------------------------------------------------------------------------------------


def _truncate(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _flip_byte(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _grow(ckpt: Path) -> None:
    with open(ckpt / "trainer.json", "ab") as f:
        f.write(b" ")


def _write(name: str, data: bytes):
    return lambda ckpt: (ckpt / name).write_bytes(data)


DAMAGE = {
    "truncated": (_truncate, "model.safetensors", r"model\.safetensors truncated"),
    "flipped_byte": (_flip_byte, "model.safetensors", r"model\.safetensors sha256 mismatch"),
    "grown": (_grow, "trainer.json", r"trainer\.json has the wrong size"),
    "missing_manifest": (lambda c: (c / "manifest.json").unlink(), "manifest.json", r"missing manifest\.json"),
    "partial_no_marker": (lambda c: (c / "COMMITTED").unlink(), "COMMITTED", r"partial checkpoint: no COMMITTED"),
    "deleted_file": (
        lambda c: (c / "rank0" / "optim.safetensors").unlink(),
        "rank0/optim.safetensors",
        r"missing file rank0/optim\.safetensors",
    ),
    "garbage_manifest": (_write("manifest.json", b"{not json"), "manifest.json", r"unparseable manifest\.json"),
    "wrong_format": (
        _write("manifest.json", json.dumps({"format": "x", "version": 1, "step": 5, "files": {}}).encode()),
        "manifest.json",
        r"malformed manifest\.json: 'format'",
    ),
    "escaping_path": (
        _write(
            "manifest.json",
            json.dumps(
                {
                    "format": "moe-platform-checkpoint",
                    "version": 1,
                    "step": 5,
                    "files": {"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}},
                }
            ).encode(),
        ),
        "manifest.json",
        r"not a safe relative path",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_detects_damage(tmp_path, damage):
    ckpt = make_checkpoint(tmp_path, 5)
    verify_checkpoint(ckpt)
    apply, bad_file, pattern = DAMAGE[damage]
    apply(ckpt)
    with pytest.raises(CheckpointError, match=pattern) as info:
        verify_checkpoint(ckpt)
    assert str(ckpt) in str(info.value)
    assert info.value.file == bad_file
    assert info.value.ckpt_dir == ckpt


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_latest_falls_back_to_previous_with_warning(tmp_path, damage):
    older = make_checkpoint(tmp_path, 10)
    newer = make_checkpoint(tmp_path, 20)
    DAMAGE[damage][0](newer)
    with pytest.warns(CheckpointWarning, match=r"step_00000020 is corrupt \(.*\); falling back to .*step_00000010"):
        assert latest_checkpoint(tmp_path) == older
    with pytest.warns(CheckpointWarning):
        assert resolve_checkpoint(tmp_path) == older


def test_all_damaged_gives_none_and_resolve_error(tmp_path):
    only = make_checkpoint(tmp_path, 3)
    _flip_byte(only)
    with pytest.warns(CheckpointWarning, match="starting from scratch"):
        assert latest_checkpoint(tmp_path) is None
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        resolve_checkpoint(tmp_path)


def test_size_only_check_misses_flips_but_catches_truncation(tmp_path):
    ckpt = make_checkpoint(tmp_path, 1)
    _flip_byte(ckpt)
    verify_checkpoint(ckpt, check_hashes=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_checkpoint(tmp_path, verify=False) == ckpt
    _truncate(ckpt)
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(ckpt, check_hashes=False)


# -- layout, reading, atomicity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, old, new", [("wb", b"old", b"new\x00bytes"), ("w", "old", "new text: \u00e9\n")])
def test_atomic_output_replaces_the_target_only_when_written_whole(tmp_path, mode, old, new):
    from moe_platform.checkpoint.files import atomic_output

    target = tmp_path / "out.bin"
    read = target.read_bytes if mode == "wb" else lambda: target.read_text(encoding="utf-8")
    with atomic_output(target, mode) as f:  # a new file
        f.write(old)
    assert read() == old and sorted(tmp_path.iterdir()) == [target]
    with atomic_output(target, mode) as f:
        f.write(new[:3])
        staged = [p for p in tmp_path.iterdir() if p != target]
        # mid-write: the data goes to one hidden temp file beside the target; readers still see the old file
        assert len(staged) == 1 and staged[0].name.startswith(".out.bin.") and staged[0].name.endswith(".tmp")
        assert read() == old
        f.write(new[3:])
    assert read() == new and sorted(tmp_path.iterdir()) == [target], "replaced, and the temp file is gone"


def test_atomic_output_leaves_the_target_untouched_on_error(tmp_path):
    from moe_platform.checkpoint.files import atomic_output

    target = tmp_path / "metrics.jsonl"
    target.write_text("line 1\n")
    with pytest.raises(RuntimeError, match="failed mid-write"):
        with atomic_output(target, "w") as f:
            f.write("half of the new")
            raise RuntimeError("failed mid-write")
    assert target.read_text() == "line 1\n" and sorted(tmp_path.iterdir()) == [target]
    missing = tmp_path / "never.bin"
    with pytest.raises(KeyboardInterrupt):  # any exit, not only an Exception, cleans up
        with atomic_output(missing) as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert not missing.exists() and sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_output(target, "a"):
            pass
    assert sorted(tmp_path.iterdir()) == [target]


def test_commit_layout_manifest_and_readers(tmp_path):
    ckpt = make_checkpoint(tmp_path, 20, value=3.0)
    assert ckpt == tmp_path / "checkpoints" / "step_00000020" and checkpoint_step(ckpt) == 20
    manifest = verify_checkpoint(ckpt)
    assert manifest["format"] == "moe-platform-checkpoint" and manifest["version"] == 1 and manifest["step"] == 20
    assert manifest["meta"] == {"world_size": 2, "layout": {"dp": 2, "tp": 1}}
    assert set(manifest["files"]) == {"model.safetensors", "rank0/optim.safetensors", "trainer.json"}
    entry = manifest["files"]["model.safetensors"]
    assert entry["bytes"] == (ckpt / "model.safetensors").stat().st_size and len(entry["sha256"]) == 64
    assert (ckpt / "COMMITTED").read_bytes() == b""
    assert torch.equal(load_tensors(ckpt, "model.safetensors")["w"], torch.full((64, 64), 3.0))
    assert load_json(ckpt, "trainer.json") == {"step": 20, "tokens": 1234}
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    with pytest.raises(CheckpointError, match="missing file nope.json"):
        load_json(ckpt, "nope.json")


def test_extra_unlisted_files_are_ignored(tmp_path):
    ckpt = make_checkpoint(tmp_path, 1)
    (ckpt / "notes.txt").write_text("added by an operator")
    verify_checkpoint(ckpt)


def test_exception_inside_writer_leaves_previous_latest(tmp_path):
    previous = make_checkpoint(tmp_path, 10)
    with pytest.raises(RuntimeError, match="preempted"):
        with CheckpointWriter(tmp_path, 20) as w:
            w.save_tensors("model.safetensors", {"w": torch.zeros(4)})
            raise RuntimeError("preempted mid-write")
    assert not w.tmp_dir.exists() and not w.final_dir.exists()
    assert list_checkpoints(tmp_path) == [previous]
    assert latest_checkpoint(tmp_path) == previous


def test_leftover_tmp_dir_is_never_loaded_and_gets_cleaned(tmp_path):
    previous = make_checkpoint(tmp_path, 10)
    crashed = CheckpointWriter(tmp_path, 20)  # process "dies" before commit: the temp dir stays behind
    crashed.save_tensors("model.safetensors", {"w": torch.zeros(4)})
    crashed.save_json("manifest-ish.json", {})
    assert list_checkpoints(tmp_path) == [previous]
    assert latest_checkpoint(tmp_path) == previous
    assert resolve_checkpoint(tmp_path / "checkpoints") == previous
    in_progress = CheckpointWriter(tmp_path, 30)
    removed = cleanup_checkpoints(tmp_path, keep=5, exclude=in_progress.tmp_dir)
    assert removed == [crashed.tmp_dir] and not crashed.tmp_dir.exists() and in_progress.tmp_dir.exists()
    assert in_progress.commit() == tmp_path / "checkpoints" / "step_00000030"


def test_recommit_same_step_replaces_old_copy(tmp_path):
    make_checkpoint(tmp_path, 10, value=1.0)
    ckpt = make_checkpoint(tmp_path, 10, value=2.0)
    verify_checkpoint(ckpt)
    assert torch.equal(load_tensors(ckpt, "model.safetensors")["w"], torch.full((64, 64), 2.0))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000010"]


def test_clean_exit_commits_and_closed_writer_refuses_writes(tmp_path):
    with CheckpointWriter(tmp_path, 7) as w:
        own = w.path("extra/blob.json")
        own.write_text("[1, 2]")
        w.add_file("extra/blob.json")
        w.copy_file(own, "copy.json")
    assert load_json(w.final_dir, "copy.json") == [1, 2]
    assert "extra/blob.json" in verify_checkpoint(w.final_dir)["files"]
    with pytest.raises(RuntimeError, match="already committed"):
        w.save_json("late.json", {})


def test_registered_file_vanishing_aborts_commit(tmp_path):
    w = CheckpointWriter(tmp_path, 1)
    w.save_json("a.json", {})
    (w.tmp_dir / "a.json").unlink()
    with pytest.raises(CheckpointError, match="a.json vanished"):
        w.commit()
    assert not w.tmp_dir.exists() and list_checkpoints(tmp_path) == []


@pytest.mark.parametrize(
    "name", ["", "../escape.json", "/abs.json", "a//b.json", "./a.json", "manifest.json", "COMMITTED"]
)
def test_writer_rejects_unsafe_names(tmp_path, name):
    with CheckpointWriter(tmp_path, 1) as w, pytest.raises(ValueError, match="checkpoint file name"):
        w.save_json(name, {})


@pytest.mark.parametrize("bad", [{"x": object()}, {"t": torch.zeros(1)}])
def test_bad_meta_and_json_fail_early(tmp_path, bad):
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        CheckpointWriter(tmp_path, 1, meta=bad)
    assert not (tmp_path / "checkpoints").exists()


def test_save_tensors_handles_shared_views_and_non_contiguous(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"tied_a": base, "tied_b": base, "t": base.t(), "row": base[1], "step": torch.tensor(3.0)}
    with CheckpointWriter(tmp_path, 1) as w:
        w.save_tensors("m.safetensors", tensors)
    loaded = load_tensors(w.final_dir, "m.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert loaded["step"].shape == ()


def test_resolve_checkpoint_accepts_all_path_kinds(tmp_path):
    make_checkpoint(tmp_path, 1)
    newest = make_checkpoint(tmp_path, 2)
    assert resolve_checkpoint(tmp_path) == newest
    assert resolve_checkpoint(tmp_path / "checkpoints") == newest
    assert resolve_checkpoint(tmp_path / "checkpoints" / "step_00000001") == tmp_path / "checkpoints" / "step_00000001"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints found"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_checkpoint(tmp_path / "missing")
    _flip_byte(newest)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        resolve_checkpoint(newest)


@pytest.mark.parametrize(
    "steps, damaged, keep, survivors",
    [
        ([1, 2, 3, 4, 5], None, 2, [4, 5]),
        ([1, 2, 3], None, 5, [1, 2, 3]),
        ([1, 2, 3], 3, 1, [2, 3]),  # a damaged newest one never makes us drop the last good one
        ([1, 2, 3], 2, 1, [3]),
    ],
)
def test_cleanup_keeps_newest_valid(tmp_path, steps, damaged, keep, survivors):
    for step in steps:
        make_checkpoint(tmp_path, step)
    if damaged is not None:
        _truncate(tmp_path / "checkpoints" / f"step_{damaged:08d}")
    cleanup_checkpoints(tmp_path, keep=keep)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == survivors
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        cleanup_checkpoints(tmp_path, keep=0)


# -- training state ----------------------------------------------------------------------------------------------


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
}


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _make_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_optimizer_round_trip_is_bitwise(tmp_path, opt_name):
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 4, generator=gen), torch.randn(5, 2, generator=gen)) for _ in range(6)]
    torch.manual_seed(0)
    model = _make_model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    _train(model, opt, batches[:3])
    with CheckpointWriter(tmp_path, 3) as w:
        w.save_tensors("model.safetensors", model.state_dict())
        write_state(w, "rank0/optim", *flatten_optimizer_state(opt.state_dict()))
    _train(model, opt, batches[3:])  # the uninterrupted reference

    torch.manual_seed(123)  # a fresh process would start from different weights
    resumed = _make_model()
    resumed_opt = OPTIMIZERS[opt_name](resumed.parameters())
    ckpt = resolve_checkpoint(tmp_path)
    resumed.load_state_dict(load_tensors(ckpt, "model.safetensors"))
    restored = unflatten_optimizer_state(*read_state(ckpt, "rank0/optim"))
    assert all(isinstance(k, int) for k in restored["state"])
    resumed_opt.load_state_dict(restored)
    _train(resumed, resumed_opt, batches[3:])

    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    ref_state, got_state = opt.state_dict(), resumed_opt.state_dict()
    assert ref_state["param_groups"] == got_state["param_groups"]
    for idx, entries in ref_state["state"].items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got_state["state"][idx][key])), (idx, key)


def test_optimizer_meta_mismatch_is_reported():
    model = _make_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    assert "state.0.exp_avg" in tensors and "state.0.step" in meta["tensor_keys"]
    json.dumps(meta, allow_nan=False)
    tensors.pop("state.0.exp_avg")
    with pytest.raises(ValueError, match=r"missing \['state.0.exp_avg'\]"):
        unflatten_optimizer_state(tensors, meta)
    with pytest.raises(ValueError, match="expected a torch optimizer state_dict"):
        flatten_optimizer_state({"params": []})


def test_rng_round_trip_is_bitwise(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in both generators, which must survive too
    np.random.normal()
    with CheckpointWriter(tmp_path, 1) as w:
        write_state(w, "rank0/rng", *capture_rng_state())

    def draw():
        return (
            [random.random() for _ in range(3)] + [random.gauss(0, 1)],
            np.concatenate([np.random.rand(3), [np.random.normal()]]),
            torch.rand(5),
        )

    expected = draw()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(*read_state(w.final_dir, "rank0/rng"))
    got = draw()
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


@pytest.mark.parametrize(
    "value",
    [
        {"betas": (0.9, 0.95), "nested": [(1, (2, 3)), None, True, "s"]},
        {0: {"step": 3}, 7: "int keys", (1, 2): "tuple key"},
        {"best": math.inf, "worst": -math.inf, "nan": math.nan, "x": 0.1 + 0.2},
        {"np_f32": np.float32(1.5), "np_i64": np.int64(-3), "np_bool": np.bool_(True), "dtype": torch.bfloat16},
        {"__tuple__": "a user key that looks like a tag", "__dict__": [1]},
    ],
    ids=["tuples", "non_str_keys", "non_finite", "numpy_scalars", "dunder_keys"],
)
def test_jsonable_round_trip(value):
    encoded = to_jsonable(value)
    decoded = from_jsonable(json.loads(json.dumps(encoded, allow_nan=False)))
    assert repr(decoded) == repr(value)
    assert [type(v) for v in decoded.values()] == [type(v) for v in value.values()]


def test_flatten_state_splits_tensors_and_arrays():
    state = {"w": torch.arange(3), "keys": np.arange(5, dtype=np.uint32), "cfg": {"lr": 0.1}, "a.b": torch.ones(1)}
    state["a"] = {"b": torch.zeros(1)}  # same dotted path as "a.b": must not overwrite it
    tensors, tree = flatten_state(state)
    assert len(tensors) == 4
    restored = unflatten_state(tensors, json.loads(json.dumps(tree)))
    assert restored["keys"].dtype == np.uint32 and np.array_equal(restored["keys"], state["keys"])
    assert torch.equal(restored["a.b"], state["a.b"]) and torch.equal(restored["a"]["b"], state["a"]["b"])
    with pytest.raises(TypeError, match="use flatten_state"):
        to_jsonable({"t": torch.zeros(1)})
    with pytest.raises(TypeError, match="without pickle"):
        flatten_state({"f": lambda: 0})


SCHEDULERS = {
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (s + 1)),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o),  # holds best=inf
}


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_scheduler_state_round_trip(kind):
    def build():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
        return opt, SCHEDULERS[kind](opt)

    opt, sched = build()
    for _ in range(3):
        opt.step()
        sched.step(1.0) if kind == "plateau" else sched.step()
    state = json.loads(json.dumps(scheduler_state(sched), allow_nan=False))
    _, fresh = build()
    restore_scheduler_state(fresh, state)
    assert repr(fresh.state_dict()) == repr(sched.state_dict())


# -- no pickle -----------------------------------------------------------------------------------------------------


def test_checkpoint_holds_no_pickle_and_loading_never_unpickles(tmp_path, monkeypatch):
    model = _make_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    with CheckpointWriter(tmp_path, 1) as w:
        w.save_tensors("model.safetensors", model.state_dict())
        write_state(w, "rank0/optim", *flatten_optimizer_state(opt.state_dict()))
        write_state(w, "rank0/rng", *capture_rng_state())
    files = [p for p in w.final_dir.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".safetensors") or p.name == "COMMITTED" for p in files)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("checkpoint code must never unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    ckpt = resolve_checkpoint(tmp_path)
    restore_rng_state(*read_state(ckpt, "rank0/rng"))
    fresh = torch.optim.AdamW(_make_model().parameters())
    fresh.load_state_dict(unflatten_optimizer_state(*read_state(ckpt, "rank0/optim")))
    shutil.rmtree(ckpt)
