"""The demo drop zone: real handwritten digits (scikit-learn's ``load_digits``, shipped in the package),
rendered as small PNGs, split into tasks with meaningful class names. Deterministic and offline.

Tasks (in arrival order):
  ``digits-0-4``       class-incremental: zero … four, black ink on white paper
  ``digits-5-9``       class-incremental: five … nine, black ink on white paper
  ``digits-chalk``     domain-incremental: all ten digits as white chalk on a dark board (new domain)
  ``digits-mislabeled`` (optional) a bad drop: an undeclared label and a train/test leak, to show quarantine

A further disjoint ``base`` split (every class) is kept out of the tasks for the demo's base model.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SIDE = 32
# Per class, in the order of scikit-learn's data (deterministic): base, then task train/test, then domain train/test.
BASE, TASK_TRAIN, TASK_TEST, DOMAIN_TRAIN, DOMAIN_TEST = 60, 30, 15, 30, 15
DATASET = "digits"


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def render(image8: np.ndarray, domain: str) -> bytes:
    """An 8×8 digit (0..16 ink) as a 32×32 PNG; ``paper`` = dark ink on white, ``chalk`` = light on dark."""
    from PIL import Image

    ink = np.clip(image8 / 16.0, 0, 1)
    if domain == "paper":
        pixels = 255 - ink * 235
    elif domain == "chalk":
        pixels = 40 + ink * 200
    else:
        raise ValueError(domain)
    img = Image.fromarray(pixels.astype(np.uint8), mode="L").resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def splits() -> dict[str, dict[int, list[int]]]:
    """Indices into load_digits() per split and class; disjoint by construction."""
    _, target = _digits()
    out: dict[str, dict[int, list[int]]] = {k: {} for k in ("base", "train", "test", "domain_train", "domain_test")}
    for label in range(10):
        idx = [int(i) for i in np.flatnonzero(target == label)]
        edges = np.cumsum([0, BASE, TASK_TRAIN, TASK_TEST, DOMAIN_TRAIN, DOMAIN_TEST])
        if len(idx) < edges[-1]:
            raise RuntimeError(f"digit {label} has only {len(idx)} images; the demo needs {edges[-1]}")
        for name, lo, hi in zip(out, edges[:-1], edges[1:]):
            out[name][label] = idx[lo:hi]
    return out


def _write_task(
    root: Path,
    task_id: str,
    scenario: str,
    labels: list[int],
    domain: str,
    rows: list[tuple[int, int, str]],
    extra_rows: list[tuple[str, str, str]] = (),
    declared: list[int] | None = None,
) -> Path:
    images, _ = _digits()
    folder = root / task_id
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "images").mkdir(parents=True)
    spec = {
        "task_id": task_id,
        "scenario": scenario,
        "dataset": DATASET,
        "domain": domain,
        "classes": [
            {"name": NAMES[i], "description": f"the handwritten digit {i} ({NAMES[i]})"}
            for i in (declared if declared is not None else labels)
        ],
    }
    (folder / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with open(folder / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "split"])
        for index, label, split in rows:
            rel = f"images/{split}-{NAMES[label]}-{index:04d}.png"
            (folder / rel).write_bytes(render(images[index], domain))
            writer.writerow([rel, NAMES[label], split])
        for row in extra_rows:
            writer.writerow(row)
    return folder


def build_drop_zone(root: Path, include_bad: bool = True) -> list[Path]:
    """Write the demo tasks under ``root`` (replacing earlier copies) and return their folders in order."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    parts = splits()

    def rows(labels: list[int], train: str, test: str) -> list[tuple[int, int, str]]:
        return [(i, lab, "train") for lab in labels for i in parts[train][lab]] + [
            (i, lab, "test") for lab in labels for i in parts[test][lab]
        ]

    low, high, every = list(range(5)), list(range(5, 10)), list(range(10))
    folders = [
        _write_task(root, "digits-0-4", "class-incremental", low, "paper", rows(low, "train", "test")),
        _write_task(root, "digits-5-9", "class-incremental", high, "paper", rows(high, "train", "test")),
        _write_task(
            root, "digits-chalk", "domain-incremental", every, "chalk", rows(every, "domain_train", "domain_test")
        ),
    ]
    if include_bad:
        # Mislabelled: a label nobody declared, and one image listed in train and again (copied) in test.
        bad_rows = [(i, lab, "train") for lab in (0, 1) for i in parts["base"][lab][:5]] + [
            (i, lab, "test") for lab in (0, 1) for i in parts["base"][lab][5:8]
        ]
        folder = _write_task(
            root, "digits-mislabeled", "domain-incremental", [0, 1], "paper", bad_rows, declared=list(range(10))
        )
        leak_src = folder / f"images/train-zero-{parts['base'][0][0]:04d}.png"
        shutil.copyfile(leak_src, folder / "images/test-copy.png")
        with open(folder / "manifest.csv", "a", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["images/test-copy.png", "zero", "test"])
            writer.writerow([f"images/train-one-{parts['base'][1][0]:04d}.png", "ten", "train"])
        folders.append(folder)
    return folders


