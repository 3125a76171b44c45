"""Decoder-only MoE transformer. Parameter names and shapes match Hugging Face's Mixtral (transformers >= 5)."""

from __future__ import annotations

import torch
from torch import nn

from moe_platform.model.args import ModelArgs
from moe_platform.model.attention import Attention, RMSNorm, RotaryEmbedding
from moe_platform.model.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MoE(args, layer_idx)

    def forward(self, x: torch.Tensor, rope, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.rotary = RotaryEmbedding(args.resolved_head_dim, args.rope_theta)


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
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). With a bound KVCache, positions (B, T) say where each token sits.

        logits_at (B,) computes the vocabulary head only at that index of each row -> (B, vocab), which is all a
        prefill needs and saves a (B, T, vocab) matmul.
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        h = self.model.embed_tokens(tokens)
        rope = self.model.rotary(positions)
        for layer in self.model.layers:
            h = layer(h, rope, cache)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]  # (B, T, dim) -> (B, dim)
        return self.lm_head(self.model.norm(h)).float()


def build_model(args: ModelArgs, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> MoETransformer:
    """A freshly initialised model; with `seed`, initialisation does not depend on (or disturb) the global RNG."""
    if seed is None:
        model = MoETransformer(args)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MoETransformer(args)
    return model.to(device=device, dtype=dtype)
