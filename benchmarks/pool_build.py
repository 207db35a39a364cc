"""Pool-building throughput from stored shards against cliploop's bare encoder and open_clip's ceiling, in one run.

    .venv/bin/python benchmarks/pool_build.py                      # small model on CPU (defaults)
    .venv/bin/python benchmarks/pool_build.py --model ViT-B-16 --side 256 --images 8192 --batch 512 \
        --device cuda                                               # on a GPU machine (nvjpeg, bf16 weights)
    .venv/bin/python benchmarks/pool_build.py --decoder pillow-draft2x --device cuda   # the Pillow path on a GPU
    .venv/bin/python benchmarks/pool_build.py --engine ray --shard-mb 2  # local and Ray side by side

No network: the model's weights are random unless ``--pretrained`` names a tag (timing does not depend on them).
Measured, on the same model and device, the frozen encoder in ``model.frozen_precision`` (``auto``: bf16 weights
on CUDA, fp32 on CPU; ``--frozen-precision``):
  ``pool_build``     images/s of cliploop's pool building from a stored task (shards → decode with ``--decoder``
                     (``auto``: nvjpeg on CUDA, pillow-draft2x on CPU) → preprocess → encode → per-class
                     sums), end to end;
  ``bare_encoder``   images/s of cliploop's encoder (``components.model.backbones.encode_batch``) alone on a batch
                     already decoded, preprocessed and on the device;
  ``ceiling``        images/s of the open_clip model called directly (created by open_clip, not cliploop), in
                     the same weights dtype, on a random batch on the device: what the GPU can encode;
  ``plain_fp32``     images/s of open_clip's plain fp32 loop on the preprocessed batch (the old baseline).
Ratios: ``pool_vs_encoder`` (target ≥ 0.90), ``encoder_vs_ceiling`` (target ≥ 0.90) and
``encoder_vs_plain_fp32``; on an H100/H200 with ViT-B-16 the target for ``pool_build`` is ≥ 9,000 img/s.
With ``--engine ray`` the same pool is also built on Ray Data (``compute.engine: ray``: a local Ray, or
``--ray-address``; encoder actors, one GPU each on CUDA), and ``engines`` reports images/s of ``local`` and
``ray`` side by side (a Ray build includes starting its actors and loading the model in them), with whether
the two pools' tensors are byte-identical. ``--shard-mb`` sets the shard size, hence how many parts Ray spreads.
The stored task is synthetic JPEGs of ``--side`` pixels (real digits drawn large, with noise) packed into
shards exactly as ingestion stores them; no network, no DVC.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def make_stored_task(folder: Path, n: int, side: int, quality: int = 90, shard_bytes: int = 256 << 20) -> Path:
    """A stored task (task.yaml, index.csv, shards) of ``n`` JPEGs, as ingestion would write it."""
    import yaml
    from PIL import Image

    from components.intake.shards import ShardWriter, write_index
    from components.scenarios.demo import NAMES, _digits
    from components.support.storage import sha256_bytes

    images, targets = _digits()
    rng = np.random.default_rng(0)
    task = folder / "bench"
    (task / "shards").mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(task / "shards", shard_bytes)
    rows = []
    for i in range(n):
        k = i % len(images)
        ink = np.kron(images[k] / 16.0, np.ones((side // 8 + 1, side // 8 + 1)))[:side, :side]
        pixels = np.clip(255 - ink[..., None] * 200 + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
        sha = sha256_bytes(data)
        writer.add(sha, ".jpg", data)
        rows.append(
            {
                "path": f"img/{i:06d}.jpg",
                "label": NAMES[int(targets[k])],
                "split": "train",
                "sha256": sha,
                "format": "JPEG",
                "width": side,
                "height": side,
            }
        )
    located = writer.close()
    for row in rows:
        where = located[row["sha256"] + ".jpg"]
        row.update(shard=where.shard, offset=where.offset, size=where.size)
    write_index(task / "index.csv", rows)
    spec = {"task_id": "bench", "scenario": "class-incremental", "dataset": "bench", "classes": NAMES}
    (task / "task.yaml").write_text(yaml.safe_dump(spec))
    (task / "manifest.csv").write_text(
        "path,label,split\n" + "".join(f"{r['path']},{r['label']},train\n" for r in rows)
    )
    return task


def timed(fn, repeat: int) -> float:
    """Best-of-``repeat`` wall time (first call is a warm-up and is not counted)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def compare_engines(overrides: list[str], args, task, ctx, settings, backbone, tmp: str) -> dict:
    """Pool building with the local engine and on Ray, on the same task, model and device: img/s side by side."""
    from components.methods.lvp import build_pool
    from components.model.backbones import save_weights
    from components.model.pool_engine import split_parts
    from components.settings.config_loading import load_config
    from components.training.run_context import context_for

    # Ray's actors load the model themselves: from a file of these very weights (random unless --pretrained).
    weights = Path(tmp) / "weights.safetensors"
    sha = save_weights(backbone.model, weights)
    sets = ["compute.engine=ray", f"compute.ray_address={args.ray_address or 'null'}"]
    sets += ["model.pretrained=null", f"model.checkpoint={weights}", f"model.sha256={sha}"]
    if args.actors:
        sets.append(f"compute.actors={args.actors}")
    ray_config = load_config(overrides=[*overrides, *sets], env={})
    # The driver's model is the same weights: say so, as loading it from that file would have.
    same_model = dataclasses.replace(backbone, reference={**backbone.reference, "path": str(weights), "sha256": sha})
    ray_ctx = context_for(ray_config, same_model)
    pools = {}

    def local():
        pools["local"] = build_pool(task, ctx, settings)[0]

    def on_ray():
        pools["ray"] = build_pool(task, ray_ctx, settings, ray_ctx.pool_engine)[0]

    local_s = timed(local, args.repeat)
    ray_s = timed(on_ray, args.repeat)  # the warm-up call starts Ray; every build starts its own actors
    import ray

    engine, parts = ray_ctx.pool_engine, split_parts(task, "train")
    same = torch.equal(pools["local"].sums, pools["ray"].sums) and torch.equal(
        pools["local"].counts, pools["ray"].counts
    )
    # Each pool's file digest, as `cliploop pool` prints it: a reader can compare them without trusting `same`.
    saved = {name: pool.save(Path(tmp) / f"pool-{name}")[f"{pool.task_id}.safetensors"] for name, pool in pools.items()}
    return {
        "img_per_s": {"local": round(args.images / local_s, 1), "ray": round(args.images / ray_s, 1)},
        "ray_vs_local": round(local_s / ray_s, 3),
        "identical_pools": bool(same),
        "tensors_sha256": saved,
        "parts": len(parts),
        "ray_actors": engine.actors(engine.actor_gpus(backbone), len(parts)),
        "ray_resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
    }


