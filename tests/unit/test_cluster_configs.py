"""The cluster definitions: launcher configs pass Ray's own schema, token auth is on everywhere, dashboards stay
private, GPU workers are spot, KubeRay manifests have their structure, and the Grafana dashboard only queries metrics
our code (or Ray Serve) registers. Offline: nothing here talks to a cloud or a cluster."""

import dataclasses
import functools
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_CONFIGS = ["cluster.yaml", "cluster-gcp.yaml", "cluster-local.yaml"]
CLOUD_CONFIGS = ["cluster.yaml", "cluster-gcp.yaml"]
K8S = ROOT / "platform" / "k8s"
GRAFANA = ROOT / "platform" / "grafana" / "moe-platform.json"


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def start_commands(cfg: dict, key: str) -> str:
    return "\n".join(cfg.get(key) or [])


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(name)
    if cfg["provider"]["type"] == "fake_multinode":
        # The wheel ships no defaults file for this provider, so the config is complete by itself.
        validate_config(cfg)
    else:
        # Merges the provider's bundled defaults.yaml only; no cloud API call.
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_token_auth_and_private_dashboard(name):
    cfg = load(name)
    text = (ROOT / name).read_text()
    head = start_commands(cfg, "head_start_ray_commands")
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_TOKEN_PATH=" in head, name
    assert "--dashboard-host=127.0.0.1" in head, name
    assert "0.0.0.0" not in text, name
    assert "RAY_AUTH_TOKEN=" not in text, f"{name}: the token belongs in a file, not in the config"
    assert "umask 077" in text and "ray-token" in text, f"{name}: document creating the 0600 token file"
    if name in CLOUD_CONFIGS:
        workers = start_commands(cfg, "worker_start_ray_commands")
        assert "RAY_AUTH_MODE=token" in workers and "RAY_AUTH_TOKEN_PATH=" in workers, name
        for cmds in (head, workers):
            assert "chmod 600 ~/.moe-platform/ray-token" in cmds, name
        assert "~/.moe-platform/ray-token" in cfg["file_mounts"], name


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_layout_on_demand_head_spot_gpu_workers(name):
    cfg = load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "training ranks and replicas must never land on the head"
    assert not head["resources"].get("GPU")
    assert cfg["provider"]["cache_stopped_nodes"] is False
    assert cfg["file_mounts"]["~/moe-platform"] == "."
    assert any("pip install -e ~/moe-platform" in c for c in cfg["setup_commands"])

    def is_spot(node_config: dict) -> bool:
        aws = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        sched = node_config.get("scheduling", {})
        sched = sched[0] if isinstance(sched, list) else sched
        gcp = sched.get("provisioningModel") == "SPOT" or sched.get("preemptible") is True
        return aws or gcp

    spot = [t for t in types.values() if is_spot(t["node_config"])]
    assert spot and all(t["resources"].get("GPU", 0) >= 1 and t["min_workers"] == 0 for t in spot)
    assert not is_spot(head["node_config"])
    floors = [t for n, t in types.items() if n != cfg["head_node_type"] and not is_spot(t["node_config"])]
    assert floors and all(t["resources"].get("GPU", 0) >= 1 for t in floors)
    # the serving floor: on-demand GPU workers that Serve replicas prefer (by node label), spot ones for the rest
    assert sum(t["min_workers"] for t in floors) >= 1
    assert all(t["labels"] == FLOOR_LABELS for t in floors) and all(t["labels"] == {"market": "spot"} for t in spot)
    if cfg["provider"]["type"] == "aws":  # spot workers spread over zones (Ray tries the next subnet when one is dry)
        assert len(cfg["provider"]["availability_zone"].split(",")) >= 3


FLOOR_LABELS = {"market": "on-demand"}


def spot_agent_args(command: list[str]):
    """A `moe-platform spot-agent ...` command line, parsed by the CLI's own parser (so a config cannot use an option
    or provider the agent does not have)."""
    from moe_platform.cli import build_parser

    i = command.index("spot-agent")
    assert command[i - 1].endswith("moe-platform"), command
    return build_parser().parse_args(command[i:])


