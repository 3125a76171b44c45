"""Serving on spot: the node holding the Serve replica is reclaimed while clients stream, and no request fails.

A real multi-node Ray on this machine: a head with no CPU (Serve's controller and HTTP proxy), a spot worker that
holds the one replica of serve/config.yaml's app, and spare capacity added later (the on-demand floor, or a node the
autoscaler brings). The spot worker's agent (`moe-platform spot-agent`) polls an AWS instance-metadata server on
loopback; the cloud publishes a spot `terminate`; the agent drains the node with the notice's deadline; Serve starts
a replacement replica on the spare node before the deadline and lets the old one finish its requests; at the
deadline the spot node vanishes. Clients (streamed and not, no client-side retries) keep asking throughout."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

from hotswap import BODY, PROMPT, completion, serve_config  # noqa: E402
from moe_platform.serving.engine import Engine, SamplingParams  # noqa: E402
from tinyrun import FakeCloud, node_cluster, poll  # noqa: E402

DEADLINE_S = 25  # AWS gives two minutes; shorter here, still time for a replica to start on a busy 2-core machine
CLIENTS = 4


def replicas(client) -> list[tuple[str, str]]:
    """(node id, state) of every replica of the app, from the Serve controller."""
    details = client.get_serve_details()
    deployment = details["applications"]["moe-platform"]["deployments"]["MoEServer"]
    return [(r.get("node_id"), r["state"]) for r in deployment["replicas"]]  # no node id while starting


def test_replica_moves_off_a_reclaimed_node_with_no_failed_request(serving_export, serving_port):
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    expected = Engine.from_pretrained(serving_export).generate(
        PROMPT, SamplingParams(max_tokens=BODY["max_tokens"], temperature=0, ignore_eos=True))
    url = f"http://127.0.0.1:{serving_port}"
    with node_cluster(head_cpus=0, worker_cpus=1) as cluster, FakeCloud() as cloud:
        spot = next(iter(cluster.worker_nodes))
        config = serve_config(serving_export, serving_port)
        client = serve_api.serve_start(http_options=config["http_options"], proxy_location="HeadOnly")
        try:
            client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
            assert replicas(client) == [(spot.node_id, "RUNNING")]  # the only node with a CPU
            spare = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            agent = cloud.start_agent(cluster.address, spot.node_id)

            results: list[tuple[int, str]] = []
            stop = threading.Event()

            def ask(i: int) -> None:
                with httpx.Client(base_url=url, timeout=60) as http:
                    n = 0
                    while not stop.is_set():
                        try:
                            results.append(completion(http, stream=(i + n) % 2 == 0))
                        except httpx.HTTPError as e:  # a dropped connection is a failed request too
                            results.append((598, repr(e)))
                        n += 1

            threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(CLIENTS)]
            for t in threads:
                t.start()
            try:
                poll(lambda: len(results) >= 2 * CLIENTS, 120, "requests before the notice")
                deadline = cloud.publish_aws_terminate(DEADLINE_S)
                out, err = agent.communicate(timeout=60)
                assert agent.returncode == 0, err
                # the replica moves before the deadline: one running on the spare node, none left on the spot one
                poll(lambda: replicas(client) == [(spare.node_id, "RUNNING")], max(1.0, deadline - time.monotonic()),
                     "the replica to move off the draining node before its deadline")
                moved_at = len(results)
                poll(lambda: time.monotonic() > deadline, DEADLINE_S + 5, "the deadline")
                cluster.remove_node(spot, allow_graceful=False)  # the VM is gone
                poll(lambda: len(results) >= moved_at + 4 * CLIENTS, 120, "requests after the node is gone")
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=120)
                if agent.poll() is None:
                    agent.kill()
        finally:
            serve.shutdown()

    failed = [r for r in results if r != (200, expected)]
    assert not failed, f"{len(failed)} of {len(results)} requests failed or came back wrong: {failed[:3]}"
    assert len(results) >= 6 * CLIENTS
