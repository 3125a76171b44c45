"""Decoder-only MoE transformer. Parameter names and shapes match Hugging Face's Mixtral (transformers >= 5)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_platform.model.args import ModelArgs
from moe_platform.model.attention import Attention, RMSNorm, document_layout
from moe_platform.model.mla import MLAttention
from moe_platform.model.moe import MoE, SwiGLU
from moe_platform.model.rope import RotaryEmbedding

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = MLAttention(args, layer_idx) if args.mla else Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        # DeepSeek and GLM keep dense layers before their MoE layers (Qwen-MoE may put them anywhere)
        self.mlp = (SwiGLU(args.dim, args.resolved_dense_intermediate_size) if layer_idx in args.dense_layer_ids
                    else MoE(args, layer_idx))
        self.checkpointing = "none"  # see MoETransformer.set_activation_checkpointing

    def forward(self, x: torch.Tensor, rope, cache=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.checkpointing == "full" and torch.is_grad_enabled():
            kwargs = {"context_fn": self.mlp.recomputation_contexts} if isinstance(self.mlp, MoE) else {}
            return checkpoint(self._forward, x, rope, cache, mask, use_reentrant=False, **kwargs)
        return self._forward(x, rope, cache, mask)

    def _forward(self, x: torch.Tensor, rope, cache, mask) -> torch.Tensor:
        selective = self.checkpointing == "selective" and torch.is_grad_enabled()
        if selective:
            attn = checkpoint(self._attention, x, rope, cache, mask, use_reentrant=False)
        else:
            attn = self._attention(x, rope, cache, mask)
        x = x + attn
        h = self.post_attention_layernorm(x)
        if selective and not isinstance(self.mlp, MoE):  # a dense MLP is recomputed like the experts
            return x + checkpoint(self.mlp, h, use_reentrant=False)
        return x + self.mlp(h)

    def _attention(self, x: torch.Tensor, rope, cache, mask) -> torch.Tensor:
        return self.self_attn(self.input_layernorm(x), rope, cache, mask)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.rotary = RotaryEmbedding(args)


class MoETransformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (> 0) before building the model")
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.args.init_std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith((".bias", "_bias")):
                p.zero_()
            else:
                p.normal_(0.0, std)

    def set_activation_checkpointing(self, mode: str) -> None:
        """Trade compute for activation memory in training: "none" keeps every activation for backward; "full"
        keeps only each decoder layer's input and recomputes the layer in backward; "selective" recomputes attention
        and the expert MLPs (dispatch included) but keeps the router's results. Losses and gradients are bitwise
        those of "none" (the recomputation runs the same kernels on the same inputs)."""
        if mode not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, "
                             f"got {mode!r}")
        for layer in self.model.layers:
            layer.checkpointing = mode
            if isinstance(layer.mlp, MoE):
                layer.mlp.checkpoint_experts = mode == "selective"

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                logits_at: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). With a bound KVCache, positions (B, T) say where each token sits.

        logits_at (B,) computes the vocabulary head only at that index of each row -> (B, vocab), which is all a
        prefill needs and saves a (B, T, vocab) matmul; a pair (rows, indices) of (N,) tensors computes it at those N
        places -> (N, vocab). segments (B, T) marks packed documents (training): each attends only within itself,
        with positions restarting at its start (`document_layout`).
        """
        mask = None
        if segments is not None:
            positions, mask = document_layout(segments)
        elif positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        h = self.model.embed_tokens(tokens)
        rope = self.model.rotary(positions)
        for layer in self.model.layers:
            h = layer(h, rope, cache, mask)
        if logits_at is not None:
            rows, at = logits_at if isinstance(logits_at, tuple) else (torch.arange(h.shape[0], device=h.device),
                                                                       logits_at)
            h = h[rows, at]  # (B, T, dim) -> (N, dim)
        return self.lm_head(self.model.norm(h)).float()


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Give a module built on the meta device (no memory, see `build_model`) uninitialised storage on `device`, and
    compute its non-persistent buffers; its weights are then loaded (a rank loads only its own share).

    The parameters become new objects; what parallelisation attached to the meta ones (attributes such as
    `tensor_model_parallel` or the expert markers, gradient hooks) moves over to them."""
    before = dict(module.named_parameters())
    module.to_empty(device=device)
    for name, p in module.named_parameters():
        old = before[name]
        p.__dict__.update(old.__dict__)
        if old._backward_hooks:
            p._backward_hooks = old._backward_hooks
    for m in module.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset_buffers()
        elif isinstance(m, MoE):
            m.reset_stats()


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.state_dict().values())


def build_model(args: ModelArgs, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> MoETransformer:
    """A freshly initialised model; with `seed`, initialisation does not depend on (or disturb) the global RNG.
    On the "meta" device it takes no memory and runs no initialisation (`materialize` it once it is sharded)."""
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return MoETransformer(args).to(dtype=dtype)
    if seed is None:
        model = MoETransformer(args)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MoETransformer(args)
    return model.to(device=device, dtype=dtype)
