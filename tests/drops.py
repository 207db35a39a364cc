"""Small, real task drops for tests: PNG (or JPEG) images with distinct random pixels, a task.yaml and a manifest."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def png_bytes(seed: int, side: int = 16, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def _seed(*parts) -> int:
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def make_task(
    root: Path,
    task_id: str,
    classes: list[str],
    *,
    scenario: str = "class-incremental",
    dataset: str = "toy",
    train: int = 3,
    test: int = 2,
    domain: str | None = None,
    salt: str = "",
    image_format: str = "png",
) -> Path:
    """Write a valid drop ``root/task_id`` and return its folder."""
    folder = Path(root) / task_id
    (folder / "img").mkdir(parents=True, exist_ok=True)
    spec = {"task_id": task_id, "scenario": scenario, "dataset": dataset, "classes": list(classes)}
    if domain:
        spec["domain"] = domain
    (folder / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    rows = []
    for name in classes:
        for split, count in (("train", train), ("test", test)):
            for i in range(count):
                rel = f"img/{split}-{name.replace(' ', '_')}-{i}.{image_format}"
                fmt = {"png": "PNG", "jpg": "JPEG"}[image_format]
                (folder / rel).write_bytes(png_bytes(_seed(task_id, name, split, i, salt), fmt=fmt))
                rows.append([rel, name, split])
    write_manifest(folder, rows)
    return folder


def read_manifest(folder: Path) -> list[list[str]]:
    with open(Path(folder) / "manifest.csv", newline="") as fh:
        return list(csv.reader(fh))


def write_manifest(folder: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    with open(Path(folder) / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header or ["path", "label", "split"])
        writer.writerows(rows)


def append_rows(folder: Path, rows: list[list[str]]) -> None:
    with open(Path(folder) / "manifest.csv", "a", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
