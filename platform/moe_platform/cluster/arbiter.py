"""Serving before training on one cluster: Serve's replicas take resources from an elastic training job.

Ray Train (V2) sizes an elastic job (ScalingConfig(num_workers=(min, max))) from the resources that Ray's
AutoscalingCoordinator reserves for it: the coordinator hands each cluster's nodes out to its requesters in order of
priority (Ray Train asks with HIGH, Ray Data with lower ones) and forwards their combined demand to the autoscaler.
Ray Serve does not take part, so by default a training job sizes itself to the whole cluster and a new Serve replica
waits for resources that training holds.

The `ServingArbiter` (a named, detached actor with no CPU of its own) makes Serve a requester too, ahead of training:
every `interval_s` it reads what every Serve application wants (each deployment's target replica count times the
resources of one replica, from the Serve controller) and registers that with the coordinator under a priority above
Ray Train's. So:
- Serve scales up (autoscaling or a redeploy) -> training's reservation shrinks -> Ray Train resizes the job to the
  workers that still fit, after a checkpoint of the running workers (moe_platform.train.resize), resharded on resume;
  the freed resources start the new replica. No training step is lost and no request fails.
- Serve scales down -> the reservation grows -> Ray Train grows the job back, again from a fresh checkpoint.
- With an autoscaler, Serve's demand also asks for nodes, ahead of training's.

It also has the coordinator re-read the cluster as soon as a node joins or leaves (by itself it does so every 20 s),
so that an elastic job grows back onto a new node at its next resize check.

Start it once per cluster: `moe-platform serve` and `start_server` do; for `serve deploy` run
`moe-platform arbiter --address ...` (idempotent) or call `ensure_arbiter()`. Training reacts within its
elastic.resize_interval_s (Ray Train's monitor interval) after a change in Serve.

Metrics (ray.util.metrics, Prometheus with Ray's `ray_` prefix):
    moe_arbiter_serving_demand   resources Serve's target replicas need, reserved ahead of training (tag resource)
"""

from __future__ import annotations

import logging
import threading
import time
import types
from typing import Any

log = logging.getLogger("moe_platform.cluster.arbiter")

ARBITER_NAME = "moe-platform-arbiter"
NAMESPACE = "moe-platform"
REQUESTER_ID = "moe-platform-serve"
# The coordinator orders requesters by an integer priority; Ray Train asks with ResourceRequestPriority.HIGH (10).
# It reads `priority.value` only, so a plain namespace (importable everywhere) carries a value above it.
SERVING_PRIORITY = 20
SERVE_CONTROLLER = ("SERVE_CONTROLLER_ACTOR", "serve")


def serving_demand(details: dict[str, Any], apps: list[str] | None = None) -> list[dict[str, float]]:
    """One resource bundle per replica that Serve's applications want (target counts, running or not)."""
    bundles: list[dict[str, float]] = []
    for app_name, app in sorted((details or {}).get("applications", {}).items()):
        if apps is not None and app_name not in apps:
            continue
        for _, dep in sorted(app.get("deployments", {}).items()):
            one = {k: float(v) for k, v in (dep.get("required_resources") or {}).items() if v}
            if one:
                bundles.extend(dict(one) for _ in range(int(dep.get("target_num_replicas") or 0)))
    return bundles


