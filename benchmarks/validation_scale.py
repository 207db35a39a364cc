"""Validation time and peak memory against the size of a drop's manifest, clean and with bad rows, as JSON.

    .venv/bin/python benchmarks/validation_scale.py                       # 10k, 100k, 1M rows (~20 min, 4 GB disk)
    .venv/bin/python benchmarks/validation_scale.py --sizes 1000,10000    # a quick look

One drop is written for the largest size (in ``--workdir``, default a temporary folder removed afterwards): a
``task.yaml`` of 10 classes and one distinct 8×8 PNG per row, 1,000 to a folder. Each size then gets its own
``manifest.csv`` over the first images, in two variants: ``clean`` (every row valid: a fifth of each class's
rows test, the rest train) and ``bad`` (every tenth row bad, alternately a file the manifest names but the drop lacks,
and a duplicate of the first row: the worst case for messages that name the other lines of a path).

Every (size, variant) runs in a fresh Python process, so that its peak RSS is its own: the whole of
``cliploop validate DROP --report-dir DIR`` (``drop_check.validate_location``: the manifest read, every image
read and decoded, the content digest, the ledger look-ups against an empty ledger, the Great Expectations suites
with their Data Docs, the report written). Printed per variant and size:
  ``seconds``          wall time of the validation, after the imports (``child_seconds``: the whole process);
  ``peak_rss_mb``      the process's peak resident memory (``getrusage`` in the child, ``ru_maxrss``), and
                       ``import_rss_mb`` its resident memory after the imports, before validating;
  ``report_kb``, ``data_docs_kb``  the size of what was written; ``failed`` the count per failed rule;
and ``growth`` between consecutive sizes: ratios of rows, of seconds and of the memory above the imports,
``vs_linear`` being a ratio over the rows' ratio. Target (read from the output, never asserted): ``vs_linear``
at most 1.3 for seconds and memory, and under 1 GB peak RSS at 1M rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = [f"class-{k}" for k in range(10)]
BAD_EVERY = 10  # every tenth row is bad in the "bad" variant


def png(index: int) -> bytes:
    """An 8×8 RGB PNG whose pixels spell ``index``: distinct content for every row, written without a codec."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = (index.to_bytes(8, "big") * 3) * 8  # 8 rows of 24 bytes
    raw = b"".join(b"\x00" + pixels[r * 24 : (r + 1) * 24] for r in range(8))
    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def image_path(index: int) -> str:
    return f"img/{index // 1000:04d}/{index % 1000:03d}.png"


def write_images(drop: Path, count: int) -> None:
    """The drop's task.yaml and ``count`` images, unless an earlier run in the same workdir wrote enough."""
    marker = drop / ".images"
    if marker.exists() and int(marker.read_text()) >= count:
        return
    drop.mkdir(parents=True, exist_ok=True)
    (drop / "task.yaml").write_text(
        "task_id: scale\nscenario: class-incremental\ndataset: scale\nclasses: [" + ", ".join(CLASSES) + "]\n"
    )
    for start in range(0, count, 1000):
        (drop / image_path(start)).parent.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(start + 1000, count)):
            (drop / image_path(i)).write_bytes(png(i))
    marker.write_text(str(count))


