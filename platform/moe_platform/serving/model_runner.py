"""The device-aware model runner: turns a step's prefill chunks or decode batch into one forward pass on the engine's
device and returns the logits on the CPU, where sampling runs.

Inputs are built on the CPU and moved once per forward. The runner owns the KV tensors (`cache`: slots or blocks):
it applies the scheduler's queued slot moves, then binds the cache to the batch's slots or block tables. The LoRA
adapter of every row is set on the model's adapter slots. Also counts the tokens every routed expert
received (the expert-load statistic) and scores text for quality probes.
"""

from __future__ import annotations

import torch

from moe_platform.model.transformer import MoETransformer
from moe_platform.serving.adapters import AdapterBank
from moe_platform.serving.cache import PagedKVCache, ServingKVCache
from moe_platform.serving.scheduler import PrefillGroup, Scheduler, SlotMove
from moe_platform.serving.scheduler import SequenceState as Seq


class ModelRunner:
    def __init__(self, model: MoETransformer, pad_token_id: int, adapters: AdapterBank | None = None):
        self.model = model.eval()
        self.args = model.args
        self.pad_token_id = pad_token_id
        self.adapters = adapters
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self._moe_layers = model.moe_layers()
        # (MoE layers, E): tokens each routed expert received (dense layers route nothing)
        self.expert_load = torch.zeros(len(self._moe_layers), self.args.num_experts, dtype=torch.long)
        self.forwards = {"prefill": 0, "decode": 0}
        self.prompt_logprob_tokens = 0  # prompt positions scored (logits computed) for requests that asked
        self.cache: ServingKVCache | PagedKVCache | None = None  # the KV tensors (engine.build_scheduler)

    def _bind(self, seqs: list[Seq], positions: torch.Tensor, scheduler: Scheduler):
        """The KV cache for one forward over `seqs`, after the scheduler's pending slot moves."""
        cache = self.cache
        if isinstance(cache, PagedKVCache):
            return cache.bind([s.block_table for s in seqs], positions, self.dtype, [s.window_table for s in seqs])
        for op in scheduler.take_kv_ops():
            if isinstance(op, SlotMove):
                cache.move_slot(op.src, op.dst, op.length)
            else:
                cache.swap_slots(op.a, op.b, op.length_a, op.length_b)
        return cache.bind_rows([s.slot for s in seqs], positions, self.dtype)

    def prefill(self, group: PrefillGroup, scheduler: Scheduler) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One right-padded forward over a group's chunks -> (rows, vocab) float32 logits at each chunk's last
        token, and (M, vocab) at the M positions whose logits score a prompt (`prompt_logprob_positions`, chunk by
        chunk; None when no chunk asks), on the CPU."""
        chunks = group.chunks
        width = group.padded_len
        tokens = torch.full((len(chunks), width), self.pad_token_id, dtype=torch.long)
        positions = torch.empty((len(chunks), width), dtype=torch.long)
        for i, c in enumerate(chunks):
            tokens[i, : c.length] = torch.tensor(c.seq.all_ids[c.start:c.start + c.length])
            positions[i] = torch.arange(c.start, c.start + width)
        at = [c.length - 1 for c in chunks]
        rows = list(range(len(chunks)))
        for i, c in enumerate(chunks):  # the prompt-scoring positions, only of the requests that ask
            rows += [i] * len(c.prompt_logprob_positions)
            at += [p - c.start for p in c.prompt_logprob_positions]
        scored = len(at) - len(chunks)
        if self.adapters is not None:
            self.adapters.batch.set([c.seq.adapter_slot for c in chunks], width)
        cache = self._bind([c.seq for c in chunks], positions, scheduler)
        where = torch.tensor(at, device=self.device)
        if scored:
            where = (torch.tensor(rows, device=self.device), where)
        logits = self.model(tokens.to(self.device), positions.to(self.device), cache, logits_at=where).float().cpu()
        self._count_expert_load()
        self.forwards["prefill"] += 1
        self.prompt_logprob_tokens += scored
        return logits[: len(chunks)], logits[len(chunks):] if scored else None

    def decode(self, batch: list[Seq], scheduler: Scheduler) -> torch.Tensor:
        """One forward of every decoding sequence's last token -> (D, vocab) float32 logits on the CPU."""
        tokens = torch.tensor([[s.output_ids[-1]] for s in batch])  # (D, 1)
        positions = torch.tensor([[s.num_computed] for s in batch])  # the last token's position
        if self.adapters is not None:
            self.adapters.batch.set([s.adapter_slot for s in batch], 1)
        cache = self._bind(batch, positions, scheduler)
        logits = self.model(tokens.to(self.device), positions.to(self.device), cache)[:, -1]
        self._count_expert_load()
        self.forwards["decode"] += 1
        return logits.float().cpu()

    def _count_expert_load(self) -> None:
        for i, moe in enumerate(self._moe_layers):
            self.expert_load[i] += moe.last_tokens_per_expert.to("cpu", self.expert_load.dtype)

    def loss(self, ids: list[int]) -> float:
        """Summed next-token loss (nats) of the base model on one token sequence."""
        tokens = torch.tensor([ids], device=self.device)
        if self.adapters is not None:
            self.adapters.batch.set([-1], len(ids) - 1)  # the base model
        logits = self.model(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits[0].float(), tokens[0, 1:], reduction="sum").item()
