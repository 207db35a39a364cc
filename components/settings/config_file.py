"""The commented ``cliploop.yaml`` that ``cliploop init`` writes: every key of :mod:`components.settings.config`
preceded by its meaning, with the defaults, and the gate a new workspace starts with.

Kept apart from the typed settings because it changes with what a new workspace should start with, not with what
the settings are.
"""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from components.settings.config import Config, GateConfig

# The gate a new workspace starts with (`cliploop init` writes it; a config without a gate: section has no rule).
# Two guards against forgetting that hold for any data: no task the champion knows may get more than 10 points
# worse, and the chain's forgetting stays at most 10 points. Chosen against measured nights (docs/configuration.md,
# "The default gate"): the demo's LVP chain passes them (6.67 points at most), plain fine-tuning (25.3 points
# forgotten) fails them. cl.last against the champion's is no such guard: a harder new task lowers it with nothing
# forgotten (the demo's chalk task: 90.00 to 64.67).
STARTER_GATE: dict[str, float] = {"max_forgetting": 10.0, "max_drop_vs_champion": 10.0}
SECTION_NOTES: dict[str, list[str]] = {
    "gate": [
        "# The promotion gate: a new version must pass every rule set here before it waits for review (a",
        "# failure rejects it; `cliploop approve N --override-gate` promotes it anyway). A new workspace starts",
        "# with two guards against forgetting, in points of accuracy: no task the champion knows may get more",
        "# than max_drop_vs_champion worse, and cl.forgetting (each earlier task's drop from its best accuracy,",
        "# averaged) stays at most max_forgetting. null = no rule; with no rule at all, a version's page says",
        '# that nothing was checked (docs/configuration.md, "The default gate").',
    ],
}


def default_config_yaml() -> str:
    """The configuration a new workspace starts with, as YAML, every key preceded by its meaning (written by
    `cliploop init`): the defaults, and the starter gate (``STARTER_GATE``)."""
    lines = [
        "# cliploop configuration. Precedence: defaults < this file < CLIPLOOP__SECTION__KEY env vars < --set flags.",
        "# Relative paths are relative to this file's folder.",
        "",
    ]
    _emit(Config(gate=GateConfig(**STARTER_GATE)), lines, indent=0)
    return "\n".join(lines) + "\n"


def _emit(model: BaseModel, lines: list[str], indent: int) -> None:
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines += [pad + note for note in SECTION_NOTES.get(name, []) if indent == 0]
            lines.append(f"{pad}{name}:")
            _emit(value, lines, indent + 1)
            continue
        if field.description:
            lines.append(f"{pad}# {field.description}")
        dumped = yaml.safe_dump({name: value}, default_flow_style=True, sort_keys=False).strip()
        # Flow style wraps the pair in braces: remove only those (a value may be "{}" itself).
        lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")
