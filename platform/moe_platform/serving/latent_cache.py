"""Multi-head latent attention's compressed KV cache (DeepSeek-V2/V3, Kimi-K2, Moonlight).

Per token and layer it stores what MLA's keys and values are made from: the normalised latent c (kv_lora_rank values)
and the rotated key part k_pe shared by all heads (qk_rope_head_dim values), not the expanded per-head keys and values
(heads x (qk_nope + qk_rope + v) values): for DeepSeek-V3, 576 values instead of 40,960.

Attention runs on the latent, with kv_b_proj absorbed into both sides, as DeepSeek and vLLM do. A head's score
q_nope . (W_UK c) + q_pe . k_pe is (q_nope W_UK) . c + q_pe . k_pe, so the query moves into latent space once per
token, every head attends the one shared latent row of each key (a single KV head), and the attention-weighted latent
leaves through W_UV. A LoRA adapter on kv_b_proj (B A added to W) adds its low-rank term on the same two sides:
s (q_nope B_K) A to the latent query and s B_V (A o_latent) to the output, per row of its adapter slot.

Blocks, block tables, row grouping by length, and int8/fp8 storage with per-token scales are the paged cache's
(serving/cache.py): the latent is its "key" table and k_pe its "value" table, each one head wide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_platform.model.args import ModelArgs
from moe_platform.model.mla import MLAttention
from moe_platform.serving.cache import PagedKVCache
from moe_platform.serving.quant import dense_weight


class PagedLatentCache(PagedKVCache):
    """The paged cache holding MLA latents: `attend_latent` (called by the model's MLAttention in place of its own
    attention) stores a batch's latents at the bound slots and attends on the latent."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", kv_dtype: str = "auto"):
        if not args.mla:
            raise ValueError("the latent KV cache needs a multi-head latent attention model (model.kv_lora_rank > 0)")
        super().__init__(args, num_blocks, block_size, dtype, device, kv_dtype, widths=(1, args.kv_lora_rank,
                                                                                        args.qk_rope_head_dim))
        self._absorbed: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
        """Cache bytes of one token position over all layers: the latent and k_pe (with int8's and fp8's scales)."""
        elem = {"auto": torch.empty(0, dtype=dtype).element_size(), "int8": 1, "fp8": 1}[kv_dtype]
        per_layer = (args.kv_lora_rank + args.qk_rope_head_dim) * elem + (8 if kv_dtype != "auto" else 0)
        return args.n_layers * per_layer

    def attend(self, layer, q, k, v, scale=None, window=0, sinks=None):
        raise TypeError("the latent KV cache serves multi-head latent attention only (attend_latent)")

    def attend_latent(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor,
                      k_pe: torch.Tensor, attn: MLAttention) -> torch.Tensor:
        """Store the latents c (B, T, r) and rotated k_pe (B, 1, T, rope) at the bound slots, then attend the
        queries q_nope (B, H, T, nope) and rotated q_pe (B, H, T, rope) to each row's latents so far -> the heads'
        value outputs (B, H, T, v)."""
        assert self._write is not None, "bind() must be called before the forward pass"
        self._store(layer, self.k, self.k_scale, c[:, None])
        self._store(layer, self.v, self.v_scale, k_pe)
        w_uk, w_uv = self._weights(layer, attn, q_nope.dtype)
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        lora = _kv_b_adapter(attn)
        if lora is not None:
            q_latent = q_latent + _adapter_query_term(lora, attn, q_nope)
        bsz, heads, seq, _ = q_latent.shape
        # Every head attends the same latent rows: fold the heads into the query rows, (B, H, T, d) -> (B, 1, H*T, d),
        # so each sequence's keys are read once for all of its heads (one matmul of H*T query rows).
        query = torch.cat((q_latent, q_pe), dim=-1).reshape(bsz, 1, heads * seq, -1)
        out = None
        for rows, read, n, kv_len, mask, _ in self._groups:
            latent = self._gather(layer, self.k, self.k_scale, read, n, kv_len, q_nope.dtype)  # (n, 1, S, r)
            pe = self._gather(layer, self.v, self.v_scale, read, n, kv_len, q_nope.dtype)  # (n, 1, S, rope)
            # the mask of each query position, for every head: (n, 1, T, S) -> (n, 1, H*T, S)
            mask = mask[:, :, None].expand(-1, -1, heads, -1, -1).reshape(n, 1, heads * seq, kv_len)
            part = F.scaled_dot_product_attention(query if rows is None else query[rows],
                                                  torch.cat((latent, pe), dim=-1), latent, attn_mask=mask,
                                                  scale=attn.scale).view(n, heads, seq, -1)  # (n, H, T, r)
            if rows is None:
                out = part
                break
            if out is None:
                out = q_latent.new_empty(q_latent.shape)
            out[rows] = part
        values = torch.einsum("bhtr,hvr->bhtv", out, w_uv)
        if lora is not None:
            values = values + _adapter_output_term(lora, attn, out)
        return values

    def _weights(self, layer: int, attn: MLAttention, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK and W_UV of the layer in `dtype`, kept until kv_b_proj's weight changes (a quantized weight is
        dequantized once)."""
        stored = getattr(attn.kv_b_proj, "weight_q", None)  # int4: the packed weight the module keeps
        stored = attn.kv_b_proj.weight if stored is None else stored
        # what identifies the weight's values: the tensor, its memory and (outside inference mode) its in-place edits
        key = (id(stored), stored.data_ptr(), None if stored.is_inference() else stored._version, dtype)
        held = self._absorbed.get(layer)
        if held is None or held[0] != key:
            w_uk, w_uv = attn.absorbed_weights(dense_weight(attn.kv_b_proj, dtype))
            held = self._absorbed[layer] = (key, w_uk.contiguous(), w_uv.contiguous())
        return held[1], held[2]


def _kv_b_adapter(attn: MLAttention):
    """The serving adapter slots on kv_b_proj when a row of this batch uses one of them, else None."""
    lora = getattr(attn, "lora", None)
    module = lora["kv_b_proj"] if lora is not None and "kv_b_proj" in lora else None
    batch = getattr(module, "batch", None)
    if batch is None or not batch.active or module.a_t is None:
        return None
    return module


def _slots(lora, attn: MLAttention, rows: int, width: int):
    """(mask of the (B, T) token rows using it, its scale, A (R, r), B_K (H, nope, R), B_V (H, v, R)) of each
    adapter slot a row of the batch uses."""
    slots = lora.batch.token_slots.view(rows, width).to(lora.a_t.device)  # (B, T)
    nope = attn.qk_nope_head_dim
    for g in slots.unique().tolist():
        if g < 0 or float(lora.scale[g]) == 0.0:
            continue
        b = lora.b_t[g].t().view(-1, nope + attn.v_head_dim, lora.b_t.shape[1])  # (H*(nope+v), R) -> (H, nope+v, R)
        yield slots == g, float(lora.scale[g]), lora.a_t[g].t(), b[:, :nope], b[:, nope:]


def _adapter_query_term(lora, attn: MLAttention, q_nope: torch.Tensor) -> torch.Tensor:
    """s (q_nope B_K) A for each token row of an adapter slot, 0 elsewhere: (B, H, T, r)."""
    term = q_nope.new_zeros(*q_nope.shape[:3], lora.a_t.shape[1])
    for mask, scale, a, b_k, _ in _slots(lora, attn, q_nope.shape[0], q_nope.shape[2]):
        q = q_nope.transpose(1, 2)[mask]  # (n, H, nope)
        part = torch.einsum("nhd,hdk->nhk", q, b_k.to(q.dtype)) @ a.to(q.dtype)  # (n, H, r)
        term.transpose(1, 2)[mask] = scale * part
    return term


def _adapter_output_term(lora, attn: MLAttention, o_latent: torch.Tensor) -> torch.Tensor:
    """s B_V (A o_latent) for each token row of an adapter slot, 0 elsewhere: (B, H, T, v)."""
    term = o_latent.new_zeros(*o_latent.shape[:3], attn.v_head_dim)
    for mask, scale, a, _, b_v in _slots(lora, attn, o_latent.shape[0], o_latent.shape[2]):
        o = o_latent.transpose(1, 2)[mask]  # (n, H, r)
        part = torch.einsum("nhk,hvk->nhv", o @ a.t().to(o.dtype), b_v.to(o.dtype))  # (n, H, v)
        term.transpose(1, 2)[mask] = scale * part
    return term
