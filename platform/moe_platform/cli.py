"""`moe-platform` command line: train, export, publish, arbiter, generate, serve, demo, spot-agent, rollout, eval,
bench."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from moe_platform.cli_support import engine_options, is_loopback, read_key

DEMO_OVERRIDES = ["--run.name=demo", "--train.steps=120", "--train.eval_interval=40", "--checkpoint.interval=40",
                  "--data.max_bytes=3000000"]
DEMO_PROMPT = "def main():\n"


def _cmd_train(ns: argparse.Namespace, rest: list[str]) -> int:
    from moe_platform.config import load_config
    from moe_platform.post_train import trainer_class
    from moe_platform.train.launch import launch_local

    cfg = load_config(ns.config, rest)
    trainer_cls = trainer_class(cfg.train.objective)  # lm: the Trainer; dpo, grpo: post_train's trainers
    on_export = None
    if cfg.checkpoint.publish_to:  # promote through the object-store model registry (logged, never fatal)
        from moe_platform.cluster.registry import export_publisher

        on_export = export_publisher(cfg)
        if cfg.rollout.auto:  # then roll the published version out to serving
            from moe_platform.serving.rollout_controller import auto_rollout

            on_export = auto_rollout(cfg, on_export)
    if ns.ray:
        from moe_platform.train.ray_launcher import launch_ray

        print(json.dumps(launch_ray(cfg, address=ns.address, progress=not ns.no_progress, on_export=on_export,
                                    trainer_cls=trainer_cls)))
        return 0
    result = launch_local(cfg, progress=not ns.no_progress, on_export=on_export, trainer_cls=trainer_cls)
    print(json.dumps({"run_dir": str(result.run_dir), "layout": result.layout, "final_step": result.final_step,
                      "final_loss": result.final_loss, "export": str(result.export_dir) if result.export_dir else None,
                      "resumed_from": result.resumed_from}, ensure_ascii=False))
    return 0


def _cmd_export(ns: argparse.Namespace, rest: list[str]) -> int:
    from moe_platform.checkpoint.export import export_checkpoint

    out = export_checkpoint(ns.checkpoint, ns.out_dir, merge=ns.merge)
    print(out)
    return 0


def _cmd_publish(ns: argparse.Namespace, rest: list[str]) -> int:
    from moe_platform.cluster.registry import publish_export

    version = publish_export(ns.export_dir, ns.name, step=ns.step, keep=ns.keep, address=ns.address)
    print(json.dumps({"name": ns.name, "version": version, "uri": f"registry://{ns.name}@{version}"}))
    return 0


def _cmd_arbiter(ns: argparse.Namespace, rest: list[str]) -> int:
    from moe_platform.cluster.arbiter import ensure_arbiter, stop_arbiter
    from moe_platform.cluster.registry import connect

    connect(ns.address)
    if ns.stop:
        print(json.dumps({"stopped": stop_arbiter()}))
        return 0
    import ray

    handle = ensure_arbiter(interval_s=ns.interval)
    print(json.dumps(ray.get(handle.status.remote(), timeout=60)))
    return 0


def _cmd_generate(ns: argparse.Namespace, rest: list[str]) -> int:
    from moe_platform.serving.engine import Engine, SamplingParams

    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                            seed=ns.seed)
    print(Engine.from_pretrained(ns.model).generate(ns.prompt, params))
    return 0


API_KEY_ENV = "MOE_PLATFORM_API_KEY"
ADMIN_KEY_ENV = "MOE_PLATFORM_ADMIN_KEY"


def _cmd_serve(ns: argparse.Namespace, rest: list[str]) -> int:
    if ns.key_on_argv is not None:
        raise ValueError(f"keys are not taken from the command line, where `ps` and the shell history show them: use "
                         f"--api-key-file PATH or {API_KEY_ENV} (admin: --admin-key-file PATH or {ADMIN_KEY_ENV})")
    adapters = {}
    for item in ns.adapter:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--adapter {item!r}: expected NAME=DIR or NAME=registry://NAME[@VERSION]")
        adapters[name] = source
    engine: dict = {"backend": ns.engine_backend, **engine_options(ns.engine)}
    if adapters or ns.max_loras:  # slots for these adapters, and for more loaded later over the admin route
        engine.update(max_loras=max(ns.max_loras, len(adapters)), max_lora_rank=ns.max_lora_rank)
    options: dict = {"adapters": adapters, "engine": engine}
    api_key = read_key(ns.api_key_file, API_KEY_ENV, "--api-key-file")
    admin_key = read_key(ns.admin_key_file, ADMIN_KEY_ENV, "--admin-key-file")
    if api_key and admin_key == api_key:
        raise ValueError("the admin key must differ from the API key: every API client holds the API key, and the "
                         "admin key moves traffic and loads models")
    if not api_key and not is_loopback(ns.host):
        if not ns.allow_unauthenticated:
            raise ValueError(f"--host {ns.host} is not a loopback address and no API key is set, so anyone who "
                             f"reaches it could use the API: set one with --api-key-file PATH or {API_KEY_ENV}, or "
                             f"pass --allow-unauthenticated (only behind a proxy that authenticates)")
        print(f"moe-platform serve: WARNING: serving on {ns.host}:{ns.port} WITHOUT AUTHENTICATION "
              f"(--allow-unauthenticated): anyone who reaches this address can use /v1/*", file=sys.stderr, flush=True)
    options.update({"api_key": api_key, "admin_api_key": admin_key})
    from moe_platform.serving.app import _model_ref

    _model_ref(ns.model)  # a wrong model directory fails here, before any Ray starts
    return _serve_until_signal(ns.model, ns.host, ns.port, ns.address, options)


def _serve_until_signal(model: str, host: str, port: int, address: str | None, options: dict) -> int:
    """Deploy the app and serve until SIGTERM or SIGINT (also where a script started us with SIGINT ignored), then
    take down what this command started: Serve and the local Ray, or only the app on a cluster it joined."""
    import signal
    import time

    import ray
    from ray import serve

    from moe_platform.cluster.registry import is_registry_uri
    from moe_platform.serving.app import start_server

    # A registry model lives in the running cluster's registry; a directory gets a Ray of its own unless told.
    address = address or os.environ.get("RAY_ADDRESS") or ("auto" if is_registry_uri(model) else "local")
    own_ray = address == "local"
    try:
        ray.init(address=address)
    except ConnectionError as e:
        raise ValueError(f"no Ray cluster answers at --address {address}: {e}") from None
    stopping: list[str] = []

    def on_signal(signum: int, frame) -> None:  # no locks here: it runs between any two bytecodes of this thread
        if not stopping:
            stopping.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}  # after ray.init's
    try:
        url = start_server(model, host=host, port=port, **options)
        print(f"moe-platform serving {model} at {url}/v1 (SIGTERM or Ctrl-C stops it)", flush=True)
        while not stopping:
            time.sleep(0.2)
        print(f"moe-platform serve: {stopping[0]}: shutting down", file=sys.stderr, flush=True)
    finally:
        spawned = _descendants()  # the local Ray's processes and their workers, taken before they go
        try:
            if own_ray:
                serve.shutdown()
            else:  # other apps on a shared cluster keep running
                serve.delete("moe-platform")
        finally:
            ray.shutdown(wait_for_processes=True)  # stops the local Ray's processes when this command started it
            _wait_gone(spawned, timeout_s=30)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0


def _descendants() -> list:
    import psutil  # Ray ships it (ray/thirdparty_files, on sys.path once ray is imported)

    return psutil.Process().children(recursive=True)


def _wait_gone(procs: list, timeout_s: float) -> None:
    """Wait until `procs` (psutil processes) have exited: Ray stops its daemons itself, but their children (workers,
    the dashboard's modules) leave a moment later."""
    import time

    import psutil

    def alive(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    end = time.monotonic() + timeout_s
    while (left := [p for p in procs if alive(p)]) and time.monotonic() < end:
        time.sleep(0.1)
    if left:
        print(f"moe-platform serve: warning: processes {[p.pid for p in left]} of the local Ray still run after "
              f"{timeout_s:.0f} s", file=sys.stderr, flush=True)


def _cmd_demo(ns: argparse.Namespace, rest: list[str]) -> int:
    from moe_platform.config import load_config
    from moe_platform.serving.engine import Engine, SamplingParams
    from moe_platform.train.trainer import train

    storage = ns.storage_path or tempfile.mkdtemp(prefix="moe-platform-demo-")
    cfg = load_config(None, [*DEMO_OVERRIDES, f"--run.storage_path={storage}", *rest])
    print(f"[demo] training a {cfg.model.num_experts}-expert top-{cfg.model.top_k} MoE for {cfg.train.steps} steps "
          f"on {'the Python stdlib sources' if not cfg.data.path else cfg.data.path} -> {storage}/{cfg.run.name}")
    result = train(cfg, progress=True)
    print(f"[demo] final loss {result.final_loss:.3f}; Hugging Face export at {result.export_dir}")
    engine = Engine.from_pretrained(result.export_dir)
    text = engine.generate(ns.prompt, SamplingParams(max_tokens=48, temperature=0.0))
    print(f"[demo] prompt: {ns.prompt!r}\n[demo] completion: {text!r}")
    if not ns.no_serve:
        _demo_serve(result.export_dir, ns.prompt)
    return 0


def _demo_serve(export_dir: Path, prompt: str) -> None:
    """The platform's serving half on an embedded Ray: publish the export to the object-store registry, serve it
    with Ray Serve on loopback, and ask it through the OpenAI client."""
    import openai
    import ray
    from ray import serve

    from moe_platform.cluster.registry import publish_export
    from moe_platform.serving.app import start_server
    from moe_platform.train.launch import free_port

    port = free_port()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        version = publish_export(export_dir, "demo")
        url = start_server(f"registry://demo@{version}", port=port, num_replicas=1,
                           engine={"max_batch_size": 8})
        print(f"[demo] published registry://demo@{version}; Ray Serve OpenAI API at {url}/v1")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.completions.create(model="moe-platform", prompt=prompt, max_tokens=48, temperature=0)
        print(f"[demo] served completion: {reply.choices[0].text!r} ({reply.usage.completion_tokens} tokens)")
    finally:
        serve.shutdown()
        ray.shutdown()


def _cmd_spot_agent(ns: argparse.Namespace, rest: list[str]) -> int:
    import time

    from moe_platform.cluster import spot_agent

    sources = spot_agent.build_sources(ns.provider, ns.metadata_url, ns.on_rebalance, ns.k8s_node, ns.k8s_api,
                                       ns.k8s_grace_s)
    address = ns.address or os.environ.get("RAY_ADDRESS") or "127.0.0.1:6379"
    end = time.monotonic() + ns.startup_timeout_s
    while True:  # fail fast on a wrong address or node, after the raylet has had time to register
        try:
            node = spot_agent.own_node_id(address, ns.node_id)
            break
        except Exception as e:
            if time.monotonic() > end:
                raise ValueError(f"cannot find this machine's Ray node: {e}") from e
            time.sleep(2)
    logging.getLogger("moe_platform.spot_agent").warning(
        "spot agent: watching %s for node %s (cluster %s)", ", ".join(ns.provider), node, address)
    notice = spot_agent.run_agent(sources, spot_agent.RayDrainer(address, ns.node_id), interval_s=ns.interval)
    print(json.dumps({"node_id": node, "provider": notice.provider, "kind": notice.kind, "deadline": notice.deadline,
                      "detail": notice.detail}))
    return 0


def _cmd_rollout(ns: argparse.Namespace, rest: list[str]) -> int:
    from moe_platform.cluster.registry import connect
    from moe_platform.serving import rollout_controller as rc
    from moe_platform.serving.rollout import RolloutSpec, read_probe_file

    spec = None
    if ns.action == "start":  # checked before touching the cluster
        if not ns.to:
            raise ValueError("rollout start needs --to VERSION")
        section: dict = {"to": ns.to, "blue_green": ns.blue_green, "gates": {}}
        if ns.source:
            section["source"] = ns.source
        if ns.steps:
            try:
                section["steps"] = [int(x) for x in ns.steps.split(",")]
            except ValueError:
                raise ValueError(f"--steps {ns.steps!r}: expected whole percentages like 5,25,50,100") from None
        if ns.dwell:
            section["dwell_s"] = ns.dwell
        for key in ("max_error_rate_increase", "max_p99_ttft_ratio", "max_p99_latency_ratio", "min_requests"):
            if getattr(ns, key) is not None:
                section["gates"][key] = getattr(ns, key)
        if ns.probe_file:
            section["gates"]["quality"] = {"file": str(Path(ns.probe_file).resolve())}
            if ns.max_loss_increase is not None:
                section["gates"]["quality"]["max_loss_increase"] = ns.max_loss_increase
        if ns.eval_task:
            section["gates"]["eval"] = {k: v for k, v in (("task", ns.eval_task), ("limit", ns.eval_limit),
                                                          ("include_path", ns.eval_include_path),
                                                          ("metric", ns.eval_metric), ("max_drop", ns.max_eval_drop))
                                        if v is not None}
        spec = read_probe_file(section)
        RolloutSpec.parse(spec)
    connect(ns.address)
    controller = rc.existing(ns.app)
    by = f"cli:{rc.who()}"
    if ns.action == "start":
        call = controller.start.remote(spec, by)
    elif ns.action == "status":
        call = controller.status.remote()
    else:
        call = getattr(controller, ns.action).remote(by, ns.reason or f"{ns.action}d from the command line")
    print(json.dumps(rc.result(call), indent=2))
    return 0


def _cmd_eval(ns: argparse.Namespace, rest: list[str]) -> int:
    from moe_platform.serving.evaluation import run_eval

    tasks = [t for t in ns.tasks.split(",") if t]
    key = read_key(ns.api_key_file, API_KEY_ENV, "--api-key-file")
    print(run_eval(ns.model, tasks, ns.include_path, ns.limit, ns.output, ns.model_name, key, ns.concurrency,
                   ns.address, ns.bootstrap_iters), flush=True)
    return 0


def _bench_dir() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "bench").is_dir() and (parent / "pyproject.toml").is_file():
            return parent / "bench"
    raise FileNotFoundError("bench/ not found: run `moe-platform bench` from a source checkout of moe-platform")


def _cmd_bench(ns: argparse.Namespace, rest: list[str]) -> int:
    bench = _bench_dir()
    script = bench / f"{ns.name}.py"
    if not script.is_file():
        names = sorted(p.stem for p in bench.glob("*.py") if not p.stem.startswith("_"))
        raise ValueError(f"unknown benchmark {ns.name!r}; available: {names}")
    spec = importlib.util.spec_from_file_location(f"bench_{ns.name}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return int(module.main(rest) or 0)


def _address_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help="the Ray cluster (default RAY_ADDRESS, else the running local "
                                                        "one)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-platform", description="Elastic Mixture-of-Experts training and serving "
                                                                 "on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a TOML config; extra --section.key=value arguments override it",
                       description="Train (resuming from the run's latest committed checkpoint if there is one, "
                                   "whatever layout wrote it). The layout's ranks (parallel.dp x tp x pp, or "
                                   "elastic.max_workers when a degree is 0/auto) run as processes on this machine. "
                                   "train.objective picks the objective: lm (next-token prediction), dpo (pairs, "
                                   "data.format = preference, [dpo]; jobs/configs/dpo.toml) or grpo (online RL on "
                                   "prompts, data.format = prompts, engine rollouts, [grpo]; jobs/configs/grpo.toml). "
                                   "Any --section.key=value after the options overrides the config file.")
    t.add_argument("--config", required=True, help="TOML config file, e.g. jobs/configs/tiny.toml")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--ray", action="store_true", help="run the ranks as Ray Train workers (elastic, restarted on "
                                                      "failure and preemption) instead of local processes")
    t.add_argument("--address", default=None, help="with --ray: the Ray cluster (default RAY_ADDRESS, else an "
                                                   "embedded local Ray)")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("export", help="write a Hugging Face model directory from a checkpoint")
    e.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest valid checkpoint)")
    e.add_argument("out_dir", help="output directory (config.json, model.safetensors, tokenizer files; for a LoRA "
                                   "run's checkpoint, its adapters in PEFT format)")
    e.add_argument("--merge", action="store_true", help="a LoRA run's checkpoint: write the model with the adapters "
                                                        "folded in instead of the adapters")
    e.set_defaults(fn=_cmd_export)

    pub = sub.add_parser("publish", help="publish an export to the model registry in a running Ray cluster's "
                                         "object store", description="Publish an export directory as the next "
                         "version of NAME in the object-store model registry of a running Ray cluster. Serve loads "
                         "it with model registry://NAME (latest) or registry://NAME@VERSION. Prints the version.")
    pub.add_argument("export_dir", help="export directory (config.json, model.safetensors, tokenizer files)")
    pub.add_argument("--name", required=True, help="model name in the registry (letters, digits, . _ -)")
    pub.add_argument("--keep", type=int, default=3, help="versions of NAME to keep; older ones are freed (default 3)")
    pub.add_argument("--step", type=int, default=None, help="training step to record with the version")
    _address_arg(pub)
    pub.set_defaults(fn=_cmd_publish)

    a = sub.add_parser("arbiter", help="give Serve priority over elastic training on a running Ray cluster",
                       description="Start (idempotent) the cluster's serving arbiter: it reserves the resources of "
                       "every Serve application's target replicas ahead of elastic training jobs, which shrink (after "
                       "a checkpoint) when Serve scales up and grow back when it scales down. Serve apps built by "
                       "moe-platform start it themselves. Prints its status as JSON.")
    _address_arg(a)
    a.add_argument("--interval", type=float, default=2.0, help="seconds between reads of Serve's demand (default 2)")
    a.add_argument("--stop", action="store_true", help="stop it: training may use the whole cluster again")
    a.set_defaults(fn=_cmd_arbiter)

    g = sub.add_parser("generate", help="complete a prompt with an exported model; prints only the completion")
    g.add_argument("--model", required=True, help="export directory")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.set_defaults(fn=_cmd_generate)

    s = sub.add_parser("serve", allow_abbrev=False, help="serve an export with the OpenAI-compatible API on Ray Serve",
                       description="Serve an export (or a registry version) with the OpenAI-compatible API on Ray "
                       "Serve until SIGTERM or SIGINT (Ctrl-C), then shut Serve down and the local Ray it started. "
                       f"Keys are read from files or the environment, never from the command line: the API key "
                       f"(--api-key-file, else {API_KEY_ENV}) guards /v1/*; the admin key (--admin-key-file, else "
                       f"{ADMIN_KEY_ENV}) guards /admin/rollout and /v1/load_lora_adapter, /v1/unload_lora_adapter, "
                       "which are disabled without it (the API key never opens them). /health and /metrics stay "
                       "open. A non-loopback --host needs an API key or --allow-unauthenticated.")
    s.add_argument("--model", required=True, help="export directory, or registry://NAME[@VERSION] (a model published "
                                                  "to the running cluster's registry)")
    s.add_argument("--engine-backend", choices=["native", "vllm"], default="native",
                   help="native, or vllm: vLLM's engine in the replica (docs/operations.md, \"Serving\")")
    s.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE", help="an engine option (serve/"
                   "config.yaml's engine: block, e.g. core=thread, stream_interval=1, max_batch_size=32); repeat")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only; any other needs an API "
                                                       "key or --allow-unauthenticated)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    s.add_argument("--api-key-file", metavar="PATH", help="require 'Authorization: Bearer KEY' on /v1/*, KEY being "
                   f"this file's content (default: the {API_KEY_ENV} environment variable; neither: no key)")
    s.add_argument("--admin-key-file", metavar="PATH", help="the key of the admin routes, read from this file "
                   f"(default: the {ADMIN_KEY_ENV} environment variable; neither: the admin routes answer 403)")
    s.add_argument("--allow-unauthenticated", action="store_true", help="serve on a non-loopback --host without an "
                                                                        "API key (behind an authenticating proxy)")
    s.add_argument("--api-key", "--admin-key", dest="key_on_argv", help=argparse.SUPPRESS)  # refused, with the why
    s.add_argument("--address", default=None, help="the Ray cluster to join: HOST:PORT, or auto for the one `ray "
                   "start` runs on this machine; stopping then deletes only this app (default RAY_ADDRESS, else "
                   "for a registry:// model auto, else local: a new local Ray that stops with the server)")
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter (a directory or registry://NAME[@VERSION]) as model MODEL_NAME:NAME; "
                        "repeat for more")
    s.add_argument("--max-loras", type=int, default=0, help="adapter slots (default: the number of --adapter)")
    s.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank (default 16)")
    s.set_defaults(fn=_cmd_serve)

    d = sub.add_parser("demo", help="train a tiny MoE on the stdlib sources, export it, generate and serve it",
                       description="Train a tiny MoE, export it and complete a prompt in-process; then publish it to "
                                   "the object-store registry of an embedded Ray, serve it with Ray Serve on loopback "
                                   "and ask it through the OpenAI client. Extra --section.key=value arguments "
                                   "override the demo config.")
    d.add_argument("--storage-path", default=None, help="where the run goes (default: a new temporary directory)")
    d.add_argument("--prompt", default=DEMO_PROMPT, help="prompt to complete at the end")
    d.add_argument("--no-serve", action="store_true", help="skip the serving part (embedded Ray: registry, Serve, "
                                                           "an OpenAI-client request)")
    d.set_defaults(fn=_cmd_demo)

    from moe_platform.cluster import spot_agent  # stdlib only at import

    sa = sub.add_parser("spot-agent", help="drain this node in Ray when the cloud announces its reclaim",
                        description="Run on each worker node (cluster.yaml's worker start commands start it). Polls "
                        "the provider's reclaim notices (AWS IMDSv2 spot instance-action, GCP preempted and "
                        "maintenance-event, Azure Scheduled Events, a cordoned or deleted Kubernetes node) and, on "
                        "one, drains this Ray node with reason preemption and the notice's deadline: training takes "
                        "its just-in-time checkpoint and Serve moves its replicas. Exits 0 once the drain is "
                        "accepted, printing the notice as JSON.")
    sa.add_argument("--provider", action="append", required=True, choices=spot_agent.PROVIDERS,
                    help="where notices come from; repeat to watch several (e.g. aws and kubernetes on EKS)")
    sa.add_argument("--address", default=None, help="the Ray GCS, host:port (default RAY_ADDRESS, else "
                                                    "127.0.0.1:6379)")
    sa.add_argument("--node-id", default=None, help="this node's Ray node id (default: the alive node with this "
                                                    "machine's IP)")
    sa.add_argument("--metadata-url", default=None, help="the cloud's metadata endpoint (default: the provider's "
                                                         "link-local one)")
    sa.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    sa.add_argument("--on-rebalance", choices=("log", "drain"), default="log",
                    help="AWS rebalance recommendation (an early warning with no deadline): log it (default) or "
                         "drain with a 120 s deadline")
    sa.add_argument("--k8s-node", default=None, help="kubernetes: the node to watch (default NODE_NAME)")
    sa.add_argument("--k8s-api", default=None, help="kubernetes: the API server (default: in-cluster)")
    sa.add_argument("--k8s-grace-s", type=float, default=30.0, help="kubernetes: the drain deadline after a cordon "
                                                                    "or deletion, seconds (default 30)")
    sa.add_argument("--startup-timeout-s", type=float, default=120.0,
                    help="how long to wait for this node to appear in Ray at start (default 120)")
    sa.set_defaults(fn=_cmd_spot_agent)

    r = sub.add_parser("rollout", help="canary or blue-green rollout of a model version in a running Serve app",
                       description="Move an app's traffic to another model version step by step (canary) or at once "
                       "(blue-green), holding each step for the dwell while the new version's error rate, p99 time "
                       "to first token, p99 latency, (with --probe-file) quality and (with --eval-task) an "
                       "lm-evaluation-harness score stay within bounds against the stable version's; a failed "
                       "gate rolls back to 0%% at once. Every event goes to the app's audit log. Prints the "
                       "rollout's status as JSON.")
    r.add_argument("action", choices=("start", "status", "promote", "abort"),
                   help="start a rollout; show it; promote the new version now; abort (back to the stable one)")
    r.add_argument("--app", default="moe-platform", help="the Serve application (default moe-platform)")
    _address_arg(r)
    r.add_argument("--to", help="start: the version to roll out (one the app serves, or give --source)")
    r.add_argument("--source", help="start: where replicas load --to from (an export directory on the replicas' "
                                    "machines, or registry://NAME@VERSION)")
    r.add_argument("--steps", help="start: canary percent per step (default 5,25,50,100)")
    r.add_argument("--dwell", help="start: how long each step holds, e.g. 30s, 10m (default 10m)")
    r.add_argument("--blue-green", action="store_true", help="start: switch all traffic at once once the version "
                                                            "is loaded and healthy on every replica")
    r.add_argument("--max-error-rate-increase", type=float, help="start: gate (default 0.01)")
    r.add_argument("--max-p99-ttft-ratio", type=float, help="start: gate, against the stable version (default 2)")
    r.add_argument("--max-p99-latency-ratio", type=float, help="start: gate, against the stable version "
                                                               "(default 1.5)")
    r.add_argument("--min-requests", type=int, help="start: canary requests a step needs before it is judged "
                                                    "(default 20)")
    r.add_argument("--probe-file", help="start: held-out texts (blank-line separated) both versions are scored on "
                                        "at every step")
    r.add_argument("--max-loss-increase", type=float, help="start: quality gate, nats per token (default 0.1)")
    r.add_argument("--eval-task", help="start: an lm-eval task both versions are scored on at every step (a YAML "
                                       "task under --eval-include-path on the replicas' machines)")
    r.add_argument("--eval-include-path", help="start: the eval task's directory on the replicas' machines")
    r.add_argument("--eval-limit", type=int, help="start: documents of the eval task scored per version")
    r.add_argument("--eval-metric", help="start: the eval task's metric compared (default: its first)")
    r.add_argument("--max-eval-drop", type=float, help="start: eval gate, how much worse the canary may score "
                                                       "(default 0.02)")
    r.add_argument("--reason", help="promote/abort: why, for the audit log")
    r.set_defaults(fn=_cmd_rollout)

    ev = sub.add_parser("eval", help="run lm-evaluation-harness tasks against a served model or a local export",
                        description="Score a model on lm-evaluation-harness tasks (multiple choice, perplexity, "
                        "generation) with lm-eval itself: against a running server (a URL: lm-eval's "
                        "local-completions over the OpenAI API, tokenizing with the server's /tokenize), or "
                        "in-process on an export directory or a registry://NAME@VERSION. Writes lm-eval's results "
                        "JSON to --output and prints one summary line. Needs lm-eval (pip install "
                        "'moe-platform[eval]').")
    ev.add_argument("--model", required=True, help="an export directory, registry://NAME@VERSION, or the URL of a "
                                                   "running server (e.g. http://127.0.0.1:8000)")
    ev.add_argument("--tasks", required=True, help="task names, comma-separated")
    ev.add_argument("--include-path", help="a directory of YAML tasks with local data (nothing is downloaded); "
                                           "without it, lm-eval's own task registry")
    ev.add_argument("--limit", type=int, help="documents per task at most")
    ev.add_argument("--output", default="eval_results.json", help="lm-eval's results JSON (default "
                                                                  "eval_results.json)")
    ev.add_argument("--model-name", help="URL: the model id to send, e.g. NAME@VERSION to pin a version (default: "
                                         "the first of /v1/models)")
    ev.add_argument("--api-key-file", help=f"URL: a file holding the server's API key (or {API_KEY_ENV})")
    ev.add_argument("--concurrency", type=int, default=8, help="URL: requests in flight at once (default 8)")
    ev.add_argument("--bootstrap-iters", type=int, default=100_000, help="bootstrap resamples for the standard "
                                                                         "errors of some metrics; 0 skips them")
    ev.add_argument("--address", default=None, help="registry://: the Ray cluster whose registry holds the model "
                                                    "(default RAY_ADDRESS, else the running local one)")
    ev.set_defaults(fn=_cmd_eval)

    b = sub.add_parser("bench", help="run a benchmark from bench/ (extra arguments go to it)")
    b.add_argument("name", help="benchmark name, e.g. moe_layer")
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if rest and ns.command not in ("train", "demo", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return ns.fn(ns, rest)
    except (ValueError, FileNotFoundError) as e:
        print(f"moe-platform {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
