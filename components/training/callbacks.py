"""The training loop's callbacks: the work around each optimisation step that is not the method's.

Step timing, the loss log, loss lines, progress (the steps done, to whatever shows it: components/support/progress.py)
and resumable checkpoints (trainable weights, optimizer moments and the method's own running state, in
safetensors + JSON, never pickled). They change when what a run records or how it resumes changes, not when the
loop's optimisation does; ``components/training/trainer.py`` drives them through ``FitRun``, the loop's state as
they see it. Like the trainer, no platform library is imported here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components.support.faults import fault_point

if TYPE_CHECKING:
    from components.methods.base import Method


@dataclass
class FitRun:
    """The loop's state as callbacks see it."""

    method: Method
    named_params: list[tuple[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    total: int
    identity: dict[str, Any]
    lr: float = 0.0


# ---- callbacks ------------------------------------------------------------------------------------------


class Callback:
    """Cross-cutting work around the loop. Every hook is optional."""

    def on_fit_start(self, run: FitRun) -> None: ...
    def on_step_end(self, run: FitRun, step: int, losses: dict[str, float], seconds: float) -> None: ...
    def on_fit_end(self, run: FitRun) -> None: ...


class StepTimer(Callback):
    """Wall time of every optimisation step run in this process."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, run, step, losses, seconds):
        self.times.append(seconds)

    def median_ms(self) -> float | None:
        """The median step, leaving out the first steps (they warm caches)."""
        steady = self.times[2:] or self.times
        return 1000 * sorted(steady)[len(steady) // 2] if steady else None


class LossLog(Callback):
    """Every loss term per step (the method names them), kept for the run's report."""

    def __init__(self, every: int = 1) -> None:
        self.every, self.rows = every, []

    def on_step_end(self, run, step, losses, seconds):
        if step % self.every == 0 or step == run.total - 1:
            self.rows.append({"step": step, "lr": run.lr, **{k: round(v, 6) for k, v in losses.items()}})


class LossLines(Callback):
    """A line with the lr and every loss term, every N steps (``cliploop learn``'s story of a run)."""

    def __init__(self, say, every: int = 50) -> None:
        self.say, self.every = say, every

    def on_step_end(self, run, step, losses, seconds):
        if step % self.every == 0 or step == run.total - 1:
            terms = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
            self.say(f"  step {step + 1}/{run.total} lr={run.lr:.2e} {terms}")


class StepProgress(Callback):
    """The steps this process runs, as one piece of tracked work (from ``first``: a resumed run starts there)."""

    def __init__(self, what: str, first: int = 0) -> None:
        self.what, self.first, self.bar = what, first, None

    def on_fit_start(self, run):
        from components.support.progress import track

        self.bar = track(run.total - self.first, self.what, unit="step")

    def on_step_end(self, run, step, losses, seconds):
        self.bar.advance(1)

    def on_fit_end(self, run):
        self.bar.close()


class Checkpoint(Callback):
    """Trainable weights, optimizer moments and the step, every N steps (safetensors + JSON, no pickle).

    ``fit`` resumes from it when the same method and task are trained again (a crashed run's rerun). ``fence``,
    called before each write (saving, removing), raises when this process may no longer write them: another
    attempt of the same step took the folder over (``components/support/fencing.py``).
    """

    def __init__(self, folder: Path, every: int, saved=None, fence=None, writes: bool = True) -> None:
        self.folder, self.every, self.saved, self.fence = Path(folder), every, saved, fence
        self.writes = writes  # data-parallel workers: the first writes; every one is told, as each reports it

    def on_step_end(self, run, step, losses, seconds):
        if (step + 1) % self.every == 0 and step + 1 < run.total:
            if self.writes:
                if self.fence is not None:
                    self.fence()
                save_checkpoint(self.folder, run, step + 1)
            if self.saved is not None:  # e.g. mirrored to the artifact store, for another worker to resume
                self.saved(self.folder if self.writes else None)
            fault_point("after_checkpoint")

    def on_fit_end(self, run):
        if not self.writes:
            return
        if self.fence is not None:
            self.fence()
        for name in ("checkpoint.safetensors", "checkpoint.json"):
            (self.folder / name).unlink(missing_ok=True)


def save_checkpoint(folder: Path, run: FitRun, next_step: int) -> None:
    from safetensors.torch import save_file

    from components.support.storage import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{name}": p.detach().cpu().contiguous().clone() for name, p in run.named_params}
    names = {id(p): name for name, p in run.named_params}
    moments: dict[str, Any] = {}
    for p, slot in run.optimizer.state.items():
        for key, value in slot.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"opt/{names[id(p)]}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                moments.setdefault(names[id(p)], {})[key] = float(value)
    for key, value in run.method.training_state().items():
        tensors[f"method/{key}"] = value.detach().cpu().contiguous().clone()
    tmp = folder / f".checkpoint.safetensors.{os.getpid()}.tmp"  # two writers never share a half-written file
    save_file(tensors, str(tmp))
    tmp.replace(folder / "checkpoint.safetensors")
    atomic_write_text(
        folder / "checkpoint.json",
        json.dumps({"next_step": next_step, "identity": run.identity, "scalars": moments}, indent=2, sort_keys=True),
    )


def load_checkpoint(folder: Path, run: FitRun) -> int:
    """Restore a matching checkpoint; returns the step to continue from (0 when there is none)."""
    from safetensors.torch import load_file

    meta_path, tensor_path = folder / "checkpoint.json", folder / "checkpoint.safetensors"
    if not (meta_path.is_file() and tensor_path.is_file()):
        return 0
    meta = json.loads(meta_path.read_text())
    if meta.get("identity") != run.identity:
        return 0  # another task, method or setting: start over rather than mix runs
    tensors = load_file(str(tensor_path))
    by_name = dict(run.named_params)
    with torch.no_grad():
        for name, p in run.named_params:
            p.copy_(tensors[f"param/{name}"].to(p.device, p.dtype))
    for name, p in by_name.items():
        slot = {
            key.split("/")[-1]: value.to(p.device) for key, value in tensors.items() if key.startswith(f"opt/{name}/")
        }
        for key, value in meta.get("scalars", {}).get(name, {}).items():
            slot[key] = torch.tensor(value)
        if slot:
            run.optimizer.state[p] = slot
    extra = {k[len("method/") :]: v for k, v in tensors.items() if k.startswith("method/")}
    if extra:
        run.method.load_training_state(extra)
    return int(meta["next_step"])
