"""The whole pipeline from one config: SFT -> reward model(s) -> rejection-sampling / PPO rounds -> evaluation.

    python -m rlhf_cluster.pipeline [--config configs/pipeline-tiny.yaml] [key=value ...]
    python -m rlhf_cluster.pipeline rerun='[final]'        # run the last stage again

    stage            what runs                                          registered as (kind, stage)
    sft              sft.run_sft (or `sft.use_existing`)                policy, sft
    reward_<name>    reward.run_reward, one per reward model / aspect   reward, reward
    final            rejection_sampling.run: rounds from the SFT        policy, the best round's kind
                     policy, scored by the reward models (combined by   (rejection_sampling or ppo)
                     `final.combine` when there are several)
    evaluation       gold score after every stage, RM accuracies, summary.json, pipeline.png,
                     one TensorBoard run per stage

Every stage writes under output_dir/<stage>/ and registers its model in the checkpoint registry
(`registry`); the next stage reads its input from that entry, never from a path of its own. The
registry ids are recorded in output_dir/pipeline.json with a fingerprint of each stage's config
and inputs: a second invocation skips every stage whose config and inputs are unchanged and whose
registered files still hash to the registered manifest, so an interrupted pipeline resumes after
its last completed stage. `rerun=[stage, ...]` (or `[all]`) runs stages again regardless.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from rlhf_cluster import scaffold
from rlhf_cluster.lib.config import (
    CONFIG_DIR,
    ConfigError,
    FeedbackRoundConfig,
    PipelineConfig,
    PipelineRewardConfig,
    RewardConfig,
    RSConfig,
    SFTConfig,
    check_resources,
    local_resources,
)
from rlhf_cluster.lib.files import write_json

DEFAULT_CONFIG = CONFIG_DIR / "pipeline-tiny.yaml"


# --------------------------------------------------------------------------- each stage's own config
def shared(cfg: PipelineConfig | FeedbackRoundConfig, stage: str) -> dict:
    """What every stage takes from the top level: seed, cluster, built-in task, precision, tracking,
    output_dir/<stage> (also a feedback round's stages)."""
    return {"seed": cfg.seed, "output_dir": str(Path(cfg.output_dir).resolve() / stage),
            "ray": cfg.ray.model_dump(), "builtin": cfg.builtin.model_dump(), "precision": cfg.precision,
            "tracking": cfg.tracking.model_dump()}


def sft_config(cfg: PipelineConfig) -> SFTConfig:
    return SFTConfig.model_validate({**cfg.sft.model_dump(exclude={"use_existing"}), **shared(cfg, "sft")})


def reward_config(cfg: PipelineConfig, rm: PipelineRewardConfig, sft_path: str | None) -> RewardConfig:
    """The reward stage's config; `builtin_init: sft` starts from the pipeline's SFT policy."""
    fields = rm.model_dump(exclude={"name", "weight", "use_existing"})
    if rm.model.path is None and rm.builtin_init == "sft":
        fields["model"]["path"] = sft_path
    return RewardConfig.model_validate({**fields, **shared(cfg, f"reward_{rm.key}")})


def final_config(cfg: PipelineConfig, policy: str, rewards: dict[str, str]) -> RSConfig:
    """The rounds' config: start from the SFT policy; several reward models are combined."""
    fields = cfg.final.model_dump()
    combined = [{"name": rm.key, "path": rewards[rm.key], "weight": rm.weight} for rm in cfg.reward_models]
    return RSConfig.model_validate({
        **fields, **shared(cfg, "final"), "registry": cfg.registry,
        "policy": {**fields["policy"], "path": policy},
        "reward": {**fields["reward"], "path": rewards[cfg.final_reward_name()]},
        "reward_models": combined if len(combined) > 1 else [],
    })


# --------------------------------------------------------------------------- before anything starts
def check_before_start(cfg: PipelineConfig) -> None:
    """Models named by `use_existing` exist, and every stage fits the cluster: checked before Ray starts."""
    import ray

    from rlhf_cluster.rejection_sampling import check_round_resources

    for where, path in [("sft", cfg.sft.use_existing)] + [(f"reward_models ({r.key})", r.use_existing)
                                                          for r in cfg.reward_models]:
        if path is not None and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{where}.use_existing: {path} is not a model directory (no config.json)")
    if ray.is_initialized():
        res = ray.cluster_resources()
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    elif cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return  # each stage checks against the cluster once it has joined
    else:
        cpus, gpus = local_resources(cfg)
    check_resources(sft_config(cfg), cpus, gpus)
    for rm in cfg.reward_models:
        check_resources(reward_config(cfg, rm, "-"), cpus, gpus)
    placeholder = {rm.key: "-" for rm in cfg.reward_models}
    check_round_resources(final_config(cfg, "-", placeholder), cpus, gpus)


# --------------------------------------------------------------------------- the registry book-keeping
class Book:
    """output_dir/pipeline.json: each completed stage's registry entry, inputs and fingerprint."""

    def __init__(self, cfg: PipelineConfig, log=print):
        from rlhf_cluster.lib.registry import open_registry

        self.out = Path(cfg.output_dir).resolve()
        self.file = self.out / "pipeline.json"
        self.registry = open_registry(cfg.registry)
        self.run = self.out.name
        self.rerun = set(cfg.stage_names()) if "all" in cfg.rerun else set(cfg.rerun)
        self.log = log
        self.state = json.loads(self.file.read_text()) if self.file.exists() else {"stages": {}}
        self.ran: dict[str, str] = {}  # stage -> "trained" | "skipped" in this invocation

    def stage(self, name: str, kind: str, config, inputs: dict, train: Callable[[], tuple]):
        """The stage's registry entry: the recorded one when intact and up to date, else train() and register.

        train() -> (model directory, registry stage name, metrics[, id of an entry the stage registered
        itself]); inputs: {role: registry entry}.
        """
        from rlhf_cluster.lib.registry import checkpoint_sha256, make_entry

        fingerprint = hashlib.sha256(json.dumps(
            {"config": config.model_dump(mode="json"), "inputs": {k: e.id for k, e in inputs.items()}},
            sort_keys=True).encode()).hexdigest()
        done = self.state["stages"].get(name)
        why = self._why_not_skip(name, done, fingerprint, checkpoint_sha256)
        if why is None:
            entry = self.registry.get(done["entry"])
            self.log(f"\n== {name}: skipped, registered {entry.id} ({entry.kind}/{entry.stage}) is intact")
            self.ran[name] = "skipped"
            return entry
        self.log(f"\n== {name}: running ({why})")
        t0 = time.time()
        stage_dir = self.out / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=1) + "\n")
        model_dir, stage_label, metrics, *own = train()
        if own and own[0]:
            entry = self.registry.get(own[0])
        else:
            entry = make_entry(model_dir, run=self.run, kind=kind, stage=stage_label, metrics=metrics)
            # what it holds, where and measured in the id: a re-run adds an entry (or repeats one), never conflicts
            tag = hashlib.sha256(entry.model_dump_json(exclude={"id", "created"}).encode()).hexdigest()[:12]
            entry = self.registry.register(entry.model_copy(update={"id": f"{self.run[:80]}-{name}-{tag}"}))
        self.state["stages"][name] = {"entry": entry.id, "fingerprint": fingerprint, "seconds": round(
            time.time() - t0, 1), "inputs": {k: e.id for k, e in inputs.items()}}
        self._save()
        self.ran[name] = "trained"
        self.log(f"== {name}: registered {entry.id} ({entry.kind}/{entry.stage}) -> {entry.path}")
        return entry

    def _why_not_skip(self, name: str, done: dict | None, fingerprint: str, sha256) -> str | None:
        if name in self.rerun:
            return "rerun asked for"
        if done is None:
            return "not run yet"
        if done["fingerprint"] != fingerprint:
            return "its config or inputs changed"
        try:
            entry = self.registry.get(done["entry"])
            if sha256(entry.path) != entry.sha256:
                return f"{entry.path} changed since it was registered"
        except (KeyError, ValueError, OSError) as e:  # NotFound, RegistryError (files gone)
            return f"registered output unusable: {e}"
        return None

    def _save(self) -> None:
        write_json(self.file, self.state, indent=1)


