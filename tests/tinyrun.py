"""What the tests share: the tiny training set-up (a small corpus and config overrides that train in seconds on 2
cores), free ports, bounded polling, run-directory readers, and the Ray pieces (a local Ray, a multi-node cluster on
this machine, node drains, `ray job submit`).

A module of its own (not conftest) so test files in every folder can import it by a unique name.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, `serve`, and the `python` Ray jobs run with
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus_text(limit: int = 120_000) -> str:
    """A slice of tinyshakespeare (or, without ../shared, of a stdlib module)."""
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text()[:limit]
    import argparse

    return Path(argparse.__file__).read_text()[:limit]


def tiny_overrides(corpus: Path, storage: Path, **extra) -> list[str]:
    base = {
        "run.name": "t", "run.storage_path": str(storage),
        "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.intermediate_size": 48, "model.num_experts": 4, "model.top_k": 2, "model.max_seq_len": 64,
        "data.path": str(corpus), "data.vocab_size": 320, "data.cache_dir": str(storage / "cache"),
        "train.steps": 12, "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.seq_len": 32,
        "train.warmup": 2, "train.lr": 3e-3, "checkpoint.interval": 6, "checkpoint.keep": 2,
    }
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def venv_env(base: dict | None = None, **extra: str) -> dict:
    """An environment (os.environ by default) whose PATH finds the venv's `ray`, `serve` and `python` first."""
    import os

    env = dict(os.environ if base is None else base)
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra}


def free_ports(n: int) -> list[int]:
    """`n` different TCP ports on 127.0.0.1 that nothing listens on right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def poll(condition, timeout_s: float, what: str, interval_s: float = 0.05):
    """Wait until `condition()` is truthy and return that value; a TimeoutError naming `what` after `timeout_s`
    (never a fixed sleep)."""
    end = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)
    return value


def scrape_ray_metrics(want: set[str], label: str, timeout_s: float = 90) -> dict[str, float]:
    """What Prometheus would scrape from this Ray's first live node (its metrics agent, in the text format): the value
    of each metric in `want` over its series carrying `label` (`model="m"`), summed over their other labels; waits
    until every one is there (Ray exports every few seconds)."""
    import httpx
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])

    def scraped() -> dict[str, float] | None:
        got: dict[str, float] = {}
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
            name, _, rest = line.partition("{")
            if name in want and label in rest:
                got[name] = got.get(name, 0.0) + float(rest.rsplit(" ", 1)[1])
        return got if got.keys() == want else None

    return poll(scraped, timeout_s, f"{sorted(want)} at the metrics agent", 1.0)


def run_events(run_dir: Path) -> list[dict]:
    """The run's events.jsonl (starts, resumes, checkpoint-and-stops), [] before the first."""
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def logged_steps(run_dir: Path) -> list[int]:
    """The steps in the run's metrics.jsonl, in order (a line being written right now is left out)."""
    from moe_platform.train.metrics import MetricsLog

    return [r["step"] for r in MetricsLog(Path(run_dir) / "metrics.jsonl").read()]


def last_logged_step(run_dir: Path) -> int:
    return max(logged_steps(run_dir), default=0)


def config_overrides(cfg) -> list[str]:
    """A whole config as `--section.key=value` arguments (for `jobs/train.py` and `moe-platform train`)."""
    from moe_platform.config import config_to_dict

    return [f"--{section}.{key}={value}" for section, values in config_to_dict(cfg).items()
            for key, value in values.items()]


def submit_job(address: str, job_id: str, entrypoint: list[str], env: dict, working_dir: bool = True,
               timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`ray job submit --no-wait` (with this checkout as the working dir), asked again while the head's job agent is
    still starting (bounded); the last answer, whatever it was."""
    end = time.monotonic() + timeout_s
    while True:
        r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
                            "--no-wait", *(["--working-dir", str(REPO)] if working_dir else []), "--", *entrypoint],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        if "No available agent" not in r.stdout + r.stderr or time.monotonic() > end:
            return r
        time.sleep(1)


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[str]:
    """A local Ray instance for one test module (no dashboard); yields its GCS address."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@contextlib.contextmanager
def node_cluster(head_cpus: int, worker_cpus: int, fast_health_checks: bool = True):
    """A two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: two raylets), connected; a vanished node
    is noticed within ~3 s (1 s health checks) rather than Ray's default ~15 s, unless `fast_health_checks` is off."""
    import ray
    from ray.cluster_utils import Cluster

    fast = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": False, "dashboard_agent_listen_port": free_port(),
        "_system_config": fast if fast_health_checks else {}})
    try:
        cluster.add_node(num_cpus=worker_cpus)
        cluster.wait_for_nodes()
        cluster.connect()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def drain_for_preemption(cluster, node, deadline_s: float) -> tuple[subprocess.CompletedProcess, float]:
    """What a cloud's spot reclaim looks like to Ray: `ray drain-node` with reason preemption and a deadline.
    Returns the CLI's answer and the deadline (time.monotonic()), no earlier than the one the CLI announced."""
    r = subprocess.run(
        [str(BIN / "ray"), "drain-node", "--address", cluster.address, "--node-id", node.node_id,
         "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed",
         f"--deadline-remaining-seconds={deadline_s}"], capture_output=True, text=True, timeout=60)
    return r, time.monotonic() + deadline_s


