"""Pool building on Ray Data (``compute.engine: ray``): a stored task's shards become one block each, a pool of
encoder actors (one GPU each where the model runs on CUDA) turns each into its partial sums with the same
:func:`components.model.pool_engine.encode_parts` the local engine runs, and the partials come back to be reduced in
shard order by the same code, so the pool is bit-identical to a local build for the same decoder and device.

Each actor loads the configured base model once (``components.model.backbones.load_backbone``) and opens the task
itself: on a GPU worker that was handed the task's DVC content address, the actor fetches the task's objects
from the DVC remote into its own node's cache (each object's md5 checked; nothing shared with the driver but
object storage); otherwise by path (a local Ray, or nodes that see the driver's folder). Every image's bytes
are checked against the index SHA-256 as they are read, and a damaged shard fails the build with
:class:`~components.intake.shards.CorruptShard` naming it. Partials cross back as safetensors bytes.
Ray's GPU resources are logical: a local Ray that declares GPUs runs the same code on a CPU-only machine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from components.model.pool_engine import LocalEngine, Part, Partial, encode_parts, split_parts


class RayEngineError(RuntimeError):
    pass


def start_ray(compute) -> None:
    """Join ``compute.ray_address``, or start a local Ray (``compute.ray_cpus``) that listens on 127.0.0.1 only;
    nothing when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    if compute.ray_address:
        ray.init(address=compute.ray_address, log_to_driver=False)
        return
    # A local Ray is this process's alone, so nothing of it may listen beyond 127.0.0.1 (docs/security.md). Its
    # GCS, raylet, agents and workers listen on the node's address, and on Linux Ray takes that to be the one
    # other machines reach (listening on every interface), turning a 127.0.0.1 handed to ray.init back into it.
    # Ray's rule on macOS and Windows, a loopback node, is one constant read when the address is resolved: it
    # holds for this start only (a later join of a cluster in this process resolves as Ray means it to).
    from ray._private import ray_constants

    cluster = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=compute.ray_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster


class PartEncoder:
    """A Ray Data actor: loads the model once and the task once, then encodes the parts it is given."""

    def __init__(
        self,
        model: dict,
        location: str | None,
        split: str,
        rows: int,
        batch_size: int,
        workers: int,
        gather: bool,
        threads: int,
        address: dict | None = None,
        s3: dict | None = None,
    ):
        import torch

        from components.model.backbones import load_backbone
        from components.model.data import load_task, resolve_decoder
        from components.settings.config import ModelConfig

        model_cfg = ModelConfig.model_validate(model)
        self.backbone = load_backbone(model_cfg, frozen=True)
        if not str(self.backbone.device).startswith("cuda"):
            # CPU kernels' rounding depends on the thread count (Ray gives an actor one): the driver's count
            # keeps the embeddings bit-identical to a local build on the driver's machine.
            torch.set_num_threads(threads)
        self.failed = ""
        if address is not None:  # by content address, into this node's cache: no path of the driver's is used
            from components.intake.task_fetch import fetched
            from components.support.storage import S3Settings, StorageError

            try:
                location = fetched(address, S3Settings(**s3))
            except StorageError as exc:  # a damaged or missing object: handed back, never retried with bad bytes
                self.failed = str(exc)
                return
        self.task = load_task(location)
        if len(self.task.split(split)) != rows:
            raise RayEngineError(
                f"{location}: the {split} split has {len(self.task.split(split))} rows here, {rows} on the driver"
            )
        decoder = resolve_decoder(model_cfg.decoder, self.backbone.device)
        self.dataset = self.task.dataset_for(split, self.backbone.preprocess, decoder, self.backbone.device)
        self.batch_size, self.workers, self.gather = batch_size, workers, gather

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from components.intake.shards import CorruptShard

        parts = [
            Part(int(i), str(shard) or None, int(start), int(stop))
            for i, shard, start, stop in zip(batch["part"], batch["shard"], batch["start"], batch["stop"])
        ]
        if self.failed:
            return _rows([p.index for p in parts], [b""] * len(parts), [self.failed] * len(parts))
        n_classes = len(self.task.class_keys)
        try:
            found = encode_parts(
                self.backbone, self.dataset, parts, n_classes, self.batch_size, self.workers, self.gather
            )
        except CorruptShard as exc:  # handed back as data: the driver raises it, naming the shard, without retries
            return _rows([p.index for p in parts], [b""] * len(parts), [str(exc)] * len(parts))
        return _rows([p.part for p in found], [p.to_bytes() for p in found], [""] * len(found))


