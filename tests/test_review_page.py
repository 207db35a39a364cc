"""What a reviewer sees on a model version in MLflow: the description and metric tags
(``components/registry/review_page.py``),
the pyfunc's signature and input example, the task's Data Docs with the run, and the champion served by
``mlflow models serve`` answering a PNG with a label.

The registry is real (MLflow on a SQLite file); the two versions are zero-shot learner states on the tiny
checkpoint, registered, gated and reviewed by the pipeline's own calls (no ingestion or training: seconds).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import warnings

import pytest

from components.model.state import ClassEntry, LearnerState
from components.pipeline import review
from components.registry import review_page
from components.registry.registry import from_config
from components.registry.registry_runs import EXAMPLE_PNG
from components.settings.config_loading import load_config
from tests.conftest import _empty_mlflow_store, _free_port, tiny_overrides

GATE_FAIL = {"verdict": "fail", "reasons": ["max_drop_vs_champion[t-a]: t-a: champion 60.00%, challenger 45.00%"]}


def _page(**kw):
    base = dict(
        version=2,
        task_id="t-b",
        parent_version=1,
        method="lvp",
        run_id="abc123",
        metrics={"cl.last": 52.5, "cl.forgetting": 15.0, "acc.t-a": 45.0, "acc.t-b": 60.0, "perf.peak_mem_mb": 9.0},
    )
    return review_page.description(**(base | kw))


def test_the_description_says_what_a_reviewer_decides_on():
    text = _page(
        champion=1,
        champion_metrics={"cl.last": 60.0, "acc.t-a": 60.0},
        gate=GATE_FAIL,
        artifacts={"eval/heatmap.png", "validation/data_docs/index.html", "model"},
    )
    assert "task `t-b`" in text and "version 1" in text and "`lvp`" in text and "`abc123`" in text
    assert "**Gate: FAIL**" in text and f"- {GATE_FAIL['reasons'][0]}" in text and "--override-gate" in text
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:6]]
        for line in text.splitlines()
        if line.startswith("| `")
    }
    assert rows["`cl.last`"] == ["52.5", "60", "-7.5"]
    assert rows["`acc.t-a`"] == ["45", "60", "-15"]
    assert rows["`acc.t-b`"] == ["60", "–", ""]  # the new task: the champion never saw it
    assert rows["`cl.forgetting`"] == ["15", "–", ""] and "`perf.peak_mem_mb`" not in rows
    assert "`eval/heatmap.png`" in text and "`validation/data_docs/index.html`" in text
    assert "eval/curves.png" not in text  # only artifacts the run has are named

    first = _page(parent_version=None, champion=None)
    assert "the base model" in first and "not run yet" in first and "no champion to compare with" in first
    assert "cliploop approve 2 --reviewer NAME" in first and "Where to look" not in first
    check = {"rule": "max_forgetting", "passed": True, "value": 15.0, "threshold": 20, "detail": ""}
    passed = _page(champion=2, champion_metrics={"cl.last": 1.0}, gate={"verdict": "pass", "checks": [check]})
    assert "**Gate: PASS**" in passed and "every configured rule passed" in passed and "champion v" not in passed


def test_metric_tags_name_the_key_metrics():
    metrics = {"cl.last": 52.5, "cl.avg_incremental": 56.25, "cl.bwt": None, "acc.t-b": 60.0, "zs.retention_rel": 0.98}
    assert review_page.metric_tags(metrics, "t-b") == {
        "metric.last": "52.5",
        "metric.avg": "56.25",
        "metric.zs_retention": "0.98",
        "metric.new_task": "60",
    }


def _update(root, cfg, task_id, classes, start):
    """A learned zero-shot state of ``classes`` with the run's files, as a finished update leaves them."""
    out = root / task_id
    entries = [ClassEntry(start + i, f"toy/{c}", c, "toy", task_id) for i, c in enumerate(classes)]
    state = LearnerState(method="zeroshot", backbone={"name": "cliploop-tiny"}, classes=entries)
    state.tasks = [{"task_id": task_id}]
    state.save(out / "state")
    (out / "eval").mkdir()
    (out / "eval" / "heatmap.png").write_bytes(EXAMPLE_PNG.read_bytes())  # any PNG: the page names it
    cfg.write_resolved(out)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_checkpoint):
    """Version 1 (t-a: cat, dog) approved as champion; version 2 (t-b, learned on it) rejected by the gate."""
    root = tmp_path_factory.mktemp("page")
    cfg = load_config(
        overrides=[f"workspace={root / 'ws'}", "method.name=zeroshot", "gate.max_drop_vs_champion=5"]
        + tiny_overrides(tiny_checkpoint),
        env={},
        cwd=root,
    )
    (cfg.workspace_path / ".cliploop").mkdir(parents=True)
    shutil.copyfile(_empty_mlflow_store(), cfg.workspace_path / ".cliploop" / "mlflow.db")
    registry = from_config(cfg)
    docs = root / "docs"  # a GX Data Docs site's layout
    for page in ("index.html", "validations/t-a/x.html", "static/styles/a.css", "static/images/logo.png"):
        (docs / page).parent.mkdir(parents=True, exist_ok=True)
        (docs / page).write_text(page)
    runs = root / "runs"
    runs.mkdir()
    report = root / "report"  # a task's report and its offline page, logged side by side (registration.py)
    report.mkdir()
    (report / "report.json").write_text("{}\n")
    (report / "report.html").write_text("<!doctype html>\n")
    extra = {"validation": [report / "report.json", report / "report.html"]}
    steps = [
        ("t-a", ["cat", "dog"], None, {"cl.last": 60.0, "zs.retention_rel": 1.0}, {"t-a": 60.0}),
        ("t-b", ["emu", "owl"], 1, {"cl.last": 52.5, "cl.forgetting": 15.0}, {"t-a": 45.0, "t-b": 60.0}),
    ]
    verdicts = []
    for i, (task, classes, parent, metrics, row) in enumerate(steps):
        tags = {"task_id": task, "method": "zeroshot", "parent_version": "" if parent is None else str(parent)}
        out = _update(runs, cfg, task, classes, 2 * i)
        run_id = registry.log_update(out, task, metrics, row, {"model.name": "cliploop-tiny"}, tags, extra, docs)
        version = registry.register(run_id, f"key-{task}", tags | {"review": "pending"})
        update = {"task_id": task, "metrics": metrics, "final_row": row}
        verdicts.append(review.apply_gate(cfg, version, update))
        if verdicts[-1]["verdict"] == "pass":
            review.decide(cfg, version, "approve", "rita")
    assert [v["verdict"] for v in verdicts] == ["pass", "fail"] and registry.alias("champion") == 1
    return cfg, registry


