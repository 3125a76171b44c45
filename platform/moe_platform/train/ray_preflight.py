"""What a Ray training job must satisfy before any worker starts, checked on the driver: worker counts and a layout
for every elastic world size, absolute paths for workers that run elsewhere, writable storage, a reachable cluster
that can ever host the workers. Each refusal is a ValueError that names what is wrong."""

from __future__ import annotations

import copy
import logging
import os
import socket
from pathlib import Path

from moe_platform import ray_compat
from moe_platform.checkpoint.files import check_writable
from moe_platform.checkpoint.remote import RemoteRun, is_uri, mirror_dir
from moe_platform.config import Config, config_from_dict, config_to_dict
from moe_platform.parallel import resolve_layout
from moe_platform.train.launch import world_size_for
from moe_platform.train.trainer import model_args_for

log = logging.getLogger("moe_platform.train.ray")


# -- what the job needs ------------------------------------------------------------------------------------------


def num_workers_for(cfg: Config) -> int | tuple[int, int]:
    """Ray's worker count: an elastic (min, max) range when elastic.min_workers < max_workers, else a fixed count."""
    e = cfg.elastic
    if e.min_workers < e.max_workers:
        return (e.min_workers, e.max_workers)
    return world_size_for(cfg)


def worker_range(num_workers: int | tuple[int, int]) -> tuple[int, int]:
    return num_workers if isinstance(num_workers, tuple) else (num_workers, num_workers)


