"""Multi-LoRA adapter math on CUDA (torch._grouped_mm in bf16, one matmul pair per adapter in fp32) against the CPU
fp32 result, for dense projections and for the routed experts. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from moe_platform.model.moe import GroupedExperts
from moe_platform.serving.multi_lora import AdapterBatch, MultiExpertLoRA, Segments, lora_delta

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_adapter_terms_on_cuda_match_cpu_fp32(dtype, tol):
    g = torch.Generator().manual_seed(0)
    a_t, b_t = torch.randn(8, 64, 16, generator=g) * 0.1, torch.randn(8, 16, 128, generator=g) * 0.1
    scale, x = torch.rand(8, generator=g), torch.randn(96, 64, generator=g)
    groups = torch.randint(-1, 8, (96,), generator=g)
    want = lora_delta(x, a_t, b_t, scale, Segments(groups, 8))
    got = lora_delta(x.cuda().to(dtype), a_t.cuda().to(dtype), b_t.cuda().to(dtype), scale.cuda(),
                     Segments(groups.cuda(), 8))
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol)


def test_expert_adapters_on_cuda_match_cpu_fp32():
    torch.manual_seed(0)
    experts, batch = GroupedExperts(4, 64, 128), AdapterBatch(2)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    experts.lora = MultiExpertLoRA(batch, 2, 4, 64, 128, 16, torch.float32)
    shapes = {"gate_up_proj.A": (4, 8, 64), "gate_up_proj.B": (4, 256, 8), "down_proj.A": (4, 8, 128),
              "down_proj.B": (4, 64, 8)}
    for slot in range(2):
        experts.lora.write(slot, {name: torch.randn(shape) * 0.1 for name, shape in shapes.items()}, 2.0)
    x = torch.randn(12, 64)
    counts = torch.tensor([6, 6, 6, 6])  # 12 tokens x top-2, grouped by expert
    token_index = torch.cat([torch.randperm(12)[:6] for _ in range(4)])
    scores = torch.rand(24)
    batch.set([0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1, -1], 1)
    with torch.inference_mode():
        want = experts(x, counts, token_index, scores)
        experts.cuda()
        for module in (experts.lora.gate_up_proj, experts.lora.down_proj):
            module.a_t, module.b_t = module.a_t.cuda(), module.b_t.cuda()
        got = experts(x.cuda(), counts.cuda(), token_index.cuda(), scores.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
