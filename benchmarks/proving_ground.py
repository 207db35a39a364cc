"""The proving ground: every registered method over the glyph sequence, from the glyph base model, as JSON.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/proving_ground.py --seed 0 --quick > proving-seed0.json

Offline and deterministic from ``--seed`` (which tasks, classes and images the sequence gets; the pretraining
corpus and so the base model stay those of ``--pretrain-seed``, so one cached base serves every seed). Steps:
the drops are written (``components.scenarios.glyph_bench``), the base model is pretrained or found in the cache
(``components.scenarios.glyph_model``, under ``$CLIPLOOP_CACHE/glyph``), and each method learns the tasks in order
through ``components.training.learn.learn_step``, as ``cliploop learn`` does (no Prefect, MLflow or DVC).

Methods compared side by side run on one schedule: ``iterations`` steps of batch 64 a task (100 with
``--quick``, 300 without), every step-counted setting (warmup, ZSCL's ensemble interval) a tenth of the run,
and one AdamW peak lr (``--lr``, 1e-3). That is the scaling rule for this model, as configuration: the
official 1e-5 over 1000 steps is for ViT-B/16, and this model is 1000x smaller and its run 10x shorter; at
3e-4 and 50 steps fine-tuning hardly learned (REPRODUCIBILITY.md, "Small scale: the glyph proving ground
(offline, 2 CPU cores)"). SG keeps its official SGD step size, which is on another scale; each method keeps
its own lr shape and losses. ZSCL and GNSP distil on the reference drop (images of the pretraining
distribution, captioned in the model's own prompt form).

Printed, per method: ``matrix`` (accuracy %, rows after learning task i; CIL tasks scored over every class
seen), ``initial`` (the base model), ``forgetting`` (the usual definition, label space growing),
``forgetting_fixed`` (each task scored among its own classes only: drift without growth), ``new_task``
(each task right after learning it), ``transfer`` / ``avg`` / ``last`` (MTIL's), ``zero_shot_retention``
(held-out classes, after minus before, points), ``zero_shot_after``, ``held_out_by_tower`` (the held-out
20-way accuracy of the learned CLIP weights, and with only the image or only the text tower learned, the
other put back to the base model's: which tower lost it) and ``seconds``. Also the base model's
``zero_shot_heldout`` accuracy (20-way and over the whole held-out set, with chance).

Methods run in worker processes, one per core (``--jobs``), each on one thread: this model's training
step measured 64 ms on one thread and 76 ms on two in one process, and two one-thread processes ran at
60-62 ms each side by side. Results are deterministic for a given ``--jobs`` and thread count; another
thread count sums in another order, which can move a figure by a test image or two.
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

QUICK = {"iterations": 100, "train_per_class": 30, "test_per_class": 15}
FULL = {"iterations": 300, "train_per_class": 40, "test_per_class": 20}


def method_overrides(name: str, iterations: int, lr: float, reference: Path) -> list[str]:
    """The matched schedule for a method that trains (nothing for one that does not)."""
    from components.methods import get_method

    cls = get_method(name)
    if not cls.trains:
        return []
    settings = cls.Settings()
    out = [
        f"method.settings.iterations={iterations}",
        "method.settings.batch_size=64",
        *(f"method.settings.{s}={max(1, iterations // 10)}" for s in getattr(settings, "step_intervals", {})),
    ]
    if settings.optimizer == "adamw":
        out.append(f"method.settings.lr={lr}")
    if "reference_set" in type(settings).model_fields:
        out.append(f"method.settings.reference_set={reference}")
    return out


def own_space_accuracy(config, state, tasks, name: str) -> list[float]:
    """Each task's test accuracy among its own classes only, for the learner ``state`` (the serving path:
    the method rebuilt from the state's settings, the backbone from its weights)."""
    import torch

    from components.model.backbones import load_backbone
    from components.model.data import make_loader
    from components.training.learn import make_method
    from components.training.run_context import context_for

    method = make_method(config, name)
    method.settings = method.Settings.model_validate(state.method_settings or method.settings.model_dump())
    backbone = load_backbone(config.model, weights=state.weights)
    by_id = {t.task_id: t for t in tasks}
    ctx = context_for(config, backbone, locate_task=lambda task_id: by_id[task_id])
    names = {c.key: c.name for c in state.classes}
    out = []
    with torch.inference_mode():
        for task in tasks:
            keys = list(task.class_keys)
            names.update(zip(task.class_keys, task.class_names))
            correct = total = 0
            for images, labels in make_loader(task.dataset_for("test", backbone.preprocess), 256, 0):
                scores = method.scores(state, images, keys, names, ctx)
                correct += int((scores.argmax(1).cpu() == labels).sum())
                total += len(labels)
            out.append(round(100.0 * correct / total, 4))
    return out