def base_split() -> tuple[list[bytes], list[int]]:
    """The base split (every class, disjoint from the tasks), paper domain: for the demo's base model."""
    images, _ = _digits()
    parts = splits()["base"]
    data, labels = [], []
    for label in range(10):
        for index in parts[label]:
            data.append(render(images[index], "paper"))
            labels.append(label)
    return data, labels


# ---- the demo's base model ----------------------------------------------------------------------------

BASE_MODEL = "cliploop-minilm-tiny"
BASE_PROMPT = "a photo of the handwritten digit {}"
BASE_RECIPE = {
    "model": BASE_MODEL,
    "prompt": BASE_PROMPT,
    "epochs": 40,
    "lr": 2e-3,
    "batch": 50,
    "seed": 0,
    "data": "sklearn load_digits, base split",
    "version": 2,
}


def base_model_path(cache_dir: Path) -> Path:
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(BASE_RECIPE, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"demo-base-{digest}.safetensors"


def build_base_model(cache_dir: Path, progress=print) -> Path:
    """A small image tower warmed up against the frozen, pretrained MiniLM text tower; cached by recipe.

    Only the image tower and the text projection learn (on the base split, disjoint from the demo's
    tasks), so zero-shot accuracy on digits comes from real class-name semantics of the text encoder.
    """
    import torch

    from components.model.backbones import quiet_loaders, register_builtin_configs, save_weights

    path = base_model_path(cache_dir)
    if path.exists():
        return path
    import open_clip

    register_builtin_configs()
    torch.manual_seed(BASE_RECIPE["seed"])
    with quiet_loaders():
        model, _, preprocess = open_clip.create_model_and_transforms(BASE_MODEL, pretrained=None)
    tokenizer = open_clip.get_tokenizer(BASE_MODEL)
    for name, param in model.named_parameters():
        # The pretrained text transformer stays as shipped; its projection and the image tower learn.
        param.requires_grad = not name.startswith("text.transformer") and name != "logit_scale"
    data, labels = base_split()
    images = torch.stack([preprocess(_decode(b)) for b in data])
    targets = torch.tensor(labels)
    with torch.no_grad():  # the frozen transformer's pooled output is the same every step: compute it once
        tokens = tokenizer([BASE_PROMPT.format(n) for n in NAMES])
        mask = (tokens != model.text.config.pad_token_id).long()
        pooled = model.text.pooler(model.text.transformer(input_ids=tokens, attention_mask=mask), mask)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=BASE_RECIPE["lr"], weight_decay=0.05)
    generator = torch.Generator().manual_seed(BASE_RECIPE["seed"])
    model.train()
    for epoch in range(BASE_RECIPE["epochs"]):
        order = torch.randperm(len(targets), generator=generator)
        total = 0.0
        for start in range(0, len(order), BASE_RECIPE["batch"]):
            idx = order[start : start + BASE_RECIPE["batch"]]
            image_features = torch.nn.functional.normalize(model.encode_image(images[idx]), dim=-1)
            text_features = torch.nn.functional.normalize(model.text.proj(pooled), dim=-1)
            logits = model.logit_scale.exp() * image_features @ text_features.T
            loss = torch.nn.functional.cross_entropy(logits, targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        if progress and (epoch + 1) % 5 == 0:
            progress(f"  base model warm-up: epoch {epoch + 1}/{BASE_RECIPE['epochs']}, loss {total / len(order):.3f}")
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)
    return path


def model_overrides(cache_dir: Path, progress=print) -> list[str]:
    """Config overrides that point cliploop at the demo's base model (built on first use)."""
    from components.support.storage import sha256_file

    path = build_base_model(cache_dir, progress=progress)
    return [
        f"model.name={BASE_MODEL}",
        "model.pretrained=null",
        f"model.checkpoint={path}",
        f"model.sha256={sha256_file(path)}",
        f"evaluation.templates={BASE_PROMPT}",
    ]


def _decode(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def demo_model_settings(ws: Path, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The demo's base model as a workspace's model: built offline (cached), placed in ``.cliploop/models/``
    and pinned by its SHA-256. The path is absolute: the model loaders read it relative to the working folder.

    The model only: the demo's digit prompt stays the demo's, so a workspace of other images keeps the general
    default of ``evaluation.templates``."""
    from components.intake.versioning import STATE_DIR
    from components.support.storage import cache_dir

    settings: dict[str, Any] = {}
    for item in model_overrides(cache_dir() / "demo", progress=progress):
        key, _, value = item.partition("=")
        if key.startswith("model."):
            settings[key] = None if value == "null" else value
    source = Path(settings["model.checkpoint"])
    target = ws.resolve() / STATE_DIR / "models" / source.name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)  # the cache and the workspace usually share a disk: no second copy
        except OSError:
            shutil.copyfile(source, target)
    settings["model.checkpoint"] = str(target)
    return settings
