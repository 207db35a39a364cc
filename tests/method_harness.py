"""What the method-loss tests share: a tiny model, small tasks, a method set up on them, and the formulas of
docs/methods/ written out by hand from plain tensor operations (never the methods' own loss helpers), so a
test compares the method's value with an independent computation of its definition."""

from __future__ import annotations

import torch

from components.model.data import load_task
from components.model.state import LearnerState
from tests.drops import make_task

# ---- the formulas (docs/methods/README.md, "Notation"), by hand -------------------------------------------


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    return z - torch.logsumexp(z, dim=1, keepdim=True)


def ce_ls(logits: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Cross-entropy with label smoothing eps: the target is (1 - eps) one-hot + eps / K, averaged over rows."""
    k = logits.shape[1]
    targets = torch.full_like(logits, eps / k)
    targets[torch.arange(len(y)), y] += 1 - eps
    return -(targets * log_softmax(logits)).sum(1).mean()


def soft_ce_ls(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    """Cross-entropy against soft targets, label smoothing on top: (1 - eps) Y + eps / K."""
    smoothed = (1 - eps) * targets + eps / logits.shape[1]
    return -(smoothed * log_softmax(logits)).sum(1).mean()


def kd(teacher: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    """KD_T: per row, CE of softmax(teacher / T) against log softmax(student / T), row mean, times T²."""
    p = torch.softmax(teacher / t, dim=1)
    return -(p * log_softmax(student / t)).sum(1).mean() * t * t


def kl_bm(target: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(student)) summed over classes, averaged over rows."""
    p = torch.softmax(target, dim=1)
    return (p * (log_softmax(target) - log_softmax(student))).sum(1).mean()


def info_nce(a: torch.Tensor, b: torch.Tensor, scale) -> torch.Tensor:
    """CLIP's symmetric contrastive loss, diagonal targets."""
    logits = scale * a @ b.T
    diag = torch.arange(len(a))
    return 0.5 * (ce_ls(logits, diag, 0.0) + ce_ls(logits.T, diag, 0.0))


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def image_features(model, images) -> torch.Tensor:
    return unit(model.encode_image(images).float())


def text_features(backbone, texts, model=None) -> torch.Tensor:
    return unit((model or backbone.model).encode_text(backbone.tokenizer(texts)).float())


# ---- the setting ------------------------------------------------------------------------------------------


def tasks(root) -> dict:
    """Three small class-incremental task drops; t-abc has three classes (two-class soft labels are symmetric)."""
    return {
        tid: load_task(make_task(root, tid, classes, train=4, test=1))
        for tid, classes in (("t-a", ["cat", "dog"]), ("t-b", ["emu", "owl"]), ("t-abc", ["cat", "dog", "emu"]))
    }


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def learned(method_name: str, backbone, *done) -> LearnerState:
    """A learner state that has learned ``done`` (tasks, in order) and kept the base weights: what a later
    task's set-up reads (its class table, its task list)."""
    state = LearnerState(method=method_name, backbone=backbone.reference)
    for task in done:
        state.add_classes(task.task_id, task.dataset, list(zip(task.class_keys, task.class_names)))
        state.tasks.append(task.summary())
    return state


class Bench:
    """One working backbone whose weights every ``begin`` resets, and the base backbone, frozen: the teacher of
    ZSCL and GNSP, and the weights every test's task starts from (loading a backbone costs a second; this does
    it twice per test module)."""

    def __init__(self, config):
        from components.model.backbones import load_backbone

        self.config = config
        self.base = load_backbone(config.model, frozen=True)
        self.backbone = load_backbone(config.model)
        self.start = {k: v.clone() for k, v in self.backbone.model.state_dict().items()}

    def begin(self, name: str, settings: dict, task, state=None):
        """The method ``name`` set up on ``task`` after ``state`` (none: the first task), on the base weights."""
        from components.methods import get_method
        from components.methods.base import Context

        model = self.backbone.model
        model.load_state_dict(self.start)
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        ctx = Context(self.backbone, batch_size=16, load_base=lambda: self.base)
        method = get_method(name)(settings)
        method.begin_task(state or LearnerState(method=name, backbone=self.backbone.reference), task, ctx)
        return method


def nudge(params, seed: int, size: float = 0.05) -> None:
    """Move trainable parameters off their start values, so that teacher and student differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(size * torch.randn(p.shape, generator=g))