def _summary_next_to(model_dir: str | Path) -> dict:
    """A stage's summary.json (next to its model directory), or {} for a model from elsewhere."""
    path = Path(model_dir).parent / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _floats(d: dict, keys: list[str]) -> dict[str, float]:
    return {k: float(d[k]) for k in keys if isinstance(d.get(k), (int, float))}


# --------------------------------------------------------------------------- the pipeline
def run(cfg: PipelineConfig, log=print) -> dict:
    """Every stage in order (skipping completed ones), then the evaluation; returns the summary."""
    from rlhf_cluster import rejection_sampling
    from rlhf_cluster.reward import run_reward
    from rlhf_cluster.sft import run_sft

    t0 = time.time()
    check_before_start(cfg)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    book = Book(cfg, log)
    log(f"pipeline {book.run}: stages {cfg.stage_names()}; registry {book.registry.describe()}; output {out}")

    # 1. SFT: the policy every later stage starts from
    sft_cfg = sft_config(cfg)

    def train_sft():
        if cfg.sft.use_existing:
            return Path(cfg.sft.use_existing), "sft", {}
        model_dir = run_sft(sft_cfg)
        return model_dir, "sft", _floats(_summary_next_to(model_dir), ["eval_loss_after", "gold_after"])

    sft = book.stage("sft", "policy", sft_cfg, {}, train_sft)

    # 2. reward models, one stage each (e.g. helpfulness and safety, Llama 2's two aspects)
    rewards = {}
    for rm in cfg.reward_models:
        rm_cfg = reward_config(cfg, rm, sft.path)
        inputs = {"policy": sft} if rm_cfg.model.path == sft.path else {}

        def train_rm(rm=rm, rm_cfg=rm_cfg):
            model_dir = Path(rm.use_existing) if rm.use_existing else run_reward(rm_cfg)
            return model_dir, "reward", _floats(_summary_next_to(model_dir), ["eval_accuracy_after", "eval_loss_after"])

        rewards[rm.key] = book.stage(f"reward_{rm.key}", "reward", rm_cfg, inputs, train_rm)

    # 3. rounds of rejection sampling and/or PPO from the SFT policy; the best round is the output
    final_cfg = final_config(cfg, sft.path, {k: e.path for k, e in rewards.items()})

    def train_final():
        s = rejection_sampling.run(final_cfg, log=log, run_name=f"{book.run}-final")
        best = s["best_round"]
        if best == 0:  # no round beat the SFT policy: register the starting point as the stage's output
            measured = {"val_gold": s["val_gold_per_round"][0], "val_rm": s["val_rm_per_round"][0]}
            return Path(s["best_model"]), "sft", measured
        return Path(s["best_model"]), cfg.final.rounds[best - 1], {}, s["best_entry"]  # registered by the round

    final = book.stage("final", "policy", final_cfg, {"policy": sft, **{f"reward_{k}": e for k, e in rewards.items()}},
                       train_final)

    # 4. evaluation: gold after every stage, reward-model accuracies, a picture, TensorBoard
    summary = final_report(cfg, book, sft, rewards, final, log)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def final_report(cfg: PipelineConfig, book: Book, sft, rewards: dict, final, log=print) -> dict:
    """The pipeline's results from what the stages measured on held-out data (nothing is retrained)."""
    out = book.out
    sft_summary = _summary_next_to(sft.path)
    rounds = [json.loads(line) for line in (out / "final" / "metrics.jsonl").read_text().splitlines()]
    final_summary = json.loads((out / "final" / "summary.json").read_text())
    shown = final_summary["reported_split"]  # test (reported only); the rounds were promoted on validation
    gold = {"sft": rounds[0][f"{shown}/gold"]}  # greedy: round 0 evaluates the starting (SFT) policy
    for r in rounds[1:]:
        gold[f"round_{r['iteration']}_{r['round']}"] = r[f"{shown}/gold"]
    rm_accuracy = {}
    for name, entry in rewards.items():
        s = _summary_next_to(entry.path)
        if "eval_accuracy_after" in s:
            rm_accuracy[name] = {"before": s["eval_accuracy_before"], "after": s["eval_accuracy_after"]}
    last_rs = next((r for r in reversed(rounds) if r.get("round") == "rejection_sampling"), {})
    per_rm = {name: {"all": last_rs[f"reward/{name}"], "selected": last_rs[f"reward/{name}_selected"]}
              for name in rewards if f"reward/{name}" in last_rs}  # the combined models' scores, last RS round
    summary = {
        "stages": {name: {"ran": book.ran[name], "entry": book.state["stages"][name]["entry"],
                          "seconds": book.state["stages"][name]["seconds"]} for name in cfg.stage_names()},
        "registered": {name: {"id": e.id, "kind": e.kind, "stage": e.stage, "path": e.path}
                       for name, e in [("sft", sft), *((f"reward_{k}", e) for k, e in rewards.items()),
                                       ("final", final)]},
        "gold": gold, "gold_split": shown, "best_round": final_summary["best_round"],
        "promote_by": final_summary["promote_by"],
        "rm_accuracy": rm_accuracy, "rm_scores_last_rs_round": per_rm,
        "combine": cfg.final.combine if len(rewards) > 1 else None,
        "picture": str(out / "pipeline.png"), "tensorboard": str(out / "tensorboard"),
    }
    if "gold_after" in sft_summary:  # SFT's own evaluation: sampled at temperature 1, base model vs SFT
        summary["sft_sampled_gold"] = {"base": sft_summary["gold_before"], "sft": sft_summary["gold_after"]}
    trained = [("sft", sft), *((f"reward_{k}", e) for k, e in rewards.items())]
    from rlhf_cluster.lib.report import pipeline_figure

    pipeline_figure(out, [(name, _rows(Path(e.path).parent / "metrics.jsonl")) for name, e in trained],
                    rounds, gold, rm_accuracy)
    tensorboard(out, trained, rounds)
    lines = ["", f"=== pipeline summary ({out}) ==="]
    for name, s in summary["stages"].items():
        took = f"{s['seconds']:>6.0f} s" if s["ran"] == "trained" else " " * 8
        lines.append(f"{name:<20} {s['ran']:<8} {took}  {s['entry']}")
    lines.append(f"{shown} gold (greedy): " + " -> ".join(f"{k} {v:.3f}" for k, v in gold.items())
                 + f"   (best: round {summary['best_round']})")
    if "sft_sampled_gold" in summary:
        g = summary["sft_sampled_gold"]
        lines.append(f"SFT gold (sampled, T=1): base {g['base']:.3f} -> sft {g['sft']:.3f}")
    for name, acc in rm_accuracy.items():
        lines.append(f"reward model {name}: validation accuracy {acc['before']:.3f} -> {acc['after']:.3f}")
    if per_rm:
        lines.append(f"reward-model scores in the last rejection-sampling round ({cfg.final.combine}; all samples"
                     " -> selected): " + ", ".join(f"{k} {v['all']:.3f} -> {v['selected']:.3f}"
                                                   for k, v in per_rm.items()))
    lines += [f"picture:     {summary['picture']}", f"tensorboard: {summary['tensorboard']}",
              f"registry:    {book.registry.describe()}"]
    log("\n".join(lines))
    return summary


# --------------------------------------------------------------------------- outputs
def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def tensorboard(out: Path, trained: list, rounds: list[dict]) -> None:
    """One TensorBoard run per stage under out/tensorboard/<stage> (rewritten on every invocation)."""
    from torch.utils.tensorboard import SummaryWriter

    root = out / "tensorboard"
    shutil.rmtree(root, ignore_errors=True)
    runs = [(name, "step", _rows(Path(e.path).parent / "metrics.jsonl")) for name, e in trained]
    runs.append(("final", "iteration", rounds))
    for name, x, rows in runs:
        if not rows:
            continue
        writer = SummaryWriter(str(root / name))
        for r in rows:
            for k, v in r.items():
                if k != x and isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.add_scalar(k, v, r[x])
        writer.close()


# --------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> dict:
    return scaffold.main("pipeline", PipelineConfig, run, argv, DEFAULT_CONFIG, __doc__.split("\n")[0])


if __name__ == "__main__":
    main()
