"""Ray Train with run.storage_path a pyarrow URI (file:// here, opened through pyarrow as s3:// or gs:// would be):
two workers, each with a mirror of its own as on two nodes, commit checkpoints in the storage, which is also Ray's
run directory; Ray's Result knows the committed checkpoint there, and a second job on fresh mirrors resumes from it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a hung cluster fails, never stalls

from moe_platform.checkpoint import list_checkpoints, verify_checkpoint  # noqa: E402
from moe_platform.train.ray_launcher import launch_ray  # noqa: E402
from tinyrun import local_ray, logged_steps  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=2):
        yield


def test_checkpoints_in_a_storage_uri_are_reported_to_ray_and_resumed(ray_cluster, tiny_config, tmp_path):
    from ray.train import Result

    def cfg(steps: int, mirrors: str):
        return tiny_config(**{"run.storage_path": f"file://{tmp_path}/bucket", "run.local_dir": f"{tmp_path}/{mirrors}",
                              "parallel.dp": 2, "train.steps": steps, "checkpoint.interval": 4, "checkpoint.keep": 2,
                              "checkpoint.export": "false"})

    remote = tmp_path / "bucket" / "t"
    first = launch_ray(cfg(8, "a/node{rank}"), progress=False)
    assert first["final_step"] == 8 and first["resumed_from"] is None
    assert [p.name for p in list_checkpoints(remote)] == ["step_00000004", "step_00000008"]
    assert first["ray_checkpoint"] == str(remote / "checkpoints" / "step_00000008")
    assert not list_checkpoints(tmp_path / "a" / "node1" / "t"), "a worker's mirror holds no partial checkpoint"

    second = launch_ray(cfg(12, "b/node{rank}"), progress=False)
    assert second["resumed_from"] == 8 and second["final_step"] == 12
    assert [p.name for p in list_checkpoints(remote)] == ["step_00000008", "step_00000012"]
    for ckpt in list_checkpoints(remote):
        verify_checkpoint(ckpt)
    result = Result.from_path(f"file://{remote}")
    assert Path(result.checkpoint.path) == remote / "checkpoints" / "step_00000012"
    assert logged_steps(remote) == list(range(1, 13))
