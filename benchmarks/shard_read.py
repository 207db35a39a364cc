"""What the SHA-256 check of every stored image costs next to decoding it, in one run, as JSON.

    .venv/bin/python benchmarks/shard_read.py                 # 512 JPEGs of 256 px (defaults), CPU
    .venv/bin/python benchmarks/shard_read.py --side 512 --images 256

Every read of a stored task's bytes (training, pool building, re-validation) is checked against the
SHA-256 its index recorded (``components/intake/shards.py``): a flipped bit stops the step instead of being
trained on. Measured per image, in microseconds, over the same stored task:
  ``read``            the bytes from the shard, unchecked;
  ``read_checked``    the same read with the SHA-256 check (what cliploop does);
  ``decode``          Pillow's decode to RGB of those bytes (what every read is followed by);
  ``decode_resize``   decode plus the resize to 224 px that preprocessing does.
Ratios: ``check_vs_decode`` = (read_checked - read) / decode, the check's share of the work it guards,
and ``check_vs_decode_resize``. The task is synthetic JPEGs (real digits drawn large, with noise), packed
into shards exactly as ingestion stores them (``benchmarks/pool_build.py``'s task maker).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _per_image_us(fn, rows, rounds: int) -> float:
    """Median over rounds of the mean time per row, in microseconds."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for row in rows:
            fn(row)
        times.append((time.perf_counter() - started) / len(rows) * 1e6)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    from PIL import Image

    from benchmarks.pool_build import make_stored_task
    from components.intake.shards import Located, StoredTask

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_stored_task(Path(tmp) / "task", args.images, args.side)
        task = StoredTask(folder)
        rows = task.rows
        reader = task._reader  # the same reader StoredTask.read_row uses, minus the check
        unchecked = _per_image_us(lambda r: reader.read(Located(r["shard"], r["offset"], r["size"])), rows, args.rounds)
        checked = _per_image_us(task.read_row, rows, args.rounds)
        blobs = {r["path"]: task.read_row(r) for r in rows}

        def decode(row):
            with Image.open(io.BytesIO(blobs[row["path"]])) as im:
                return im.convert("RGB")

        decoded = _per_image_us(decode, rows, args.rounds)
        resized = _per_image_us(lambda r: decode(r).resize((224, 224), Image.BICUBIC), rows, args.rounds)
        task.close()
    check = max(checked - unchecked, 0.0)
    result = {
        "benchmark": "shard_read",
        "images": args.images,
        "side": args.side,
        "rounds": args.rounds,
        "mean_jpeg_bytes": round(sum(len(b) for b in blobs.values()) / len(blobs)),
        "us_per_image": {
            "read": round(unchecked, 1),
            "read_checked": round(checked, 1),
            "decode": round(decoded, 1),
            "decode_resize": round(resized, 1),
        },
        "check_vs_decode": round(check / decoded, 3),
        "check_vs_decode_resize": round(check / resized, 3),
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
