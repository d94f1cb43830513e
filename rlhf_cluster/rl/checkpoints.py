"""Checkpoints of an RL run: atomic (written under .tmp, hashed into a manifest, renamed), pruned to
the last `keep_checkpoints` plus the best by validation gold, and registered in the checkpoint
registry — entries wait in a queue (kept in every checkpoint) while the registry is down."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from rlhf_cluster.lib.config import PPOConfig
from rlhf_cluster.rl.weights import short


class PoisonedState(RuntimeError):
    """Trainer weights went non-finite: the run rolls back instead of saving them."""


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest; partial or corrupt ones are skipped."""
    from rlhf_cluster.lib.registry import checkpoint_manifest

    root = out / "checkpoints"
    for path in sorted((p for p in root.glob("iter_*") if not p.name.endswith(".tmp")), reverse=True):
        try:
            stored = json.loads((path / "manifest.json").read_text())
            actual = checkpoint_manifest(path)
            actual.pop("manifest.json", None)
            if stored == actual:
                return path
            print(f"skipping checkpoint {path}: files differ from its manifest", file=sys.stderr)
        except (OSError, ValueError) as e:
            print(f"skipping checkpoint {path}: {e}", file=sys.stderr)
    return None


class CheckpointStore:
    def __init__(self, out: Path, groups, tokenizer, cfg: PPOConfig, log=print):
        self.root, self.groups, self.tokenizer, self.cfg, self.log = out / "checkpoints", groups, tokenizer, cfg, log
        self.run_name = cfg.registry_run or out.name
        self.best: tuple[float, str] | None = None  # (validation gold, checkpoint name)
        self.unregistered: list = []  # registry entries waiting for the registry to come back

    def save(self, iteration: int, state: dict, row: dict) -> Path:
        """Trainer groups' states, the HF policy and the coordinator's `state`, as `iter_<iteration>`.
        Never from a poisoned state: non-finite weights raise PoisonedState (the run rolls back)."""
        from rlhf_cluster.lib.registry import checkpoint_manifest

        for group in self.groups.trainers():
            if not all(group.run("weights_finite")):
                raise PoisonedState(f"the {group.name} weights are not finite; no checkpoint written")
        name = f"iter_{iteration:06d}"
        tmp, final = self.root / (name + ".tmp"), self.root / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.groups.policy.run("save", str(tmp / "policy"))
        if self.groups.critic:
            self.groups.critic.run("save", str(tmp / "critic"))
        self.groups.policy.run("save_pretrained", str(tmp / "hf"))
        self.tokenizer.save_pretrained(tmp / "hf")
        val_gold = row.get("val/gold")
        best = self.best
        if val_gold is not None and (best is None or val_gold > best[0]):  # chosen on validation, never test
            best = (val_gold, name)
        state = state | {"val_gold": val_gold, "best": best,
                         "unregistered": [e.model_dump(mode="json") for e in self.unregistered]}
        (tmp / "coordinator.json").write_text(json.dumps(state))
        (tmp / "manifest.json").write_text(json.dumps(checkpoint_manifest(tmp)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.best = best
        self._prune()
        self._register(final, iteration, {k.replace("/", "_"): row[k] for k in ("val/gold", "test/gold") if k in row})
        return final

    def load(self, path: Path) -> dict:
        """Restore the trainer groups from `path`; returns the coordinator's state."""
        from rlhf_cluster.lib.registry import Entry

        state = json.loads((path / "coordinator.json").read_text())
        self.groups.policy.run("load", str(path / "policy"))
        if self.groups.critic:
            self.groups.critic.run("load", str(path / "critic"))
        self.load_state_dict(state)
        pending = [Entry.model_validate(e) for e in state.get("unregistered", [])]
        self.unregistered += [e for e in pending if e.id not in {u.id for u in self.unregistered}]
        return state

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = tuple(state["best"]) if state["best"] else None

    def _prune(self) -> None:
        """Keep the last `keep_checkpoints` and the best by validation gold score."""
        done = sorted(p for p in self.root.glob("iter_*") if not p.name.endswith(".tmp"))
        keep = set(done[-self.cfg.keep_checkpoints:])
        if self.best:
            keep.add(self.root / self.best[1])
        for p in done:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def _register(self, path: Path, iteration: int, metrics: dict[str, float]) -> None:
        from rlhf_cluster.lib.registry import make_entry

        self.unregistered.append(make_entry(path / "hf", run=self.run_name, kind="policy", stage="ppo",
                                            step=iteration, metrics=metrics))
        self.flush_registry()

    def flush_registry(self) -> bool:
        """Register the waiting entries, oldest first. While the registry is down they wait (in
        memory and in every checkpoint's coordinator state) and training goes on."""
        from rlhf_cluster.lib.registry import Conflict, open_registry

        try:
            registry = open_registry(self.cfg.registry)
            while self.unregistered:
                try:
                    registry.register(self.unregistered[0])
                except Conflict as e:  # same id, other content: a bug or a reused output directory
                    self.log(f"warning: {e}; not registered")
                self.unregistered.pop(0)
            return True
        except Exception as e:  # the checkpoint is on disk either way
            self.log(f"registry unavailable ({short(e)}); "
                     f"{len(self.unregistered)} checkpoint(s) wait to be registered")
            return False
