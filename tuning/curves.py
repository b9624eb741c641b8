"""One PNG of training runs' loss curves: training loss per step (smoothed) and validation loss at its checks."""
from __future__ import annotations

from pathlib import Path


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean over `window` steps (one batch's loss is mostly which dialogues it drew)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


def plot_curves(panels: list[tuple[str, dict[str, dict]]], path: Path) -> Path:
    """panels: (title, {run name: {"losses": [per step], "evals": [{"step", "loss"}]}}); one subplot per panel."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        for i, (name, run) in enumerate(runs.items()):
            color = f"C{i}"
            losses = run["losses"]
            ax.plot(range(1, len(losses) + 1), smooth(losses), color=color, label=f"{name}: train (5-step mean)")
            evals = run.get("evals", [])
            if evals:
                ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], color=color, linestyle="--",
                        marker="o", label=f"{name}: held-out (assistant tokens)")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
