"""How many planted label flips the label-doubt check finds, at what false-alarm rate, as JSON.

    .venv/bin/python benchmarks/label_noise.py                      # paper and chalk digits, 10% flips (~3 min)
    .venv/bin/python benchmarks/label_noise.py --noise 0.2 --seed 1

The data ship inside scikit-learn (the demo's handwritten digits, ``components/scenarios/demo.py``): one drop per
domain (``paper``: the ink the demo's base model was warmed up on; ``chalk``: light on a dark board, a domain it has
not seen), the ten digits, the demo's task train and test images of each. A share ``--noise`` of the training rows
get another digit's name, drawn at random (seeded). Each drop is ingested for real into a fresh workspace whose model
is the demo's base model (built offline on first use, cached) and which has no champion yet, so the base model scores
it (``components/pipeline/label_scoring.py``) under the configured method, LVP's defaults.

Printed per domain: ``planted`` flips, ``found`` (flips the check doubted), ``recall`` = found / planted,
``false_alarms`` (clean rows doubted) and ``false_alarm_rate`` = false_alarms / clean rows, ``precision``, the
ingestion's verdict (accepted with a warning under the defaults), its ``seconds``, and ``by_confidence``: the same
figures at other floors (``validation.label_doubt_confidence``), from one scoring of the same rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLOORS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def write_drop(root: Path, domain: str, noise: float, seed: int) -> tuple[Path, set[int], int]:
    """The digits of ``domain`` as one drop with a share ``noise`` of its training labels flipped; returns the
    folder, the manifest lines of the flips and the number of training rows."""
    import numpy as np

    from components.scenarios import demo

    parts = demo.splits()
    train_key, test_key = ("train", "test") if domain == "paper" else ("domain_train", "domain_test")
    rows = [(i, label, "train") for label in range(10) for i in parts[train_key][label]]
    rows += [(i, label, "test") for label in range(10) for i in parts[test_key][label]]
    folder = demo._write_task(root, f"digits-{domain}-noisy", "class-incremental", list(range(10)), domain, rows)
    rng = np.random.default_rng(seed)
    train_lines = [n for n, row in enumerate(rows, start=2) if row[2] == "train"]
    flipped = set(rng.choice(train_lines, size=round(noise * len(train_lines)), replace=False).tolist())
    with open(folder / "manifest.csv", newline="") as fh:
        table = list(csv.reader(fh))
    for line in flipped:  # line n is table[n - 1] (the header is line 1)
        true = demo.NAMES.index(table[line - 1][1])
        table[line - 1][1] = demo.NAMES[(true + int(rng.integers(1, 10))) % 10]
    with open(folder / "manifest.csv", "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(table)
    return folder, flipped, len(train_lines)


def figures(doubted: set[int], flipped: set[int], train_rows: int) -> dict:
    found, false = len(doubted & flipped), len(doubted - flipped)
    clean = train_rows - len(flipped)
    return {
        "doubted": len(doubted),
        "found": found,
        "recall": round(found / len(flipped), 4) if flipped else None,
        "false_alarms": false,
        "false_alarm_rate": round(false / clean, 4) if clean else None,
        "precision": round(found / len(doubted), 4) if doubted else None,
    }


def run_domain(work: Path, domain: str, noise: float, seed: int, overrides: list[str]) -> dict:
    import numpy as np

    from components.intake import ingestion
    from components.intake.label_doubt import confident_doubts
    from components.intake.tasks import normalise_class_name, open_drop, read_metadata
    from components.pipeline.label_scoring import champion_scorer
    from components.settings.config_loading import load_config

    folder, flipped, train_rows = write_drop(work / "drops", domain, noise, seed)
    cfg = load_config(overrides=[f"workspace={work / f'ws-{domain}'}", *overrides], env={}, cwd=work)
    started = time.perf_counter()
    outcome = ingestion.ingest(str(folder), cfg, scorer=champion_scorer(cfg))
    seconds = time.perf_counter() - started
    section = json.loads(Path(outcome.report_path).read_text())["label_doubt"]
    out = {
        "domain": domain,
        "train_rows": train_rows,
        "planted": len(flipped),
        "model": section["model"],
        "scored": section["scored"],
        "agreement": section["agreement"],  # with the drop's (noisy) labels
        "not_checked": section["not_checked"],
        "status": outcome.status,
        "first_line": outcome.message.splitlines()[0],
        "seconds": round(seconds, 1),
        "confidence": cfg.validation.label_doubt_confidence,
        **figures({d["line"] for d in section["doubts"]}, flipped, train_rows),
    }
    # The other floors, from one more scoring of the same training rows (the model is loaded once).
    source = open_drop(str(folder))
    spec, manifest, _, _ = read_metadata(source)
    train = [row for row in manifest.rows if row.split == "train"]
    names = spec.class_names
    index = {normalise_class_name(n): i for i, n in enumerate(names)}
    probs = champion_scorer(cfg)(spec.dataset, names, [source.read(r.path, 1 << 20) for r in train])
    labels = np.array([index[normalise_class_name(r.label)] for r in train])
    out["by_confidence"] = {
        str(floor): figures({train[i].line for i in confident_doubts(labels, probs, floor)}, flipped, train_rows)
        for floor in FLOORS
    }
    out["top1_agreement_with_true_labels"] = round(
        float(np.mean([probs[k].argmax() == _truth(r) for k, r in enumerate(train)])), 4
    )
    return out


def _truth(row) -> int:
    """The digit an image really shows: its file name says (``<split>-<name>-<index>.png``), whatever its label."""
    from components.scenarios import demo

    return demo.NAMES.index(Path(row.path).name.split("-")[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.1, help="share of training labels flipped (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domains", default="paper,chalk")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    from components.scenarios import demo
    from components.support.storage import cache_dir

    # The demo's base model and its prompt (digits), on the CPU.
    overrides = [*demo.model_overrides(cache_dir() / "demo", progress=None), "model.device=cpu"]
    with tempfile.TemporaryDirectory(prefix="cliploop-label-noise-") as tmp:
        results = [run_domain(Path(tmp), d, args.noise, args.seed, overrides) for d in args.domains.split(",")]
    doc = {
        "benchmark": "label_noise",
        "noise": args.noise,
        "seed": args.seed,
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