def manifest(rows: int, variant: str) -> str:
    lines = ["path,label,split"]
    for i in range(rows):
        label, split = CLASSES[i % len(CLASSES)], "test" if (i // len(CLASSES)) % 5 == 0 else "train"
        path = image_path(i)
        if variant == "bad" and i % BAD_EVERY == BAD_EVERY - 1:
            if (i // BAD_EVERY) % 2 == 0:
                path = f"missing/{i}.png"  # named, not there
            else:
                path, label, split = image_path(0), CLASSES[0], "test"  # the first row again
        lines.append(f"{path},{label},{split}")
    return "\n".join(lines) + "\n"


def measure_one(drop: Path, report_dir: Path, workspace: Path) -> dict:
    """In the child process: validate the drop as ``cliploop validate`` does; time and memory."""
    started = time.perf_counter()
    import great_expectations  # noqa: F401  imported before the clock: any long-lived process has it loaded
    import pandas  # noqa: F401
    import PIL.Image  # noqa: F401

    from components.intake.drop_check import validate_location
    from components.settings.config_loading import load_config

    config = load_config(overrides=[f"workspace={workspace}"], env={}, cwd=workspace)
    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    report = validate_location(str(drop), config, report_dir)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    docs = report_dir / "data_docs"
    return {
        "seconds": round(seconds, 2),
        "child_seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(peak / 1024, 1),
        "import_rss_mb": round(import_rss / 1024, 1),
        "report_kb": round((report_dir / "report.json").stat().st_size / 1024, 1),
        "data_docs_kb": round(sum(p.stat().st_size for p in docs.rglob("*") if p.is_file()) / 1024, 1),
        "rows": report.stats.get("rows"),
        "success": report.success,
        "failed": {r.rule: r.count for r in report.failed_rules},
    }


def run_child(drop: Path, report_dir: Path, workspace: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--one", str(drop), str(report_dir), str(workspace)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"validation of {drop} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def growth(results: dict[str, dict]) -> dict[str, dict]:
    """Ratios between consecutive sizes; ``vs_linear`` over the ratio of rows (1 = linear)."""
    out = {}
    sizes = sorted(results, key=int)
    for small, big in zip(sizes, sizes[1:], strict=False):
        a, b = results[small], results[big]
        rows = int(big) / int(small)
        seconds = b["seconds"] / a["seconds"]
        memory = max(b["peak_rss_mb"] - b["import_rss_mb"], 1.0) / max(a["peak_rss_mb"] - a["import_rss_mb"], 1.0)
        out[f"{big}_vs_{small}"] = {
            "rows_ratio": round(rows, 2),
            "seconds_ratio": round(seconds, 2),
            "seconds_vs_linear": round(seconds / rows, 3),
            "memory_ratio": round(memory, 2),
            "memory_vs_linear": round(memory / rows, 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="manifest rows, comma-separated")
    parser.add_argument("--variants", default="clean,bad")
    parser.add_argument("--workdir", type=Path, help="keep the generated drop here and reuse it (default: temporary)")
    parser.add_argument("--one", nargs=3, metavar=("DROP", "REPORT_DIR", "WORKSPACE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(*(Path(p) for p in args.one))))
        return 0

    sizes = sorted(int(s) for s in args.sizes.split(","))
    variants = args.variants.split(",")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="cliploop-validation-"))
    try:
        drop, workspace = root / "drop", root / "ws"
        t0 = time.perf_counter()
        write_images(drop, sizes[-1])
        generated = time.perf_counter() - t0
        from components.intake.workspace import open_ledger
        from components.settings.config_loading import load_config

        workspace.mkdir(parents=True, exist_ok=True)
        open_ledger(load_config(overrides=[f"workspace={workspace}"], env={}, cwd=workspace)).close()  # empty
        results: dict[str, dict[str, dict]] = {v: {} for v in variants}
        for variant in variants:
            for n in sizes:
                (drop / "manifest.csv").write_text(manifest(n, variant))
                report_dir = root / "reports" / f"{variant}-{n}"
                shutil.rmtree(report_dir, ignore_errors=True)
                results[variant][str(n)] = run_child(drop, report_dir, workspace)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    grown = {v: growth(results[v]) for v in variants}
    ratios = [
        pair[key]
        for pairs in grown.values()
        for pair in pairs.values()
        for key in ("seconds_vs_linear", "memory_vs_linear")
    ]
    largest = [results[v][str(1_000_000)]["peak_rss_mb"] for v in variants if str(1_000_000) in results[v]]
    report = {
        "sizes": sizes,
        "bad_rows": f"1 in {BAD_EVERY}: alternately a file not in the drop and a duplicate of the first row",
        "results": results,
        "growth": grown,
        "target": {
            "vs_linear_max": 1.3,
            "linear": all(r <= 1.3 for r in ratios) if ratios else None,
            "rss_limit_mb_at_1m": 1024,
            "under_limit_at_1m": all(p < 1024 for p in largest) if largest else None,
        },
        "generate_seconds": round(generated, 1),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {platform.system()}",
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
