"""WiSE-FT as a continual baseline (docs/methods/wise-ft.md): fine-tune on the task, then interpolate the weights
with the model the task started from, theta_t = alpha * theta_ft + (1 - alpha) * theta_{t-1}
(alpha 0.8 in the ZSCL script).
"""

from __future__ import annotations

import torch
from pydantic import Field

from components.methods import register_method
from components.methods.finetune import FineTune, FineTuneSettings


def interpolate(
    finetuned: dict[str, torch.Tensor], start: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """alpha * finetuned + (1 - alpha) * start, tensor by tensor (integer buffers are taken as fine-tuned)."""
    out = {}
    for name, value in finetuned.items():
        if value.is_floating_point():
            out[name] = alpha * value + (1 - alpha) * start[name].to(value.device, value.dtype)
        else:
            out[name] = value
    return out


class WiseFTSettings(FineTuneSettings):
    alpha: float = Field(0.8, ge=0, le=1, description="weight of the fine-tuned model in the interpolation")


@register_method("wise-ft")
class WiseFT(FineTune):
    summary = "WiSE-FT: fine-tune, then interpolate weights with the task's starting model (alpha 0.8)"
    Settings = WiseFTSettings
    data_parallel = True  # fine-tune's loss; the interpolation is the same arithmetic on every worker's same weights

    def setup(self) -> None:
        self.start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def after_fit(self) -> None:
        with torch.no_grad():
            self.model.load_state_dict(interpolate(self.model.state_dict(), self.start, self.settings.alpha))
        del self.start
