"""Learning-curve pictures for the end of a run (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("held-out gold score (truth)", ["eval/gold"]),
    ("reward-model score", ["reward/rm_score", "eval/rm_score"]),
    ("KL to reference", ["kl/mean_sequence_kl", "eval/kl"]),
    ("policy", ["policy/entropy", "policy/clip_frac"]),
    ("critic", ["critic/value_loss", "critic/explained_variance"]),
    ("response length", ["response/length"]),
]


def learning_curves(history: list[dict], path: Path, title: str = "") -> Path:
    """One panel per family of metrics, x = iteration; panels without data are left out."""
    panels = [(name, keys) for name, keys in PANELS if any(k in row for row in history for k in keys)]
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["iteration"], r[key]) for r in history if key in r and isinstance(r[key], (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key.startswith("eval/") else None, markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
