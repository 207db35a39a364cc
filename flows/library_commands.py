"""The library's commands, which need no pipeline (no ledger of nights, no registry): ``learn`` (a method over
task drops), ``methods`` (the registered methods and their settings), ``pool`` (one stored task's pool by hand),
``scenario`` (the papers' benchmark scenarios and the glyph proving ground) and ``metrics`` (from an accuracy
matrix). Same contract as :mod:`flows.commands`: parsed arguments in, an exit code out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.commands import EXIT_OK, EXIT_USAGE, fail, resolve_config


def cmd_metrics(args: argparse.Namespace) -> int:
    from components.training import metrics

    return metrics.main([args.matrix] + (["--json"] if args.json else []))


def cmd_learn(args: argparse.Namespace) -> int:
    from components.training import learn_sequence

    # The method that will run (--method, else method.name) is checked with its settings before anything loads.
    resolve_config(args, [f"method.name={args.method}"] if args.method else [])
    if args.workspace:
        args.overrides = list(args.overrides) + [f"workspace={Path(args.workspace).resolve()}"]
    return learn_sequence.run_cli(args)


def cmd_methods(args: argparse.Namespace) -> int:
    from components.methods import MethodError, available_methods, get_method
    from flows.console import method_settings_text, methods_text

    if not args.name:
        print(methods_text({name: get_method(name) for name in available_methods()}))
        return EXIT_OK
    try:
        cls = get_method(args.name)
    except MethodError as exc:
        return fail("methods", exc, EXIT_USAGE)
    if args.json:
        print(json.dumps(cls.Settings().model_dump(mode="json"), indent=2))
    else:
        head, _, rest = method_settings_text(args.name, cls).partition("\n")
        print(f"{head}\ntrains: {cls.trained_text()}\n{rest}")
    return EXIT_OK


def cmd_pool(args: argparse.Namespace) -> int:
    """One stored task's pool, built with the configured (or --engine) engine into the pipeline's keyed folder
    (reused when complete) or --out; prints the folder and the SHA-256 of the pool's tensors."""
    from components.pipeline.stored_pool import build_stored_pool

    config = resolve_config(args, [f"compute.engine={args.engine}"] if args.engine else [])
    if not (config.workspace_path / "data" / "tasks" / args.task_id / "index.csv").is_file():
        return fail("pool", f"no stored task {args.task_id!r} in {config.workspace_path} (cliploop status)", EXIT_USAGE)
    out = build_stored_pool(config, args.task_id, Path(args.out) if args.out else None)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        reused = " (reused: already built)" if out["cached"] else ""
        print(f"pool of {args.task_id} ({out['engine']}){reused}: {out['pool_dir']}\nsha256: {out['tensors_sha256']}")
    return EXIT_OK


def cmd_scenario(args: argparse.Namespace) -> int:
    from components.scenarios import catalog as scenario
    from flows.console import scenario_tasks_text, scenarios_text

    try:
        if args.action == "list":
            print(scenarios_text(scenario.list_scenarios()))
        elif args.action == "show":
            print(scenario_tasks_text(scenario.load_scenario(args.name)))
        elif args.action == "glyphs":
            from pydantic import ValidationError

            from components.scenarios.glyph_bench import GlyphBench, write_bench

            try:
                sizes: dict = {k.strip(): int(v) for k, v in (item.split("=", 1) for item in args.size)}
                if args.domains:
                    sizes["domains"] = tuple(d.strip() for d in args.domains.split(","))
                bench = GlyphBench(seed=args.seed, pretrain_seed=args.pretrain_seed, **sizes)
                write_bench(bench, Path(args.out), include_pretrain=args.pretrain)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise scenario.ScenarioError(f"glyphs: {problems}") from None
            except ValueError as exc:  # a benchmark larger than the fonts allow
                raise scenario.ScenarioError(f"glyphs: {exc}") from None
        else:
            scenario.convert(
                scenario.load_scenario(args.name),
                Path(args.out),
                Path(args.root).expanduser(),
                args.download,
                args.limit_per_class,
                args.tasks.split(",") if args.tasks else None,
            )
    except scenario.ScenarioError as exc:
        return fail("scenario", exc, EXIT_USAGE)
    return EXIT_OK
