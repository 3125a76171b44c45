"""How long a training step is blocked by a checkpoint: asynchronous (host snapshot, write in the background) against
synchronous (snapshot + write + sha256 manifest + fsync + atomic commit), on the same model and optimizer state; the
peer is PyTorch Distributed Checkpoint (`torch.distributed.checkpoint.save` and `async_save`) on the same state, in
the same run, the modes taking turns.

    python bench/checkpoint.py --dim 512 --layers 8 --experts 16 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from _output import add_output_args, save_result, subplots  # noqa: E402
from _training import add_shape_args  # noqa: E402
from moe_platform.config import load_config  # noqa: E402
from moe_platform.model.args import ModelArgs  # noqa: E402
from moe_platform.model.transformer import build_model  # noqa: E402
from moe_platform.train.backends import LocalBackend  # noqa: E402
from moe_platform.train.checkpointing import AsyncCheckpointer, take_snapshot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, dim=512, layers=8, experts=16, intermediate=1024, vocab=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    add_output_args(p, "checkpoint")
    args = p.parse_args(argv)

    margs = ModelArgs(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4,
                      intermediate_size=args.intermediate, num_experts=args.experts, top_k=2, max_seq_len=256)
    cfg = load_config(None, ["--train.global_batch_size=2", "--train.micro_batch_size=2", "--train.warmup=1"])
    backend = LocalBackend(build_model(margs, seed=0), cfg, torch.device("cpu"), None, 1)
    tokens = torch.randint(0, args.vocab, (2, 32))
    backend.train_batch([(tokens, tokens)])  # creates the AdamW state, so the checkpoint holds all of it
    n_params = sum(p.numel() for p in backend.model.parameters())
    state_bytes = 3 * 4 * n_params  # fp32 weights + two Adam moments
    tok_dir = Path(tempfile.mkdtemp())

    def snap(step):
        return lambda: take_snapshot(step, 0, backend.local_state(), {"step": step}, tok_dir)

    import torch.distributed.checkpoint as dcp

    dcp_state = {"model": backend.model.state_dict(), "optim": backend.optimizer.state_dict()}
    results = {"sync": [], "async": [], "async_background_write": [], "dcp_sync": [], "dcp_async": [],
               "dcp_async_total": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: DCP's no-dist mode
        ckpt = AsyncCheckpointer(Path(tmp) / "ours", keep=2, enabled=True)
        step = 0
        for _ in range(args.repeats):
            step += 1
            ckpt.save(snap(step), blocking=True)
            results["sync"].append(ckpt.last_blocking_s)
            step += 1
            t0 = time.perf_counter()
            ckpt.save(snap(step), blocking=False)
            results["async"].append(time.perf_counter() - t0)
            ckpt.wait()
            results["async_background_write"].append(ckpt.last_write_s)
            t0 = time.perf_counter()
            dcp.save(dcp_state, checkpoint_id=f"{tmp}/dcp-{step}-sync")
            results["dcp_sync"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            future = dcp.async_save(dcp_state, checkpoint_id=f"{tmp}/dcp-{step}-async")
            results["dcp_async"].append(time.perf_counter() - t0)
            future.result()
            results["dcp_async_total"].append(time.perf_counter() - t0)
            shutil.rmtree(f"{tmp}/dcp-{step}-sync")
            shutil.rmtree(f"{tmp}/dcp-{step}-async")
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio, dcp_ratio = med["async"] / med["sync"], med["dcp_async"] / med["dcp_sync"]
    print(f"model: {n_params / 1e6:.1f}M parameters, checkpoint state {state_bytes / 2**20:.0f} MiB")
    print(f"{'mode':<36}{'blocking s (median)':>22}")
    for key, label in (("sync", "ours synchronous"), ("async", "ours asynchronous"),
                       ("async_background_write", "  (its background write)"), ("dcp_sync", "DCP save"),
                       ("dcp_async", "DCP async_save"), ("dcp_async_total", "  (until its write is done)")):
        print(f"{label:<36}{med[key]:>22.3f}")
    print(f"async / sync blocking: ours {ratio:.3f} (target <= 0.05), DCP {dcp_ratio:.3f}")
    print(f"async blocking, ours / DCP async_save: {med['async'] / med['dcp_async']:.3f}")
    save_result({"args": vars(args), "params": n_params, "state_bytes": state_bytes, "torch": torch.__version__,
                 "results": results, "median": med, "ratio": ratio, "dcp_ratio": dcp_ratio,
                 "async_vs_dcp_async": med["async"] / med["dcp_async"]}, args.out_json, args.out_png, plot)
    return 0


def plot(result: dict):
    med, ratio, dcp_ratio = result["median"], result["ratio"], result["dcp_ratio"]
    fig, ax = subplots(figsize=(7, 3.5))
    ax.bar(["ours sync", "ours async", "DCP save", "DCP async_save"],
           [med["sync"], med["async"], med["dcp_sync"], med["dcp_async"]],
           color=["tab:gray", "tab:green", "tab:gray", "tab:blue"])
    ax.set_ylabel("seconds the training step is blocked")
    ax.set_title(f"checkpoint of {result['state_bytes'] / 2**20:.0f} MiB: async/sync ours {ratio:.3f}, "
                 f"DCP {dcp_ratio:.3f}")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