def check_layouts(cfg: Config, lo: int, hi: int) -> None:
    """Every world size Ray may hand the job must have a valid layout, or a restart would fail on the workers."""
    args = model_args_for(cfg)
    for world_size in range(lo, hi + 1):
        try:
            resolve_layout(cfg, world_size, args)
        except ValueError as e:
            raise ValueError(f"no valid layout for {world_size} worker(s), which Ray may give this job "
                             f"(workers {lo}..{hi}): {e}") from e


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose local paths are absolute: Ray workers run in their own working directories, maybe elsewhere.
    A storage URI (s3://, gs://, file://) stays as it is: every worker opens it through pyarrow, as Ray does."""
    data = copy.deepcopy(config_to_dict(cfg))
    run = data["run"]
    if not is_uri(run["storage_path"]):
        run["storage_path"] = str(Path(run["storage_path"]).expanduser().resolve())
    if run["local_dir"]:  # an empty one means each worker's own ~/.cache/moe-platform/runs/...
        run["local_dir"] = str(Path(run["local_dir"]).expanduser().resolve())
    if data["data"]["path"] and Path(data["data"]["path"]).expanduser().exists():
        data["data"]["path"] = str(Path(data["data"]["path"]).expanduser().resolve())
    if data["init"]["from_hf"]:
        data["init"]["from_hf"] = str(Path(data["init"]["from_hf"]).expanduser().resolve())
    if data["dpo"]["reference"] != "base":  # a model directory
        data["dpo"]["reference"] = str(Path(data["dpo"]["reference"]).expanduser().resolve())
    if data["data"]["cache_dir"]:
        data["data"]["cache_dir"] = str(Path(data["data"]["cache_dir"]).expanduser().resolve())
    return config_from_dict(data)


def check_storage(cfg: Config) -> tuple[Path, RemoteRun]:
    """The run directory, created and probed for writing (on this machine: a local storage path must be shared),
    and the run's storage as a `RemoteRun` (also for a local path), where Ray Train keeps its checkpoint index.
    A storage URI is probed through pyarrow, so that an unknown scheme, an unreachable bucket or missing write access
    fail here; the directory returned is then the run directory's local path for file://, and for object storage
    this machine's mirror."""
    if is_uri(cfg.run.storage_path):
        remote = RemoteRun(cfg.run.storage_path, cfg.run.name)
        remote.check_writable()
        run_dir = Path(remote.root) if remote.is_local else mirror_dir(cfg.run.storage_path, cfg.run.name,
                                                                       cfg.run.local_dir)
        return run_dir, remote
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    if "runtime_resources" in run_dir.parts:
        log.warning("run directory %s lies in the copy of the job's working dir, which Ray deletes with the cluster; "
                    "give run.storage_path as an absolute path on shared storage", run_dir)
    check_writable(run_dir, f"run.storage_path {cfg.run.storage_path!r}")
    return run_dir, RemoteRun.local(run_dir)


# -- the cluster ---------------------------------------------------------------------------------------------------


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of a GCS (`host:port`) or Ray Client (`ray://host:port`) address; None for `auto`."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme in ("http", "https"):
        raise ValueError(f"Ray address {address!r} is a dashboard (job submission) address; training connects to "
                         f"the cluster's GCS address (host:6379) or a Ray Client address (ray://host:10001)")
    hostport = rest if sep else address
    if hostport == "auto":
        return None
    host, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not of the form host:port or ray://host:port")
    return host.strip("[]"), int(port)


def connect(address: str | None, num_cpus: int) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start an embedded local Ray; True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        # address="local" (not None): never attach by accident to some other cluster running on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        return True
    target = _host_port(address)
    if target is not None:
        try:
            socket.create_connection(target, timeout=5).close()
        except OSError as e:
            raise ValueError(f"no Ray cluster reachable at {address!r} ({e}); start one (`ray start --head`) or "
                             f"unset RAY_ADDRESS to train on an embedded local Ray") from e
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        raise ValueError(f"could not connect to the Ray cluster at {address!r}: {e}") from e
    return True


def _cluster_capacity(per_worker: dict[str, float]) -> tuple[int, str]:
    """How many workers the cluster can ever host: from the autoscaler's limits when there is an autoscaler,
    else from the nodes it has (a worker must fit on one node)."""
    import ray

    limits = ray_compat.autoscaler_max_resources()
    if limits:
        fits = min(int(limits.get(k, 0) // v) for k, v in per_worker.items())
        return fits, f"autoscaler maximum {dict(limits)}"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = sum(min(int(n["Resources"].get(k, 0) // v) for k, v in per_worker.items()) for n in nodes)
    return fits, f"{len(nodes)} node(s) with {[{k: n['Resources'].get(k, 0) for k in per_worker} for n in nodes]}"


def _autoscaler_running() -> bool:
    """Whether an autoscaler that can add nodes reports on this cluster. Ray's v1 autoscaler (the default of `ray up`)
    does not expose its node limits, so the nodes that exist now say nothing about what it can add. A head started
    without a cluster config also runs the monitor, with a read-only provider whose node types just mirror the
    existing nodes (`node_<id>`): that one can add nothing."""
    report = ray_compat.autoscaler_report()
    return _report_can_add_nodes(report)


def _report_can_add_nodes(report: dict | None) -> bool:
    if not report:
        return False
    mapping = report.get("node_type_mapping") or {}
    types = set(mapping.values()) | set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    readonly = {f"node_{node_id}" for node_id in mapping}
    return bool(types - readonly)


def check_cluster_fits(per_worker: dict[str, float], lo: int, hi: int, address: str | None) -> None:
    fits, what = _cluster_capacity(per_worker)
    where = address or os.environ.get("RAY_ADDRESS") or "the local Ray"
    if fits < lo and not what.startswith("autoscaler") and _autoscaler_running():
        log.warning("the Ray cluster at %s hosts %d of the %d training worker(s) needed now (%s); its autoscaler "
                    "may add nodes, so Ray Train waits for them", where, fits, lo, what)
        return
    if fits < lo:
        raise ValueError(f"the job needs at least {lo} training worker(s) of {per_worker}, but the Ray cluster at "
                         f"{where} can host at most {fits} ({what}); lower the parallel degrees / elastic.min_workers "
                         f"or elastic.cpus_per_worker, or add nodes")
    if fits < hi:
        log.warning("the Ray cluster can host %d of the %d workers asked for (%s); training on fewer", fits, hi, what)
