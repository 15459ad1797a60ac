"""Grouped-query attention that keeps its key/value heads grouped when there is a mask.

transformers' "sdpa" attention, given an attention mask (a padded batch always has one),
first copies every key/value head once per query head it serves, then calls torch's
`scaled_dot_product_attention` on the copies. On a CPU that costs about 12x the grouped
call: SmolLM2's shape (9 query heads over 3 key/value heads), 32 rows of 90 positions,
measured 7.9 ms against 0.62 ms per layer. `implementation(device)` names an attention that
passes the mask together with `enable_gqa=True` instead; the results are the same.

It is used on CPUs. On CUDA transformers' own "sdpa" stands: there torch's fused kernels
do not take a mask together with grouped heads and fall back to a slower one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "asystem_gqa_sdpa"


def implementation(device: torch.device) -> str:
    """The `attn_implementation` to load a transformers model with on `device`."""
    if device.type != "cpu":
        return "sdpa"
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as "sdpa"
    return NAME


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **_) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [batch, heads, q, dim], key and value
    [batch, kv_heads, kv, dim]; returns [batch, q, heads, dim]."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As transformers' "sdpa": causal by flag only for a maskless multi-token query, where
    # the keys are exactly the query's positions (no cache before them).
    is_causal = bool(is_causal and attention_mask is None and query.shape[2] > 1)
    if is_causal and key.shape[2] > query.shape[2]:
        raise ValueError("asystem attention: a causal query without a mask must not follow a cache")
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=is_causal,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None
