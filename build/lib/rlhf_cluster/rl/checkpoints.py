"""Checkpoints of an RL run: pruned to the last `keep_checkpoints` plus the best by validation gold, and
registered in the checkpoint registry — entries wait in a queue (kept in every checkpoint) while the
registry is down. In <output_dir>/checkpoints a checkpoint is written under .tmp, hashed into a manifest and
renamed; in a storage URI (`checkpoint_storage`, rlhf_cluster/lib/storage.py) every rank uploads its own files
and the manifest of them all, written last, completes it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from rlhf_cluster.lib import storage
from rlhf_cluster.lib.config import PPOConfig
from rlhf_cluster.rl.weights import PoisonedState, short


def _newest_complete(candidates: list, stored_and_actual):
    """The first of `candidates` (newest first) whose manifest matches what is stored, as `stored_and_actual`
    reads them; partial or corrupt ones are skipped, saying why."""
    for where in candidates:
        try:
            stored, actual = stored_and_actual(where)
            if stored == actual:
                return where
            print(f"skipping checkpoint {where}: files differ from its manifest", file=sys.stderr)
        except (OSError, ValueError) as e:
            print(f"skipping checkpoint {where}: {e}", file=sys.stderr)
    return None


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint under <out>/checkpoints whose files (their sha256) match its manifest."""
    from rlhf_cluster.lib.registry import checkpoint_manifest

    def read(path: Path):
        stored = json.loads((path / "manifest.json").read_text())  # first: no hashing of a checkpoint without one
        actual = checkpoint_manifest(path)
        actual.pop("manifest.json", None)
        return stored, actual

    root = out / "checkpoints"
    return _newest_complete(sorted((p for p in root.glob("iter_*") if not p.name.endswith(".tmp")), reverse=True),
                            read)


def latest_stored_checkpoint(root: str) -> str | None:
    """The newest checkpoint under a storage URI whose stored files are those its manifest lists, with their
    sizes (each rank checks the hashes of what it downloads)."""
    def read(where: str):
        stored = {rel: m["size"] for rel, m in storage.read_json(storage.join(where, "manifest.json")).items()}
        actual = storage.stored_sizes(where)
        actual.pop("manifest.json", None)
        return stored, actual

    names = [n for n in storage.list_dirs(root) if n.startswith("iter_")]
    return _newest_complete([storage.join(root, n) for n in reversed(names)], read)


def latest_of_run(cfg: PPOConfig, out: Path) -> Path | str | None:
    """The checkpoint a resume starts from: in `checkpoint_storage` when set, else under <out>/checkpoints."""
    return latest_stored_checkpoint(cfg.checkpoint_storage) if cfg.checkpoint_storage else latest_checkpoint(out)


def _under(prefix: str, manifest: dict) -> dict:
    return {f"{prefix}/{rel}": meta for rel, meta in manifest.items()}


def _within(prefix: str, manifest: dict) -> dict:
    return {rel[len(prefix) + 1:]: meta for rel, meta in manifest.items() if rel.startswith(prefix + "/")}


class CheckpointStore:
    def __init__(self, out: Path, groups, tokenizer, cfg: PPOConfig, log=print):
        self.groups, self.tokenizer, self.cfg, self.log = groups, tokenizer, cfg, log
        self.remote = cfg.checkpoint_storage  # a storage URI, or None: <out>/checkpoints
        self.root = out / "checkpoints"
        self.run_name = cfg.registry_run or out.name
        self.best: tuple[float, str] | None = None  # (validation gold, checkpoint name)
        self.unregistered: list = []  # registry entries waiting for the registry to come back
        if self.remote and cfg.registry:
            log("checkpoints in checkpoint_storage are not registered: the registry and the serving apps read "
                "local paths (not yet)")

    def where(self) -> str:
        return self.remote or str(self.root)

    def save(self, iteration: int, state: dict, row: dict) -> Path | str:
        """Trainer groups' states, the HF policy and the coordinator's `state`, as `iter_<iteration>`.
        Never from a poisoned state: non-finite weights raise PoisonedState (the run rolls back)."""
        from rlhf_cluster.lib.registry import checkpoint_manifest

        self._check_finite("no checkpoint written")
        name = f"iter_{iteration:06d}"
        if self.remote:  # no atomic rename in object stores: the manifest, written last, completes it
            target = final = storage.join(self.remote, name)
            storage.delete_dir(target)
        else:
            tmp, final = self.root / (name + ".tmp"), self.root / name
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            target = str(tmp)
        manifest = {}
        for group, part in ((self.groups.policy, "policy"), (self.groups.critic, "critic")):
            if group:
                for uploaded in group.run("save", f"{target}/{part}"):
                    manifest |= _under(part, uploaded)
        for uploaded in self.groups.policy.run("save_pretrained", f"{target}/hf"):
            manifest |= _under("hf", uploaded)
        val_gold = row.get("val/gold")
        best = self.best
        if val_gold is not None and (best is None or val_gold > best[0]):  # chosen on validation, never test
            best = (val_gold, name)
        state = state | {"val_gold": val_gold, "best": best,
                         "unregistered": [e.model_dump(mode="json") for e in self.unregistered]}
        with storage.staged(target) as (local, uploaded):
            self.tokenizer.save_pretrained(local / "hf")
            (local / "coordinator.json").write_text(json.dumps(state))
        manifest |= uploaded
        self._check_finite("the checkpoint being written is left incomplete")  # poisoned while written
        if self.remote:
            storage.write_bytes(storage.join(target, "manifest.json"), json.dumps(manifest).encode())
        else:
            (tmp / "manifest.json").write_text(json.dumps(checkpoint_manifest(tmp)))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.best = best
        self._prune()
        if not self.remote:
            self._register(final, iteration,
                           {k.replace("/", "_"): row[k] for k in ("val/gold", "test/gold") if k in row})
        return final

    def _check_finite(self, consequence: str) -> None:
        for group in self.groups.trainers():
            if not all(group.run("weights_finite")):
                raise PoisonedState(f"the {group.name} weights are not finite; {consequence}")

    def load(self, path: Path | str) -> dict:
        """Restore the trainer groups from `path`; returns the coordinator's state."""
        from rlhf_cluster.lib.registry import Entry

        manifest = {}
        if self.remote:
            manifest = storage.read_json(storage.join(str(path), "manifest.json"))
            state = storage.read_json(storage.join(str(path), "coordinator.json"))
        else:
            state = json.loads((Path(path) / "coordinator.json").read_text())
        for group, part in ((self.groups.policy, "policy"), (self.groups.critic, "critic")):
            if group:
                group.run("load", f"{path}/{part}", "state", _within(part, manifest))
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
        if self.remote:
            done = [n for n in storage.list_dirs(self.remote) if n.startswith("iter_")]
        else:
            done = sorted(p.name for p in self.root.glob("iter_*") if not p.name.endswith(".tmp"))
        keep = set(done[-self.cfg.keep_checkpoints:]) | ({self.best[1]} if self.best else set())
        for name in done:
            if name not in keep:
                if self.remote:
                    storage.delete_dir(storage.join(self.remote, name))
                else:
                    shutil.rmtree(self.root / name, ignore_errors=True)

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
