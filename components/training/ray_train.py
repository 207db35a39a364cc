"""One task trained by several data-parallel workers on Ray Train (``compute.train_workers`` > 1).

The step's driver keeps everything but the training: it evaluates before and after, and writes the step's outputs.
What a task's training needs crosses to the workers as data (``TrainJob``): the portable config, the parent learner
state as its files' bytes (safetensors + JSON, checked against the manifest's SHA-256 on arrival), each task by its
DVC content address (fetched from the remote, every object's md5 checked) or by path (a local Ray, or nodes sharing
the folder), the dataset prompts, and the driver's random state at the moment one process would start the task,
so that N workers draw what one process draws. Every worker runs the same ``run_task`` as one process does, with
its ``Replicas`` (components/model/replicas.py), under the process group Ray Train sets up (gloo on CPU, NCCL on
CUDA).

Checkpoints: the first worker writes the trainer's checkpoints to a folder of its own and every worker reports it to
Ray Train together (``ray.train.report``), so Ray keeps them in ``compute.train_storage``
(components/training/train_storage.py). When a worker dies, Ray Train restarts the whole group
(``compute.train_retries`` times) and each worker resumes from the last one; a step run again after its driver died
resumes from it too, with any number of workers.
The learned state comes back the same way: the first worker reports it as the run's last checkpoint, with the
trainer's report beside it as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components.methods.base import MethodReport, PoolStats
from components.training.train_storage import TrainPlace, place_of, remove

if TYPE_CHECKING:
    from components.model.data import TaskData
    from components.model.state import LearnerState
    from components.settings.config import Config
    from components.training.trainer import TaskReport

FINAL = "learned.json"  # in the last checkpoint only: the trainer's and the method's report


class TrainWorkersError(RuntimeError):
    """The workers could not train the task (every restart used, or a worker's own error, named)."""


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs to train the task, as plain data."""

    config: dict[str, Any]  # Config.portable()
    method: str
    task_id: str
    tasks: dict[str, dict[str, Any]]  # task id -> {"address": DVC content address} or {"path": folder}
    prompts: dict[str, list[str]]
    parent: dict[str, bytes] | None  # the parent state's files (relative path -> bytes)
    rng: bytes  # torch's CPU random state where one process would start the task
    s3: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def write_folder(files: dict[str, bytes], folder: Path) -> Path:
    for rel, data in files.items():
        target = (folder / rel).resolve()
        if not target.is_relative_to(folder.resolve()):
            raise TrainWorkersError(f"a state file {rel!r} leaves its folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return folder


def make_job(
    config: Config,
    method: str,
    task: TaskData,
    parent: LearnerState | None,
    known: dict[str, TaskData],
    prompts: dict[str, list[str]],
    addresses: dict[str, dict] | None,
) -> TrainJob:
    """The driver's side: the job of training ``task`` on top of ``parent``, with the random state as it is now."""
    from components.intake.workspace import s3_settings

    parent_files = None
    if parent is not None:
        with tempfile.TemporaryDirectory(prefix="cliploop-parent-") as tmp:
            parent.save(Path(tmp) / "state")
            parent_files = folder_bytes(Path(tmp) / "state")
    addresses = addresses or {}
    tasks = {
        tid: {"address": addresses[tid]} if tid in addresses else {"path": str(Path(t.location).resolve())}
        for tid, t in known.items()
    }
    return TrainJob(
        config=config.portable(),
        method=method,
        task_id=task.task_id,
        tasks=tasks,
        prompts={k: list(v) for k, v in prompts.items()},
        parent=parent_files,
        rng=torch.get_rng_state().numpy().tobytes(),
        s3=s3_settings(config).__dict__,
    )


# ---- the driver -------------------------------------------------------------------------------------------


def train_on_workers(
    job: TrainJob, config: Config, checkpoint_dir: Path | None, say
) -> tuple[LearnerState, TaskReport]:
    """Train ``job`` on ``compute.train_workers`` Ray Train workers; the learned state and the task's report."""
    from components.model.backbones import pick_device
    from components.model.ray_pools import start_ray

    compute = config.compute
    use_gpu = pick_device(config.model.device).startswith("cuda")
    start_ray(compute)
    own = None if checkpoint_dir is not None or compute.train_storage else tempfile.mkdtemp(prefix="cliploop-train-")
    place = place_of(config, Path(own) if own else checkpoint_dir, job.task_id)
    try:
        learned = _fit(job, compute, use_gpu, place, checkpoint_dir, say)
        remove(place)  # the result is in: its checkpoints (whole models) are not needed again
        return learned
    finally:
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)


def _fit(job: TrainJob, compute, use_gpu: bool, place: TrainPlace, checkpoint_dir: Path | None, say):
    from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train resumes a run of the same name and place by itself; what the step holds of its own (one process's
    # checkpoints, or an earlier attempt's pulled from the artifact store) is handed over too.
    resume = None
    if checkpoint_dir is not None and (Path(checkpoint_dir) / job.task_id / "checkpoint.json").is_file():
        resume = Checkpoint.from_directory(str(Path(checkpoint_dir) / job.task_id))
    say(f"  training {job.task_id} on {compute.train_workers} data-parallel workers (Ray Train)")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job.to_dict(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=compute.train_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": compute.train_worker_cpus} | ({"GPU": 1} if use_gpu else {}),
        ),
        run_config=RunConfig(
            name=place.name,
            storage_path=place.storage,
            storage_filesystem=place.filesystem,
            failure_config=FailureConfig(max_failures=compute.train_retries),
            worker_runtime_env=_fault_env(),
        ),
        resume_from_checkpoint=resume,
    )
    failed = f"task {job.task_id}: training on {compute.train_workers} workers failed"
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train raises its own wrapper: the worker's error is what the user needs
        raise TrainWorkersError(f"{failed}: {_cause(exc)}") from None
    if result.error is not None:
        raise TrainWorkersError(f"{failed}: {_cause(result.error)}")
    return _learned(result.checkpoint, job)