def start_in_background(fn) -> tuple:
    """Run `fn()` on a daemon thread; returns (thread, out): out["result"] gets its value, out["error"] its error."""
    import threading

    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:  # reported by the caller
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def read_env_file(path: Path) -> dict[str, str]:
    """The `export K=V` lines scripts/cluster-up.sh writes to STATE_DIR/env."""
    return dict(line.removeprefix("export ").split("=", 1) for line in Path(path).read_text().splitlines() if line)


@contextlib.contextmanager
def scripted_cluster(state: Path, env: dict, *up_args: str) -> Iterator[dict[str, str]]:
    """A cluster started by scripts/cluster-up.sh STATE ARGS (token auth, its own ports and temp dir), and stopped by
    scripts/cluster-down.sh, which must leave none of its processes running; yields the exports of STATE/env."""
    up = subprocess.run(["bash", "scripts/cluster-up.sh", str(state), *up_args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=200)
    try:
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
        yield read_env_file(state / "env")
    finally:
        down = subprocess.run(["bash", "scripts/cluster-down.sh", str(state)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, f"{down.stdout}\n{down.stderr}"
        assert cluster_processes(state) == [], "cluster-down.sh left processes of its cluster running"


def cluster_processes(state: Path | str) -> list[int]:
    """Processes of the cluster that scripts/cluster-up.sh started with STATE_DIR `state`: every process it starts
    inherits MOE_CLUSTER_STATE=<state>."""
    marker = f"MOE_CLUSTER_STATE={state}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


# -- tiny Hugging Face MoE models (built from transformers' config classes: nothing is downloaded) ----------------
HF_ARCHITECTURES = ("MixtralForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                    "DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Glm4MoeForCausalLM", "GptOssForCausalLM")
# DeepSeek-V3/V2 (multi-head latent attention) and GLM-4.5: grouped routing, dense first layers, YaRN
GROUPED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Glm4MoeForCausalLM")


def yarn(factor: float, original: int, **extra) -> dict:
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32.0, "beta_slow": 1.0, **extra}


def hf_config(arch: str, vocab_size: int):
    """A tiny config of `arch`: 2 layers, 4 heads (2 kv), 8 experts top-2, with each architecture's features on.
    DeepSeek-V3/V2 and GLM-4.5 have a dense first layer, expert groups, biases and YaRN RoPE; DeepSeek-V3 a
    low-rank query, DeepSeek-V2 a full q_proj and group_limited_greedy routing, GLM partial rotary and q/k norms.
    gpt-oss: attention sinks, a sliding window of 8 on every other layer (4 layers), biases on every projection, the
    router and the experts, the clamped SwiGLU at gpt-oss's own limit (7; test_gpt_oss.py clamps most values) and
    YaRN."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=2,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # the tiny <|endoftext|>
    grouped = dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, first_k_dense_replace=1,
                   attention_bias=True, **{**common, "num_key_value_heads": 4})
    mla = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
    return {
        "MixtralForCausalLM": lambda: transformers.MixtralConfig(intermediate_size=48, num_local_experts=8, **common),
        "Qwen3MoeForCausalLM": lambda: transformers.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32,
                                                                   num_experts=8, norm_topk_prob=True, head_dim=24,
                                                                   **common),
        "Qwen2MoeForCausalLM": lambda: transformers.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32,
                                                                   num_experts=8, shared_expert_intermediate_size=40,
                                                                   **common),
        "OlmoeForCausalLM": lambda: transformers.OlmoeConfig(intermediate_size=32, num_experts=8, **common),
        "DeepseekV3ForCausalLM": lambda: transformers.DeepseekV3Config(
            **grouped, **mla, q_lora_rank=48, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            norm_topk_prob=True, rope_parameters=yarn(4.0, 32, mscale=1.0, mscale_all_dim=1.0)),
        "DeepseekV2ForCausalLM": lambda: transformers.DeepseekV2Config(
            **grouped, **mla, q_lora_rank=None, n_shared_experts=2, n_group=4, topk_group=1,
            topk_method="group_limited_greedy", routed_scaling_factor=1.5,
            rope_parameters=yarn(4.0, 32, mscale=0.707, mscale_all_dim=0.707)),
        "Glm4MoeForCausalLM": lambda: transformers.Glm4MoeConfig(
            **{**grouped, "num_key_value_heads": 2}, head_dim=16, n_shared_experts=1, n_group=2, topk_group=1,
            routed_scaling_factor=2.0, use_qk_norm=True,
            rope_parameters=yarn(2.0, 64, partial_rotary_factor=0.5)),
        "GptOssForCausalLM": lambda: transformers.GptOssConfig(
            **{**common, "num_hidden_layers": 4}, head_dim=16, intermediate_size=64, num_local_experts=8,
            sliding_window=8, swiglu_limit=7.0, rope_parameters=yarn(4.0, 32, truncate=False)),
    }[arch]()


def engine_outputs(engine, prompts, max_tokens: int = 16) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probabilities of `prompts`, batched on a serving engine (stepped to the end)."""
    from moe_platform.serving.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(p, params) for p in prompts]
    got = {i: ([], []) for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id][0].extend(out.token_ids)
            got[out.request_id][1].extend(lp for lp, _ in out.logprobs or [])
    return [got[i] for i in ids]


def tiny_tokenizer(out: Path, vocab: int = 300, max_len: int = 128, chars: int = 60_000) -> Path:
    """A byte-level BPE tokenizer (`vocab` tokens) trained on the first `chars` characters of the test corpus,
    saved in `out` with `max_len` as its model_max_length."""
    from moe_platform.tokenizer import save_tokenizer, train_tokenizer

    text = corpus_text(chars)
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], vocab)
    return save_tokenizer(tok, out, model_max_length=max_len)