def ceiling_rate(args, device: str, dtype: torch.dtype, image_size: tuple[int, int], n_batches: int) -> float:
    """Images/s of the open_clip model itself (no cliploop code on the path) on a random device-resident batch."""
    import open_clip

    model = open_clip.create_model(args.model, pretrained=None).to(device=device, dtype=dtype).eval()
    batch = torch.randn(args.batch, 3, *image_size, device=device, dtype=dtype)

    @torch.inference_mode()
    def run():
        for _ in range(n_batches):
            model.encode_image(batch)

    seconds = timed(run, args.repeat)
    return n_batches * args.batch / seconds


def main(argv: list[str] | None = None) -> int:
    from components.methods.lvp import build_pool
    from components.model.backbones import encode_batch, load_backbone, quiet_loaders
    from components.model.data import load_task
    from components.model.pools import PoolConfig
    from components.settings.config_loading import load_config
    from components.training.run_context import context_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cliploop-tiny")
    parser.add_argument("--pretrained", default=None, help="open_clip tag (needs the network); default: random")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--side", type=int, default=64, help="stored image side in pixels")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: auto)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="model.precision (training; frozen follows its auto)")
    parser.add_argument("--frozen-precision", default="auto", help="model.frozen_precision of the frozen encoder")
    parser.add_argument("--decoder", default="auto", help="model.decoder: auto, pillow, pillow-draft2x, nvjpeg, ...")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: also build on Ray Data")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local Ray)")
    parser.add_argument("--actors", type=int, default=None, help="Ray encoder actors (default: one per GPU/CPU)")
    parser.add_argument("--shard-mb", type=float, default=256, help="shard size of the stored task in MiB")
    args = parser.parse_args(argv)

    overrides = [
        f"model.name={args.model}",
        f"model.pretrained={args.pretrained or 'null'}",
        f"model.device={args.device}",
        f"model.precision={args.precision}",
        f"model.frozen_precision={args.frozen_precision}",
        f"model.decoder={args.decoder}",
        f"evaluation.batch_size={args.batch}",
    ]
    if args.workers is not None:
        overrides.append(f"evaluation.workers={args.workers}")
    config = load_config(overrides=overrides, env={})
    torch.manual_seed(0)
    with quiet_loaders():  # random weights: open_clip's warning says so, and that is the point here
        backbone = load_backbone(config.model, frozen=True)  # pool building's encoder: the frozen base model
    ctx = context_for(config, backbone)
    with tempfile.TemporaryDirectory() as tmp:
        task = load_task(make_stored_task(Path(tmp), args.images, args.side, shard_bytes=int(args.shard_mb * 2**20)))
        settings = PoolConfig()

        # One batch decoded and preprocessed by the configured decoder, already on the device.
        dataset = task.dataset_for("train", backbone.preprocess, ctx.decoder, backbone.device)
        rows = range(min(args.batch, len(dataset)))
        batch = dataset.finish_batch(dataset.collate([dataset[i] for i in rows])[0]).to(backbone.device)
        n_batches = max(1, args.images // len(batch))
        fallbacks = dataset.fallbacks

        def bare():
            for _ in range(n_batches):
                encode_batch(backbone, batch, on_device=True)

        model = backbone.model
        device_batch = batch.float()

        @torch.inference_mode()
        def plain_fp32():
            for _ in range(n_batches):
                model.encode_image(device_batch)

        def pool():
            build_pool(task, ctx, settings)

        encoder_s = timed(bare, args.repeat)
        pool_s = timed(pool, args.repeat)
        restore = {p: p.dtype for p in model.parameters()}
        model.float()
        plain_s = timed(plain_fp32, args.repeat)
        for p, dtype in restore.items():
            p.data = p.data.to(dtype)
        engines = None
        if args.engine == "ray":  # after the figures above: a running Ray shares this machine's cores
            engines = compare_engines(overrides, args, task, ctx, settings, backbone, tmp)
        encoder = n_batches * len(batch) / encoder_s
        pool_rate = args.images / pool_s
        plain = n_batches * len(batch) / plain_s
        task.source.close()
    with quiet_loaders():
        ceiling = ceiling_rate(args, backbone.device, backbone.weights_dtype, tuple(batch.shape[-2:]), n_batches)
    result = {
        "benchmark": "pool_build",
        "model": args.model,
        "device": str(backbone.device),
        "precision": args.precision,
        "frozen_precision": args.frozen_precision,
        "decoder": ctx.decoder,
        "decoder_fallbacks": fallbacks,  # images of the measured batch the tensor decoder left to Pillow
        "autocast": str(backbone.autocast_dtype),
        "weights_dtype": str(backbone.weights_dtype),
        "images": args.images,
        "image_side": args.side,
        "batch": args.batch,
        "workers": ctx.workers,
        "repeat": args.repeat,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "machine": platform.machine(),
        "img_per_s": {
            "pool_build": round(pool_rate, 1),
            "bare_encoder": round(encoder, 1),
            "ceiling": round(ceiling, 1),
            "plain_fp32": round(plain, 1),
        },
        "ratios": {
            "pool_vs_encoder": round(pool_rate / encoder, 3),
            "encoder_vs_ceiling": round(encoder / ceiling, 3),
            "encoder_vs_plain_fp32": round(encoder / plain, 3),
        },
        "targets": {"pool_vs_encoder": 0.90, "encoder_vs_ceiling": 0.90, "pool_build_img_per_s_h100": 9000},
    }
    if engines is not None:
        result["engines"] = engines
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
