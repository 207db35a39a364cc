"""Key-value prefixes injected into a frozen tower's self-attention for the length of one forward (DIKI's attention,
docs/methods/diki.md, "Forward with a slot injected").

Two kinds of block take a prefix:

- open_clip's residual attention blocks (both towers of an open_clip CLIP): the block's ``nn.MultiheadAttention``
  is stood in for by one that computes the block's own attention plus the prefix's, through the block's own
  projections;
- Hugging Face encoder layers of the BERT family (open_clip's ``HFTextEncoder``, e.g. the demo model's MiniLM text
  tower): the layer's self-attention returns the heads before the out-projection (the next module applies W_o),
  so the stand-in adds the prefix's heads to the layer's own output, which the out-projection then takes, the same
  formula.

The backbone's modules are put back after the forward, so its weights and state dict never hold a prefix.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from components.methods.base import MethodError


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, D] -> [B, heads, L, D / heads]."""
    return t.reshape(t.shape[0], t.shape[1], heads, t.shape[2] // heads).transpose(1, 2)


def _prefix_heads(q: torch.Tensor, prefix: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """w · softmax(q p_kᵀ/√h) p_v per head, for queries ``q`` [B, heads, L, h] and a prefix [2, P, D] (unmasked)."""
    b, heads = q.shape[:2]
    keys, values = (_heads(p.to(q.dtype).unsqueeze(0).expand(b, -1, -1), heads) for p in prefix)
    extra = F.scaled_dot_product_attention(q, keys, values)
    if weight is not None:
        extra = extra * weight.to(extra.dtype).reshape(-1, 1, 1, 1)
    return extra


def prefix_attention(
    attn: torch.nn.MultiheadAttention,
    x: torch.Tensor,
    prefix: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention of ``x`` through ``attn``'s projections, plus the weighted attention over a prefix:

        out = W_o [ softmax(q kᵀ/√h + mask) v + w · softmax(q p_kᵀ/√h) p_v ]  (per head; no mask on the prefix)

    ``prefix``: [2, P, D] (keys, values: raw head-split rows, not projected by ``attn``); ``weight``: [B], [1] or
    None (1). ``x`` in ``attn``'s layout (batch first or not)."""
    batch_first = attn.batch_first
    x = x if batch_first else x.transpose(0, 1)
    b, length, width = x.shape
    h = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = _heads(q, h)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # nn.MultiheadAttention's reading: True = may not attend
            attn_mask = torch.zeros(attn_mask.shape, device=x.device).masked_fill(attn_mask, float("-inf"))
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, _heads(k, h), _heads(v, h), attn_mask=attn_mask)
    if prefix is not None:
        out = out + _prefix_heads(q, prefix, weight)
    out = F.linear(out.transpose(1, 2).reshape(b, length, width), attn.out_proj.weight, attn.out_proj.bias)
    return out if batch_first else out.transpose(0, 1)


class _Injected(torch.nn.Module):
    """Stands in for an open_clip block's attention while a forward runs: the block calls it as it calls its own."""

    def __init__(self, attn: torch.nn.MultiheadAttention, prefix: torch.Tensor, weight: torch.Tensor | None):
        super().__init__()
        self.attn, self.prefix, self.weight = attn, prefix, weight

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
        return prefix_attention(self.attn, query, self.prefix, self.weight, attn_mask), None


class _InjectedSelf(torch.nn.Module):
    """Stands in for a Hugging Face layer's self-attention (query/key/value projections, heads concatenated out,
    no out-projection): the layer's own attention, untouched (its mask and kernel), plus the prefix's heads."""

    def __init__(self, attn: torch.nn.Module, prefix: torch.Tensor, weight: torch.Tensor | None):
        super().__init__()
        self.attn, self.prefix, self.weight = attn, prefix, weight

    def forward(self, hidden_states, *args, **kwargs):
        out, *rest = self.attn(hidden_states, *args, **kwargs)
        q = _heads(self.attn.query(hidden_states), self.attn.num_attention_heads)
        extra = _prefix_heads(q, self.prefix, self.weight)
        return (out + extra.transpose(1, 2).reshape(out.shape), *rest)


def _is_hf_self_attention(module: torch.nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("query", "key", "value", "num_attention_heads"))


def _site(block: torch.nn.Module) -> tuple[torch.nn.Module, str, type[torch.nn.Module]]:
    """Where a block's self-attention sits: (its parent, attribute name, the stand-in's class)."""
    if isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention):
        return block, "attn", _Injected
    attention = getattr(block, "attention", None)
    if attention is not None and _is_hf_self_attention(getattr(attention, "self", None)):
        return attention, "self", _InjectedSelf
    inner = getattr(block, "attn", None) or getattr(attention, "self", None) or block
    raise MethodError(
        "DIKI injects into nn.MultiheadAttention (open_clip) or BERT-style self-attention (Hugging Face), "
        f"not {type(inner).__name__}"
    )


def block_width(block: torch.nn.Module) -> int:
    """The width of a block's attention (the prefix rows' width)."""
    parent, name, _ = _site(block)
    attn = getattr(parent, name)
    return attn.embed_dim if name == "attn" else attn.num_attention_heads * attn.attention_head_size


def text_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The text tower's attention blocks, first first: open_clip's own tower or a Hugging Face encoder's layers."""
    tower = getattr(model, "transformer", None) or getattr(getattr(model, "text", None), "transformer", None)
    if tower is not None and hasattr(tower, "resblocks"):
        return list(tower.resblocks)
    layers = getattr(getattr(tower, "encoder", None), "layer", None)
    first = getattr(layers[0], "attention", None) if layers is not None and len(layers) else None
    if first is not None and _is_hf_self_attention(getattr(first, "self", None)):
        return list(layers)
    raise MethodError(
        "DIKI needs a text tower of attention blocks (open_clip's transformer or a BERT-style Hugging Face "
        f"encoder); {type(getattr(model, 'text', tower)).__name__} is neither"
    )


@contextlib.contextmanager
def injected(blocks: list[torch.nn.Module], prefix: torch.Tensor, weight: torch.Tensor | None):
    """The first len(prefix) blocks attend to their prefix ([depth, 2, P, width]) during the ``with``; the blocks'
    own attention modules are back in place afterwards (the backbone's weights and state dict never change)."""
    sites = [_site(block) for block in blocks[: len(prefix)]]
    own = [getattr(parent, name) for parent, name, _ in sites]
    try:
        for (parent, name, stand_in), attn, layer in zip(sites, own, prefix):
            setattr(parent, name, stand_in(attn, layer, weight))
        yield
    finally:
        for (parent, name, _), attn in zip(sites, own):
            setattr(parent, name, attn)
