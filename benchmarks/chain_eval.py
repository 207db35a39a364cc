"""A chain of small tasks learned with LVP on CPU, with the embedding cache and without it, as JSON.

    .venv/bin/python benchmarks/chain_eval.py                       # 20 tasks, cliploop-tiny on CPU
    .venv/bin/python benchmarks/chain_eval.py --tasks 50 --test 32   # a longer chain

Each step learns one task on top of the previous state (``components.training.learn.learn_step``, as ``cliploop learn``
and the pipeline do) and evaluates every task learned so far (``evaluation.future_tasks`` off, so that the work
of step t grows with t). Printed, with the cache on (``artifacts.embedding_cache``, entries in a temporary
artifact store):
  ``images_encoded``   images the encoder saw over the whole chain (counted in ``pool_engine.encode_parts``, the
                       one function that encodes images for pools and frozen-encoder evaluation);
  ``distinct_images``  train + test images of all the tasks (target: ``images_encoded`` equal to it);
  ``step_seconds``     wall time of each step; ``encoded_per_step`` the images each step encoded;
  ``step_growth``      a least-squares slope of step time over step number (steps 2..T; step 1 also
                       evaluates the base model on every task);
and the same under ``no_cache`` (every evaluation encodes its split: step t encodes t test splits, so the
chain costs T² encodings). ``identical_matrices``: both runs give the same accuracy matrix.
The tasks are synthetic PNG drops (random pixels, two classes each), written to a temporary folder; the model
is ``--model`` with fixed random weights; no network.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_drop(root: Path, index: int, classes: int, train: int, test: int, side: int) -> Path:
    """A task drop of random-pixel PNGs: ``classes`` classes of its own, ``train`` + ``test`` images per class."""
    import yaml
    from PIL import Image

    rng = np.random.default_rng(index)
    folder = root / f"chain-{index:03d}"
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = [f"class {index:03d}-{c}" for c in range(classes)]
    rows = []
    for c, name in enumerate(names):
        for split, count in (("train", train), ("test", test)):
            for i in range(count):
                buf = io.BytesIO()
                tint = np.array([40 * c, 255 - 40 * c, 128], dtype=np.int16)  # classes differ a little
                pixels = np.clip(rng.integers(0, 128, (side, side, 3)) + tint // 2, 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(buf, format="PNG")
                rel = f"img/{split}-{c}-{i}.png"
                (folder / rel).write_bytes(buf.getvalue())
                rows.append(f"{rel},{name},{split}\n")
    spec = {"task_id": folder.name, "scenario": "class-incremental", "dataset": "chain", "classes": names}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (folder / "manifest.csv").write_text("path,label,split\n" + "".join(rows))
    return folder


def slope(values: list[float]) -> float | None:
    """Least-squares slope of values over 1, 2, 3, ..."""
    if len(values) < 2:
        return None
    x = np.arange(1, len(values) + 1, dtype=float)
    return float(np.polyfit(x, np.asarray(values, dtype=float), 1)[0])


def run_chain(config, drops: list[Path], base) -> dict:
    """Learn the drops in order, one learn_step each; time and count the encodes of each step."""
    from components.model import pool_engine
    from components.model.data import load_task
    from components.model.embedding_cache import for_config
    from components.training.learn import learn_step

    tasks = [load_task(str(d)) for d in drops]
    by_id = {t.task_id: t for t in tasks}
    cache = for_config(config)
    state, seconds, encoded, start_count = None, [], [], pool_engine.encoded_images
    for i, task in enumerate(tasks):
        before, started = pool_engine.encoded_images, time.perf_counter()
        step = learn_step(
            task, config, state, locate=by_id.__getitem__, upcoming=tasks[i + 1 :], base=base, embeddings=cache
        )
        seconds.append(round(time.perf_counter() - started, 4))
        encoded.append(pool_engine.encoded_images - before)
        state = step.state
    return {
        "images_encoded": pool_engine.encoded_images - start_count,
        "step_seconds": seconds,
        "encoded_per_step": encoded,
        "total_seconds": round(sum(seconds), 3),
        "step_growth": {"slope_s_per_step": None if len(seconds) < 3 else round(slope(seconds[1:]), 5)},
        "matrix": step.matrix.matrix,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--classes", type=int, default=2, help="classes per task")
    parser.add_argument("--train", type=int, default=8, help="training images per class")
    parser.add_argument("--test", type=int, default=16, help="test images per class")
    parser.add_argument("--side", type=int, default=32, help="image side in pixels")
    parser.add_argument("--model", default="cliploop-tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    import open_clip

    from components.model.backbones import load_backbone, quiet_loaders, register_builtin_configs, save_weights
    from components.settings.config_loading import load_config

    with tempfile.TemporaryDirectory(prefix="cliploop-chain-") as tmp:
        root = Path(tmp)
        drops = [
            make_drop(root / "drops", i, args.classes, args.train, args.test, args.side) for i in range(args.tasks)
        ]
        register_builtin_configs()
        torch.manual_seed(0)  # fixed random weights, the same for both runs
        weights = root / "weights.safetensors"
        with quiet_loaders():
            sha = save_weights(open_clip.create_model(args.model, pretrained=None), weights)

        def config(name: str, cache: bool):
            sets = [
                f"model.name={args.model}",
                "model.pretrained=null",
                f"model.checkpoint={weights}",
                f"model.sha256={sha}",
                "model.device=cpu",
                "method.name=lvp",
                f"evaluation.batch_size={args.batch}",
                "evaluation.future_tasks=false",
                f"workspace={root / 'ws'}",
                f"artifacts.root={root / name}",
                f"artifacts.embedding_cache={'true' if cache else 'false'}",
            ]
            return load_config(overrides=sets, env={})

        base = load_backbone(config("warm", False).model)
        run_chain(config("warm", False), drops[:1], base)  # imports and first-call costs, not timed
        with_cache = run_chain(config("store", True), drops, base)
        without = run_chain(config("store-off", False), drops, base)

    distinct = args.tasks * args.classes * (args.train + args.test)
    report = {
        "tasks": args.tasks,
        "model": args.model,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "images_per_task": {"train": args.classes * args.train, "test": args.classes * args.test},
        "distinct_images": distinct,
        "images_encoded": with_cache["images_encoded"],
        "step_seconds": with_cache["step_seconds"],
        "encoded_per_step": with_cache["encoded_per_step"],
        "total_seconds": with_cache["total_seconds"],
        "step_growth": with_cache["step_growth"],
        "matrix": with_cache["matrix"],  # accuracy of task j (column) after step i (row), both runs: so a reader
        "no_cache": without,  # can compare them without trusting identical_matrices
        "identical_matrices": with_cache["matrix"] == without["matrix"],
        "target": {"each_image_once": with_cache["images_encoded"] == distinct},
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
