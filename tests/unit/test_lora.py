"""LoRA: adapters on attention, routed experts and shared experts start as the base model exactly, are all that
trains (the base holds no optimizer state), resume bit for bit, merge into a plain model that computes the same, and
export in PEFT's format, which peft loads onto the transformers model with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from moe_platform.checkpoint.export import export_checkpoint
from moe_platform.checkpoint.hf import load_hf
from moe_platform.model.lora import is_lora_name
from moe_platform.model.transformer import MoETransformer
from moe_platform.train.trainer import Trainer

ALL = "q_proj,k_proj,v_proj,o_proj,experts,shared_experts"
COMMON = {"lora.enabled": "true", "lora.targets": ALL, "lora.rank": 4, "model.n_shared_experts": 1,
          "train.steps": 6, "train.warmup": 1, "train.lr": 1e-2, "checkpoint.interval": 3,
          "checkpoint.async_save": "false"}


def trainer(cfg) -> Trainer:
    t = Trainer(cfg, progress=False)
    t.setup()
    return t


def state(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def test_step_zero_is_the_base_model_and_only_adapters_train(tiny_config):
    base = trainer(tiny_config(**{**COMMON, "lora.enabled": "false", "run.name": "base"}))
    lora = trainer(tiny_config(**{**COMMON, "run.name": "lora"}))
    before = state(lora)
    assert {k: v for k, v in before.items() if not is_lora_name(k)}.keys() == state(base).keys()
    assert all(torch.equal(v, state(base)[k]) for k, v in before.items() if not is_lora_name(k))
    assert base.train_step()["loss"] == lora.train_step()["loss"], "B = 0: the adapted model is the base model"
    after = state(lora)
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed and all(is_lora_name(k) for k in changed), sorted(k for k in changed if not is_lora_name(k))
    for where in (".self_attn.lora.", ".mlp.experts.lora.", ".shared_experts.lora."):
        assert any(where in k for k in changed), f"no {where} adapter trained"
    trained = {p for p in lora.model.parameters() if p.requires_grad}
    assert set(lora.backend.optimizer.state) == trained
    assert all(is_lora_name(n) for n, p in lora.model.named_parameters() if p.requires_grad)


def test_lora_runs_resume_bit_for_bit(tiny_config):
    straight = trainer(tiny_config(**{**COMMON, "run.name": "straight"}))
    straight.fit()
    first = trainer(tiny_config(**{**COMMON, "run.name": "resumed"}))
    first.fit(stop_after=3)
    second = trainer(tiny_config(**{**COMMON, "run.name": "resumed"}))
    assert second.resumed_from == 3
    second.fit()
    a, b = state(straight), state(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in straight.metrics.read()] == [r["loss"] for r in second.metrics.read()]


def test_the_merged_export_computes_what_the_adapted_model_does(tiny_config, tmp_path):
    from moe_platform.train.trainer import TrainerHooks

    published = []
    t = Trainer(tiny_config(**{**COMMON, "run.name": "merge", "checkpoint.export": "true"}), progress=False,
                hooks=TrainerHooks(on_export=lambda d, step: published.append((d, step))))
    t.setup()
    result = t.fit()
    assert published == [(t.run_dir / "adapter", 6)], "a LoRA run publishes its adapter (checkpoint.publish_to)"
    tokens = torch.randint(0, t.model_args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    t.model.eval()
    with torch.no_grad():
        adapted = t.model(tokens)
        args, merged_state = load_hf(result.export_dir)  # the run's export is the merged model
        merged = MoETransformer(args)
        merged.load_state_dict(merged_state, strict=True)
        torch.testing.assert_close(merged.eval()(tokens), adapted, rtol=1e-5, atol=1e-5)
    again = export_checkpoint(t.run_dir, tmp_path / "merged", merge=True)
    assert not any(is_lora_name(k) for k in load_hf(again)[1])
    adapter = t.run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (adapter / "moe_platform_adapters.safetensors").is_file(), "the expert adapters PEFT cannot express"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from tinyrun import save_tiny_hf_model, tiny_tokenizer

    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return save_tiny_hf_model("Qwen3MoeForCausalLM", tmp_path_factory.mktemp("qwen3"), tok)[1]


def test_peft_loads_the_attention_adapters_with_our_logits(tiny_config, qwen3):
    import transformers
    from peft import PeftModel

    cfg = tiny_config(**{**COMMON, "lora.targets": "q_proj,k_proj,v_proj,o_proj", "init.from_hf": str(qwen3),
                         "run.name": "peft", "checkpoint.export": "true"})
    t = trainer(cfg)
    t.fit()
    config = json.loads((t.run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(qwen3)
    assert not (t.run_dir / "adapter" / "moe_platform_adapters.safetensors").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, t.run_dir / "adapter").eval()
    tokens = torch.randint(0, t.model_args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    t.model.eval()
    with torch.no_grad():
        ours = t.model(tokens)
        theirs = peft_model(tokens).logits.float()
        with peft_model.disable_adapter():
            plain = peft_model(tokens).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (plain - theirs).abs().max() > 1e-3, "the adapters changed nothing"


def test_the_vllm_layout_adds_the_same_update_per_expert_under_the_checkpoints_names(tiny_config, qwen3):
    from safetensors.torch import load_file

    cfg = tiny_config(**{**COMMON, "lora.targets": "q_proj,experts", "init.from_hf": str(qwen3),
                         "model.n_shared_experts": 0, "run.name": "vllm", "checkpoint.export": "true"})
    t = trainer(cfg)
    t.fit()
    vllm = t.run_dir / "adapter" / "vllm"
    config = json.loads((vllm / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "q_proj", "up_proj"]
    lora = load_file(vllm / "adapter_model.safetensors")
    merged = load_file(t.run_dir / "export" / "model.safetensors")  # the checkpoint's own per-expert names
    _, base = load_hf(qwen3)
    scale = config["lora_alpha"] / config["r"]
    inter = t.model_args.intermediate_size
    for layer in range(t.model_args.n_layers):
        for e in range(t.model_args.num_experts):
            for proj, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, 2 * inter))):
                key = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                delta = lora[f"base_model.model.{key}.lora_B.weight"] @ lora[f"base_model.model.{key}.lora_A.weight"]
                want = base[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e, rows] + scale * delta
                torch.testing.assert_close(merged[f"{key}.weight"], want, rtol=1e-5, atol=1e-6)
                assert delta.abs().max() > 0
            key = f"model.layers.{layer}.mlp.experts.{e}.down_proj"
            delta = lora[f"base_model.model.{key}.lora_B.weight"] @ lora[f"base_model.model.{key}.lora_A.weight"]
            want = base[f"model.layers.{layer}.mlp.experts.down_proj"][e] + scale * delta
            torch.testing.assert_close(merged[f"{key}.weight"], want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def grouped_models(tmp_path_factory):
    from tinyrun import GROUPED_ARCHITECTURES, save_tiny_hf_model, tiny_tokenizer

    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return {a: save_tiny_hf_model(a, tmp_path_factory.mktemp(a), tok)[1]
            for a in (*GROUPED_ARCHITECTURES, "GptOssForCausalLM")}


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Glm4MoeForCausalLM",
                                  "GptOssForCausalLM"])
def test_peft_loads_latent_attention_and_dense_mlp_adapters_with_our_logits(tiny_config, grouped_models, arch):
    """`attention` adapts every attention projection the model has: latent attention's q_a/q_b (DeepSeek-V3) or
    q_proj (V2), kv_a_proj_with_mqa, kv_b_proj and o_proj, GLM's and gpt-oss's q/k/v/o (gpt-oss's experts, with their
    biases and clamped activation, take stacked adapters too). PEFT loads them onto the transformers model
    with our logits; the dense first layer's MLP adapters (`dense_mlp`) and the routed experts' go beside them (PEFT
    would take gate/up/down_proj of an MoE model for its fused experts), and the merged export folds them all in."""
    import transformers
    from peft import PeftModel

    model_dir = grouped_models[arch]
    targets = "attention,experts" if arch == "GptOssForCausalLM" else "attention,dense_mlp,experts"  # no dense layer
    cfg = tiny_config(**{**COMMON, "lora.targets": targets, "init.from_hf": str(model_dir),
                         "run.name": f"peft-{arch}", "checkpoint.export": "true", "model.n_shared_experts": 0})
    t = trainer(cfg)
    t.fit()
    config = json.loads((t.run_dir / "adapter" / "adapter_config.json").read_text())
    want = {"DeepseekV3ForCausalLM": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
            "DeepseekV2ForCausalLM": {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
            "Glm4MoeForCausalLM": {"q_proj", "k_proj", "v_proj", "o_proj"},
            "GptOssForCausalLM": {"q_proj", "k_proj", "v_proj", "o_proj"}}[arch]
    assert {m.rsplit(".", 1)[1] for m in config["target_modules"]} == want
    _, base_state = load_hf(model_dir)
    assert all(torch.equal(t.model.state_dict()[k], v) for k, v in base_state.items() if k.endswith("expert_bias")), \
        "LoRA freezes the base, its routing correction bias included"
    from safetensors.torch import load_file

    own = load_file(t.run_dir / "adapter" / "moe_platform_adapters.safetensors")
    layers = {"model.layers.0.mlp", "model.layers.1.mlp.experts"} if arch != "GptOssForCausalLM" else {
        f"model.layers.{i}.mlp.experts" for i in range(4)}
    assert {k.rsplit(".lora.", 1)[0] for k in own} == layers
    t.model.eval()
    tokens = torch.randint(0, t.model_args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(t.run_dir / "export", dtype=torch.float32)
        # folding the adapters into the weights rounds differently: within 1e-4
        torch.testing.assert_close(merged.eval()(tokens).logits.float(), t.model(tokens), rtol=1e-4, atol=1e-4)
        for name, p in t.model.named_parameters():  # ours with only the adapters PEFT has a module for
            if ".mlp." in name and ".lora." in name and name.endswith(".B"):
                p.zero_()
        ours = t.model(tokens)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, t.run_dir / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(tokens).logits.float()
        with peft_model.disable_adapter():
            plain = peft_model(tokens).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (plain - theirs).abs().max() > 1e-3, "the adapters changed nothing"


def test_targets_a_model_does_not_have_are_refused(tiny_config, grouped_models):
    cfg = tiny_config(**{**COMMON, "lora.targets": "q_proj,k_proj,v_proj", "run.name": "bad-targets",
                         "init.from_hf": str(grouped_models["DeepseekV3ForCausalLM"]), "model.n_shared_experts": 0})
    with pytest.raises(ValueError, match=r"lora.targets: this model has no q_proj, k_proj, v_proj to adapt; its "
                                         r"targets are .*kv_b_proj"):
        trainer(cfg)