def held_out_by_tower(config, state, base, heldout, seed: int) -> dict | None:
    """Held-out 20-way zero-shot accuracy (%, CLIP's text classifier) of the learner's weights, and with one
    tower learned and the other put back to the base model's: which tower lost what the method lost."""
    from components.methods.tuning import TEXT_TOWER
    from components.model.backbones import load_backbone
    from components.scenarios.glyph_model import zero_shot

    if not state.weights or heldout is None:
        return None
    start = base.model.state_dict()
    out = {}
    for label, keep in (
        ("learned", lambda k: True),
        ("image_learned", lambda k: not k.startswith(TEXT_TOWER)),
        ("text_learned", lambda k: k.startswith(TEXT_TOWER)),
    ):
        mixed = {k: state.weights[k] if keep(k) and k in state.weights else v for k, v in start.items()}
        backbone = load_backbone(config.model, weights=mixed)
        figures = zero_shot(backbone, heldout, seed=seed)
        out[label] = round(100 * next(v for k, v in figures.items() if k.endswith("_way")), 2)  # 20-way (or fewer)
    return out


def run_method(name: str, config, tasks, base, heldout=None) -> dict:
    from components.training.learn import learn_step
    from components.training.metrics import AccuracyMatrix, forgetting

    started = time.perf_counter()
    state, fixed_rows, step = None, [], None
    by_id = {t.task_id: t for t in tasks}
    for i, task in enumerate(tasks):
        step = learn_step(task, config, state, locate=by_id.__getitem__, upcoming=tasks[i + 1 :], base=base)
        state = step.state
        learned = tasks[: i + 1]
        fixed_rows.append(own_space_accuracy(config, state, learned, name) + [None] * (len(tasks) - i - 1))
    seconds = time.perf_counter() - started
    m, metrics = step.matrix, step.metrics
    fixed = AccuracyMatrix(tasks=m.tasks, matrix=fixed_rows, test_sizes=m.test_sizes)
    zs = m.zero_shot or {}
    return {
        "matrix": m.matrix,
        "initial": m.initial,
        "forgetting": metrics["cl.forgetting"],
        "forgetting_fixed": forgetting(fixed),
        "matrix_fixed": fixed_rows,
        "new_task": sum(m.matrix[i][i] for i in range(len(tasks))) / len(tasks),
        "transfer": metrics["mtil.transfer"],
        "avg": metrics["mtil.avg"],
        "last": metrics["mtil.last"],
        "zero_shot_retention": metrics["zs.retention_abs"],
        "zero_shot_after": (zs.get("after") or [None])[-1],
        "held_out_by_tower": held_out_by_tower(config, state, base, heldout, config.evaluation.seed),
        "seconds": round(seconds, 1),
    }


def sequence_overrides(base_path: Path, work: Path, drops: Path, layout: dict, seed: int) -> list[str]:
    """The config every method's run of one sequence shares: the base model, the workspace, the evaluation."""
    from components.scenarios.glyph_model import model_overrides

    return [
        *model_overrides(base_path),
        f"workspace={work / 'workspace'}",
        f"evaluation.zero_shot_set={drops / layout['heldout']}",
        f"evaluation.seed={seed}",
        "evaluation.batch_size=256",
        "model.device=cpu",
    ]


def settings_problem(names: list[str], iterations: int, lr: float, overrides: list[str]) -> str | None:
    """Why a method's configuration (its name, the matched schedule, the --set overrides) would be refused."""
    from components.methods import MethodError
    from components.settings.config_loading import ConfigError, load_config
    from components.training.learn import LearnError, make_method

    cwd = Path(tempfile.gettempdir())
    for name in names:
        try:
            schedule = method_overrides(name, iterations, lr, Path("reference"))
            make_method(load_config(overrides=[f"method.name={name}", *schedule, *overrides], env={}, cwd=cwd), name)
        except (ConfigError, MethodError, LearnError) as exc:
            return f"{name}: {exc}"
    return None


def summary(figures: dict) -> str:
    return f"forgetting {figures['forgetting']}, last {figures['last']}, {figures['seconds']} s"


