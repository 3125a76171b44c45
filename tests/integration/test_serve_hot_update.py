"""Hot model update: deploy serve/config.yaml, then change `user_config.model` while clients keep sending requests.
No request may fail, every answer comes whole from one of the two exports, and the new weights answer afterwards."""

from __future__ import annotations

import pytest

from hotswap import PROMPT, serve_config, switch_under_load  # noqa: E402
from moe_platform.serving.engine import Engine, SamplingParams  # noqa: E402
from tinyrun import local_ray  # noqa: E402


@pytest.fixture(scope="module")
def deployed(serving_export, serving_port):
    """serve/config.yaml deployed the way `serve run`/`serve deploy` do (a config pushed to the controller)."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    with local_ray(num_cpus=4):
        try:
            config = serve_config(serving_export, serving_port)
            client = serve_api.serve_start(http_options=config["http_options"], proxy_location="HeadOnly")

            def deploy(cfg: dict, blocking: bool) -> None:
                client.deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=blocking)

            deploy(config, blocking=True)
            yield deploy, f"http://127.0.0.1:{serving_port}"
        finally:
            serve.shutdown()


def test_hot_update_under_load_drops_nothing(deployed, serving_export, serving_export_b, serving_port):
    deploy, url = deployed
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    old_text = Engine.from_pretrained(serving_export).generate(PROMPT, greedy)
    new_text = Engine.from_pretrained(serving_export_b).generate(PROMPT, greedy)
    assert old_text != new_text

    # only user_config.model changes: the replica swaps its weights in place
    switch_under_load(url, lambda: deploy(serve_config(serving_export_b, serving_port), blocking=False),
                      old_text, new_text)

    from ray import serve

    status = serve.status().applications["moe-platform"]
    assert status.status == "RUNNING"
    assert status.deployments["MoEServer"].replica_states == {"RUNNING": 1}  # updated in place, not replaced
