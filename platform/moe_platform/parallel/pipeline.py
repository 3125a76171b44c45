"""Pipeline stages: the single-device model cut into a sequence of layers for DeepSpeed's PipelineModule (1F1B).

The stage wrappers hold the model's own submodules, so parameters keep their identity (and their full names, found
through `param_names`) whatever stage they land on. Only activations (B, T, D) travel between stages, with the
packed-document ids (B, T) beside them when a batch packs documents ((tokens, segments) in, (hidden, segments)
between stages); each MoE layer attaches its balancing loss to its output, so no extra tensors need to cross stage
boundaries.

Dense layers (DeepSeek's and GLM's first layers) may fill a stage on their own. DeepSpeed's ZeRO computes the gradient
norm group by group, each group's norm reduced over the pipeline stages, so every stage needs the same optimizer
groups: under expert parallelism a stage without experts carries one zero placeholder in the expert group
(`ExpertPlaceholder`). It is never saved, stays zero, and adds exactly zero to its stage's output.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_platform.model.attention import document_layout
from moe_platform.model.transformer import DecoderLayer, MoETransformer, materialize
from moe_platform.parallel.expert_parallel import mark_expert_param
from moe_platform.parallel.layout import ProcessGroups
from moe_platform.parallel.placement import is_expert_tensor


class ExpertPlaceholder(nn.Module):
    """One zero expert parameter for a pipeline stage that holds no experts (see the module docstring); it stands
    for the model's `num_experts` experts where DeepSpeed looks for an MoE layer."""

    def __init__(self, num_experts: int, ep_size: int, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.zeros(1, 1, device=device))
        mark_expert_param(self.weight, ep_size)


class EmbeddingStage(nn.Module):
    def __init__(self, model: MoETransformer):
        super().__init__()
        self.embed_tokens = model.model.embed_tokens

    def forward(self, inputs):
        if isinstance(inputs, tuple):  # (tokens, segments)
            return self.embed_tokens(inputs[0]), inputs[1]
        return self.embed_tokens(inputs)


class DecoderStage(nn.Module):
    def __init__(self, layer: DecoderLayer, rotary: nn.Module):
        super().__init__()
        self.layer = layer
        self.rotary = rotary

    def forward(self, inputs):
        if isinstance(inputs, tuple):  # (hidden, segments): packed documents
            hidden, segments = inputs
            positions, mask = document_layout(segments)
            return self._placeheld(self.layer(hidden, self.rotary(positions), mask=mask)), segments
        bsz, seq, _ = inputs.shape
        positions = torch.arange(seq, device=inputs.device).expand(bsz, -1)
        return self._placeheld(self.layer(inputs, self.rotary(positions)))

    def _placeheld(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden`, plus exactly zero from the expert placeholder when this stage holds one (so that it has a
        gradient, zero, like every parameter of its optimizer group)."""
        placeholder = getattr(self, "expert_placeholder", None)
        return hidden if placeholder is None else hidden + 0.0 * placeholder.weight.sum().to(hidden.dtype)


class HeadStage(nn.Module):
    def __init__(self, model: MoETransformer):
        super().__init__()
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    def forward(self, inputs) -> torch.Tensor:
        hidden = inputs[0] if isinstance(inputs, tuple) else inputs
        return self.lm_head(self.norm(hidden)).float()


def _trains_experts(module: nn.Module) -> bool:
    return any(p.requires_grad and is_expert_tensor(n) for n, p in module.named_parameters())


def pipeline_layers(model: MoETransformer) -> list[nn.Module]:
    rotary = model.model.rotary
    return [EmbeddingStage(model), *(DecoderStage(layer, rotary) for layer in model.model.layers), HeadStage(model)]


def build_pipeline_module(model: MoETransformer, groups: ProcessGroups, loss_fn, materialize_on=None):
    """A DeepSpeed PipelineModule over this model with our layout's (pipe, data, model) rank order.

    `materialize_on` (a device): the model was built on meta; only this stage's layers get memory there (DeepSpeed
    moves the stage's layers to its device as it builds the module), so a stage never holds the others' weights."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if model.args.tie_word_embeddings:
        raise ValueError("model.tie_word_embeddings cannot be combined with pipeline parallelism (parallel.pp > 1)")
    layout = groups.layout
    # Axes ('pipe', 'data', 'model'): model (tp) fastest, then data, then pipe, which is our Layout's rank order.
    topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    # Balance transformer blocks across stages; embedding and head ride on the first and last stage.
    layers = pipeline_layers(model)
    from moe_platform import deepspeed_compat

    parts = deepspeed_compat.partition_balanced([int(isinstance(x, DecoderStage)) for x in layers], layout.pp)
    local = layers[parts[groups.pp_rank]:parts[groups.pp_rank + 1]]
    if materialize_on is not None:
        for layer in local:
            materialize(layer, materialize_on)
    if layout.ep_enabled and _trains_experts(model) and not any(_trains_experts(x) for x in local):
        stage = next(x for x in local if isinstance(x, DecoderStage))
        stage.expert_placeholder = ExpertPlaceholder(model.args.num_experts, layout.ep, materialize_on)
    module = PipelineModule(layers=layers, topology=topology, loss_fn=loss_fn, partition_method="type:DecoderStage")
    if list(module.parts) != list(parts):
        raise RuntimeError(f"DeepSpeed split the pipeline as {module.parts}, expected {parts}")
    return module
