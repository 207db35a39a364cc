"""Continual full fine-tuning (docs/methods/finetune.md): both towers trained on each task with the task loss
alone. The forgetting lower bound every other method is measured against.

Defaults are the MTIL protocol of the ZSCL code: AdamW (weight decay 0), 1000 iterations of batch 64,
100-step linear warmup then cosine, label smoothing 0.2, logit scale frozen.
"""

from __future__ import annotations

from pydantic import Field

from components.methods import register_method
from components.methods.tuning import TunedCLIP, TuneSettings


class FineTuneSettings(TuneSettings):
    lr: float = Field(1e-5, gt=0)
    iterations: int | None = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    warmup_steps: int = Field(100, ge=0)
    label_smoothing: float = Field(0.2, ge=0, lt=1)


@register_method("finetune")
class FineTune(TunedCLIP):
    summary = "Continual full fine-tuning of both towers with the task loss only (the forgetting lower bound)"
    Settings = FineTuneSettings
    data_parallel = True  # its one loss is TunedCLIP.task_loss, over the global batch
