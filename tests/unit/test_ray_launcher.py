"""What the Ray launcher decides before any cluster exists: worker counts, layouts for every elastic world size,
absolute paths for workers that run elsewhere, Ray addresses. (The launcher itself runs in tests/integration.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_platform.checkpoint.remote import RemoteRun
from moe_platform.ray_compat import RAY_RUN_INDEX, prune_ray_index
from moe_platform.train.ray_preflight import (
    _host_port,
    check_layouts,
    check_storage,
    num_workers_for,
    with_absolute_paths,
)


@pytest.mark.parametrize("extra, want", [
    ({}, 1),
    ({"parallel.dp": 2}, 2),
    ({"parallel.dp": 0, "elastic.min_workers": 2, "elastic.max_workers": 2}, 2),  # automatic degree, fixed count
    ({"parallel.dp": 0, "elastic.min_workers": 1, "elastic.max_workers": 2}, (1, 2)),
    ({"parallel.dp": 2, "elastic.min_workers": 1, "elastic.max_workers": 2}, (1, 2)),
])
def test_num_workers(tiny_config, extra, want):
    assert num_workers_for(tiny_config(**extra)) == want


def test_every_elastic_world_size_needs_a_layout(tiny_config):
    cfg = tiny_config(**{"parallel.dp": 0, "elastic.min_workers": 1, "elastic.max_workers": 3})
    check_layouts(cfg, 1, 2)
    with pytest.raises(ValueError, match=r"no valid layout for 3 worker\(s\).*workers 1\.\.3"):
        check_layouts(cfg, 1, 3)


def test_paths_become_absolute(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(tiny_config(**{"run.storage_path": "runs", "data.cache_dir": "cache",
                                             "run.local_dir": "mirror/node{rank}"}))
    assert cfg.run.storage_path == str(tmp_path / "runs")
    assert cfg.data.cache_dir == str(tmp_path / "cache")
    assert cfg.run.local_dir == str(tmp_path / "mirror" / "node{rank}")
    assert Path(cfg.data.path).is_absolute()
    for uri in (f"file://{tmp_path}/r", "s3://bucket/runs", "gs://bucket/runs"):  # opened by pyarrow on each worker
        assert with_absolute_paths(tiny_config(**{"run.storage_path": uri})).run.storage_path == uri
    assert with_absolute_paths(tiny_config()).run.local_dir == "", "empty: each worker's own cache dir"


def test_storage_is_checked_before_any_cluster(tiny_config, tmp_path):
    run_dir, store = check_storage(tiny_config(**{"run.storage_path": f"file://{tmp_path}/bucket"}))
    assert run_dir == tmp_path / "bucket" / "t" and store.root == str(run_dir)
    assert (tmp_path / "bucket" / "t").is_dir()
    run_dir, store = check_storage(tiny_config(**{"run.storage_path": str(tmp_path / "plain")}))
    assert run_dir == tmp_path / "plain" / "t" and store.root == str(run_dir) and run_dir.is_dir()
    (tmp_path / "plain" / "x").write_text("a file where the runs directory should be")
    with pytest.raises(ValueError, match=r"run.storage_path '.*/x' is not writable"):
        check_storage(tiny_config(**{"run.storage_path": str(tmp_path / "plain" / "x")}))
    with pytest.raises(ValueError, match=r"'foo://bucket/runs' is not a storage pyarrow can open"):
        check_storage(tiny_config(**{"run.storage_path": "foo://bucket/runs"}))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"'file://.*/file/runs' is not writable"):
        check_storage(tiny_config(**{"run.storage_path": f"file://{tmp_path}/file/runs"}))


@pytest.mark.parametrize("address, want", [
    ("10.0.0.1:6379", ("10.0.0.1", 6379)),
    ("ray://head:10001", ("head", 10001)),
    ("[::1]:6379", ("::1", 6379)),
    ("auto", None),
])
def test_ray_addresses(address, want):
    assert _host_port(address) == want


@pytest.mark.parametrize("address, message", [
    ("http://127.0.0.1:8265", "dashboard"),
    ("head", "not of the form host:port"),
])
def test_bad_ray_addresses(address, message):
    with pytest.raises(ValueError, match=message):
        _host_port(address)


def test_only_an_autoscaler_with_node_types_of_its_own_can_add_nodes():
    from moe_platform.train.ray_preflight import _report_can_add_nodes

    head = "cb9cdb75"
    # `ray start --head` without a cluster config: the monitor's read-only provider mirrors the nodes it sees
    readonly = {"active_nodes": {f"node_{head}": 1}, "pending_launches": {},
                "node_type_mapping": {head: f"node_{head}"}}
    assert not _report_can_add_nodes(readonly)
    assert not _report_can_add_nodes(None)
    # `ray up`: the head's type comes from the cluster config, and worker types may be launching
    assert _report_can_add_nodes({"active_nodes": {"ray.head.default": 1},
                                  "node_type_mapping": {head: "ray.head.default"}})
    assert _report_can_add_nodes({"active_nodes": {}, "pending_launches": {"cpu_worker": 1}, "node_type_mapping": {}})


def _ray_index(names: list[str]) -> dict:
    entries = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    return {"checkpoint_results": entries, "checkpoint_report_indices": list(range(len(names))),
            "latest_checkpoint_result": entries[-1] if entries else None, "pending_training_results": [],
            "pending_validation_specs": [], "validated_checkpoint_dir_names": names}


@pytest.mark.parametrize("uri", [False, True], ids=["local-dir", "storage-uri"])
def test_ray_index_keeps_only_checkpoints_that_exist(tmp_path, uri):
    """One pruning for every storage: Ray refuses an index that names a checkpoint the trainer has deleted."""
    run_dir = tmp_path / "runs" / "t"
    store = RemoteRun(f"file://{tmp_path}/runs", "t") if uri else RemoteRun.local(run_dir)
    for name in ("checkpoints/step_00000002", "checkpoints/step_00000004"):
        (run_dir / name).mkdir(parents=True)
    prune_ray_index(store)  # no index: nothing to do
    assert not (run_dir / RAY_RUN_INDEX).exists()
    index = _ray_index(["checkpoints/step_00000001", "checkpoints/step_00000002", "checkpoints/step_00000004"])
    (run_dir / RAY_RUN_INDEX).write_text(json.dumps(index))
    prune_ray_index(store)
    kept = json.loads((run_dir / RAY_RUN_INDEX).read_text())
    assert [e["checkpoint_dir_name"] for e in kept["checkpoint_results"]] == ["checkpoints/step_00000002",
                                                                             "checkpoints/step_00000004"]
    assert kept["checkpoint_report_indices"] == [1, 2]
    assert kept["validated_checkpoint_dir_names"] == ["checkpoints/step_00000002", "checkpoints/step_00000004"]
    (run_dir / "checkpoints/step_00000004").rmdir()
    prune_ray_index(store)
    assert json.loads((run_dir / RAY_RUN_INDEX).read_text())["latest_checkpoint_result"]["checkpoint_dir_name"] == (
        "checkpoints/step_00000002")
    (run_dir / RAY_RUN_INDEX).write_text("{not json")
    prune_ray_index(store)  # an index this cannot read is dropped (the trainer resumes from its own checkpoints)
    assert not (run_dir / RAY_RUN_INDEX).exists()
