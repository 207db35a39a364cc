"""The proving ground's base model: a small CLIP pretrained contrastively on the glyph corpus, cached by recipe.

``cliploop-glyph`` (``components/model/model_configs/cliploop-glyph.json``, open_clip's own format) pairs a small
ViT image tower (patches of 4 pixels, width 96, 3 blocks: the methods that act on ViT blocks, SG and GNSP,
need one) with open_clip's text transformer (width 64, 2 blocks) over a BPE vocabulary cut to the merges
that the glyph names and captions use (``cliploop-glyph-bpe.txt.gz``): with CLIP's 49,408 tokens the
embedding table alone would outweigh the image tower. Both towers have about 0.3M parameters.

Cutting the vocabulary keeps tokenisation identical for the words it was cut for: byte-pair encoding
applies, in rank order, the lowest-ranked merge present; keeping every merge that any of those words
applies, in the original order, leaves each of those choices unchanged. Other words still encode, as
smaller pieces (every byte is a token).

The base model (``build_base_model``) is trained on ``glyph_bench.pretrain_items`` with AdamW and a cosine
schedule, budgeted in steps: the loss sits near ln(batch) for a long stretch before it drops, at a moment
that depends on the seed, so a budget in seconds would stop some runs on the plateau. It is saved as
safetensors beside a JSON of its recipe, under a name that holds the recipe's SHA-256, and it loads
through ``components.model.backbones.load_backbone`` like any checkpoint.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from components.model.backbones import CONFIG_DIR
from components.scenarios import glyph_bench, glyphs
from components.scenarios.glyph_bench import GlyphBench

MODEL = "cliploop-glyph"
BPE_FILE = "cliploop-glyph-bpe.txt.gz"
# Words beyond the class names that captions and prompts use.
EXTRA_WORDS = [
    "a glyph of",
    "an on background",
    "a photo of the",
    *glyphs.COLOURS,
    *glyphs.DOMAINS,
    *glyphs.BACKGROUNDS,
]
RECIPE = {
    "model": MODEL,
    "steps": 3400,
    "batch": 64,
    "lr": 1e-3,
    "warmup": 100,
    "weight_decay": 0.1,
    "seed": 0,
    "version": 2,
}


# ---- vocabulary ---------------------------------------------------------------------------------------


def _merges_used(word: tuple[str, ...], ranks: dict[tuple[str, str], int], used: set[tuple[str, str]]) -> None:
    """Byte-pair encode ``word`` (symbols, last one ending in </w>), recording each merge applied."""
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            return
        used.add(best)
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)


def cut_bpe(texts: list[str]) -> tuple[bytes, int]:
    """(gzipped merges file keeping what ``texts`` use, the vocabulary size it gives open_clip's tokenizer)."""
    import regex
    from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe

    full = SimpleTokenizer()
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    ranks = {m: i for i, m in enumerate(merges)}
    encoder = bytes_to_unicode()
    used: set[tuple[str, str]] = set()
    for text in texts:
        for token in regex.findall(full.pat, full.clean_fn(text)):
            symbols = "".join(encoder[b] for b in token.encode("utf-8"))
            _merges_used(tuple(symbols[:-1]) + (symbols[-1] + "</w>",), ranks, used)
    kept = [m for m in merges if m in used]
    body = "\n".join([lines[0], *(" ".join(m) for m in kept)])
    return gzip.compress(body.encode("utf-8"), mtime=0), 512 + len(kept) + 2


def vocabulary_texts() -> list[str]:
    return [g.name for g in glyphs.candidates()] + EXTRA_WORDS


def write_model_files(folder: Path = CONFIG_DIR) -> int:
    """Write the cut vocabulary and the model config (a maintainer's step, when fonts or captions change)."""
    data, vocab = cut_bpe(vocabulary_texts())
    (folder / BPE_FILE).write_bytes(data)
    config = {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8},
        "text_cfg": {
            "context_length": 32,
            "vocab_size": vocab,
            "width": 64,
            "heads": 2,
            "layers": 2,
            "tokenizer_kwargs": {"bpe_path": f"package:components/model/model_configs/{BPE_FILE}"},
        },
    }
    (folder / f"{MODEL}.json").write_text(json.dumps(config, indent=4) + "\n")
    return vocab


# ---- the base model -----------------------------------------------------------------------------------


def recipe(bench: GlyphBench, **changes) -> dict:
    """Everything the base model's bytes depend on: the corpus settings and the training recipe."""
    corpus = {
        "seed": bench.pretrain_seed,
        "pretrain_classes": bench.pretrain_classes,
        "pretrain_per_class": bench.pretrain_per_class,
    }
    config = (CONFIG_DIR / f"{MODEL}.json").read_text()
    return {
        **RECIPE,
        **changes,
        "corpus": corpus,
        "classes": glyphs.fingerprint(glyphs.candidates()),
        "config": hashlib.sha256(config.encode()).hexdigest()[:16],
    }