def _fault_env() -> dict | None:
    """The fault suite's setting (components/support/faults.py) reaches the workers, which a Ray started earlier in
    this process would not otherwise pass it to."""
    from components.support.faults import ENV

    return {"env_vars": {ENV: os.environ[ENV]}} if os.environ.get(ENV) else None


def _cause(exc: BaseException) -> str:
    """The error at the root, in one line (Ray Train's own wrappers carry every worker's traceback): the first
    failed worker's own error where Ray Train names the workers' failures."""
    for _ in range(20):  # a chain of causes, never a loop
        failures = getattr(exc, "worker_failures", None)
        if failures:
            rank = min(failures)
            return f"worker {rank}: {_cause(failures[rank])}"
        inner = exc.__cause__ or getattr(exc, "cause", None)  # a worker's error as Ray hands it back
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' '.join(lines[:2])[:300]}"


def _learned(checkpoint, job: TrainJob) -> tuple[LearnerState, TaskReport]:
    from components.model.state import LearnerState
    from components.training.trainer import TaskReport, TrainReport

    if checkpoint is None:
        raise TrainWorkersError(f"task {job.task_id}: the workers ended without handing back the learned state")
    with checkpoint.as_directory() as folder:
        doc_path = Path(folder) / FINAL
        if not doc_path.is_file():
            raise TrainWorkersError(f"task {job.task_id}: the workers' last checkpoint holds no learned state")
        doc = json.loads(doc_path.read_text())
        state = LearnerState.load(Path(folder) / "state")  # every file checked against the manifest's SHA-256
    train = TrainReport(**doc["train"]) if doc["train"] is not None else None
    method = MethodReport(pools=tuple(PoolStats(**p) for p in doc["pools"]))
    return state, TaskReport(train=train, method=method)


# ---- a worker ---------------------------------------------------------------------------------------------


def train_worker(doc: dict[str, Any]) -> None:
    """Ray Train's loop on each worker: the task trained as one of the group, the first worker reporting the result."""
    import ray.train

    from components.methods import get_method
    from components.model.backbones import load_backbone
    from components.model.replicas import Replicas
    from components.model.state import LearnerState
    from components.settings.config_loading import config_from_doc
    from components.training.run_context import context_for
    from components.training.trainer import run_task

    job = TrainJob(**doc)
    context = ray.train.get_context()
    replicas = Replicas(context.get_world_rank(), context.get_world_size())
    config = config_from_doc(job.config)
    work = Path(tempfile.mkdtemp(prefix="cliploop-train-worker-"))
    try:
        parent = LearnerState.load(write_folder(job.parent, work / "parent")) if job.parent is not None else None
        method = get_method(job.method)(config.method.settings)
        weights = parent.weights if parent is not None else None
        backbone = load_backbone(config.model, weights=weights, frozen=False)
        tasks = _Tasks(job)
        checkpoints = work / "checkpoints"
        found = ray.train.get_checkpoint()  # after a restart: the group's last; else what the driver resumes
        if found is not None:
            with found.as_directory() as folder:
                shutil.copytree(folder, checkpoints / job.task_id, dirs_exist_ok=True)
        ctx = context_for(
            config,
            backbone,
            task_prompts=job.prompts,
            locate_task=tasks,
            checkpoint_dir=checkpoints,
            checkpoint_saved=_report_checkpoint,
            replicas=replicas,
        )
        state = parent if parent is not None else LearnerState(method=job.method, backbone=backbone.reference)
        torch.set_rng_state(torch.frombuffer(bytearray(job.rng), dtype=torch.uint8))
        state, report = run_task(method, state, tasks(job.task_id), ctx)
        if replicas.rank == 0:
            out = work / "learned"
            state.save(out / "state")
            train = report.train.__dict__ if report.train is not None else None
            pools = [p.__dict__ for p in report.method.pools]
            (out / FINAL).write_text(json.dumps({"train": train, "pools": pools}))
            ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(str(out)))
        else:
            ray.train.report({"done": 1})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report_checkpoint(folder: Path | None) -> None:
    """Every worker reports each checkpoint together (Ray Train's rule); the first one hands over the folder."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
    ray.train.report({"checkpoint": 1}, checkpoint=checkpoint)


class _Tasks:
    """Task id -> TaskData on a worker: fetched by content address (checked) or opened by path, each once."""

    def __init__(self, job: TrainJob):
        self.job, self.loaded = job, {}

    def __call__(self, task_id: str) -> TaskData:
        from components.model.data import load_task

        if task_id not in self.loaded:
            where = self.job.tasks.get(task_id)
            if where is None:
                raise TrainWorkersError(f"task {task_id} is needed on a training worker but was not handed to it")
            if "address" in where:
                from components.intake.task_fetch import fetched
                from components.support.storage import S3Settings

                location = fetched(where["address"], S3Settings(**self.job.s3))
            else:
                location = where["path"]
            self.loaded[task_id] = load_task(location)
        return self.loaded[task_id]