def save_tiny_hf_model(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0, **config):
    """A random `arch` model saved by transformers in shards of ~100 KB (model.safetensors.index.json), with the
    tokenizer's files beside it, as a model directory from a hub looks. Every weight is random, norms and routers
    included, so a misplaced tensor shows; `seed` picks other weights, `config` overrides config fields. Returns
    (the transformers model, the directory)."""
    import torch
    import transformers

    from moe_platform.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    torch.manual_seed(0)
    hf = hf_config(arch, vocab)
    for key, value in config.items():
        setattr(hf, key, value)
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():  # routing correction biases: non-zero, so that they matter
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
    model.eval().save_pretrained(out, max_shard_size="100KB")
    for f in Path(tokenizer_dir).iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return model, out


def chatml_tokenizer(out: Path) -> Path:
    """The tiny tokenizer turned into a ChatML one (turn markers, chat_template.jinja) the way the fine-tuning
    example's model ships it (scripts/tiny_chat_model.py)."""
    return _example_inputs().add_chatml(tiny_tokenizer(out))


CHAT_ROWS = [
    [{"role": "user", "content": "What is a mixture of experts?"},
     {"role": "assistant", "content": "A layer that routes each token to a few expert networks."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "6, since three and three make six."}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Eleven."}],
]


def write_chat_jsonl(path: Path, rows: int = 60) -> Path:
    """`rows` conversations (variations of CHAT_ROWS) as OpenAI-style JSONL."""
    import json

    with open(path, "w") as f:
        for i in range(rows):
            messages = [{**m, "content": m["content"] + (f" ({i})" if m["role"] != "system" else "")}
                        for m in CHAT_ROWS[i % len(CHAT_ROWS)]]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def preference_rows(n: int = 24, implicit_every: int = 0) -> list[dict]:
    """`n` preference pairs in TRL's conversational format: a sum asked, the right answer in words chosen and a
    refusal rejected; every `implicit_every`-th row (0: none) in the implicit-prompt form (whole chosen and rejected
    conversations sharing their first messages)."""
    rows = []
    for i in range(n):
        a, b = i % 10, (i * 7 + 3) % 9
        prompt = [{"role": "user", "content": f"What is {a} plus {b}?"}]
        if i % 4 == 1:
            prompt = [{"role": "system", "content": "Answer in words."}, *prompt]
        chosen = [{"role": "assistant", "content": f"{a} plus {b} is {NUMBER_WORDS[a + b]}."}]
        rejected = [{"role": "assistant", "content": "I cannot say." if i % 2 else "No idea, sorry."}]
        if implicit_every and i % implicit_every == implicit_every - 1:
            rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_preference_jsonl(path: Path, rows: int = 24, implicit_every: int = 0) -> Path:
    """`preference_rows(rows, implicit_every)` as JSONL."""
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(rows, implicit_every)))
    return path