def _rows(parts: list[int], blobs: list[bytes], errors: list[str]) -> dict[str, np.ndarray]:
    return {
        "part": np.array(parts, dtype=np.int64),
        "partial": np.array(blobs, dtype=object),
        "error": np.array(errors, dtype=object),
    }


class RayEngine:
    """Encodes a stored task's parts on Ray; anything else (a drop, a fine-tuned encoder) runs locally."""

    name = "ray"

    def __init__(self, config, addresses: dict[str, dict] | None = None):
        self.model = config.model.model_dump(mode="json")
        self.compute = config.compute
        self.addresses = addresses or {}  # task id -> DVC content address (a worker's step was handed them)
        self.s3 = {"endpoint_url": config.s3.endpoint_url, "region": config.s3.region}

    def actor_gpus(self, backbone) -> float:
        if self.compute.actor_gpus is not None:
            return self.compute.actor_gpus
        return 1.0 if str(backbone.device).startswith("cuda") else 0.0

    def actors(self, gpus: float, parts: int) -> int:
        import ray

        if self.compute.actors:
            return min(self.compute.actors, parts)
        resources = ray.cluster_resources()
        if gpus > 0:
            fit = int(resources.get("GPU", 0) // gpus)
        else:
            fit = int(resources.get("CPU", 1) // self.compute.actor_cpus)
        return max(1, min(fit, parts))

    def partials(self, task, split: str, ctx, gather: bool) -> list[Partial]:
        from components.intake.shards import CorruptShard, StoredTask

        # The actors can load only the configured base model, and read only a stored task's shards.
        if "weights" in ctx.backbone.reference or not isinstance(task.source, StoredTask):
            return LocalEngine().partials(task, split, ctx, gather)
        if not {"pretrained", "path", "uri"} & set(ctx.backbone.reference):
            raise RayEngineError(
                f"model {ctx.backbone.reference.get('name')!r} has no weights to load (model.pretrained and "
                f"model.checkpoint are null): each Ray actor would start from other random weights"
            )
        parts = split_parts(task, split)
        if not parts:
            return []
        import ray
        import torch
        from ray.data import DataContext

        start_ray(self.compute)
        DataContext.get_current().enable_progress_bars = False
        items = [{"part": p.index, "shard": p.shard or "", "start": p.start, "stop": p.stop} for p in parts]
        gpus = self.actor_gpus(ctx.backbone)
        encoder_args: dict[str, Any] = {
            "model": self.model,
            "location": None if task.task_id in self.addresses else str(task.source.folder),
            "address": self.addresses.get(task.task_id),
            "s3": self.s3,
            "split": split,
            "rows": len(task.split(split)),
            "batch_size": ctx.batch_size,
            "workers": ctx.workers,
            "gather": gather,
            "threads": torch.get_num_threads(),
        }
        rows = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(
                PartEncoder,
                fn_constructor_kwargs=encoder_args,
                batch_size=1,  # one part per call: a part's batches are the same whichever actor encodes it
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self.actors(gpus, len(parts))),
                num_gpus=gpus,
                num_cpus=self.compute.actor_cpus,
            )
            .take_all()
        )
        errors = sorted({str(r["error"]) for r in rows if r["error"]})
        if errors:
            raise CorruptShard(errors[0])
        return [Partial.from_bytes(bytes(r["partial"])) for r in rows]