@pytest.mark.parametrize("name,provider", [("cluster.yaml", "aws"), ("cluster-gcp.yaml", "gcp")])
def test_workers_start_the_spot_agent(name, provider):
    import shlex

    cfg = load(name)
    commands = cfg["worker_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(commands) if "ray start" in c)
    agent = next(i for i, c in enumerate(commands) if "moe-platform spot-agent" in c and "pkill" not in c)
    assert agent > ray_start, "the agent finds its node once the raylet has registered"
    assert any("pkill" in c and "spot-agent" in c for c in commands[:agent]), "a restart must not leave two agents"
    words = shlex.split(commands[agent].split("nohup", 1)[1].split(">", 1)[0])
    ns = spot_agent_args(words)
    assert ns.provider == [provider] and ns.address == "$RAY_HEAD_IP:6379"
    assert "RAY_AUTH_MODE=token" in commands[agent] and commands[agent].rstrip().endswith("&")


def test_serve_replicas_prefer_the_on_demand_floor():
    ref = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    options = ref["applications"][0]["deployments"][0]["ray_actor_options"]
    assert options["label_selector"] == FLOOR_LABELS
    assert options["fallback_strategy"] == [{"label_selector": {}}], "without a floor node, replicas go anywhere"


def test_local_config_is_fake_multinode():
    cfg = load("cluster-local.yaml")
    assert cfg["provider"]["type"] == "fake_multinode"
    # the provider hard-codes this head type name
    assert cfg["head_node_type"] == "ray.head.default"
    workers = [t for n, t in cfg["available_node_types"].items() if n != "ray.head.default"]
    assert len(workers) == 1 and workers[0]["min_workers"] == 0 and workers[0]["max_workers"] == 3
    assert 0 < workers[0]["resources"]["CPU"] <= 4
    # The provider starts raylets itself and refuses tag updates: with node updaters or launch-config checks on, the
    # autoscaler fails every launch and terminates the node again (tests/integration/test_fake_autoscaling.py).
    assert cfg["provider"]["disable_node_updaters"] is True
    assert cfg["provider"]["disable_launch_config_check"] is True


# -- KubeRay ---------------------------------------------------------------------------------------------------


def cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob-train.yaml", "RayJob"),
                                       ("rayservice-serve.yaml", "RayService")])
