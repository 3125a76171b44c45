"""Exporting a LoRA run's adapters (model/lora.py).

`<dir>/adapter_config.json` + `<dir>/adapter_model.safetensors` is PEFT's format for the adapters PEFT can express
on the transformers model, the attention projections: `peft.PeftModel.from_pretrained(base, dir)` loads them. The
adapters PEFT has no module for, the routed experts' stacked pairs and the shared experts', go beside them in
`<dir>/moe_platform_adapters.safetensors` under our own names (`model.layers.L.mlp.experts.lora.gate_up_proj.A`
(E, r, D) and `.B` (E, 2I, r), `...down_proj.A` (E, r, I) and `.B` (E, D, r), `...shared_experts.lora.
{gate,up,down}_proj.{A,B}`), with the scale alpha / r of adapter_config.json. `merge_adapters` folds all of them into
a plain model instead (`moe-platform export --merge`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_platform.model.lora import ATTENTION_TARGETS, is_lora_name

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
OWN_WEIGHTS_FILE = "moe_platform_adapters.safetensors"


def export_adapters(state: dict[str, torch.Tensor], lora: dict, out_dir: str | Path, base_model: str = "") -> Path:
    """Write the adapters of `state` (our names) to `out_dir`; `lora` is the run's [lora] section."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft, own, modules = {}, {}, []
    for name, t in state.items():
        if not is_lora_name(name):
            continue
        prefix, rest = name.split(".lora.")
        target, factor = rest.rsplit(".", 1)
        if prefix.endswith(".self_attn") and target in ATTENTION_TARGETS:
            module = f"{prefix}.{target}"
            peft[f"base_model.model.{module}.lora_{factor}.weight"] = t.detach().contiguous()
            if module not in modules:
                modules.append(module)
        else:
            own[name] = t.detach().contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"], "bias": "none",
        "target_modules": modules, "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
    }
    (out / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(peft, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    if own:
        scale = str(lora["alpha"] / lora["rank"])
        save_file(own, str(out / OWN_WEIGHTS_FILE), metadata={"format": "pt", "scale": scale})
    return out
