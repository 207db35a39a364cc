"""Can DIKI's task selection tell unseen images from the tasks' own? One proving-ground sequence, as JSON.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/diki_selection.py --seed 4

DIKI (docs/methods/diki.md) scales each image's injected prefixes by a calibrated function of its best
log-likelihood under the learned tasks' Gaussians, so an image unlike every task should get a weight near zero and
keep the frozen CLIP's prediction. That can only work where the likelihood ranks unseen images below the tasks' own
images. This script learns the quick proving-ground sequence of ``--seed`` with ``diki`` (the schedule, the cached
base model and the shared config of ``benchmarks/proving_ground.py``), then computes, on the frozen model's
embeddings, each test image's best log-likelihood under the last state's Gaussians, for every task's test split
and for the held-out set (classes no task or pretraining used). Printed per task and for all tasks together: the
mean log-likelihood per dimension, the median calibrated weight (with the state's own calibration width) and
``auroc_vs_heldout``, the chance that a task's test image scores above a held-out image (ties count half). 1.0:
every calibration threshold that keeps the tasks' images can switch the held-out ones off; 0.5 or below: no
increasing function of the likelihood (no calibration at all) gives the held-out images less weight than the tasks'
own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads collapse on shared cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def auroc(positive, negative) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney statistic over all pairs)."""
    import torch

    pos, neg = torch.as_tensor(positive).double().unsqueeze(1), torch.as_tensor(negative).double().unsqueeze(0)
    return float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=4, help="the proving-ground sequence")
    parser.add_argument("--work", help="folder for the drops and runs (default: a temporary one)")
    parser.add_argument("--bench", default="{}", help="JSON of GlyphBench sizes to change (tests: tiny runs)")
    parser.add_argument("--iterations", type=int, help="steps per task (default: the quick proving ground's)")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.proving_ground import QUICK, method_overrides, sequence_overrides
    from components.methods.base import Context
    from components.methods.diki import DIKI, gaussian_log_prob
    from components.model.backbones import load_backbone
    from components.model.data import load_task
    from components.scenarios.glyph_bench import GlyphBench, write_bench
    from components.scenarios.glyph_model import build_base_model
    from components.settings.config_loading import load_config
    from components.support.storage import cache_dir
    from components.training.learn import learn_step

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    sizes = {"train_per_class": QUICK["train_per_class"], "test_per_class": QUICK["test_per_class"]}
    bench = GlyphBench(seed=args.seed, **{**sizes, **json.loads(args.bench)})
    work = Path(args.work or tempfile.mkdtemp(prefix="diki-selection-"))
    layout = write_bench(bench, work / "drops", say=lambda _: None)
    base_path = build_base_model(bench, cache_dir() / "glyph", progress=lambda m: print(m, file=sys.stderr))
    overrides = [
        *sequence_overrides(base_path, work, work / "drops", layout, args.seed),
        "method.name=diki",
        *method_overrides("diki", args.iterations or QUICK["iterations"], 1e-3, work / "drops" / layout["reference"]),
    ]
    config = load_config(overrides=overrides, env={}, cwd=work)
    tasks = [load_task(work / "drops" / t) for t in layout["tasks"]]
    base = load_backbone(config.model)
    state, by_id = None, {t.task_id: t for t in tasks}
    for i, task in enumerate(tasks):
        state = learn_step(task, config, state, locate=by_id.__getitem__, upcoming=tasks[i + 1 :], base=base).state

    method = DIKI(state.method_settings)
    means, factors = method.gaussians(state, "cpu")
    ctx = Context(base, batch_size=256)
    width = method.settings.calibration_width or base.embed_dim

    def best(task) -> torch.Tensor:
        features, _ = ctx.image_embeddings(task, "test")
        return gaussian_log_prob(features, means, factors).max(dim=1).values

    def figures(scores: torch.Tensor) -> dict:
        return {
            "images": len(scores),
            "mean_log_p_per_dim": round(float(scores.mean()) / width, 4),
            "median_weight": round(float(torch.sigmoid(scores / width - 1).median()), 4),
        }

    heldout = best(load_task(work / "drops" / layout["heldout"]))
    per_task, everything = {}, []
    for task in tasks:
        scores = best(task)
        everything.append(scores)
        per_task[task.task_id] = {**figures(scores), "auroc_vs_heldout": round(auroc(scores, heldout), 4)}
    tasks_scores = torch.cat(everything)
    doc = {
        "seed": args.seed,
        "calibration_width": width,
        "tasks": per_task,
        "all_tasks": {**figures(tasks_scores), "auroc_vs_heldout": round(auroc(tasks_scores, heldout), 4)},
        "heldout": figures(heldout),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
