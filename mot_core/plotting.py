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


def smoothed(values, alpha: float = 0.9):
    """Bias-corrected exponential moving average (TensorBoard's smoothing):
    ``out_t = avg_t / (1 - alpha^t)`` with ``avg_t = alpha * avg_{t-1} + (1 - alpha) * x_t``.
    (n,) values -> (n,) float64 array."""
    import numpy as np

    out = np.empty(len(values))
    avg = 0.0
    for i, value in enumerate(values, 1):
        avg = alpha * avg + (1 - alpha) * float(value)
        out[i - 1] = avg / (1 - alpha**i)
    return out


def run_loss_curves(records: list[dict], path: Path, title: str = "") -> bool:
    """One run's loss curves from its ``metrics.jsonl`` records: a panel per modality with the
    training loss (raw, faint, and its EMA 0.9) and the validation loss (points), the layout of
    ``mot compare --plot``. Writes ``path`` and returns True; False (nothing written) when no
    record holds a ``loss/<modality>``."""
    modalities = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("loss/")})
    if not modalities:
        return False
    fig, axes = panels(len(modalities), width=5.0, height=3.6)
    for ax, modality in zip(axes, modalities):
        train = [(r["step"], r[f"loss/{modality}"]) for r in records if f"loss/{modality}" in r]
        steps, values = zip(*train)
        raw, = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smoothed(values), color=raw.get_color(), label="train (EMA 0.9)")
        val = [(r["step"], r[f"val/{modality}/loss"]) for r in records if f"val/{modality}/loss" in r]
        if val:
            ax.plot(*zip(*val), "o--", color="black", markersize=4, label="val")
        ax.set_title(f"{title + ': ' if title else ''}{modality} loss")
    finish(fig, axes, path)
    return True
