"""Every use of a Ray API that is not public, in one place.

Ray keeps these stable in practice but promises nothing about them; each is checked against the Ray versions in
`TESTED_RAY` by the test suite. Importing this module on another Ray version fails with a message that says which
versions are tested, unless MOE_PLATFORM_ALLOW_UNTESTED_RAY=1 asks to try anyway.

What is used, and why:
- `ray._raylet.GcsClient`: node list and `drain_node` (the spot agent turns a cloud's reclaim notice into the same
  drain that Ray's autoscaler sends for a preemption; `ray drain-node` is a hidden CLI over the same call).
- `ray._private.state.state.get_max_resources_from_cluster_config` and the autoscaler's status report in the GCS
  key-value store: how many workers an autoscaling cluster can ever host (preflight).
- `ray.train.v2._internal` controller/worker-group callbacks (resize checkpoints) and the worker's own train context
  (reading a preemption notice without a collective, and echoing it with a passed deadline once the just-in-time
  checkpoint has committed, so that the group restarts at once instead of at the drain deadline).
- Ray Data's AutoscalingCoordinator: the arbiter hands GPUs between training and serving through it.
- Ray Train's index of reported checkpoints in the run directory (`checkpoint_manager_snapshot.json`), whose format is
  Ray's own: pruned when the trainer has deleted checkpoints it names.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import ray

TESTED_RAY = ("2.60.",)
RAY_RUN_INDEX = "checkpoint_manager_snapshot.json"  # Ray Train's index of reported checkpoints in the run dir

log = logging.getLogger("moe_platform.train.ray")
ALLOW_UNTESTED_ENV = "MOE_PLATFORM_ALLOW_UNTESTED_RAY"


def check_ray_version(version: str = ray.__version__) -> None:
    if not version.startswith(TESTED_RAY) and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise ImportError(f"moe-platform is tested with Ray {', '.join(v + 'x' for v in TESTED_RAY)}, and this "
                          f"environment has Ray {version}; install the pinned one (pip install 'ray[default,serve,"
                          f"train]==2.60.0'), or set {ALLOW_UNTESTED_ENV}=1 to try this one anyway")


check_ray_version()


# -- nodes and drains ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    node_id: str  # hex
    ip: str
    name: str
    is_head: bool


def _gcs_client(address: str):
    """A client of the GCS at `address`; a ConnectionError at once when nothing listens there (Ray's own client
    would retry for 30 s first)."""
    import socket

    from ray._private import services

    address = services.canonicalize_bootstrap_address_or_die(address)
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"no Ray GCS answers at {address}: {e}") from e
    return ray._raylet.GcsClient(address=address)


def alive_nodes(address: str, timeout_s: float = 30) -> list[NodeInfo]:
    """The cluster's alive nodes, read from the GCS at `address` (host:port) without joining it as a driver."""
    from ray.core.generated import gcs_pb2

    nodes = _gcs_client(address).get_all_node_info(timeout=timeout_s)
    return [NodeInfo(node_id.hex(), info.node_manager_address, info.node_name, info.is_head_node)
            for node_id, info in nodes.items() if info.state == gcs_pb2.GcsNodeInfo.ALIVE]


def drain_node_for_preemption(address: str, node_id: str, message: str, deadline_ms: int) -> tuple[bool, str]:
    """Ask the GCS to drain `node_id` because it is being preempted, by `deadline_ms` (Unix ms; 0: none). Ray then
    stops placing work there, Ray Train tells the workers on it (just-in-time checkpoint), and Serve moves replicas
    off it. Returns (accepted, why not)."""
    from ray.core.generated import autoscaler_pb2

    client = _gcs_client(address)
    accepted, why_not = client.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                          message, int(deadline_ms))
    return bool(accepted), str(why_not or "")


# -- cluster capacity (preflight) ------------------------------------------------------------------------------------


def autoscaler_max_resources() -> dict[str, float] | None:
    """The autoscaler's per-cluster resource limits, what Ray Train itself checks against (None: no autoscaler
    config, or an older GCS)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or None
    except Exception:
        return None


def autoscaler_report() -> dict[str, Any] | None:
    """The autoscaler's latest status report (node types, active and pending nodes), or None when none reports."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return json.loads(raw).get("autoscaler_report") if raw else None
    except Exception:
        return None


