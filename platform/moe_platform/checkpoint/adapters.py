"""Exporting a LoRA run's adapters (model/lora.py).

`<dir>/adapter_config.json` + `<dir>/adapter_model.safetensors` is PEFT's format for the adapters PEFT can express
on the transformers model, the attention projections (grouped-query or latent attention's):
`peft.PeftModel.from_pretrained(base, dir)` loads them. (The dense layers' MLPs are nn.Linear modules too, but PEFT
maps gate_proj/up_proj/down_proj targets of an MoE model onto its fused experts, so their adapters go beside the
experts'.) The
adapters PEFT has no module for, the routed experts' stacked pairs and the shared experts', go beside them in
`<dir>/moe_platform_adapters.safetensors` under our own names (`model.layers.L.mlp.experts.lora.gate_up_proj.A`
(E, r, D) and `.B` (E, 2I, r), `...down_proj.A` (E, r, I) and `.B` (E, D, r), `...shared_experts.lora.
{gate,up,down}_proj.{A,B}`), with the scale alpha / r of adapter_config.json. `<dir>/vllm/` holds all of them once
more in the per-expert layout vLLM's MoE LoRA loads. `merge_adapters` folds all of them into a plain model instead
(`moe-platform export --merge`). Serving (serving/adapters.py) reads `<dir>` back with `read_adapters`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_platform.checkpoint.hf_arch import export_architecture
from moe_platform.model.args import ModelArgs
from moe_platform.model.lora import ATTENTION_TARGETS, is_lora_name

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
OWN_WEIGHTS_FILE = "moe_platform_adapters.safetensors"
VLLM_DIR = "vllm"  # every adapter in vLLM's per-expert MoE LoRA layout (export_vllm_adapters)
META_FILE = "adapter_meta.json"  # base_fingerprint and base_model of an adapter held in memory (the registry)


_FINGERPRINT_TENSOR = "model.embed_tokens.weight"
_FINGERPRINT_VALUES = 8192


def base_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short id of a base model's weights that no adapter changes: its embedding's shape and first values, rounded
    to bfloat16 (so that the same weights served in another precision keep their id)."""
    t = state[_FINGERPRINT_TENSOR]
    head = t.detach().reshape(-1)[:_FINGERPRINT_VALUES].to("cpu", torch.bfloat16).view(torch.int16)
    digest = hashlib.sha256(f"{tuple(t.shape)}".encode())
    digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


def export_adapters(state: dict[str, torch.Tensor], lora: dict, out_dir: str | Path, base_model: str = "",
                    args: ModelArgs | None = None) -> Path:
    """Write the adapters of `state` (our names) to `out_dir`; `lora` is the run's [lora] section. The weight files'
    metadata carry `base_fingerprint` of the frozen base in `state`, which serving checks before loading. With
    expert or shared-expert adapters and the model's `args`, `<out_dir>/vllm/` also holds every adapter in vLLM's
    per-expert MoE LoRA layout (`export_vllm_adapters`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft, own, modules = {}, {}, []
    for name, t in state.items():
        if not is_lora_name(name):
            continue
        prefix, rest = name.split(".lora.")
        target, factor = rest.rsplit(".", 1)
        if _peft_expresses(prefix, target):
            module = f"{prefix}.{target}"
            peft[f"base_model.model.{module}.lora_{factor}.weight"] = t.detach().contiguous()
            if module not in modules:
                modules.append(module)
        else:
            own[name] = t.detach().contiguous()
    config = _peft_config(lora, modules, base_model)
    (out / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    meta = {"format": "pt", "base_fingerprint": base_fingerprint(state), "base_model": base_model}
    save_file(peft, str(out / PEFT_WEIGHTS_FILE), metadata=meta)
    if own:
        save_file(own, str(out / OWN_WEIGHTS_FILE), metadata={**meta, "scale": str(lora["alpha"] / lora["rank"])})
        if args is not None:
            export_vllm_adapters(state, lora, args, out / VLLM_DIR, base_model)
    return out


def export_vllm_adapters(state: dict[str, torch.Tensor], lora: dict, args: ModelArgs, out_dir: str | Path,
                         base_model: str = "") -> Path | None:
    """Every adapter of `state` as one PEFT-style directory in the layout vLLM's MoE LoRA reads for models whose
    experts are separate modules on disk (its "2D" layout): keys named after the base checkpoint's own modules,
    `base_model.model.model.layers.L.<moe module>.experts.E.<gate|up|down name>.lora_{A,B}.weight` for every
    expert, the attention projections as PEFT writes them, and the shared expert under its on-disk module name.
    Our stacked gate_up pair (A, B) becomes a gate pair (A, B[:I]) and an up pair (A, B[I:]) of the same rank,
    which add exactly the same update. None (nothing written) when the model has no Hugging Face architecture."""
    arch = export_architecture(args)
    if arch is None:
        return None
    gate_name, up_name, down_name = arch.expert_names
    inter = args.intermediate_size
    tensors: dict[str, torch.Tensor] = {}
    modules: set[str] = set()

    def put(module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.detach().clone()  # gate and up share A: two copies
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().clone()
        modules.add(module.rsplit(".", 1)[1])

    for name, a in state.items():
        if not (is_lora_name(name) and name.endswith(".A")):
            continue
        b = state[name.removesuffix(".A") + ".B"]
        prefix, target = name.removesuffix(".A").split(".lora.")
        if prefix.endswith(".mlp.experts"):
            layer = prefix.removesuffix(".mlp.experts")
            for e in range(a.shape[0]):
                base = f"{layer}.{arch.moe_module}.experts.{e}"
                if target == "gate_up_proj":
                    put(f"{base}.{gate_name}", a[e], b[e, :inter])
                    put(f"{base}.{up_name}", a[e], b[e, inter:])
                else:
                    put(f"{base}.{down_name}", a[e], b[e])
        elif ".mlp.shared_experts" in prefix:
            shared = ".mlp." + (arch.shared_module or "shared_experts")
            put(f"{prefix.replace('.mlp.shared_experts', shared)}.{target}", a, b)
        else:
            put(f"{prefix}.{target}", a, b)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _peft_config(lora, sorted(modules), base_model)
    (out / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def _peft_expresses(prefix: str, target: str) -> bool:
    """Whether PEFT loads the adapter `<prefix>.lora.<target>` onto the transformers model: the attention
    projections."""
    return prefix.endswith(".self_attn") and target in ATTENTION_TARGETS


def _peft_config(lora: dict, target_modules: list[str], base_model: str) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"], "bias": "none",
        "target_modules": target_modules, "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
    }


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded: the message names the file and what is wrong."""


