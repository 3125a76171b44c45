"""Model registry in the Ray object store, on one real local Ray cluster for the module (no mocks).

Publishing, listing, pruning, errors; weights that outlive their publisher (a killed actor, an exited CLI process);
zero-copy loading (the engine's parameters are the object store's read-only pages); and Serve started from
`registry://tiny`, switched to `registry://tiny@2` by `user_config` while clients stream: no request fails."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from hotswap import PROMPT, serve_config, switch_under_load  # noqa: E402
from moe_platform.checkpoint.hf import export_hf, load_hf  # noqa: E402
from moe_platform.cluster import registry  # noqa: E402
from moe_platform.config import load_config  # noqa: E402
from moe_platform.serving.engine import Engine, SamplingParams  # noqa: E402
from moe_platform.serving.loader import load_engine  # noqa: E402
from tinyrun import local_ray  # noqa: E402

pytestmark = pytest.mark.timeout(600)  # a hung cluster fails, never stalls

EXE = shutil.which("moe-platform", path=str(Path(sys.executable).parent)) or "moe-platform"
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    from ray import serve

    with local_ray(num_cpus=4) as address:
        try:
            yield address
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def greedy_texts(serving_export, serving_export_b) -> tuple[str, str]:
    """What the two exports answer to PROMPT, loaded from disk."""
    texts = tuple(Engine.from_pretrained(d).generate(PROMPT, GREEDY) for d in (serving_export, serving_export_b))
    assert texts[0] != texts[1]
    return texts


@pytest.fixture(scope="module")
def bf16_export(serving_export, tmp_path_factory) -> Path:
    args, state = load_hf(serving_export)
    return export_hf(state, args, tmp_path_factory.mktemp("bf16_export"), tokenizer_dir=serving_export,
                     dtype=torch.bfloat16)


def test_publish_list_resolve(cluster, serving_export, serving_export_b, greedy_texts):
    assert registry.publish_export(serving_export, "basic", step=10) == 1
    assert registry.publish_export(serving_export_b, "basic", step=20) == 2
    listed = registry.list_models()["basic"]
    assert [(v["version"], v["step"], v["source"]) for v in listed] == [
        (1, 10, str(serving_export)), (2, 20, str(serving_export_b))]
    assert listed[0]["nbytes"] == sum(t.numel() * 4 for t in load_hf(serving_export)[1].values())

    latest, first = registry.resolve("registry://basic"), registry.resolve("registry://basic@1")
    assert (latest.uri, first.uri) == ("registry://basic@2", "registry://basic@1")
    assert registry.resolve("basic", version=1).weights == first.weights
    assert first.model_args == json.loads((serving_export / "moe_platform_args.json").read_text())
    assert first.files["tokenizer.json"] == (serving_export / "tokenizer.json").read_bytes()
    assert not any(name.endswith(".safetensors") for name in first.files)
    # The registry's weights answer exactly like the export directories they came from.
    for uri, text in (("registry://basic@1", greedy_texts[0]), ("registry://basic", greedy_texts[1])):
        assert load_engine(uri).generate(PROMPT, GREEDY) == text
    # In an engine process of its own, from the local export directory it is written to (removed at shutdown).
    engine = load_engine("registry://basic@1", core="process")
    written = engine.model_dir_on_disk
    assert engine.generate(PROMPT, GREEDY) == greedy_texts[0] and (written / "model.safetensors").is_file()
    engine.shutdown()
    assert not written.exists()


def test_old_versions_are_pruned_but_a_holder_keeps_its_copy(cluster, serving_export, serving_export_b,
                                                             greedy_texts):
    v1 = registry.publish_export(serving_export, "pruned", keep=2)
    held = registry.resolve("registry://pruned@1")  # like a replica still serving v1
    for export in (serving_export_b, serving_export, serving_export_b):
        registry.publish_export(export, "pruned", keep=2)
    assert [v["version"] for v in registry.list_models()["pruned"]] == [3, 4]
    with pytest.raises(registry.RegistryError, match=r"no version 1 any more \(the registry keeps the last 2\)"):
        registry.resolve(f"registry://pruned@{v1}")
    # Dropped by the registry, but reference counting keeps it for whoever still holds it.
    assert load_engine(held).generate(PROMPT, GREEDY) == greedy_texts[0]


def test_unknown_names_versions_and_bad_references(cluster, serving_export, tmp_path):
    registry.publish_export(serving_export, "known")
    with pytest.raises(registry.RegistryError, match=r"no model named 'nope' in the registry; published models: "
                                                     r"\[.*'known'.*\]"):
        registry.resolve("registry://nope")
    with pytest.raises(registry.RegistryError, match=r"model 'known' has no version 7; available: \[1\]"):
        registry.resolve("registry://known@7")
    for bad in ("registry://known@x", "registry://known@0", "registry://", "registry://a/b"):
        with pytest.raises(registry.RegistryError):
            registry.parse_uri(bad)
    with pytest.raises(registry.RegistryError, match="invalid model name"):
        registry.publish_export(serving_export, "a@b")
    with pytest.raises(registry.RegistryError, match="keep must be an integer >= 1"):
        registry.publish_export(serving_export, "known", keep=0)
    with pytest.raises(FileNotFoundError):
        registry.publish_export(tmp_path, "known")

    from moe_platform.serving.app import build_app

    with pytest.raises(registry.RegistryError, match="no model named 'absent'"):
        build_app({"model": "registry://absent"})


@ray.remote(num_cpus=0)
class Publisher:
    def publish(self, export_dir: str, name: str) -> int:
        return registry.publish_export(export_dir, name)

    def own(self, value) -> list:
        return [ray.put(value)]  # wrapped so the caller gets the reference (a borrower), not the value

    def ping(self) -> bool:
        return True


def test_weights_outlive_the_publisher(cluster, serving_export, serving_export_b, greedy_texts):
    publisher = Publisher.remote()
    version = ray.get(publisher.publish.remote(str(serving_export), "orphan"))
    [owned_by_publisher] = ray.get(publisher.own.remote(np.ones(1 << 20)))
    ray.kill(publisher, no_restart=True)
    deadline = time.monotonic() + 60
    with pytest.raises(ray.exceptions.RayActorError):  # the kill takes effect asynchronously
        while time.monotonic() < deadline:
            ray.get(publisher.ping.remote(), timeout=60)
            time.sleep(0.05)
    # The control: an object the dead publisher owned is gone with it (its node learns of the death asynchronously) ...
    deadline = time.monotonic() + 60
    with pytest.raises(ray.exceptions.ObjectLostError):
        while time.monotonic() < deadline:
            ray.get(owned_by_publisher, timeout=60)
            time.sleep(0.05)
    # ... but the weights it published are the registry's.
    assert load_engine(f"registry://orphan@{version}").generate(PROMPT, GREEDY) == greedy_texts[0]

    # Same through the CLI: a separate driver process publishes and exits.
    out = subprocess.run([EXE, "publish", str(serving_export_b), "--name", "orphan", "--address", cluster],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-2000:]
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed == {"name": "orphan", "version": version + 1, "uri": f"registry://orphan@{version + 1}"}
    assert load_engine("registry://orphan").generate(PROMPT, GREEDY) == greedy_texts[1]


@pytest.mark.parametrize("export_dtype, engine_dtype, zero_copy", [
    ("float32", "float32", True),
    ("bfloat16", "bfloat16", True),  # no numpy bfloat16: travels as int16 bit patterns, viewed back in place
    ("float32", "bfloat16", False),  # the engine converts: a copy is unavoidable
])
def test_weights_load_zero_copy_where_the_dtype_allows(cluster, serving_export, bf16_export, export_dtype,
                                                       engine_dtype, zero_copy):
    export = serving_export if export_dtype == "float32" else bf16_export
    name = f"zc-{export_dtype}"
    registry.publish_export(export, name)
    mv = registry.resolve(name)
    arrays = ray.get(mv.weights)
    assert all(not a.flags.writeable and not a.flags.owndata for a in arrays.values())  # views of the store
    engine = load_engine(mv, dtype=engine_dtype)
    params = engine.model.state_dict()
    assert set(arrays) == set(params)
    shared = {name for name, a in arrays.items() if params[name].data_ptr() == a.ctypes.data}
    assert shared == (set(arrays) if zero_copy else set())
    assert all(p.dtype == getattr(torch, engine_dtype) for p in params.values() if p.is_floating_point())
    # Same answers as the same export loaded from disk with the same options.
    assert engine.generate(PROMPT, GREEDY) == Engine.from_pretrained(export, dtype=engine_dtype).generate(PROMPT,
                                                                                                          GREEDY)


def test_training_hook_publishes_when_configured(cluster, serving_export, caplog):
    assert registry.export_publisher(load_config(None, [])) is None
    on = registry.export_publisher(load_config(None, ["--checkpoint.publish_to=trained",
                                                      "--checkpoint.publish_keep=1"]))
    on = pickle.loads(pickle.dumps(on))  # it travels to Ray Train workers and spawned ranks
    on(serving_export, 5)
    on(serving_export, 6)
    assert [(v["version"], v["step"]) for v in registry.list_models()["trained"]] == [(2, 6)]
    bad = registry.export_publisher(load_config(None, ["--checkpoint.publish_to=bad/name"]))
    bad(serving_export, 5)  # logged, the run still succeeds
    assert "invalid model name" in caplog.text and "bad/name" not in registry.list_models()


# -- Serve: started from registry://tiny, switched to registry://tiny@2 under load ----------------------------------


def test_serve_switches_registry_versions_under_load(cluster, serving_export, serving_export_b, serving_port,
                                                     greedy_texts):
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    old_text, new_text = greedy_texts
    assert registry.publish_export(serving_export, "tiny") == 1
    config = serve_config("registry://tiny", serving_port, "registry://tiny")
    client = serve_api.serve_start(http_options=config["http_options"], proxy_location="HeadOnly")
    client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
    assert registry.publish_export(serving_export_b, "tiny") == 2  # the app stays on the version it was built on

    switch = serve_config("registry://tiny", serving_port, "registry://tiny@2")  # only user_config changes
    switch_under_load(f"http://127.0.0.1:{serving_port}",
                      lambda: client.deploy_apps(ServeDeploySchema.model_validate(switch), _blocking=False),
                      old_text, new_text)
    status = serve.status().applications["moe-platform"]
    assert status.status == "RUNNING"
    assert status.deployments["MoEServer"].replica_states == {"RUNNING": 1}  # updated in place, not replaced


# -- Serve: LoRA adapters beside the base model, from directories and the registry, loaded and unloaded live --------


@pytest.fixture(scope="module")
def adapters(serving_export, serving_export_b, tmp_path_factory):
    """Adapters 'a' (every target) and 'b' (attention) on serving_export, and 'other' on serving_export_b."""
    from tinyrun import random_adapter

    made = {}
    for name, base, targets, rank in (("a", serving_export, "q_proj,k_proj,v_proj,o_proj,experts", 4),
                                      ("b", serving_export, "q_proj,v_proj", 8),
                                      ("other", serving_export_b, "q_proj", 4)):
        args, state = load_hf(base)
        made[name] = random_adapter(args, state, tuple(targets.split(",")), rank, len(made) + 1,
                                    tmp_path_factory.mktemp(name), base)
    return made


def test_serve_mixes_adapters_and_loads_them_live(cluster, serving_export, serving_port, adapters):
    import concurrent.futures

    import httpx
    import openai
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    key = "admin-key-1"
    want = {m: Engine.from_pretrained(d).generate(PROMPT, GREEDY) for m, d in
            (("moe-platform", serving_export), ("moe-platform:a", adapters["a"][1]),
             ("moe-platform:tuned", adapters["b"][1]))}
    assert len(set(want.values())) == 3
    assert registry.publish_export(adapters["b"][0], "tuned") == 1  # a LoRA run's publish_to: the adapter itself
    assert registry.list_models()["tuned"][0]["kind"] == "adapter"
    with pytest.raises(ValueError, match="is a LoRA adapter, not a model"):
        load_engine("registry://tuned@1")

    config = serve_config(serving_export, serving_port)
    app = config["applications"][0]
    app["args"].update(admin_api_key=key)
    app["args"]["engine"].update(max_loras=2, max_lora_rank=8)
    app["deployments"][0]["user_config"] = {"model": str(serving_export), "adapters": {"a": str(adapters["a"][0])}}
    client = serve_api.serve_start(http_options=config["http_options"], proxy_location="HeadOnly")
    client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
    url = f"http://127.0.0.1:{serving_port}"
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    http = httpx.Client(base_url=url, timeout=60)
    assert [m.id for m in oai.models.list().data] == ["moe-platform", "moe-platform:a"]

    def complete(model: str) -> str:
        return oai.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # base and adapter requests share the replica's batches
        models = ["moe-platform", "moe-platform:a"] * 3
        in_flight = [pool.submit(complete, m) for m in models]
        # loaded from the registry while those run (admin key required)
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "tuned"}).status_code == 401
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "tuned", "lora_path": "registry://tuned@1"},
                      headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        assert [f.result() for f in in_flight] == [want[m] for m in models]
    assert complete("moe-platform:tuned") == want["moe-platform:tuned"]

    admin = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    for bad in (b"{", b'{"lora_name": 5}', b'{"lora_name": "x", "lora_path": "/tmp/\\udcff"}', b'{"lora_name": "x"}'):
        assert http.post("/v1/load_lora_adapter", content=bad, headers=admin).status_code == 400, bad
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapters["other"][0])},
                  headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_base_mismatch", r.text
    assert "trained on a different base model" in r.json()["error"]["message"]

    # serve deploy with other adapters: applied in place (same replica), 'a' and 'tuned' unloaded, 'b' loaded
    app["deployments"][0]["user_config"]["adapters"] = {"b": str(adapters["b"][0])}
    client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
    assert [m.id for m in oai.models.list().data] == ["moe-platform", "moe-platform:b"]
    assert complete("moe-platform:b") == want["moe-platform:tuned"]
    with pytest.raises(openai.NotFoundError, match="no adapter named 'a'"):
        complete("moe-platform:a")
    status = serve.status().applications["moe-platform"]
    assert status.deployments["MoEServer"].replica_states == {"RUNNING": 1}