def recipe_key(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def base_model_path(cache_dir: Path, doc: dict) -> Path:
    return Path(cache_dir) / f"glyph-base-{recipe_key(doc)}.safetensors"


def _corpus(bench: GlyphBench, preprocess) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    from PIL import Image

    images, captions, labels = [], [], []
    for position, pixels, text in glyph_bench.pretrain_items(bench):
        images.append(preprocess(Image.fromarray(pixels)))
        captions.append(text)
        labels.append(position)
    return torch.stack(images), captions, torch.tensor(labels)


def build_base_model(bench: GlyphBench, cache_dir: Path, progress=print, **changes) -> Path:
    """Pretrain (or find in the cache) the base model for ``bench``'s corpus; ``changes`` alter the recipe."""
    import open_clip

    from components.model.backbones import quiet_loaders, register_builtin_configs, save_weights

    doc = recipe(bench, **changes)
    path = base_model_path(cache_dir, doc)
    if path.exists():
        return path
    register_builtin_configs()
    torch.manual_seed(doc["seed"])
    with quiet_loaders():
        model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL)
    started = time.perf_counter()
    images, captions, _ = _corpus(bench, preprocess)
    tokens = tokenizer(captions)
    progress(f"  glyph corpus: {len(images)} images rendered in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    # Matrices decay; gains, biases and the logit scale do not (decaying the scale toward 0 flattens the
    # logits). Version 1 decayed everything at lr 2e-3 and stayed on the loss plateau for 3,400 steps.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != "logit_scale"]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n != "logit_scale")]
    groups = [{"params": decay, "weight_decay": doc["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=doc["lr"])
    steps, warmup = doc["steps"], doc["warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + np.cos(np.pi * (s - warmup) / (steps - warmup))),
    )
    generator = torch.Generator().manual_seed(doc["seed"])
    order = torch.randperm(len(images), generator=generator)
    cursor, recent = 0, []
    model.train()
    for step in range(steps):
        if cursor + doc["batch"] > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        idx = order[cursor : cursor + doc["batch"]]
        cursor += doc["batch"]
        image_features, text_features, scale = model(images[idx], tokens[idx])
        logits = scale * image_features @ text_features.T
        target = torch.arange(len(idx))
        loss = (
            torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
        ) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        recent.append(loss.item())
        if progress and (step + 1) % 200 == 0:
            rate = (step + 1) / (time.perf_counter() - started)
            progress(f"  glyph base model: step {step + 1}/{steps}, loss {np.mean(recent):.3f}, {rate:.1f} steps/s")
            recent = []
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)
    path.with_suffix(".json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def model_overrides(path: Path) -> list[str]:
    """Config overrides that point cliploop at a glyph base model."""
    from components.support.storage import sha256_file

    return [
        f"model.name={MODEL}",
        "model.pretrained=null",
        f"model.checkpoint={path}",
        f"model.sha256={sha256_file(path)}",
        f"evaluation.templates={glyph_bench.PROMPT}",
    ]


@torch.inference_mode()
def zero_shot(backbone, task, ways: int = 20, seed: int = 0) -> dict[str, float]:
    """Accuracy of a loaded backbone on a drop's test images by class name: over all its classes, and
    ``ways``-way (each image against its class and ways-1 others drawn at random), with chance beside it."""
    from components.model.backbones import encode_batch, encode_texts
    from components.model.data import make_loader

    texts = encode_texts(backbone, [glyph_bench.PROMPT.format(n) for n in task.class_names])
    features, labels = [], []
    for x, y in make_loader(task.dataset_for("test", backbone.preprocess), 256, 0):
        features.append(encode_batch(backbone, x))
        labels.append(y)
    sims, truth = torch.cat(features) @ texts.T, torch.cat(labels)
    full = float((sims.argmax(1) == truth).float().mean())
    rng = np.random.default_rng(seed)
    n, hits = texts.shape[0], 0
    ways = min(ways, n)
    for row, label in zip(sims, truth.tolist()):
        others = rng.choice([c for c in range(n) if c != label], ways - 1, replace=False)
        hits += int(row[label] > row[torch.as_tensor(others)].max())
    return {"all": full, "all_chance": 1 / n, f"{ways}_way": hits / len(truth), f"{ways}_way_chance": 1 / ways}


if __name__ == "__main__":
    print(f"{MODEL}: vocabulary of {write_model_files()} tokens written to {CONFIG_DIR}")
