"""The data keeper's command: ``gc`` (collect the DVC objects nothing cliploop knows uses). Same contract as
:mod:`flows.commands`: parsed arguments in, an exit code out."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from flows.commands import EXIT_EXTERNAL, EXIT_OK, EXIT_REFUSED, fail, resolve_config


def cmd_gc(args: argparse.Namespace) -> int:
    from components.registry.data_gc import CollectRefused, collect

    config = resolve_config(args, writes=True)
    try:
        result = collect(config, delete=args.yes)
    except CollectRefused as exc:
        return fail("gc", f"refused, nothing deleted: {exc}", EXIT_EXTERNAL if exc.unavailable else EXIT_REFUSED)
    if args.json:
        print(json.dumps({"kept": result.kept, "stores": result.stores, "deleted": result.deleted}, indent=2))
        return EXIT_OK
    reasons = Counter(why.split(" ")[0] for why in result.kept.values())
    named = {"HEAD": "HEAD", "version": "of registered versions", "task": "of tasks in the ledger only"}
    print(
        f"keeps the data of the working tree and of {len(result.kept)} commit(s): "
        + ", ".join(f"{n} {named[kind]}" if kind != "HEAD" else "HEAD" for kind, n in reasons.items())
    )
    for store in result.stores:
        what = f"{store['unused']} of {store['objects']} objects used by nothing kept ({_size(store['bytes'])})"
        done = f"; removed {store['removed']}" if result.deleted else ""
        print(f"  {store['store']}: {what}{done}")
    if not result.deleted and any(s["unused"] for s in result.stores):
        print("dry run: nothing deleted; `cliploop gc --yes` deletes them")
    return EXIT_OK


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
