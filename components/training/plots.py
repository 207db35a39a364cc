"""PNG figures of an accuracy matrix: the heatmap and the per-task curves (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

from components.training.metrics import AccuracyMatrix, seen_accuracy


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def heatmap(m: AccuracyMatrix, path: Path) -> Path:
    """Rows = after learning task i (plus the initial model), columns = task j; blank where not evaluated."""
    import numpy as np

    plt = _pyplot()
    rows = ([("initial", m.initial)] if m.initial is not None else []) + list(zip(m.tasks, m.matrix))
    values = np.array([[np.nan if v is None else v for v in row] for _, row in rows], dtype=float)
    size = max(4.0, 0.7 * len(m.tasks) + 2.5)
    fig, ax = plt.subplots(figsize=(size, max(3.0, 0.55 * len(rows) + 1.8)))
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(m.tasks)), m.tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [f"after {name}" if name != "initial" else name for name, _ in rows])
    ax.set_xlabel("evaluated on task")
    if len(m.tasks) <= 16:
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_title("accuracy matrix")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def curves(m: AccuracyMatrix, path: Path) -> Path:
    """Accuracy of each task across training steps, and A_i (all seen tasks) as a thick line."""
    plt = _pyplot()
    steps = list(range(len(m.matrix) + 1)) if m.initial is not None else list(range(1, len(m.matrix) + 1))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(steps) + 3), 4))
    for j, task in enumerate(m.tasks):
        series = ([m.initial[j]] if m.initial is not None else []) + [row[j] for row in m.matrix]
        points = [(s, v) for s, v in zip(steps, series) if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", linewidth=1, label=task)
    seen = [(i, seen_accuracy(m, i)) for i in range(1, len(m.matrix) + 1)]
    seen = [(i, v) for i, v in seen if v is not None]
    if seen:
        ax.plot(*zip(*seen), color="black", linewidth=2.5, label="A_i (seen tasks)")
    ax.set_xticks(
        steps, (["init"] if m.initial is not None else []) + m.tasks[: len(m.matrix)], rotation=30, ha="right"
    )
    ax.set_xlabel("after learning")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
