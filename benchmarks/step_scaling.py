"""Data-parallel scaling of the training step, for ``benchmarks/method_step.py --workers 1,2``.

For each worker count N, N processes on one process group (gloo on CPU, NCCL on CUDA, one GPU each) set up every
method that trains data-parallel exactly as method_step.py does (task 2, after task 1's end-of-task state), each
worker takes its slice of the same global batch (components/model/replicas.py), and the shared trainer's
``optimization_step`` is timed round robin: the forward and backward on the slice, the gathers of the batch's
features and the all-reduce of the gradients. A step starts on every worker together (a barrier) and counts until
the slowest worker ends it. Starting the workers (Ray Train's start-up in a real run) is not part of a step.

Scaling efficiency at a fixed global batch: ``t(1) / (N * t(N))`` (1.0 = N workers take 1/N of the time).
On a CPU machine the workers share its cores and memory bandwidth: such figures say nothing about GPU scaling.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from argparse import Namespace
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world: int, port: int, job: dict) -> None:
    """One of ``world`` workers: every method's step timed on this worker's slice; the first writes the medians."""
    import torch.distributed as dist

    from benchmarks.step_setup import config_for, prepare, sync
    from components.model.data import load_task
    from components.model.replicas import Replicas

    args = Namespace(**job["args"])
    if args.device.startswith("cuda"):
        torch.cuda.set_device(rank)
        args.device = f"cuda:{rank}"
    else:
        torch.set_num_threads(job["threads"])
    if world > 1:
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        replicas = Replicas(rank, world)
        tasks = [load_task(p) for p in job["tasks"]]
        config = config_for(args, Path(job["workspace"]))
        runners = {name: prepare(name, {}, tasks, config, args, replicas=replicas)[0] for name in job["methods"]}
        times: dict[str, list[float]] = {name: [] for name in runners}
        for round_ in range(args.warmup + args.steps):
            for name, step in runners.items():
                if world > 1:
                    dist.barrier()
                t0 = time.perf_counter()
                step()
                sync(args.device)
                if world > 1:
                    dist.barrier()  # the step ends when its slowest worker ends it
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        if rank == 0:
            medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
            Path(job["out"]).write_text(json.dumps(medians))
    finally:
        if world > 1:
            dist.destroy_process_group()


def scaling(args, task_paths: list[str], workspace: Path, counts: list[int], methods: list[str]) -> dict:
    """Median step time per method and worker count, each count's workers started afresh; and the efficiencies."""
    import torch.multiprocessing as mp

    from components.methods import get_method

    parallel = [m for m in methods if get_method(m).data_parallel]
    skipped = sorted(set(methods) - set(parallel))
    threads = max(1, torch.get_num_threads() // max(counts)) if not args.device.startswith("cuda") else 1
    found: dict[int, dict[str, float]] = {}
    for n in counts:
        out = workspace / f"scaling-{n}.json"
        job = {
            "args": {k: v for k, v in vars(args).items() if k != "workers"},
            "tasks": task_paths,
            "workspace": str(workspace),
            "methods": parallel,
            "threads": args.threads or threads,
            "out": str(out),
        }
        mp.spawn(worker, args=(n, _free_port(), job), nprocs=n, join=True)
        found[n] = json.loads(out.read_text())
    one = min(counts)
    results = {}
    for name in parallel:
        per_n = {}
        for n in counts:
            ms = found[n][name]
            per_n[str(n)] = {
                "median_ms": round(ms, 3),
                "img_per_s": round(args.batch / (ms / 1000), 1),
                "efficiency": round(found[one][name] * one / (n * ms), 3),
            }
        results[name] = per_n
    return {
        "workers": counts,
        "threads_per_worker": None if args.device.startswith("cuda") else job["threads"],
        "global_batch": args.batch,
        "results": results,
        "not_data_parallel": skipped,
        "note": "efficiency = t(1) / (N t(N)) at a fixed global batch; CPU workers share the machine's cores, so "
        "CPU figures say nothing about GPU scaling",
    }
