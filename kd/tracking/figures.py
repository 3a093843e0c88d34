"""The figures a run, a stage or a report writes (PNG, headless): one way to open and to save them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A figure and its axes on matplotlib's headless backend (imported here: a run that draws
    nothing never pays for matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_figure(fig: Any, ax: Any, path: Path, legend_fontsize: float | None = 8, grid: bool = True) -> Path:
    """Grid and legend on ``ax``, then ``fig`` written to ``path`` (its folder made) and closed."""
    import matplotlib.pyplot as plt

    if grid:
        ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