def test_each_version_shows_its_page_metrics_and_data_docs(workspace):
    _, registry = workspace
    mv = registry.model_version(2)
    assert "**Gate: FAIL**" in mv.description and "max_drop_vs_champion[t-a]" in mv.description
    assert "champion v1" in mv.description and "`eval/heatmap.png`" in mv.description
    tags = registry.version_tags(2)
    assert (tags["metric.last"], tags["metric.forgetting"], tags["metric.new_task"]) == ("52.5", "15", "60")
    # Version 1 had no champion to compare with: its one rule checked nothing, and its page says so.
    first = registry.model_version(1).description
    assert "**Gate: nothing checked**" in first and "`max_drop_vs_champion` (no champion to compare with)" in first
    docs = {
        a.path
        for folder in ("validation/data_docs", "validation/data_docs/static")
        for a in registry.client.list_artifacts(mv.run_id, folder)
    }
    assert {"validation/data_docs/index.html", "validation/data_docs/static/styles"} <= docs
    assert "validation/data_docs/static/images" not in docs  # GX's logos and fonts are left out
    # The report a reviewer can open offline is in the run, and the page names it before the JSON and the docs.
    assert {"validation/report.html", "validation/report.json"} <= {
        a.path for a in registry.client.list_artifacts(mv.run_id, "validation")
    }
    where = mv.description[mv.description.index("### Where to look") :]
    assert where.index("`validation/report.html`: the task's data-validation report, one page that opens offline") < (
        where.index("`validation/report.json`")
    )


def _champion_expects(cfg, image: bytes) -> str:
    """The label the champion (version 1: zero-shot over cat and dog) must give ``image``, from the zero-shot rule
    applied to its learner state as the fixture saved it (tests/expected_predictions.py). With the tiny model's
    random weights that is "dog" for every image tried, so this pins the label and its key, not variety."""
    from tests.expected_predictions import expected_labels

    state = LearnerState.load(cfg.workspace_path.parent / "runs" / "t-a" / "state")
    return expected_labels(cfg, state, [image])[0]


def test_the_champion_has_a_signature_and_an_input_example_that_predicts(workspace):
    import mlflow
    from mlflow.models import Model
    from PIL import Image

    _, registry = workspace
    mlflow.set_registry_uri(registry.tracking_uri)
    mlflow.set_tracking_uri(registry.tracking_uri)
    info = mlflow.models.get_model_info("models:/cliploop@champion")
    assert info.signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["label", "class_key", "score"]
    local = mlflow.artifacts.download_artifacts("models:/cliploop@champion")
    example = Model.load(local).load_input_example(local)
    assert list(example.columns) == ["image"] and len(example) == 1
    with Image.open(io.BytesIO(example["image"][0])) as im:
        assert im.format == "PNG" and im.size == (32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predicted = mlflow.pyfunc.load_model(local).predict(example)
    expected = _champion_expects(workspace[0], example["image"][0])
    assert (predicted["label"][0], predicted["class_key"][0]) == (expected, f"toy/{expected}")
    assert not [w for w in caught if "requires_grad" in str(w.message)]


@pytest.mark.server  # starts `mlflow models serve`
def test_mlflow_models_serve_answers_a_png_with_a_label(workspace, tmp_path):
    _, registry = workspace
    port = _free_port()
    env = os.environ | {
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "MLFLOW_REGISTRY_URI": registry.tracking_uri,
        # The server runs `uvicorn` by name: the environment's scripts must be on PATH, as in an activated venv.
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    }
    log = open(tmp_path / "serve.log", "w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/cliploop@champion"]
        + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the server's own workers end with it
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /ping"
            time.sleep(0.5)
        # A binary column travels as base64 in JSON; the server decodes it by the signature.
        png = base64.b64encode(EXAMPLE_PNG.read_bytes()).decode()
        body = {"dataframe_split": {"columns": ["image"], "data": [[png]]}}
        request = urllib.request.Request(
            f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = json.loads(answer.read())["predictions"]
    finally:
        with contextlib.suppress(ProcessLookupError):  # its group: mlflow runs uvicorn as a child
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert len(predictions) == 1 and predictions[0]["label"] == _champion_expects(
        workspace[0], EXAMPLE_PNG.read_bytes()
    )
    assert 0 <= predictions[0]["score"] <= 1
    assert "requires_grad" not in (tmp_path / "serve.log").read_text()