def test_kuberay_manifest_structure(name, kind):
    doc = yaml.safe_load((K8S / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head must not be exposed outside Kubernetes"
    groups = spec["workerGroupSpecs"]

    def is_spot(group):
        selector = group["template"]["spec"]["nodeSelector"]
        return any("SPOT" in str(v).upper() or "spot" in k for k, v in selector.items())

    assert any(is_spot(g) for g in groups)
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["tolerations"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        # the spot agent as a sidecar beside the Ray container (KubeRay treats containers[0] as Ray's)
        (agent,) = [c for c in pod["containers"] if c["name"] == "spot-agent"]
        ns = spot_agent_args(agent["command"])
        assert ns.provider == ["kubernetes"] and ns.address == "$(RAY_CLUSTER)-head-svc:6379"
        env = {e["name"]: e for e in agent["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert env["RAY_CLUSTER"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['ray.io/cluster']"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "moe-platform-ray-token"
        assert pod["serviceAccountName"] == "moe-platform-spot-agent"
    if kind == "RayService":  # the serving floor: an on-demand group that replicas prefer by Ray node label
        (floor,) = [g for g in groups if not is_spot(g)]
        assert floor["minReplicas"] >= 1 and floor["labels"] == FLOOR_LABELS
        assert all(g["labels"] == {"market": "spot"} for g in groups if is_spot(g))
    if kind == "RayCluster":
        assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"


KUBERAY_CRDS = ROOT / "tests" / "data" / "kuberay"  # KubeRay v1.7.0's, unmodified (README.md there)
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
MANIFESTS = ["raycluster.yaml", "rayjob-train.yaml", "rayservice-serve.yaml"]


def strict(schema):
    """`schema` with every object's unknown fields refused, as the API server's strict field validation does
    (`kubectl apply --validate=strict`; otherwise it drops them silently, so a misspelled field is simply lost)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and \
            not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str):
    import jsonschema

    crd = yaml.load((KUBERAY_CRDS / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def kuberay_problems(doc: dict) -> list[str]:
    """What KubeRay v1.7.0 refuses in a manifest: its CRD schema, and the group-labels rule its operator enforces
    since v1.5.1 (validateRayGroupLabels: node labels in the group's `labels` field, never in rayStartParams)."""
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in crd_validator(doc["kind"]).iter_errors(doc)]
    spec = cluster_spec(doc)
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        if "labels" in (group.get("rayStartParams") or {}):
            problems.append(f"{group.get('groupName', 'Head')}: rayStartParams['labels'] is not supported; please use "
                            f"the top-level Labels field instead")
    return problems


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifests_pass_the_kuberay_crd_schemas(name):
    doc = yaml.safe_load((K8S / name).read_text())
    assert kuberay_problems(doc) == []


def test_the_kuberay_check_catches_refused_manifests():
    doc = yaml.safe_load((K8S / "rayservice-serve.yaml").read_text())
    group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["rayStartParams"] = {"labels": "market=on-demand"}  # what KubeRay >= 1.5.1 rejects
    group["lables"] = group.pop("labels")  # an unknown field
    group["maxReplicas"] = "1"  # an integer field
    problems = kuberay_problems(doc)
    assert any("rayStartParams['labels'] is not supported" in p for p in problems), problems
    assert any("'lables' was unexpected" in p for p in problems), problems
    assert any("maxReplicas" in p and "is not of type 'integer'" in p for p in problems), problems


def test_spot_agent_rbac_reads_nodes_only():
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "spot-agent-rbac.yaml").read_text())}
    assert docs["ServiceAccount"]["metadata"]["name"] == "moe-platform-spot-agent"
    assert docs["ClusterRole"]["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    binding = docs["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == "moe-platform-spot-agent"


def test_rayjob_entrypoint_runs_the_training_job():
    doc = yaml.safe_load((K8S / "rayjob-train.yaml").read_text())
    entry = doc["spec"]["entrypoint"]
    assert entry.startswith("python jobs/train.py --config jobs/configs/tiny.toml")
    storage = re.search(r"--run\.storage_path=(\S+)", entry).group(1)
    assert storage.startswith("/"), "the trainer needs an absolute filesystem path on shared storage"
    mounts = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(storage.startswith(m["mountPath"]) for m in mounts)


def test_rayservice_serve_config_matches_serve_config_yaml():
    doc = yaml.safe_load((K8S / "rayservice-serve.yaml").read_text())
    ours = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ref = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    assert len(ours["applications"]) == len(ref["applications"])
    for a, b in zip(ours["applications"], ref["applications"], strict=True):
        assert a["import_path"] == b["import_path"] == "moe_platform.serving.app:build_app"
        assert a["name"] == b["name"] and a["route_prefix"] == b["route_prefix"]
        # only the model paths differ: absolute on the shared volume
        assert Path(a["args"]["model"]).is_absolute()
        assert {k: v for k, v in a["args"].items() if k != "model"} == \
               {k: v for k, v in b["args"].items() if k != "model"}
        for da, db in zip(a["deployments"], b["deployments"], strict=True):
            assert da["user_config"]["model"] == a["args"]["model"]
            # and the GPU each replica runs on in the cluster (the local config runs on CPUs)
            assert (da["ray_actor_options"].pop("num_gpus"), db["ray_actor_options"].pop("num_gpus")) == (1, 0)
            assert {k: v for k, v in da.items() if k != "user_config"} == \
                   {k: v for k, v in db.items() if k != "user_config"}


def test_serve_yaml_defaults_are_the_code_defaults():
    """EngineConfig is the one definition of the engine options, AppArgs of the app's: the Serve configs show exactly
    their defaults, and a config the app rejects (an unknown engine key) is caught before any cluster."""
    from moe_platform.serving.app import AppArgs
    from moe_platform.serving.engine import EngineConfig

    ref = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]
    assert ref["args"]["engine"] == dataclasses.asdict(EngineConfig())
    parsed = AppArgs.model_validate(ref["args"])
    assert parsed.engine == EngineConfig()
    for key in ("model_name", "api_key", "admin_api_key", "max_body_bytes"):
        assert ref["args"][key] == AppArgs.model_fields[key].default, key
    deployment = ref["deployments"][0]
    for key in ("max_ongoing_requests", "max_queued_requests"):
        assert deployment[key] == AppArgs.model_fields[key].default, key
    assert deployment["autoscaling_config"]["target_ongoing_requests"] == (
        AppArgs.model_fields["target_ongoing_requests"].default)
    with pytest.raises(ValueError, match=r"unknown engine options \['max_batch'\]"):
        AppArgs.model_validate({**ref["args"], "engine": {"max_batch": 4}})
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1"):
        AppArgs.model_validate({**ref["args"], "engine": {"max_batch_size": 0}})
    with pytest.raises(ValueError, match="admin_api_key must differ from api_key"):  # the admin key is its own
        AppArgs.model_validate({**ref["args"], "api_key": "k", "admin_api_key": "k"})


# -- Grafana ---------------------------------------------------------------------------------------------------


def registered_metric_names() -> set[str]:
    """Names passed to ray.util.metrics in our code, plus the Ray Serve metrics the dashboard may use."""
    names: set[str] = set()
    source = ROOT / "platform" / "moe_platform"
    for path in source.rglob("*.py"):
        names |= set(re.findall(r"""["'](moe_[a-z0-9_]+)["']""", path.read_text()))
    ray_root = Path(importlib.util.find_spec("ray").origin).parent  # located, not imported (importing Serve is slow)
    serve_src = ray_root / "serve" / "_private" / "deployment_state.py"
    names |= set(re.findall(r"""["'](serve_[a-z0-9_]+)["']""", serve_src.read_text()))
    return names


def registered_uses(expr: str, names: set[str], where: str) -> set[str]:
    """The registered names of the Ray metrics `expr` reads (`ray_` prefix off, and a `_total`/`_bucket`/`_sum`/
    `_count` series suffix unless the metric itself has that name, as node_mem_total does); fails on any other."""
    used = set()
    for m in re.findall(r"\bray_([a-z0-9_]+)", expr):
        base = m if m in names else re.sub(r"_(total|bucket|sum|count)$", "", m)
        assert base in names, f"{where} uses ray_{m}, but nothing registers {base!r}"
        used.add(base)
    return used


def test_grafana_dashboard_queries_existing_metrics():
    dash = json.loads(GRAFANA.read_text())
    names = registered_metric_names()
    assert {"moe_train_loss", "moe_serve_time_to_first_token_s"} <= names
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    assert exprs
    used = set()
    for expr in exprs:
        metrics = registered_uses(expr, names, repr(expr))
        assert metrics, f"no Ray metric in {expr!r}"
        used |= metrics
    wanted = {"moe_train_loss", "moe_train_tokens_per_s", "moe_train_mfu", "moe_train_expert_imbalance",
              "moe_train_checkpoint_seconds", "moe_train_restarts", "moe_train_preemptions",
              "moe_serve_time_to_first_token_s", "moe_serve_inter_token_latency_s", "moe_serve_queue_depth",
              "moe_serve_running_batch_size", "moe_serve_expert_tokens", "serve_deployment_replica_healthy",
              "moe_serve_rollout_weight", "moe_serve_rollout_state", "moe_serve_rollout_rollbacks",
              "moe_serve_requests", "moe_serve_request_latency_s", "moe_serve_kv_cache_usage_perc",
              "moe_serve_prefix_cache_hit_rate", "moe_serve_preemptions", "moe_train_grpo_reward",
              "moe_train_grpo_kl", "moe_train_grpo_clip_fraction", "moe_train_grpo_response_length",
              "moe_train_grpo_sync_seconds"}
    assert wanted <= used, f"panels missing for {sorted(wanted - used)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# -- alert rules: platform/prometheus/alerts.yml, checked and unit-tested by the real promtool --------------------

ALERTS = ROOT / "platform" / "prometheus" / "alerts.yml"
ALERT_TESTS = Path(__file__).with_name("alerts_test.yml")


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def promtool() -> str:
    import shutil
    import sys

    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    assert found, "promtool is missing: run scripts/setup.sh (it unpacks Debian's prometheus package's promtool)"
    return found


def run_promtool(*args: str, cwd: Path = ROOT):
    import subprocess

    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_alert_rules_pass_promtool_check():
    out = run_promtool("check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout + out.stderr


def test_alert_rules_pass_their_promtool_unit_tests():
    out = run_promtool("test", "rules", str(ALERT_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {r["alert"] for r in alert_rules() if "alert" in r}
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert alerts == tested, f"alerts without a promtool test: {sorted(alerts - tested)}"


def unit_tests_against(tmp_path: Path, rules: str):
    """`promtool test rules` of tests/unit/alerts_test.yml with `rules` in place of alerts.yml."""
    (tmp_path / "platform" / "prometheus").mkdir(parents=True)
    (tmp_path / "platform" / "prometheus" / "alerts.yml").write_text(rules)
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    (tmp_path / "tests" / "unit" / "alerts_test.yml").write_text(ALERT_TESTS.read_text())
    return run_promtool("test", "rules", "tests/unit/alerts_test.yml", cwd=tmp_path)


def failed_alerts(out) -> set[str]:
    return set(re.findall(r"alertname: (\w+), time:", out.stdout + out.stderr))


def test_promtool_catches_a_broken_rule_and_a_changed_bound(tmp_path):
    text = ALERTS.read_text()
    (tmp_path / "bad.yml").write_text(text.replace("moe:serve_error_ratio:5m > 0.02", "moe:serve_error_ratio:5m >"))
    assert run_promtool("check", "rules", str(tmp_path / "bad.yml")).returncode != 0
    # the unit tests fail when a bound moves: 5% errors no longer page at a 10% bound
    out = unit_tests_against(tmp_path, text.replace("moe:serve_error_ratio:5m > 0.02",
                                                    "moe:serve_error_ratio:5m > 0.10"))
    assert out.returncode != 0 and "MoeServeErrorRate" in out.stdout + out.stderr


API_ROUTES = 'route=~".*/v1/.+"'


def test_scrapes_and_probes_do_not_dilute_the_request_ratios(tmp_path):
    """Both ratios count /v1 routes only. Counting every route (the matcher dropped), the scrape-heavy app's 5% errors
    and 2% 429s fall under the bounds, and the unit tests fail on exactly those two alerts."""
    rules = {r.get("alert") or r["record"]: r["expr"] for r in alert_rules()}
    for name in ("moe:serve_error_ratio:5m", "MoeServeOverloaded"):
        expr = rules[name]
        assert expr.count("ray_serve_num_http_requests_total{") == expr.count(API_ROUTES) == 2, name
    text = ALERTS.read_text()
    out = unit_tests_against(tmp_path, text.replace(API_ROUTES + ", ", "").replace("{" + API_ROUTES + "}", ""))
    report = out.stdout + out.stderr
    assert out.returncode != 0 and failed_alerts(out) == {"MoeServeErrorRate", "MoeServeOverloaded"}, report
    assert 'application="scraped"} 5E-02' in report  # and the recorded ratio moved


def test_a_first_rollback_alerts_although_its_series_starts_at_one(tmp_path):
    """Ray exports a counter from its first count on: increase() alone misses a controller's first rollback."""
    doc = yaml.safe_load(ALERTS.read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "MoeServeRolloutRolledBack"]
    alone = "sum by (model) (increase(ray_moe_serve_rollout_rollbacks_total[15m])) > 0"
    assert rule["expr"].startswith(alone + "\n")
    rule["expr"] = alone
    out = unit_tests_against(tmp_path, yaml.safe_dump(doc, sort_keys=False))
    report = out.stdout + out.stderr
    assert out.returncode != 0 and failed_alerts(out) == {"MoeServeRolloutRolledBack"}, report
    assert 'model="fresh"' in report


def test_alert_rules_use_registered_metrics():
    ray_root = Path(importlib.util.find_spec("ray").origin).parent
    names = registered_metric_names()
    for src in (ray_root / "serve" / "_private" / "request_ingress_metrics.py",
                ray_root / "dashboard" / "modules" / "reporter" / "reporter_agent.py"):
        names |= set(re.findall(r"""["'](serve_[a-z0-9_]+|node_[a-z0-9_]+)["']""", src.read_text()))
    names |= {"serve_num_http_requests"}  # built there as f"serve_num_{protocol}_requests"
    for rule in alert_rules():
        registered_uses(rule["expr"], names, rule.get("alert") or rule["record"])