def _totals(bundles: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


class ServingArbiter:
    """The actor (see the module docstring). `interval_s`: how often it reads Serve's demand."""

    def __init__(self, interval_s: float = 2.0, apps: list[str] | None = None):
        self.interval_s = interval_s
        self.apps = apps
        self.bundles: list[dict[str, float]] = []
        self.updates = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._gauge = None
        self._thread = threading.Thread(target=self._run, name="moe-arbiter", daemon=True)
        self._thread.start()

    # -- the loop ------------------------------------------------------------------------------------------------

    def _coordinator(self):
        from moe_platform import ray_compat

        return ray_compat.autoscaling_coordinator()

    def _serve_details(self) -> dict[str, Any]:
        import ray

        try:
            controller = ray.get_actor(*SERVE_CONTROLLER)
        except ValueError:  # Serve is not running: it wants nothing
            return {}
        return ray.get(controller.get_serve_instance_details.remote(), timeout=30)

    def _run(self) -> None:
        import ray

        coordinator = None
        registered = False
        last_sent = -float("inf")
        nodes: set[str] | None = None
        while not self._stop.is_set():
            try:
                bundles = serving_demand(self._serve_details(), self.apps)
                coordinator = coordinator or self._coordinator()
                alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
                if nodes is not None and alive != nodes:
                    # The coordinator re-reads the cluster only every 20 s: have it do so now, so that elastic jobs
                    # see a node that came (or went) at their next resize check.
                    ray.get(coordinator.get_reserved_resources.remote(REQUESTER_ID, recompute=True), timeout=30)
                    log.info("nodes changed (%d -> %d alive): reservations recomputed", len(nodes), len(alive))
                nodes = alive
                # Re-send well within the request's expiry even when nothing changed.
                if bundles != self.bundles or time.monotonic() - last_sent > 30:
                    if bundles:
                        ray.get(coordinator.request_resources.remote(
                            requester_id=REQUESTER_ID, resources=bundles, expire_after_s=180,
                            priority=types.SimpleNamespace(value=SERVING_PRIORITY)), timeout=30)
                        registered = True
                    elif registered:
                        ray.get(coordinator.cancel_request.remote(REQUESTER_ID), timeout=30)
                        registered = False
                    if bundles != self.bundles:
                        log.info("serving demand %s reserved ahead of training", _totals(bundles) or "nothing")
                        self.updates += 1
                    self.bundles = bundles
                    last_sent = time.monotonic()
                    self._export(bundles)
                self.error = None
            except Exception as e:  # keep arbitrating: a slow controller or coordinator is retried next round
                self.error = repr(e)
                log.warning("serving arbiter: %s", e)
            self._stop.wait(self.interval_s)
        if registered and coordinator is not None:
            try:
                ray.get(coordinator.cancel_request.remote(REQUESTER_ID), timeout=30)
            except Exception as e:
                log.warning("serving arbiter: could not cancel its reservation: %s", e)

    def _export(self, bundles: list[dict[str, float]]) -> None:
        from ray.util.metrics import Gauge

        if self._gauge is None:
            self._gauge = Gauge("moe_arbiter_serving_demand", "resources reserved for Serve ahead of training",
                                tag_keys=("resource",))
        totals = _totals(bundles)
        for resource in {"CPU", "GPU", *totals}:
            self._gauge.set(totals.get(resource, 0.0), tags={"resource": resource})

    # -- the actor's methods -------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"demand": _totals(self.bundles), "replicas": len(self.bundles), "updates": self.updates,
                "interval_s": self.interval_s, "error": self.error}

    def stop(self) -> None:
        """Stop arbitrating and give the reserved resources back to training."""
        self._stop.set()
        self._thread.join(timeout=60)


def ensure_arbiter(interval_s: float = 2.0, apps: list[str] | None = None):
    """The cluster's arbiter actor, started if it is not running yet (needs a connected Ray)."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1)(ServingArbiter).options(
        name=ARBITER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        resources={"node:__internal_head__": 0.001},  # the on-demand head, not a spot worker that may vanish
        scheduling_strategy="DEFAULT")  # not inside a caller's placement group
    handle = actor.remote(interval_s, apps)
    ray.get(handle.status.remote(), timeout=60)
    return handle


def stop_arbiter() -> bool:
    """Stop the cluster's arbiter (training may use the whole cluster again); False when none was running."""
    import ray

    try:
        handle = ray.get_actor(ARBITER_NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    ray.get(handle.stop.remote(), timeout=90)
    ray.kill(handle)
    return True


__all__ = ["ServingArbiter", "ensure_arbiter", "serving_demand", "stop_arbiter"]
