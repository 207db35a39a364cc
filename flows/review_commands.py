"""The reviewer's and the auditor's commands: ``approve``, ``reject``, ``rollback``, ``requeue`` and ``lineage``
(what a person decides about, or asks of, a model version), apart from the commands that make them.
Same contract as :mod:`flows.commands`: parsed arguments in, an exit code out, output through
:mod:`flows.console`."""

from __future__ import annotations

import argparse
import json
import sys

from flows.commands import EXIT_INVALID, EXIT_OK, EXIT_USAGE, fail, resolve_config, resolve_existing


def cmd_lineage(args: argparse.Namespace) -> int:
    from components.registry.lineage import LineageError, build_lineage, format_lineage
    from components.registry.registry import from_config

    config = resolve_existing(args)  # the registry's database lives in the workspace
    registry = from_config(config)
    if not registry.versions():
        return fail(
            "lineage",
            f"no model version of {registry.model_name!r} is registered in {config.workspace_path} yet "
            "(a night registers one per learned task: `cliploop nightly`)",
            EXIT_USAGE,
        )
    from components.pipeline.review import record_manual_alias

    # The auditor reads the chain head: an alias moved by hand since the last night is recorded first.
    for line in record_manual_alias(config):
        print(f"recorded: {line}", file=sys.stderr)
    try:
        record = build_lineage(registry, args.ref, config.workspace_path, verify=args.verify)
    except LineageError as exc:
        return fail("lineage", exc, EXIT_USAGE)
    if args.verify:
        _verify_registry(config, registry, record)
    print(json.dumps(record, indent=2) if args.json else format_lineage(record))
    return EXIT_INVALID if record["verified"] is False else EXIT_OK


def _verify_registry(config, registry, record: dict) -> None:
    """``--verify`` also holds the registry to the ledger (a version the ledger says was registered and the
    registry lacks, or holds as another task's, is a mismatch, as much as a changed byte of data) and the
    version's stored model to the digests its registration pinned."""
    from components.intake.workspace import open_ledger, workspace_paths
    from components.registry import registry_check
    from components.registry.model_pins import verify_version

    found = []
    if workspace_paths(config)["ledger"].is_file():  # an auditor's clone has none (.cliploop/ is not in git)
        with open_ledger(config) as ledger:
            found = [f"registry and ledger disagree: {line}" for line in registry_check.problems(ledger, registry)]
    # The model's own files, re-hashed against the digests pinned at registration.
    found += verify_version(registry, int(record["model"]["version"]))
    if found:
        record["problems"] = [*record["problems"], *found]
        record["verified"] = False


def _reviewer(args) -> str:
    import getpass

    return args.reviewer or getpass.getuser()


def _review(args: argparse.Namespace, decision: str, note: str) -> int:
    from components.pipeline import review
    from components.registry.registry import from_config
    from flows.console import review_text

    config = resolve_config(args, writes=True)
    registry = from_config(config)
    # A version that does not exist and other registry errors are mapped by flows.cli (exit 2 or 4).
    version = registry.resolve(args.version)
    was_pending = registry.version_tags(version).get("review") == "pending"
    result = review.decide(
        config, version, decision, _reviewer(args), note, override_gate=getattr(args, "override_gate", False)
    )
    resumed: list[str] = []
    if was_pending:
        from flows.update import resume_waiting

        try:
            resumed = resume_waiting(config, version, decision, _reviewer(args), note)
        except Exception as exc:  # no Prefect API reachable: the decision stands; the paused run times out
            print(
                f"cliploop {decision}: decision recorded, but no paused flow run could be resumed ({exc})",
                file=sys.stderr,
            )
    print(review_text(version, decision, result, resumed))
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    return _review(args, "approve", args.note)


def cmd_reject(args: argparse.Namespace) -> int:
    return _review(args, "reject", args.reason)


def cmd_rollback(args: argparse.Namespace) -> int:
    from components.pipeline import review
    from flows.console import rollback_text

    print(rollback_text(review.rollback(resolve_config(args, writes=True), _reviewer(args), args.note)))
    return EXIT_OK


def cmd_requeue(args: argparse.Namespace) -> int:
    from components.pipeline import review

    review.requeue(resolve_config(args, writes=True), args.task_id)
    print(f"task {args.task_id} will be learned again next night")
    return EXIT_OK


def cmd_move_registry(args: argparse.Namespace) -> int:
    """The deliberate move to another registry (a new tracking server, another database): the ledger records
    the configured registry as the workspace's, and the tasks whose versions it lacks are learned again."""
    from components.intake.workspace import open_ledger
    from components.pipeline.chain import chain_lock
    from components.registry import registry_check
    from components.registry.registry import from_config

    config = resolve_config(args, writes=True)
    registry = from_config(config)
    where = registry_check.describe(registry)
    with chain_lock(config), open_ledger(config) as ledger:  # no night of this chain runs meanwhile
        before = ledger.meta(registry_check.META_KEY)
        moves = registry_check.adopt(ledger, registry) if args.yes else registry_check.plan_move(ledger, registry)
    if before is not None and before.get("identity") == where["identity"]:
        print(f"model {where['model']!r} at {where['uri']} is this workspace's registry already")
    else:
        print(
            f"{'moved' if args.yes else 'would move'} this workspace's registry "
            + (f"from model {before['model']!r} at {before['uri']} " if before else "")
            + f"to model {where['model']!r} at {where['uri']}"
        )
    for move in moves:
        print(f"  {move['task_id']}: v{move['version']} is not there; {move['from']} -> {move['to']}")
    if not moves:
        print("  every version the ledger names is there: no task changes")
    if not args.yes:
        print("nothing changed; run again with --yes to move")
    return EXIT_OK
