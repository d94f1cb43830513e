"""Every picture a run ends with (PNG, matplotlib's Agg backend: no display needed): PPO and
rejection-sampling learning curves, a stage's loss curve, the pipeline's overview."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf_cluster.lib.files import replaced_file

PANELS = [
    ("gold score (truth): validation, test", ["val/gold", "test/gold"]),
    ("pass@k (verifier, sampled)", ["val/pass@1", "test/pass@1", "test/pass@*"]),
    ("reward-model score", ["reward/rm_score", "val/rm_score", "test/rm_score"]),
    ("KL to reference", ["kl/mean_sequence_kl", "val/sampled_kl", "test/sampled_kl"]),
    ("policy", ["policy/entropy", "policy/clip_frac"]),
    ("critic", ["critic/value_loss", "critic/explained_variance"]),
    ("response length", ["response/length"]),
]


def learning_curves(history: list[dict], path: Path, title: str = "") -> Path:
    """One panel per family of metrics, x = iteration; panels without data are left out."""
    present = {k for row in history for k in row}
    # a key ending in * stands for every key with that prefix (pass@k for the run's k)
    expand = [(name, [m for k in keys for m in (sorted(p for p in present if p.startswith(k[:-1]) and p not in keys)
                                                 if k.endswith("*") else [k])]) for name, keys in PANELS]
    panels = [(name, keys) for name, keys in expand if any(k in present for k in keys)]
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["iteration"], r[key]) for r in history if key in r and isinstance(r[key], (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key.startswith(("val/", "test/")) else None, markersize=3, label=key)
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


def loss_curves(history: list[dict], path: Path) -> None:
    """Train loss per step and held-out loss at each evaluation, one PNG."""
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    held = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pipeline_figure(out: Path, curves: list[tuple[str, list[dict]]], rounds: list[dict], gold: dict,
                    rm_accuracy: dict) -> Path:
    """out/pipeline.png: each training stage's train/held-out loss (`curves`: (stage, metrics rows)),
    reward-model accuracies, gold after each stage."""
    curves = [(name, rows) for name, rows in curves if rows]
    n, cols = len(curves) + 2, 3
    rows = -(-n // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    axes = list(grid.flat)[:n]
    for spare in list(grid.flat)[n:]:
        spare.axis("off")
    for ax, (name, rows) in zip(axes, curves):
        for key, label, style in (("train_loss", "train", "-"), ("eval_loss", "held-out", "o-")):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), style, lw=1, markersize=3, label=f"{label} loss")
        ax.set_title(f"{name} loss")
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    ax = axes[-2]
    for name in rm_accuracy:
        rows = dict(curves).get(f"reward_{name}", [])
        pts = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
        if pts:
            ax.plot(*zip(*pts), "o-", markersize=3, label=name)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_title("reward models: held-out accuracy")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=7)
    ax = axes[-1]
    ax.plot(range(len(gold)), list(gold.values()), "o-", label="gold (truth)")
    ax.set_ylabel("gold score")
    split = "test" if "test/gold" in rounds[0] else "val"
    rm = [r.get(f"{split}/rm_score") for r in rounds]
    if all(isinstance(v, (int, float)) for v in rm):
        ax2 = ax.twinx()
        ax2.plot(range(len(rm)), rm, "s--", color="tab:orange")
        ax2.set_ylabel("reward-model score (dashed)", color="tab:orange")
    ax.set_xticks(range(len(gold)), [k.replace("_", " ", 1).replace("_", "\n", 1) for k in gold], fontsize=7)
    ax.set_title(f"{split} gold (greedy) after each stage")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    with replaced_file(out / "pipeline.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out / "pipeline.png"
