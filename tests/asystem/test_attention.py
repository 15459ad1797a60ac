"""asystem/attention.py: grouped-query attention with a mask gives what transformers' "sdpa" gives."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from asystem import attention
from asystem.models import tiny_llama


def test_grouped_attention_with_a_padding_mask_equals_transformers_sdpa():
    path = tiny_llama()  # 4 query heads over 2 key/value heads
    name = attention.implementation(torch.device("cpu"))
    assert name == attention.NAME and attention.implementation(torch.device("cuda")) == "sdpa"
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=name).eval()
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    assert ours.config.num_key_value_heads < ours.config.num_attention_heads
    # Two left-padded rows, then one decode step on the cache: the engine's two kinds of pass.
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        assert torch.allclose(a.logits[0, 3:], b.logits[0, 3:], atol=1e-5)
        assert torch.allclose(a.logits[1], b.logits[1], atol=1e-5)
        step = dict(input_ids=torch.tensor([[20], [21]]), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                    position_ids=torch.tensor([[4], [7]]), use_cache=True)
        a2 = ours(**step, past_key_values=a.past_key_values)
        b2 = theirs(**step, past_key_values=b.past_key_values)
    assert torch.allclose(a2.logits, b2.logits, atol=1e-5)
    # Unpadded, where transformers drops the mask: causal attention by flag.
    with torch.no_grad():
        full = ours(input_ids=ids[1:]).logits
    assert torch.allclose(full, theirs(input_ids=ids[1:]).logits, atol=1e-5)
