"""The consumer's commands: ``predict`` and ``export-model`` load a registered version only from a copy checked
against the digests its registration pinned (``components/registry/model_pins.py``), so nothing planted in the artifact
store is imported or read. Same contract as :mod:`flows.commands`: parsed arguments in, an exit code out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.commands import EXIT_OK, EXIT_USAGE, fail, resolve_existing


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from components.registry.model_pins import load_verified
    from components.registry.registry import from_config

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        return fail("predict", f"no such image file: {', '.join(missing)}", EXIT_USAGE)
    config = resolve_existing(args)  # an existing workspace: its registry is read, nothing made
    model = load_verified(from_config(config), args.ref)
    table = model.predict(pd.DataFrame({"image": [Path(p).read_bytes() for p in args.images]}))
    rows = [{"image": p, **row} for p, row in zip(args.images, table.to_dict("records"))]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['image']}: {row['label']} ({row['score']:.3f})")
    return EXIT_OK


def cmd_export_model(args: argparse.Namespace) -> int:
    from components.registry.model_pins import fetch_verified
    from components.registry.registry import from_config

    config = resolve_existing(args)  # an existing workspace: its registry is read, nothing made
    registry = from_config(config)
    version = registry.resolve(args.ref)
    dest = Path(args.dir)
    if dest.exists():
        return fail("export-model", f"{dest} exists: give a new folder", EXIT_USAGE)
    fetch_verified(registry, version, dest)
    print(f"version {version} of {registry.model_name!r}, every file checked against its pinned digest, in {dest}")
    print(f"serve it with: mlflow models serve -m {dest} --env-manager local")
    return EXIT_OK
