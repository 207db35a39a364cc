"""Bad task drops, one per validation rule (tests/test_validation.py): each case is a mutation of a valid drop, the rule
it breaks, the text that rule's messages must contain, config overrides, and how many rows the rule's expectation
counts as failing."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import yaml

from components.intake.validation_report import RULES
from tests.drops import append_rows, png_bytes, read_manifest, write_manifest


def crafted_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but whose pixel data is a few bytes: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def tiff_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="TIFF")
    return buf.getvalue()


def _drop_column(d: Path, ctx):
    rows = read_manifest(d)
    write_manifest(d, [r[:2] for r in rows[1:]], header=["path", "label"])


def _extra_column(d: Path, ctx):
    rows = read_manifest(d)
    write_manifest(d, [r + ["0.5"] for r in rows[1:]], header=["path", "label", "split", "weight"])


def _only_split(keep: str):
    def mutate(d: Path, ctx):
        rows = read_manifest(d)
        write_manifest(d, [r for r in rows[1:] if r[2] == keep])

    return mutate


def undeclared_label(d: Path, ctx):
    (d / "img" / "zebra.png").write_bytes(png_bytes(9001))
    append_rows(d, [["img/zebra.png", "zebra", "train"]])
    ctx["row"] = "img/zebra.png"


def _truncate(d: Path, ctx):
    target = d / "img" / "train-bird-0.png"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    ctx["row"] = "img/train-bird-0.png"


def _garbage(d: Path, ctx):
    (d / "img" / "train-fish-1.png").write_bytes(os.urandom(300))
    ctx["row"] = "img/train-fish-1.png"


def _missing_file(d: Path, ctx):
    append_rows(d, [["img/not-there.png", "bird", "train"]])
    ctx["row"] = "img/not-there.png"


def _bomb(d: Path, ctx):
    (d / "img" / "bomb.png").write_bytes(crafted_png(100_000, 100_000))
    append_rows(d, [["img/bomb.png", "bird", "train"]])
    ctx["row"] = "img/bomb.png"


def _dotdot(d: Path, ctx):
    (d.parent / "outside.png").write_bytes(png_bytes(77))
    append_rows(d, [["../outside.png", "bird", "train"]])
    ctx["row"] = "../outside.png"


def _absolute(d: Path, ctx):
    (d.parent / "abs.png").write_bytes(png_bytes(78))
    append_rows(d, [[str(d.parent / "abs.png"), "bird", "train"]])
    ctx["row"] = str(d.parent / "abs.png")


def _symlink(d: Path, ctx):
    (d.parent / "secret.png").write_bytes(png_bytes(79))
    os.symlink(d.parent / "secret.png", d / "img" / "link.png")
    append_rows(d, [["img/link.png", "bird", "train"]])
    ctx["row"] = "img/link.png"


def _duplicate_row(d: Path, ctx):
    rows = read_manifest(d)
    append_rows(d, [rows[1]])
    ctx["row"] = rows[1][0]


def _leak(d: Path, ctx):
    shutil.copyfile(d / "img" / "train-bird-0.png", d / "img" / "copy.png")
    append_rows(d, [["img/copy.png", "bird", "test"]])
    ctx["row"] = "img/copy.png"


def _seen_before(d: Path, ctx):
    shutil.copyfile(ctx["earlier"] / "img" / "train-cat-0.png", d / "img" / "old.png")
    append_rows(d, [["img/old.png", "bird", "train"]])
    ctx["row"] = "img/old.png"


def _tiff(d: Path, ctx):
    (d / "img" / "train-bird-1.png").write_bytes(tiff_bytes())
    ctx["row"] = "img/train-bird-1.png"


def _animated(fmt: str, suffix: str):
    """A three-frame animation: which frame would be the labelled picture?"""

    def mutate(d: Path, ctx):
        from PIL import Image

        frames = [Image.new("RGB", (16, 16), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
        rel = f"img/animated.{suffix}"
        frames[0].save(d / rel, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        append_rows(d, [[rel, "bird", "train"]])
        ctx["row"] = rel

    return mutate


def _respec(**changes):
    def mutate(d: Path, ctx):
        spec = yaml.safe_load((d / "task.yaml").read_text())
        spec.update(changes)
        (d / "task.yaml").write_text(yaml.safe_dump(spec))

    return mutate


def _relabel(old: str, new: str):
    """Class ``old`` renamed ``new`` in task.yaml and on every row: a consistent drop with other classes."""

    def mutate(d: Path, ctx):
        spec = yaml.safe_load((d / "task.yaml").read_text())
        spec["classes"] = [new if c == old else c for c in spec["classes"]]
        (d / "task.yaml").write_text(yaml.safe_dump(spec))
        write_manifest(d, [[r[0], new if r[1] == old else r[1], r[2]] for r in read_manifest(d)[1:]])

    return mutate


def _no_manifest(d: Path, ctx):
    (d / "manifest.csv").unlink()


def _declared_without_train(d: Path, ctx):
    spec = yaml.safe_load((d / "task.yaml").read_text())
    spec["classes"].append("owl")
    (d / "task.yaml").write_text(yaml.safe_dump(spec))


def _split_value(d: Path, ctx):
    (d / "img" / "val.png").write_bytes(png_bytes(9100))
    append_rows(d, [["img/val.png", "bird", "validation"]])
    ctx["row"] = "img/val.png"


def _empty_cell(column: int):
    """A row whose path (0) or split (2) is empty; the other cells as a valid row has them."""

    def mutate(d: Path, ctx):
        (d / "img" / "extra.png").write_bytes(png_bytes(9200))
        row = ["img/extra.png", "bird", "train"]
        row[column] = ""
        append_rows(d, [row])
        ctx["line"] = len(read_manifest(d))

    return mutate


def image_of(width: int, height: int):
    def mutate(d: Path, ctx):
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (width, height), (9, 99, 199)).save(buf, format="PNG")
        (d / "img" / "thin.png").write_bytes(buf.getvalue())
        append_rows(d, [["img/thin.png", "fish", "train"]])
        ctx["row"] = "img/thin.png"

    return mutate


# Each case: a mutation of a valid drop "toy-b" (classes bird, fish, 3 train and 2 test images each, 16×16), the
# rule that must fail and the text its messages must contain, config overrides, and the number of failing rows a
# row rule's expectation counts. "{row}" stands for "manifest.csv line N (path)" of the offending row.
CASES = {
    "missing-column": (_drop_column, "columns", ["missing column(s): split"], []),
    "extra-column": (_extra_column, "columns", ["unexpected column(s): weight"], []),
    "empty-test-split": (_only_split("train"), "split-nonempty", ["the test split is empty"], []),
    "empty-train-split": (_only_split("test"), "split-nonempty", ["the train split is empty"], []),
    "split-value": (_split_value, "split-value", ["{row}", "split 'validation' is not 'train' or 'test'"], []),
    "empty-path": (_empty_cell(0), "required-values", ["manifest.csv line {line}: column 'path' is empty"], []),
    "empty-split": (_empty_cell(2), "required-values", ["{line}", "column 'split' is empty"], []),
    "undeclared-label": (undeclared_label, "label-declared", ["{row}", "label 'zebra' is not declared"], []),
    "truncated-image": (_truncate, "image-readable", ["{row}", "cannot be decoded"], []),
    "unreadable-bytes": (_garbage, "image-format", ["{row}", "content is unknown"], []),
    "missing-file": (_missing_file, "image-readable", ["{row}", "not in the drop"], []),
    "decompression-bomb": (_bomb, "pixel-limit", ["{row}", "100000×100000", "over the limit"], []),
    "over-configured-pixels": (
        lambda d, c: c.update(row="img/train-bird-0.png"),
        "pixel-limit",
        ["{row}", "16×16", "validation.max_pixels"],
        ["validation.max_pixels=200"],
    ),
    "image-min-side": (image_of(7, 40), "image-min-side", ["{row}", "7×40 is smaller than 8 pixels on a side"], []),
    "over-configured-min-side": (
        lambda d, c: c.update(row="img/test-fish-1.png"),
        "image-min-side",
        ["{row}", "16×16 is smaller than 17 pixels"],
        ["validation.min_side=17"],
    ),
    "path-dotdot": (_dotdot, "path-safe", ["{row}", "contains '..'"], []),
    "path-absolute": (_absolute, "path-safe", ["{row}", "absolute"], []),
    "path-symlink": (_symlink, "path-safe", ["{row}", "symbolic link"], []),
    "duplicate-row": (_duplicate_row, "duplicate-rows", ["{row}", "also listed on line"], []),
    "train-test-leak": (_leak, "train-test-leak", ["{row}", "same image content as line"], []),
    "seen-in-earlier-task": (_seen_before, "seen-before", ["{row}", "already ingested in task toy-a"], []),
    "tiff-renamed": (_tiff, "image-format", ["{row}", "content is TIFF"], []),
    "animated-webp": (_animated("WEBP", "webp"), "image-readable", ["{row}", "is animated (3 frames)"], []),
    "animated-png": (_animated("PNG", "png"), "image-readable", ["{row}", "is animated (3 frames)"], []),
    "class-overlap": (
        _relabel("fish", "cat"),
        "scenario-classes",
        ["'cat'", "already learned in task toy-a"],
        [],
    ),
    "domain-class-mismatch": (
        _respec(scenario="domain-incremental", classes=["bird", "fish"]),
        "scenario-classes",
        ["unknown to dataset 'toy': bird, fish", "lacks known class(es)"],
        [],
    ),
    "class-without-train": (_declared_without_train, "class-has-train", ["class 'owl' has 0 training image(s)"], []),
    "bad-task-yaml": (_respec(scenario="sideways"), "task-yaml", ["scenario"], []),
    "task-yaml-not-yaml": (
        lambda d, c: (d / "task.yaml").write_text("task_id: toy-b\nclasses: [bird\n"),
        "task-yaml",
        ["task.yaml, line 3, column 1: not valid YAML: expected ',' or ']'"],
        [],
    ),
    "no-manifest": (_no_manifest, "manifest-readable", ["manifest.csv is missing"], []),
}
# Rules that fail with the case's own, by their definitions: no train rows at all leaves every class without one.
ALSO_FAILS = {"empty-train-split": {"class-has-train"}}
# Rules a Great Expectations expectation decides (components/intake/expectations.py), and how many rows fail each
# case's expectation: the bad row, or both rows that share a path or an image, or every image over a configured cap.
GX_RULES = set(RULES) - {"task-yaml", "manifest-readable", "class-has-train", "scenario-classes", "label-doubt"}
BAD_ROWS = {"duplicate-row": 2, "train-test-leak": 2, "over-configured-pixels": 10, "over-configured-min-side": 10}
NOT_ROWS = {"columns", "split-nonempty"}  # table-level expectations: no failing rows to count