@dataclass
class Adapters:
    """A loaded adapter: tensors under our names (`...self_attn.lora.q_proj.A`, `...experts.lora.gate_up_proj.A`,
    ...), one scale for all of them, and what the files say about their base model."""

    tensors: dict[str, torch.Tensor]
    rank: int
    scale: float
    base_fingerprint: str | None
    base_model: str


# PEFT options that change what an adapter computes, and the values under which it is a plain LoRA we can serve.
_PEFT_PLAIN = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
               "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}
_PEFT_NAME = re.compile(r"^base_model\.model\.(model\.layers\.\d+\.self_attn)\.([a-z_]+)\.lora_([AB])\.weight$")


def read_adapters(source: str | Path, files: dict[str, bytes] | None = None,
                  arrays: dict[str, torch.Tensor] | None = None) -> Adapters:
    """Read an adapter directory (PEFT's adapter_config.json + adapter_model.safetensors, plus our
    moe_platform_adapters.safetensors), or the same content in memory (`files`: adapter_config.json and
    adapter_meta.json by name, `arrays`: the tensors under our names, as the registry holds them)."""
    where = str(source)
    if files is None:
        d = Path(source)
        if not (d / PEFT_CONFIG_FILE).is_file():
            raise AdapterError(f"{d} is not an adapter directory: it has no {PEFT_CONFIG_FILE} (pass the <run>/adapter "
                               f"directory a LoRA run writes, or a PEFT adapter saved with save_pretrained)")
        files = {PEFT_CONFIG_FILE: (d / PEFT_CONFIG_FILE).read_bytes()}
    try:
        config = json.loads(files[PEFT_CONFIG_FILE])
    except (KeyError, ValueError) as e:
        raise AdapterError(f"{where}/{PEFT_CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}/{PEFT_CONFIG_FILE}: peft_type must be LORA, got {config.get('peft_type')!r}")
    for key, plain in _PEFT_PLAIN.items():
        if config.get(key, plain) not in (plain, None, {}):
            raise AdapterError(f"{where}/{PEFT_CONFIG_FILE}: {key} = {config[key]!r} is not supported (serving "
                               f"loads plain LoRA adapters: {key} = {plain!r})")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{where}/{PEFT_CONFIG_FILE}: r must be an integer >= 1 and lora_alpha a number, "
                           f"got r = {rank!r}, lora_alpha = {alpha!r}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    meta: dict[str, str] = {}
    if arrays is not None:
        tensors = dict(arrays)
        meta = json.loads(files.get(META_FILE, b"{}"))
    else:
        tensors = {}
        for file in (PEFT_WEIGHTS_FILE, OWN_WEIGHTS_FILE):
            path = Path(source) / file
            if not path.is_file():
                if file == PEFT_WEIGHTS_FILE:
                    raise AdapterError(f"{where} has no {PEFT_WEIGHTS_FILE}")
                continue
            try:
                with safe_open(str(path), "pt") as f:
                    meta = {**(f.metadata() or {}), **meta}
                    for name in f.keys():
                        tensors[_our_name(name, path) if file == PEFT_WEIGHTS_FILE else name] = f.get_tensor(name)
            except AdapterError:
                raise
            except Exception as e:  # noqa: BLE001 - a corrupt or truncated file, whatever safetensors says
                raise AdapterError(f"{path} is not a readable safetensors file: {e}") from None
    for name, t in tensors.items():
        if not is_lora_name(name) or not name.endswith((".A", ".B")):
            raise AdapterError(f"{where}: {name!r} is not an adapter tensor")
        if name.endswith(".A") and t.shape[-2] != rank:
            raise AdapterError(f"{where}: {name} has rank {t.shape[-2]} but {PEFT_CONFIG_FILE} says r = {rank}")
    if not tensors:
        raise AdapterError(f"{where}: the adapter has no tensors")
    return Adapters(tensors, rank, scale, meta.get("base_fingerprint") or None, meta.get("base_model", ""))


def _our_name(peft_name: str, path: Path) -> str:
    m = _PEFT_NAME.match(peft_name)
    if m is None or not _peft_expresses(m.group(1), m.group(2)):
        raise AdapterError(f"{path}: tensor {peft_name!r} adapts a module serving has no adapters for; PEFT adapters "
                           f"load on the attention projections ({', '.join(ATTENTION_TARGETS)}); expert and MLP "
                           f"adapters go in {OWN_WEIGHTS_FILE}")
    return f"{m.group(1)}.lora.{m.group(2)}.{m.group(3)}"
