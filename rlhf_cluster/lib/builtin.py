"""The embedded default: the built-in task's data and locally built models, made on first use.

Everything lives under one cache directory keyed by (size, seed, label noise), so that
`make run`, the tests and every job share one copy and rebuild nothing.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlhf_cluster.lib.config import BuiltinConfig


@dataclass(frozen=True)
class BuiltinAssets:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def base(self) -> Path:
        return self.root / "models" / "base"

    @property
    def reward_base(self) -> Path:
        return self.root / "models" / "reward_base"

    def file(self, name: str) -> Path:
        return self.data / name


def cache_root(cfg: BuiltinConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("RLHF_CLUSTER_CACHE") or Path.home() / ".cache" / "rlhf-cluster"
    if cfg.task == "arithmetic":  # no preference labels, so no label noise in the key
        return Path(root) / f"builtin-v2-arithmetic-{cfg.size}-seed{cfg.seed}"
    # v2: train/val/test splits, a tokenizer that never saw the test split
    return Path(root) / f"builtin-v2-{cfg.size}-seed{cfg.seed}-noise{cfg.label_noise:g}"


def builtin_model_dir(cfg: BuiltinConfig, stage: str) -> Path:
    """Where the built-in `stage` ("sft" or "reward") model trained on this task is cached (rlhf_cluster.prerequisites
    trains it there)."""
    return cache_root(cfg) / stage / "model"


@contextmanager
def locked(path: Path):
    """One builder at a time across processes (Ray workers, parallel jobs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_builtin(cfg: BuiltinConfig = BuiltinConfig(), log=print) -> BuiltinAssets:
    """Build the task data and the base models unless they already exist; returns their paths."""
    from rlhf_cluster.lib import arithmetic, task, tiny_models

    assets = BuiltinAssets(cache_root(cfg))
    verifiable = cfg.task == "arithmetic"
    with locked(assets.root.with_name(assets.root.name + ".lock")):
        if not (assets.data / "task.json").exists():
            log(f"building the built-in {cfg.task} task data in {assets.data}")
            if verifiable:
                arithmetic.build(assets.data, seed=cfg.seed)
            else:
                task.build(assets.data, seed=cfg.seed, label_noise=cfg.label_noise)
        if not (assets.base / "config.json").exists() or not (assets.reward_base / "config.json").exists():
            log(f"building {cfg.size} Llama models in {assets.base.parent}")
            # arithmetic: one token per digit, as Llama's tokenizer does, so numbers are learnt digit by digit
            corpus = arithmetic.corpus(cfg.seed) if verifiable else task.corpus(cfg.seed)
            tiny_models.build_tiny(assets.base.parent, size=cfg.size, seed=cfg.seed, corpus=corpus,
                                   split_digits=verifiable)
    return assets
