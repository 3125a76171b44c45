"""Imported Hugging Face models on CUDA in bf16 and fp16, against the CPU fp32 result: logits, greedy decoding
through the serving engine, and the first fine-tuning step's loss (`init.from_hf`). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from moe_platform.checkpoint.hf import load_hf
from moe_platform.model.transformer import MoETransformer
from tinyrun import HF_ARCHITECTURES, save_tiny_hf_model, tiny_tokenizer

pytestmark = pytest.mark.gpu
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return {arch: save_tiny_hf_model(arch, tmp_path_factory.mktemp(arch), tok)[1] for arch in HF_ARCHITECTURES}


def build(model_dir, device: str, dtype: torch.dtype) -> MoETransformer:
    args, state = load_hf(model_dir)
    model = MoETransformer(args)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("arch", HF_ARCHITECTURES)
def test_logits_on_cuda_match_cpu_fp32(hf_dirs, arch, dtype):
    tokens = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = build(hf_dirs[arch], "cpu", torch.float32)(tokens)
        got = build(hf_dirs[arch], "cuda", DTYPES[dtype])(tokens.cuda()).float().cpu()
    # half precision: compare against the spread of the logits, and the chosen tokens
    scale = want.std()
    assert (got - want).abs().max() <= 0.1 * scale, f"{arch} {dtype}: {(got - want).abs().max()} vs std {scale}"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("arch", HF_ARCHITECTURES)
def test_engine_greedy_on_cuda_matches_cpu(hf_dirs, arch):
    from moe_platform.serving.engine import Engine, SamplingParams

    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = [5, 17, 42, 7, 99, 3, 11]
    cpu = Engine.from_pretrained(hf_dirs[arch], batch_wait_timeout_s=0.0).generate(prompt, greedy)
    model = build(hf_dirs[arch], "cuda", torch.float32)
    with torch.no_grad():
        ids = list(prompt)
        for _ in range(greedy.max_tokens):
            ids.append(int(model(torch.tensor([ids], device="cuda"))[0, -1].argmax()))
    from moe_platform.tokenizer import load_tokenizer

    assert load_tokenizer(hf_dirs[arch]).decode(ids[len(prompt):], skip_special_tokens=True) == cpu


@pytest.mark.parametrize("arch", HF_ARCHITECTURES)
def test_first_fine_tuning_step_in_bf16_matches_cpu_fp32(hf_dirs, arch, tiny_config):
    from moe_platform.train.trainer import Trainer

    losses = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "bf16")):
        cfg = tiny_config(**{"init.from_hf": str(hf_dirs[arch]), "train.steps": 1, "train.device": device,
                             "train.precision": precision, "train.deterministic": "false",
                             "run.name": f"{arch}-{device}", "checkpoint.interval": 0})
        trainer = Trainer(cfg, progress=False)
        trainer.setup()
        losses[device] = trainer.train_step()["loss"]
    assert abs(losses["cuda"] - losses["cpu"]) <= 2e-2 * losses["cpu"], losses