def method_figures(
    name: str,
    common: list[str],
    work: Path,
    drops: Path,
    layout: dict,
    iterations: int,
    lr: float,
    threads: int,
    extra: tuple[str, ...] = (),
) -> dict:
    """One method over the sequence (everything loaded here, so that a worker process can run it)."""
    import torch

    from components.model.backbones import load_backbone
    from components.model.data import load_task
    from components.settings.config_loading import load_config

    torch.set_num_threads(threads)
    schedule = method_overrides(name, iterations, lr, drops / layout["reference"])
    overrides = [*common, f"method.name={name}", *schedule, *extra]
    config = load_config(overrides=overrides, env={}, cwd=work)
    tasks = [load_task(drops / t) for t in layout["tasks"]]
    return run_method(name, config, tasks, load_backbone(config.model), load_task(drops / layout["heldout"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the sequence's seed (tasks, classes, images)")
    parser.add_argument("--pretrain-seed", type=int, default=0, help="the pretraining corpus (the base model)")
    parser.add_argument("--quick", action="store_true", help="shorter tasks: fits 15 minutes on 2 cores")
    parser.add_argument("--methods", help="comma-separated subset (default: every registered method)")
    parser.add_argument("--iterations", type=int, help="steps per task (default: 100 quick, 300 full)")
    parser.add_argument("--lr", type=float, default=1e-3, help="the AdamW peak lr of every AdamW method")
    parser.add_argument("--work", help="folder for the drops and runs (default: a temporary one)")
    parser.add_argument("--bench", default="{}", help="JSON of GlyphBench sizes to change (tests: tiny runs)")
    parser.add_argument("--base-steps", type=int, help="pretraining steps (default: the recipe's)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every method run, after the matched schedule (an experiment, e.g. "
        "method.settings.alpha=0.5 with --methods wise-ft: a method's setting only with methods that have it)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="methods run at once, each in a worker process with cores/jobs threads (default: one per core, "
        "at most one per method; this model trains faster on one thread a process than on two in one)",
    )
    args = parser.parse_args(argv)

    import torch

    from components.methods import available_methods
    from components.model.backbones import load_backbone
    from components.model.data import load_task
    from components.scenarios.glyph_bench import GlyphBench, write_bench
    from components.scenarios.glyph_model import build_base_model, zero_shot
    from components.settings.config_loading import load_config
    from components.support.storage import cache_dir

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    sizes = QUICK if args.quick else FULL
    fields = {"train_per_class": sizes["train_per_class"], "test_per_class": sizes["test_per_class"]}
    bench = GlyphBench(seed=args.seed, pretrain_seed=args.pretrain_seed, **{**fields, **json.loads(args.bench)})
    iterations = args.iterations or sizes["iterations"]
    names = args.methods.split(",") if args.methods else list(available_methods())
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    problem = settings_problem(names, iterations, args.lr, args.overrides)
    if problem:  # before minutes of pretraining, and in one line
        print(f"proving_ground: {problem}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="proving-ground-"))
    drops = work / "drops"
    layout = write_bench(bench, drops, say=say)
    changes = {"steps": args.base_steps} if args.base_steps else {}
    base_started = time.perf_counter()
    path = build_base_model(bench, cache_dir() / "glyph", progress=say, **changes)
    base_s = time.perf_counter() - base_started
    common = sequence_overrides(path, work, drops, layout, args.seed)
    config = load_config(overrides=common, env={}, cwd=work)
    base = load_backbone(config.model)
    heldout = zero_shot(base, load_task(drops / layout["heldout"]), seed=args.seed)
    say(f"base model {path.name}: held-out zero-shot {heldout}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = max(1, min(args.jobs or cores, len(names)))
    threads = max(1, cores // jobs) if args.jobs else 1
    extra = tuple(args.overrides)
    work_items = [(name, common, work, drops, layout, iterations, args.lr, threads, extra) for name in names]
    results = {}
    if jobs == 1:
        for job in work_items:
            say(f"-- {job[0]}")
            results[job[0]] = method_figures(*job)
            say(f"   {summary(results[job[0]])}")
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # a fork would copy this process's torch thread pool
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {job[0]: pool.submit(method_figures, *job) for job in work_items}
            for name, future in futures.items():
                results[name] = future.result()
                say(f"-- {name}: {summary(results[name])}")
    doc = {
        "seed": args.seed,
        "pretrain_seed": args.pretrain_seed,
        "quick": args.quick,
        "iterations": iterations,
        "adamw_lr": args.lr,
        "overrides": list(extra),
        "bench": bench.model_dump(),
        "tasks": layout["tasks"],
        "base_model": {"file": path.name, "build_or_load_s": round(base_s, 1)},
        "zero_shot_heldout": heldout,
        "methods": results,
        "seconds": round(time.perf_counter() - started, 1),
        "threads": threads,
        "jobs": jobs,
    }
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
