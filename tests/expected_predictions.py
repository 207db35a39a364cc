"""What a registered learner state must predict for some images, worked out in the test from the methods'
prediction rules (docs/methods/lvp.md, "Prediction"; docs/methods/zeroshot.md) rather than through the method
code the served model runs, so a test of serving can ask for the very label of each image.

The rules, with e(x) the normalised image embedding of the state's encoder:

- a state with LVP pools (LVP-I, mean mode, cosine): the class of the pool entry u = sum / count (one per class
  and domain) nearest to e(x) in cosine;
- a state without pools (zero-shot, or a fine-tuned encoder): the class c whose prompt "a photo of a {name}"
  (the default `lvp` template) has the text embedding nearest to e(x) in cosine.
"""

from __future__ import annotations

import io

import torch
from PIL import Image


def expected_labels(config, state, blobs: list[bytes]) -> list[str]:
    from components.model.backbones import encode_batch, encode_texts, load_backbone

    backbone = load_backbone(config.model, weights=state.weights)
    images = torch.stack([backbone.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    embeddings = encode_batch(backbone, images).double()
    names = {c.key: c.name for c in state.classes}
    if state.pools:
        keys = [key for pool in state.pools.values() for key in pool.class_keys]
        vectors = torch.cat([pool.sums / pool.counts[:, None] for pool in state.pools.values()])
    else:
        keys = [c.key for c in state.classes]
        vectors = encode_texts(backbone, [f"a photo of a {names[k]}" for k in keys]).double()
    similarity = embeddings @ torch.nn.functional.normalize(vectors, dim=-1).T
    return [names[keys[i]] for i in similarity.argmax(dim=1).tolist()]