def _example_inputs():
    """scripts/tiny_chat_model.py, the fine-tuning and adapter examples' inputs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_chat_model", REPO / "scripts" / "tiny_chat_model.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def random_adapter(args, base_state: dict, targets: tuple[str, ...], rank: int, seed: int, out: Path,
                   tokenizer_dir: Path) -> tuple[Path, Path]:
    """scripts/tiny_chat_model.py's random_adapter: (the adapter directory, the merged model's export)."""
    return _example_inputs().random_adapter(args, base_state, targets, rank, seed, out, tokenizer_dir)


class FakeCloud:
    """Real HTTP on 127.0.0.1 speaking the four reclaim-notice protocols the spot agent reads, each as its provider
    documents it: AWS IMDSv2 (PUT a session token, then GETs carrying it; 401 without; 404 until a notice), the GCE
    metadata server (requires and answers `Metadata-Flavor: Google`), Azure Scheduled Events (requires
    `Metadata: true`) and the Kubernetes API's Node object (requires the bearer token; 404 once the node is gone).
    Tests change `state` to publish notices; `requests` records (method, path, headers with lower-case names) of
    what was asked."""

    K8S_TOKEN = "k8s-service-account-token"

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.state: dict = {"aws_action": None, "aws_rebalance": None, "gcp_preempted": "FALSE",
                            "gcp_maintenance": "NONE", "azure_vm": "vm-7", "azure_events": [],
                            "k8s_node": {"metadata": {"name": "node-a"}, "spec": {}}}
        self.requests: list[tuple[str, str, dict]] = []
        self.aws_tokens: set[str] = set()
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body=b"", headers: dict | None = None):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                cloud.requests.append(("PUT", self.path, {k.lower(): v for k, v in self.headers.items()}))
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if self.path != "/latest/api/token" or not ttl or not 1 <= int(ttl) <= 21600:
                    return self.reply(400)
                token = f"imds-token-{len(cloud.aws_tokens)}"
                cloud.aws_tokens.add(token)
                self.reply(200, token.encode())

            def do_GET(self):
                cloud.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                s, path = cloud.state, self.path
                if path.startswith("/latest/"):
                    if self.headers.get("X-aws-ec2-metadata-token") not in cloud.aws_tokens:
                        return self.reply(401)
                    doc = {"/latest/meta-data/spot/instance-action": s["aws_action"],
                           "/latest/meta-data/events/recommendations/rebalance": s["aws_rebalance"]}.get(path)
                    return self.reply(404, b"Not Found") if doc is None else self.reply(200, doc)
                if path.startswith("/computeMetadata/v1/"):
                    google = {"Metadata-Flavor": "Google"}
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self.reply(403, b"Missing Metadata-Flavor:Google header.", google)
                    value = {"/computeMetadata/v1/instance/preempted": s["gcp_preempted"],
                             "/computeMetadata/v1/instance/maintenance-event": s["gcp_maintenance"]}.get(path)
                    return self.reply(404, b"", google) if value is None else self.reply(200, value.encode(), google)
                if path.startswith("/metadata/"):
                    if self.headers.get("Metadata") != "true":
                        return self.reply(400, {"error": "Bad request. Required metadata header not specified"})
                    if path.startswith("/metadata/instance/compute/name?") and "format=text" in path:
                        return self.reply(200, s["azure_vm"].encode())
                    if path.startswith("/metadata/scheduledevents?api-version="):
                        return self.reply(200, {"DocumentIncarnation": len(s["azure_events"]),
                                                "Events": s["azure_events"]})
                    return self.reply(404)
                if path.startswith("/api/v1/nodes/"):
                    if self.headers.get("Authorization") != f"Bearer {FakeCloud.K8S_TOKEN}":
                        return self.reply(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                    node = s["k8s_node"]
                    if node is None or path != f"/api/v1/nodes/{node['metadata']['name']}":
                        return self.reply(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                    return self.reply(200, {"kind": "Node", "apiVersion": "v1", **node})
                self.reply(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish_aws_terminate(self, in_s: float) -> float:
        """A spot `terminate` instance-action `in_s` seconds ahead (whole seconds, as AWS writes its time); returns
        the deadline as time.monotonic()."""
        from datetime import datetime, timedelta, timezone

        when = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=in_s)
        self.state["aws_action"] = {"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
        return time.monotonic() + (when.timestamp() - time.time())

    def start_agent(self, address: str, node_id: str) -> subprocess.Popen:
        """`moe-platform spot-agent` for Ray node `node_id`, watching this cloud's IMDSv2 (the nodes of a cluster on
        this machine share its IP, so the agent is told its node); stdout and stderr piped."""
        return subprocess.Popen([str(BIN / "moe-platform"), "spot-agent", "--provider", "aws", "--metadata-url",
                                 self.url, "--address", address, "--node-id", node_id, "--interval", "0.2"],
                                env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeCloud:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def checksum_reward(row, completion: str) -> float:
    """A GRPO reward that differs between almost any two completions, for checks that need every group's advantages
    to be non-zero: the sum of the completion's character codes, mod 7."""
    return float(sum(map(ord, completion)) % 7)
