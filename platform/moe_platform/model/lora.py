"""Low-rank adapters (LoRA) on attention projections, routed experts and shared experts.

An adapted projection computes W x + (alpha / r) * B (A x). A is (r, in), initialised like a linear layer's weight
(Kaiming-uniform, as PEFT does); B is (out, r), zero, so an adapted model computes exactly its base model until the
first update. The adapters live beside the weights they adapt, as `lora` submodules, so the base weights keep their
names (checkpoints, Hugging Face import and export are unchanged):

- attention: `self_attn.lora.{q_proj,k_proj,v_proj,o_proj}.{A,B}`; multi-head latent attention's projections
  `self_attn.lora.{q_proj,q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj}.{A,B}`;
- routed experts: one pair per expert, stacked like the experts: `experts.lora.gate_up_proj.{A,B}` with A
  (E, r, D) and B (E, 2I, r), and `experts.lora.down_proj.{A,B}` with A (E, r, I) and B (E, D, r). The experts run
  with W + (alpha / r) * B @ A, the adapted weight, so every expert kernel (grouped GEMM, the fused CPU path) serves
  them unchanged;
- shared experts: `shared_experts.lora.{gate_proj,up_proj,down_proj}.{A,B}`;
- the dense layers' MLPs (target `dense_mlp`): `mlp.lora.{gate_proj,up_proj,down_proj}.{A,B}`.

Dropout (on the adapter's input) applies to the attention and MLP adapters; the expert adapters, folded
into the expert weights, take none. The layers add their adapters' terms through model/adapter_hooks.py; this module
attaches the adapters from outside (it imports the layers, never the other way round).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from moe_platform.model.attention import Attention
from moe_platform.model.mla import MLAttention
from moe_platform.model.moe import GroupedExperts, SwiGLU

MLA_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", *MLA_TARGETS)
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
# "attention": every attention projection the model has (q/k/v/o, or multi-head latent attention's)
LORA_TARGETS = ("attention", *ATTENTION_TARGETS, "experts", "shared_experts", "dense_mlp")


def parse_targets(targets: str) -> tuple[str, ...]:
    """'q_proj, v_proj,experts' -> ('q_proj', 'v_proj', 'experts'); unknown names are an error naming the choices."""
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"lora.targets {targets!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                         f"choose from {', '.join(LORA_TARGETS)}")
    return names


def init_lora_a(a: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Kaiming-uniform with a = sqrt(5) over the input dimension (nn.Linear's and PEFT's default for lora_A)."""
    fan_in = a.shape[-1]
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))
    with torch.no_grad():
        a.uniform_(-bound, bound, generator=generator)


class LoRA(nn.Module):
    """The adapter of one linear map in -> out: `forward(x)` is (alpha / r) * B (A dropout(x))."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.zeros(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.A.t().to(x.dtype)) @ (self.B.t() * self.scale).to(x.dtype)


class StackedLoRA(nn.Module):
    """One adapter per expert, stacked: A (E, r, in), B (E, out, r); `delta()` is the (E, out, in) weight update."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.zeros(num_experts, rank, in_features))
        self.B = nn.Parameter(torch.zeros(num_experts, out_features, rank))

    def delta(self) -> torch.Tensor:
        return torch.bmm(self.B, self.A) * self.scale


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: tuple[str, ...]) -> None:
    """Attach adapters to `model` (the single-device MoETransformer, before any parallelism) and freeze every other
    parameter. The adapters start as A = 0, B = 0; `init_adapters` gives A its initial values."""
    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank}")
    found = _lora_sites(model, targets)
    missing = [t for t in targets if not any(t in names for _, names in found)]
    if missing:
        present = sorted({t for _, names in _lora_sites(model, LORA_TARGETS) for t in names})
        raise ValueError(f"lora.targets: this model has no {', '.join(missing)} to adapt; its targets are "
                         f"{', '.join(present)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for m, names in found:
        names = [t for t in names if t != "attention"]
        if isinstance(m, GroupedExperts):
            e, two_i, d = m.gate_up_proj.shape
            m.lora = nn.ModuleDict({"gate_up_proj": StackedLoRA(e, d, two_i, rank, alpha),
                                    "down_proj": StackedLoRA(e, two_i // 2, d, rank, alpha)})
        else:
            projections = MLP_TARGETS if isinstance(m, SwiGLU) else names
            m.lora = nn.ModuleDict({t: LoRA(getattr(m, t).in_features, getattr(m, t).out_features, rank, alpha,
                                            dropout) for t in projections})


def _lora_sites(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, list[str]]]:
    """The modules `targets` put adapters on, each with the targets it answers to."""
    sites = []
    for name, m in model.named_modules():
        if isinstance(m, (Attention, MLAttention)):
            wanted = [t for t in ATTENTION_TARGETS if (t in targets or "attention" in targets)
                      and isinstance(getattr(m, t, None), nn.Linear)]
            if "attention" in targets:
                wanted.append("attention")
        elif isinstance(m, GroupedExperts):
            wanted = ["experts"] if "experts" in targets else []
        elif isinstance(m, SwiGLU):
            kind = "shared_experts" if name.endswith(".shared_experts") else "dense_mlp"
            wanted = [kind] if kind in targets else []
        else:
            continue
        if wanted:
            sites.append((m, wanted))
    return sites


def is_lora_name(name: str) -> bool:
    return ".lora." in name


def lora_a_init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial value of adapter tensor `name` (full shape): A random from (seed, name), B zero. It depends on
    nothing else, so every rank and every layout starts from the same adapters."""
    out = torch.zeros(shape)
    if name.endswith(".A"):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + _stable_hash(name))
        init_lora_a(out, generator)
    return out


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def init_adapters(model: nn.Module, seed: int) -> None:
    """Give every adapter of `model` (unsharded, on a real device) its initial value (`lora_a_init`)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if is_lora_name(name):
                t.copy_(lora_a_init(name, tuple(t.shape), seed))


def merge_adapters(state: dict[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """Our state dict with every adapter folded into the weight it adapts (W + alpha / rank * B @ A) and the adapter
    tensors gone: a plain model that computes what the adapted one does."""
    scale = alpha / rank
    out = {k: v for k, v in state.items() if not is_lora_name(k)}
    for name in state:
        if not (is_lora_name(name) and name.endswith(".A")):
            continue
        prefix, target = name.removesuffix(".A").split(".lora.")
        a, b = state[name], state[name.removesuffix(".A") + ".B"]
        weight = f"{prefix}.{target}" if prefix.endswith(".experts") else f"{prefix}.{target}.weight"
        delta = torch.bmm(b.float(), a.float()) if a.dim() == 3 else b.float() @ a.float()
        out[weight] = (out[weight].float() + scale * delta).to(out[weight].dtype)
    return out