# -- Ray Train internals ---------------------------------------------------------------------------------------------


def train_controller_callback_bases() -> tuple[type, type]:
    """Ray Train v2's (ControllerCallback, WorkerGroupCallback), for a callback passed in RunConfig(callbacks=...)."""
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    return ControllerCallback, WorkerGroupCallback


def local_preemption_info():
    """The preemption notice Ray Train marked this worker with (None: none yet). Read from the worker's own train
    context, with no collective; without that context (another Ray version), Ray's public call, a barrier that every
    rank makes at the same checks."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except (ImportError, AttributeError):
        import ray.train

        return ray.train.get_preemption_info()


def end_preemption_wait(grace_s: float) -> bool:
    """After this worker's just-in-time checkpoint has committed: let Ray Train restart the group now rather than at
    the drain deadline plus `grace_s`. The worker echoes its notice to the controller at every poll, and the
    controller keeps the earliest deadline it is shown, so echoing a deadline that has already passed (by the grace)
    makes its next poll (about 2 s) end the preemption. It is charged to failure.max_preemption_failures as usual,
    and the drain itself is untouched: the node, and the Serve replicas on it, keep the notice's full deadline.
    False where this Ray has no such context (the group then restarts at the deadline)."""
    import dataclasses
    import time

    try:
        from ray.train.v2._internal.execution.context import get_train_context

        context = get_train_context().preemption_context
    except (ImportError, AttributeError):
        return False
    info = context.preemption_info
    if info is None:
        return False
    passed_ms = int((time.time() - grace_s) * 1000) - 1
    context.preemption_info = dataclasses.replace(info, deadline_ms=min(info.deadline_ms or passed_ms, passed_ms))
    return True


# -- Ray Data's autoscaling coordinator (train/serve arbitration) ----------------------------------------------------


def autoscaling_coordinator():
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    return get_or_create_autoscaling_coordinator()


# -- Ray Train's checkpoint index ------------------------------------------------------------------------------------


def prune_ray_index(store) -> None:
    """Keep Ray Train's index of reported checkpoints in step with the trainer, which deletes old checkpoints itself:
    Ray refuses to start a run (and Result.from_path to load one) whose index names a checkpoint that is gone. The
    trainer resumes from its own directory, so an index this cannot make sense of is simply dropped. One function
    for every storage: `store` is the run's directory on a local disk or behind a storage URI."""
    data = store.get_bytes(RAY_RUN_INDEX)
    if data is None:
        return

    def exists(entry) -> bool:
        return store.exists(entry["checkpoint_dir_name"])

    try:
        state = json.loads(data)
        results, order = state["checkpoint_results"], state["checkpoint_report_indices"]
        if len(results) != len(order):
            raise ValueError("checkpoint_results and checkpoint_report_indices differ in length")
        kept = [i for i, entry in enumerate(results) if exists(entry)]
        latest = state.get("latest_checkpoint_result")
        if len(kept) == len(results) and (latest is None or exists(latest)):
            return
        state["checkpoint_results"] = [results[i] for i in kept]
        state["checkpoint_report_indices"] = [order[i] for i in kept]
        if latest is not None and not exists(latest):
            state["latest_checkpoint_result"] = state["checkpoint_results"][-1] if kept else None
        pending = list(zip(state["pending_training_results"], state["pending_validation_specs"], strict=True))
        pending = [(r, v) for r, v in pending if exists(r)]
        state["pending_training_results"] = [r for r, _ in pending]
        state["pending_validation_specs"] = [v for _, v in pending]
        for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                    "failed_validation_checkpoint_dir_names"):
            state[key] = [n for n in state.get(key, []) if store.exists(n)]
        store.put_bytes(RAY_RUN_INDEX, json.dumps(state).encode())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.info("dropping Ray's checkpoint index %s, which does not match the run's checkpoints: %s",
                 store.path(RAY_RUN_INDEX), e)
        store.delete(RAY_RUN_INDEX)
