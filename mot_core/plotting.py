"""Loss-curve figures (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def panels(count: int, width: float = 5.5, height: float = 4.0):
    """A figure with ``count`` side-by-side axes: (figure, list of axes)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return fig, list(axes[0])


def finish(fig, axes, path: Path) -> None:
    """Common styling, then write the PNG and release the figure."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
