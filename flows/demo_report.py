"""The demo's closing report: the night, plain fine-tuning beside it, the ledger, the registry, and where the
night's time went (from its clock, ``flows/night_clock.py``)."""

from __future__ import annotations

from flows.console import ledger_text, night_text, number, table


def baseline_text(run) -> list[str]:
    """A method's figures beside plain fine-tuning of the same tasks with the same schedule (empty without one)."""
    b = run.baseline
    learned = [u for u in run.summary["updates"] if u.get("metrics")]
    if not b or not learned:
        return []
    mine = learned[-1]["metrics"]
    rows = [
        [run.config.method.name, number(mine.get("cl.forgetting")), number(mine.get("cl.last")), "this night"],
        [
            b["method"],
            number(b["forgetting"]),
            number(b["last"]),
            f"learned here in {b['seconds']:.1f} s, not registered",
        ],
    ]
    return [
        f"\n{run.config.method.name} against plain fine-tuning of the same tasks ({', '.join(b['tasks'])}), same "
        "schedule and seed:",
        table(rows, ["method", "forgetting", "cl.last", "run"]),
    ]


def demo_text(run) -> str:
    """The demo's closing report: the night, the ledger, the registry, where the time went, what to run next."""
    summary, ws = run.summary, run.config.workspace_path
    return "\n".join(
        [
            night_text(summary, run.config),
            *baseline_text(run),
            "\ntask ledger:",
            ledger_text(run.ledger),
            run.registry,
            f"\ndemo finished in {run.elapsed_s:.1f} s. {night_split_text(summary, run.night_s)}\n"
            f"  .venv/bin/cliploop status -w {ws}\n"
            f"  .venv/bin/cliploop lineage champion -w {ws} --verify\n"
            f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{ws / '.cliploop' / 'mlflow.db'} "
            f"--port 5000   (then http://127.0.0.1:5000)\n"
            f"  Prefect UI: .venv/bin/prefect server start   "
            f"(then http://127.0.0.1:4200; the demo's runs are there)",
        ]
    )


def night_split_text(summary: dict, night_s: float) -> str:
    """Where the night's time went, from its clock (flows/night_clock.py): each part of our code, and Prefect's."""
    clock = summary.get("clock") or {}
    ours = clock.get("ours_s") or {}
    if not ours:
        return f"The night took {night_s:.1f} s."
    night = clock["night_s"]
    ingest_s = ours.get("ingest", 0.0) + ours.get("discover", 0.0)
    register_s = ours.get("register-update", 0.0)
    learn_s = sum(float(p.get("seconds") or 0) for p in summary["pools"] if not p.get("cached"))
    learn_s += sum(float((u.get("timings") or {}).get("total_s") or 0) for u in summary["updates"])
    other_s = sum(ours.values()) - ingest_s - register_s - learn_s
    orchestration = clock["orchestration_s"]
    return (
        f"The night took {night:.1f} s: ingestion + validation + DVC {ingest_s:.1f} s, pools + training + evaluation "
        f"{learn_s:.1f} s, MLflow run + model + version {register_s:.1f} s, ledger + registry reads + gate + promotion "
        f"{other_s:.1f} s, orchestration (Prefect: flow and task runs, artifacts, its server's start-up) "
        f"{orchestration:.1f} s = {100 * orchestration / night:.0f}% (of which {clock['server_wait_s']:.1f} s waiting "
        "for the server)."
    )
