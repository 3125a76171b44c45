"""run.storage_path as a pyarrow filesystem URI (file:// here: a real pyarrow LocalFileSystem, no mocks): checkpoints
committed in the storage (payload, manifest, COMMITTED last) and pruned to checkpoint.keep there, a fresh node that
resumes from the storage bit for bit, damaged or half-uploaded checkpoints skipped, clear errors for bad URIs; two
ranks without a shared disk, and a rank killed between writing its files and the commit."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from moe_platform.checkpoint import CheckpointWarning, latest_checkpoint, list_checkpoints, verify_checkpoint
from moe_platform.checkpoint.remote import RemoteRun
from moe_platform.checkpoint.sharded import ShardedReader
from moe_platform.config import config_from_dict, config_to_dict
from moe_platform.train.launch import free_port, init_process_group, launch_local, run_rank
from moe_platform.train.metrics import MetricsLog
from moe_platform.train.trainer import DistContext, Trainer, train

pytestmark = pytest.mark.timeout(600)


def run(cfg, stop_after=None):
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    return trainer, trainer.fit(stop_after=stop_after)


def storage_cfg(tiny_config, tmp_path, node: str, **extra):
    return tiny_config(**{"run.storage_path": f"file://{tmp_path}/bucket", "run.local_dir": str(tmp_path / node),
                          **extra})


def remote_run(tmp_path) -> Path:
    return tmp_path / "bucket" / "t"


def committed_steps(run_dir: Path) -> list[int]:
    return [int(p.name[5:]) for p in list_checkpoints(run_dir) if (p / "COMMITTED").exists()]


def params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in MetricsLog(run_dir / "metrics.jsonl").read()]


def test_checkpoints_are_committed_in_the_storage_and_pruned(tiny_config, tmp_path):
    cfg = storage_cfg(tiny_config, tmp_path, "node0", **{"checkpoint.interval": 4, "checkpoint.keep": 2})
    trainer, result = run(cfg)
    remote = remote_run(tmp_path)
    assert result.run_dir == tmp_path / "node0" / "t"  # the trainer works in the node-local mirror
    assert committed_steps(remote) == [8, 12] and [p.name for p in list_checkpoints(remote)] == [
        "step_00000008", "step_00000012"]
    for ckpt in list_checkpoints(remote):
        manifest = verify_checkpoint(ckpt)
        assert manifest == verify_checkpoint(result.run_dir / "checkpoints" / ckpt.name), "the mirror's own copy"
    for name in ("tokenizer/tokenizer.json", "metrics.jsonl", "summary.json", "loss.png", "export/config.json",
                 "export/model.safetensors"):
        assert (remote / name).is_file(), name
    assert losses(remote) == losses(result.run_dir) and len(losses(remote)) == 12


def test_a_fresh_node_resumes_from_the_storage_bitwise(tiny_config, tmp_path):
    """16 steps straight == 8 steps on one node, then 8 more on a node with an empty mirror: same parameters bit for
    bit, same losses, each step logged once."""
    common = {"train.steps": 16, "checkpoint.interval": 8, "train.warmup": 3}
    straight, _ = run(tiny_config(**common, **{"run.name": "straight"}))
    _, first = run(storage_cfg(tiny_config, tmp_path, "node0", **common), stop_after=8)
    assert first.final_step == 8 and committed_steps(remote_run(tmp_path)) == [8]
    second, result = run(storage_cfg(tiny_config, tmp_path, "node1", **common))
    assert result.resumed_from == 8 and result.final_step == 16
    a, b = params(straight), params(second)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming on a fresh node"
    assert losses(result.run_dir) == losses(straight.run_dir) and len(losses(result.run_dir)) == 16
    assert committed_steps(remote_run(tmp_path)) == [8, 16]


def _no_marker(ckpt: Path) -> None:
    (ckpt / "COMMITTED").unlink()  # a crash between the manifest and the marker


def _truncated(ckpt: Path) -> None:
    shard = ckpt / "shards" / "rank0.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])


@pytest.mark.parametrize("damage", [_no_marker, _truncated], ids=["no_COMMITTED", "truncated_file"])
def test_a_damaged_checkpoint_in_the_storage_is_skipped(tiny_config, tmp_path, damage):
    extra = {"checkpoint.interval": 4, "checkpoint.keep": 3}
    run(storage_cfg(tiny_config, tmp_path, "node0", **extra), stop_after=8)
    remote = remote_run(tmp_path)
    damage(remote / "checkpoints" / "step_00000008")
    with pytest.warns(CheckpointWarning) if damage is _truncated else contextlib.nullcontext():
        trainer, result = run(storage_cfg(tiny_config, tmp_path, "node1", **extra))
    assert result.resumed_from == 4 and result.final_step == 12
    assert [s for s, _ in losses(result.run_dir)] == list(range(1, 13)), "steps after step 4 are redone once"
    assert committed_steps(remote) == [4, 8, 12]
    for ckpt in list_checkpoints(remote):
        verify_checkpoint(ckpt)  # step 8 was written again, whole


@pytest.mark.parametrize("uri, match", [
    ("foo://bucket/runs", r"'foo://bucket/runs' is not a storage pyarrow can open"),
    ("file://relative/runs", r"'file://relative/runs' is not a storage pyarrow can open"),
    ("file:///proc/version/runs", r"'file:///proc/version/runs' is not writable"),
])
def test_a_bad_storage_uri_is_a_clear_error(tiny_config, tmp_path, uri, match):
    with pytest.raises(ValueError, match=match):
        train(tiny_config(**{"run.storage_path": uri, "run.local_dir": str(tmp_path / "node0")}), progress=False)
    assert not (tmp_path / "node0" / "t" / "checkpoints").exists(), "nothing trained before the error"


def test_remote_run_layout(tmp_path):
    remote = RemoteRun(f"file://{tmp_path}/b", "r")
    assert remote.root == f"{tmp_path}/b/r" and remote.is_local
    assert remote.step_path(20) == f"{tmp_path}/b/r/checkpoints/step_00000020"
    assert remote.step_dirs() == {} and remote.prune(1) == []


# -- several ranks ---------------------------------------------------------------------------------------------------

DP2 = {"parallel.dp": 2, "train.steps": 8, "checkpoint.interval": 4, "train.global_batch_size": 8,
       "train.micro_batch_size": 2, "train.warmup": 2, "checkpoint.export": "false", "checkpoint.keep": 3}


def full_state(ckpt: Path) -> dict[str, torch.Tensor]:
    reader = ShardedReader(ckpt)
    return {f"{kind}/{k}": v for kind in ("model", "exp_avg", "exp_avg_sq")
            for k, v in reader.full_state_dict(kind).items()}


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_resume_from_the_storage(tiny_config, tmp_path):
    """Two ranks, each with a mirror of its own (two nodes): each uploads what it wrote and rank 0 commits in the
    storage; a restart on new nodes downloads the checkpoint on each and ends like an uninterrupted run."""
    straight = launch_local(tiny_config(**DP2, **{"run.name": "straight"}), progress=False)
    per_rank = storage_cfg(tiny_config, tmp_path, "a/node{rank}", **DP2)
    first = launch_local(per_rank, progress=False, stop_after=4)
    assert first.final_step == 4 and committed_steps(remote_run(tmp_path)) == [4]
    assert not list_checkpoints(tmp_path / "a" / "node1" / "t"), "a node keeps no partial checkpoint of its own"
    result = launch_local(storage_cfg(tiny_config, tmp_path, "b/node{rank}", **DP2), progress=False)
    assert result.resumed_from == 4 and result.final_step == 8
    assert committed_steps(remote_run(tmp_path)) == [4, 8]
    want, got = full_state(latest_checkpoint(straight.run_dir)), full_state(latest_checkpoint(remote_run(tmp_path)))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k} differs after resuming on new nodes"
    assert losses(tmp_path / "b" / "node0" / "t") == losses(straight.run_dir)


def _crashing_rank(rank: int, world_size: int, port: int, cfg_dict: dict, crash_step: int) -> None:
    """A rank of a 2-rank run whose rank 1 dies right before it marks its part of `crash_step` as written."""
    from moe_platform.checkpoint.remote import RemoteRun
    from moe_platform.train import checkpointing

    put_local, put_remote = checkpointing._put_local_part, RemoteRun.put_part

    def put_local_or_die(tmp_dir, rank, part):
        if "files" in part and f"step_{crash_step:08d}" in tmp_dir.name:
            os._exit(3)  # killed: its files are written, its marker never is
        put_local(tmp_dir, rank, part)

    def put_remote_or_die(self, step, token, rank, part):
        if "files" in part and step == crash_step:
            os._exit(3)  # killed: its files are uploaded, its marker never is
        put_remote(self, step, token, rank, part)

    if rank == 1:
        checkpointing._put_local_part = put_local_or_die
        RemoteRun.put_part = put_remote_or_die
    torch.set_num_threads(1)
    init_process_group(rank, world_size, rank, "127.0.0.1", port)
    run_rank(config_from_dict(cfg_dict), DistContext(rank, world_size, rank), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["shared_dir", "uri_per_node"])
def test_a_rank_killed_mid_checkpoint_leaves_the_previous_one_latest(tiny_config, tmp_path, storage):
    """Rank 1 dies in the background write of step 8 (after writing its files, before its part marker) while rank 0
    trains on: no step 8 is ever committed, and a restart resumes from step 4."""
    import torch.multiprocessing as mp

    extra = {**DP2, "train.steps": 12}
    cfg = tiny_config(**extra) if storage == "shared_dir" else storage_cfg(tiny_config, tmp_path, "node{rank}", **extra)
    where = tmp_path / "t" if storage == "shared_dir" else remote_run(tmp_path)
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(_crashing_rank, args=(2, free_port(), config_to_dict(cfg), 8), nprocs=2, join=True)
    assert committed_steps(where) == [4]
    with pytest.warns(CheckpointWarning) if storage == "uri_per_node" else contextlib.nullcontext():
        assert latest_checkpoint(where).name == "step_00000004"  # (step 8's dir there holds rank 1's upload)
    if storage == "uri_per_node":
        assert (where / "checkpoints" / "step_00000008" / "rng" / "rank1.json").exists(), \
            "rank 1's files of the lost step were uploaded, but nothing committed them"
    result = launch_local(cfg, progress=False)
    assert result.resumed_from == 4 and result.final_step == 12 and committed_steps(where) == [4, 8, 12]
    run_dir = where if storage == "shared_dir" else tmp_path / "node0" / "t"
    assert [s for s, _ in losses(run_dir)] == list(range(1, 13))
