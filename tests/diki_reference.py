"""DIKI's formulas as the official code (github lloongx/DIKI) computes them, written out here independently of
components/methods/diki.py, for the parity tests (tests/test_diki_values.py) and the scoring rule of
tests/test_methods.py. No code is shared with the method: the attention is an explicit softmax, the prefixes go in
through forward hooks that replace each block's attention output, and the Gaussian is torch's MultivariateNormal,
the official code's own call.

The official code, in our words:
- attention (clip/attention.py, ``multi_head_attention_forward``): q, k, v from the block's packed in-projection;
  per head, softmax(q kᵀ / √h + mask) v, plus softmax(q p_kᵀ / √h) p_v times the sample's weight (the prefix rows
  split into heads like k and v, not projected, never masked); the sum goes through the out-projection;
- a new prefix slot (``MultiheadAttention.__init__``): keys uniform in [-1, 1], values zero;
- the task's Gaussian (DIKI/DIKI.py, ``train_one_task``): mean of the frozen CLIP's normalised image features of
  the training set, covariance Δᵀ Δ / (n - 1) plus 1e-7 on the diagonal;
- the choice (``CustomCLIP.forward``): log-likelihood under each learned task's MultivariateNormal, the top task
  per image, its weight sigmoid(log p / 512 - 1) (512: ViT-B/16's embedding width); with ``batchwise_prompt`` the
  batch takes the task most images chose, and the text side weighs the prefix by the batch's mean weight;
- the schedule (DIKI/utils.py, ``build_cosine_scheduler``): lr_i = f + (lr - f)(1 + cos(π i / N)) / 2 with
  f = lr / 1000, no warmup; SGD without momentum (torch's default), lr 5, batch 128, 10 epochs (configs/MTIL.yaml).
"""

from __future__ import annotations

import math

import torch


def official_attention(attn, x, prefix, weight, attn_mask=None) -> torch.Tensor:
    """One block's attention with its prefix ([2, P, D]); ``x`` in ``attn``'s layout; ``weight`` [B] or None."""
    x = x if attn.batch_first else x.transpose(0, 1)  # [B, L, D]
    b, length, d = x.shape
    h = attn.num_heads
    hd = d // h
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q, k, v = x @ w_q.T + b_q, x @ w_k.T + b_k, x @ w_v.T + b_v

    def split(t):  # [B, n, D] -> [B, H, n, hd]
        return t.reshape(t.shape[0], t.shape[1], h, hd).permute(0, 2, 1, 3)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd)
    if attn_mask is not None:
        scores = scores + attn_mask
    out = scores.softmax(dim=-1) @ split(v)
    if prefix is not None:
        keys = prefix[0].unsqueeze(0).repeat(b, 1, 1)
        values = prefix[1].unsqueeze(0).repeat(b, 1, 1)
        extra = (split(q) @ split(keys).transpose(-1, -2) / math.sqrt(hd)).softmax(dim=-1) @ split(values)
        if weight is not None:
            extra = extra * weight.view(-1, 1, 1, 1)
        out = out + extra
    out = out.permute(0, 2, 1, 3).reshape(b, length, d) @ attn.out_proj.weight.T + attn.out_proj.bias
    return out if attn.batch_first else out.transpose(0, 1)


def hooked(blocks, prefix, weight):
    """Forward hooks on the first len(prefix) blocks' attention modules that replace their output by
    ``official_attention``; returns the handles (remove them after the forward)."""
    handles = []
    for block, layer in zip(blocks, prefix if prefix is not None else []):

        def hook(module, args, kwargs, output, layer=layer):
            return official_attention(module, args[0], layer, weight, kwargs.get("attn_mask")), None

        handles.append(block.attn.register_forward_hook(hook, with_kwargs=True))
    return handles


def encode(model, blocks, run, prefix, weight) -> torch.Tensor:
    """``run()`` (an encode call) with the prefixes hooked in; the normalised fp32 output."""
    handles = hooked(blocks, prefix, weight)
    try:
        out = run().float()
    finally:
        for handle in handles:
            handle.remove()
    return out / out.norm(dim=-1, keepdim=True)


def official_gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.double()
    mean = x.mean(dim=0)
    delta = x - mean
    return mean, delta.T @ delta / (x.shape[0] - 1) + torch.eye(x.shape[1], dtype=x.dtype) * 1e-7


def official_choice(log_probs: torch.Tensor, width: float, batchwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The official top-1 task and weight per image (no ties in the tests that use it)."""
    top, indices = log_probs.topk(k=1, dim=1)
    weight = torch.sigmoid(top.squeeze(1) / width - 1.0)
    if batchwise:
        ids, counts = torch.unique(indices, return_counts=True, sorted=True)
        indices = ids[counts.topk(k=1).indices].repeat(len(indices)).unsqueeze(1)
    return indices.squeeze(1), weight


def reference_scores(state, backbone, images, names, template, width=None, batchwise=True) -> torch.Tensor:
    """Cosine scores [N, len(names)] of the learner ``state`` by the official forward, one template."""
    from torch.distributions import MultivariateNormal

    model = backbone.model
    frozen = model.encode_image(images).float()
    frozen = frozen / frozen.norm(dim=-1, keepdim=True)
    ids = [t for t in state.task_ids if f"diki.mean.{t}" in state.method_tensors]
    tensors = state.method_tensors
    dists = [
        MultivariateNormal(tensors[f"diki.mean.{t}"].double(), tensors[f"diki.covariance.{t}"].double()) for t in ids
    ]
    log_probs = torch.vstack([dist.log_prob(frozen.double()) for dist in dists]).t()
    chosen, weight = official_choice(log_probs, width or frozen.shape[1], batchwise)
    tokens = backbone.tokenizer([template.format(n) for n in names])
    image_blocks = list(model.visual.transformer.resblocks)
    text_blocks = list(model.transformer.resblocks)
    out = torch.zeros(len(images), len(names))
    for slot in sorted(set(chosen.tolist())):
        rows = (chosen == slot).nonzero().flatten()
        t = ids[slot]
        image = encode(
            model,
            image_blocks,
            lambda rows=rows: model.encode_image(images[rows]),
            tensors[f"diki.image.{t}"],
            weight[rows].float(),
        )
        text_weight = weight[rows].float().mean().reshape(1)
        text = encode(model, text_blocks, lambda: model.encode_text(tokens), tensors[f"diki.text.{t}"], text_weight)
        out[rows] = image @ text.T
    return out
