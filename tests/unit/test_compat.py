"""Private Ray and DeepSpeed APIs are used in one module each (moe_platform/ray_compat.py, deepspeed_compat.py), and
those modules refuse versions they were not tested with, with a message that says what to install."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "platform" / "moe_platform"
RAY_PRIVATE = re.compile(r"ray\._private|ray\._raylet|ray\.train\.v2\._internal|ray\.data\._internal|_internal_kv|"
                         r"ray\.core\.generated")
DEEPSPEED_PRIVATE = re.compile(r"ds_groups\._|deepspeed\.utils\.groups|deepspeed\.moe\.layer|deepspeed\.runtime\.utils|"
                               r"_lazy_init_hp_params|_hp_optimizer_states_linked|fp32_groups_flat_partition")


@pytest.mark.parametrize("pattern,home", [(RAY_PRIVATE, "ray_compat.py"), (DEEPSPEED_PRIVATE, "deepspeed_compat.py")],
                         ids=["ray", "deepspeed"])
def test_private_apis_live_in_one_compat_module(pattern, home):
    users = sorted(str(p.relative_to(SOURCE)) for p in SOURCE.rglob("*.py") if pattern.search(p.read_text()))
    assert users == [home]


def test_ray_compat_refuses_an_untested_ray(monkeypatch):
    from moe_platform import ray_compat

    ray_compat.check_ray_version("2.60.0")
    with pytest.raises(ImportError, match=r"tested with Ray 2\.60\.x, and this environment has Ray 2\.59\.1; "
                                          r"install the pinned one"):
        ray_compat.check_ray_version("2.59.1")
    monkeypatch.setenv(ray_compat.ALLOW_UNTESTED_ENV, "1")
    ray_compat.check_ray_version("2.61.0")


def test_deepspeed_compat_refuses_an_old_deepspeed_and_warns_on_a_newer(caplog):
    from moe_platform import deepspeed_compat

    deepspeed_compat.check_deepspeed_version("0.19.8")
    with pytest.raises(ImportError, match=r"needs DeepSpeed >= 0\.16, and this environment has 0\.15\.4"):
        deepspeed_compat.check_deepspeed_version("0.15.4")
    deepspeed_compat.check_deepspeed_version("0.20.1+cu124")
    assert "newer than the versions moe-platform is tested with" in caplog.text


def test_a_stale_deepspeed_build_lock_is_removed_and_a_live_one_kept(tmp_path):
    """A rank killed while it loads DeepSpeed's compiled CPU op leaves torch's build lock, on which every later
    DeepSpeed process would wait forever: an old lock beside a built library goes, a fresh one (a build or load in
    progress) and one without a library (a first build) stay."""
    import os
    import time

    from moe_platform.deepspeed_compat import STALE_LOCK_SECONDS, clear_stale_build_locks

    def op(name: str, built: bool, age: float) -> Path:
        d = tmp_path / "py312_cpu" / name
        d.mkdir(parents=True)
        if built:
            (d / f"{name}.so").write_bytes(b"\0")
        lock = d / "lock"
        lock.touch()
        then = time.time() - age
        os.utime(lock, (then, then))
        return lock

    stale = op("deepspeed_shm_comm", built=True, age=STALE_LOCK_SECONDS + 60)
    live = op("deepspeed_live", built=True, age=5)
    first_build = op("deepspeed_first", built=False, age=STALE_LOCK_SECONDS + 60)
    other = op("someone_elses_op", built=True, age=STALE_LOCK_SECONDS + 60)
    assert clear_stale_build_locks(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and first_build.exists() and other.exists()
    assert clear_stale_build_locks(tmp_path) == []
