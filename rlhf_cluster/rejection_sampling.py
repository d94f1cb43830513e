"""Rejection sampling (Llama 2 / Llama 3.1), in iterative rounds with best-model promotion.

    python -m rlhf_cluster.rejection_sampling [--config FILE] [key=value ...]
    python -m rlhf_cluster.rejection_sampling rounds='[rejection_sampling, rejection_sampling, ppo]'

A rejection-sampling round, on the same actor groups as PPO:
    rollout engines sample K responses per prompt  →  reward model(s) score all of them
    keep the best of K per prompt (threshold, de-duplication)  →  written to round_N/selected.jsonl
    SFT on the selected set in the policy trainer group  →  weight sync  →  held-out evaluation
Each round starts from the best model so far by validation gold or RM score (`promote_by`; the test
split is only reported, never compared); a PPO round runs the
PPO job on top of it, as Llama 2 applied PPO to its rejection-sampled checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch

from rlhf_cluster import scaffold
from rlhf_cluster.actors.group import gather
from rlhf_cluster.lib import algorithms as A
from rlhf_cluster.lib.config import CONFIG_DIR, ConfigError, PPOConfig, RSConfig
from rlhf_cluster.prerequisites import resolve_models
from rlhf_cluster.rl.batch import trainer_item
from rlhf_cluster.rl.checkpoints import latest_checkpoint
from rlhf_cluster.rl.evaluation import HeldOutEval
from rlhf_cluster.rl.groups import RLGroups, plan_memory
from rlhf_cluster.rl.rollout import PromptOrder, RolloutProducer, load_prompt_splits, reward_context
from rlhf_cluster.rl.weights import WeightSync

DEFAULT_CONFIG = CONFIG_DIR / "rejection-sampling-tiny.yaml"


class RejectionSamplingRun:
    """The RL parts (rlhf_cluster/rl/) without a critic: groups, rollout producer, weight sync and
    held-out evaluation, with a rejection-sampling round as the update."""

    extra_rewards: dict = {}  # name -> reward group, when several reward models are combined

    def __init__(self, cfg: RSConfig, policy_path: str, reward_path: str, log=print):
        from transformers import AutoTokenizer

        self.cfg, self.log = cfg, log
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        self.prompts = load_prompt_splits(cfg, self.tokenizer, log)
        rs = cfg.rs
        per_epoch = -(-(rs.prompts_per_round or 256) // cfg.trainer.micro_batch_size)
        steps = max(1, cfg.rounds.count("rejection_sampling") * rs.epochs * per_epoch)
        trainer = cfg.trainer.model_copy(update={"optim": cfg.trainer.optim.model_copy(update={"lr": rs.lr})})
        self.groups = RLGroups(cfg, policy_path, reward_path, trainer=trainer, train_steps=steps, with_critic=False,
                               log=log)
        self.policy, self.reward = self.groups.policy, self.groups.reward
        self.faults = {"rollbacks": 0, "engine_failures": 0, "skipped_iterations": 0}
        self.weights = WeightSync(self.groups, cfg, self.faults, log)
        self.rng = random.Random(cfg.seed)
        self.order = PromptOrder(self.prompts["train"], self.rng)
        self.producer = RolloutProducer(self.groups, self.weights, self.order, cfg, self.faults, log)
        self.held_out_eval = HeldOutEval(self.groups, self.producer, self.prompts, cfg, log)

    def generate(self, prompt_ids: list[list[int]], overrides: dict | None = None, seed: int | None = None):
        return self.producer.generate(prompt_ids, overrides, seed)

    def sync(self) -> None:
        self.weights.sync()

    def shutdown(self) -> None:
        self.groups.shutdown()

    # ---------------------------------------------------------------- scoring
    def scores(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """Reward of every sample: {"reward": combined, name: per-model scores...}."""
        from rlhf_cluster.lib import task

        if self.cfg.rewards:  # models, functions and endpoints, combined in the reward actors with each prompt's label
            return {"reward": torch.tensor(self.reward.map("score_samples", samples,
                                                           reward_context(self.round_prompts)))}
        seqs = [trainer_item(s)["input_ids"] for s in samples]
        if not self.extra_rewards:
            return {"reward": torch.tensor(self.reward.map("score", seqs))}
        per_model = {name: torch.tensor(g.map("score", seqs)) for name, g in self.extra_rewards.items()}
        if self.cfg.combine == "llama2":
            texts = [task.prompt_text(self.prompt_messages(s)) for s in samples]
            unsafe = torch.tensor([task.is_unsafe_prompt(t) for t in texts])
            # Llama 2 compares the safety score *as a probability* (sigmoid of the model's output) with
            # the threshold and trains on logit(R_c), i.e. on the raw output of the model the rule picked.
            # Comparing raw outputs with logit(threshold) is the same rule, with no sigmoid/logit round trip.
            t = self.cfg.safety_threshold
            combined = A.llama2_combined_reward(per_model["helpfulness"], per_model["safety"], unsafe,
                                                math.log(t / (1 - t)))
        else:
            combined = A.weighted_reward(per_model, {m.name: m.weight for m in self.cfg.reward_models})
        return {"reward": combined, **per_model}

    def prompt_messages(self, sample: dict) -> list[dict]:
        return self.round_prompts[sample["prompt_index"]]["messages"]

    # ---------------------------------------------------------------- one round
    def rejection_sampling_round(self, number: int, out: Path) -> dict:
        cfg, rs = self.cfg, self.cfg.rs
        t0 = time.time()
        self.round_prompts = self.order.take(rs.prompts_per_round or len(self.prompts["train"]))
        samples = self.generate([p["prompt_ids"] for p in self.round_prompts],
                                {"samples_per_prompt": rs.samples_per_prompt, "temperature": rs.temperature},
                                seed=cfg.seed * 1_000_003 + number * 100_003)
        scored = self.scores(samples)
        best = A.best_of_k(scored["reward"], rs.samples_per_prompt).tolist()
        model_scores = {n: v for n, v in scored.items() if n != "reward"}
        selected, seen, skipped = [], set(), {"below_threshold": 0, "duplicate": 0}
        for i in best:
            s, reward = samples[i], scored["reward"][i].item()
            if rs.score_threshold is not None and reward < rs.score_threshold:
                skipped["below_threshold"] += 1
                continue
            key = (tuple(s["prompt_ids"]), tuple(s["response_ids"]))
            if rs.dedup and key in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(key)
            selected.append((s, reward, {n: v[i].item() for n, v in model_scores.items()}))
        if not selected:
            raise RuntimeError(f"round {number}: no sample passed selection ({skipped})")
        out.mkdir(parents=True, exist_ok=True)
        with (out / "selected.jsonl").open("w") as fh:
            for s, reward, per_model in selected:
                messages = self.prompt_messages(s) + [{"role": "assistant", "content": s["text"]}]
                fh.write(json.dumps({"messages": messages, "reward": reward, **per_model}) + "\n")
        t_sample = time.time() - t0

        items = [trainer_item(s) for s, _, _ in selected]
        losses = []
        size = cfg.trainer.micro_batch_size * self.policy.world_size  # one optimiser step per global batch, as SFT
        for _ in range(rs.epochs):
            self.rng.shuffle(items)
            steps = []
            for start in range(0, len(items), size):
                batch = items[start:start + size]
                steps += gather(self.policy.split_call("train_step", batch, "sft"))
            losses.append(sum(m["loss"] * m["items"] for m in steps) / len(items))
        self.sync()
        by_model = {}  # each combined reward model's mean score, over all samples and over the selected ones
        for n, v in model_scores.items():
            by_model[f"reward/{n}"] = v.mean().item()
            by_model[f"reward/{n}_selected"] = sum(m[n] for _, _, m in selected) / len(selected)
        return {"selected": len(selected), **{f"skipped_{k}": v for k, v in skipped.items()},
                "selected_mean_reward": sum(r for _, r, _ in selected) / len(selected),
                "all_mean_reward": scored["reward"].mean().item(), **by_model, "sft_loss": losses[-1],
                "time/sample_and_score": t_sample, "time/train": time.time() - t0 - t_sample}

    # ---------------------------------------------------------------- best-of-K as inference-time evaluation
    def best_of_k_curve(self, ks: list[int], seeds: int) -> dict[int, float]:
        """Test gold score (validation without a test split) when the reward model picks the best of K
        samples, averaged over seeds. Reported only."""
        from rlhf_cluster.lib import task

        k_max, curve = max(ks), {k: 0.0 for k in ks}
        self.round_prompts = self.prompts.get("test", self.prompts["val"])
        for seed in range(seeds):
            samples = self.generate([p["prompt_ids"] for p in self.round_prompts],
                                    {"samples_per_prompt": k_max, "temperature": self.cfg.rs.temperature},
                                    seed=10_000_019 * (seed + 1))
            reward = self.scores(samples)["reward"].view(-1, k_max)
            gold = torch.tensor([task.gold_score(task.prompt_text(self.prompt_messages(s)), s["text"]).total
                                 for s in samples]).view(-1, k_max)
            for k in ks:
                pick = reward[:, :k].argmax(-1)
                curve[k] += gold[torch.arange(len(pick)), pick].mean().item() / seeds
        return curve


MEASURES = ("val/gold", "val/rm_score", "test/gold", "test/rm_score")  # what a round's registry entry records


def _scores(ev: dict) -> str:
    """'val gold 0.700, RM 0.310 | test gold 0.712 ± 0.040, RM 0.300' for a log line."""
    return " | ".join(f"{split} gold {ev[f'{split}/gold']:.3f}"
                      + (f" ± {ev[f'{split}/gold_se']:.3f}" if split == "test" else "")
                      + f", RM {ev[f'{split}/rm_score']:.3f}" for split in ("val", "test") if f"{split}/gold" in ev)


def promotion_score(ev: dict, promote_by: str) -> float:
    """The validation metric that promotes a round (`promote_by`): never a test-split number."""
    return ev["val/gold"] if promote_by == "val_gold" else ev["val/rm_score"]


def check_round_resources(cfg: RSConfig, cpus: float, gpus: float) -> None:
    """Fail before any actor starts when a round cannot fit: a rejection-sampling round holds the
    policy, reference, reward and rollout groups plus one group per combined reward model (no
    critic); a PPO round holds PPO's groups (the rejection-sampling ones are stopped first)."""
    from rlhf_cluster.lib.config import check_resources

    groups = cfg.resource_groups()
    if "rejection_sampling" in cfg.rounds:
        rs_groups = {k: v for k, v in groups.items() if k != "critic"}
        rs_groups.update({f"reward_{m.name}": cfg.reward_group.demand() for m in cfg.reward_models})
        check_resources(rs_groups, cpus, gpus)
    if "ppo" in cfg.rounds:
        check_resources(groups, cpus, gpus)


def run(cfg: RSConfig, log=print, run_name: str | None = None) -> dict:
    """All rounds; returns the summary (best round, its checkpoint, gold per round).

    `run_name`: the `run` of this job's registry entries (default: the output directory's name).
    """

    from rlhf_cluster import ppo
    from rlhf_cluster.actors.group import ActorGroup
    from rlhf_cluster.actors.scorers import RewardModel
    from rlhf_cluster.lib.registry import make_entry, open_registry
    from rlhf_cluster.lib.report import learning_curves
    from rlhf_cluster.lib.tracking import track_finished

    if cfg.reward_models and cfg.combine == "llama2" and not 0 < cfg.safety_threshold < 1:
        raise ConfigError(f"safety_threshold is a probability in (0, 1) (Llama 2: 0.15), got {cfg.safety_threshold}")
    scaffold.connect(cfg, log_to_driver=False, check=lambda cpus, gpus: check_round_resources(cfg, cpus, gpus),
                     log=log)
    policy_path, reward_path = resolve_models(cfg, log)
    plan_memory(cfg, policy_path, reward_path, with_critic="ppo" in cfg.rounds and cfg.needs_critic, log=log)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_name = run_name or out.name

    def start(path: str) -> RejectionSamplingRun:
        job = RejectionSamplingRun(cfg, path, reward_path, log)
        rg = cfg.reward_group
        job.extra_rewards = {m.name: ActorGroup(RewardModel, rg, m.path, cfg.reward.dtype, rg.micro_batch_size,
                                                rg.max_tokens_per_micro_batch, rg.partition, rg.offload,
                                                name=f"reward-{m.name}")
                             for m in cfg.reward_models}
        return job

    def stop(job: RejectionSamplingRun) -> None:
        job.shutdown()
        for g in job.extra_rewards.values():
            g.shutdown()

    def export(job: RejectionSamplingRun, where: Path) -> Path:
        job.policy.run("save", str(where / "policy"))
        job.policy.run("save_pretrained", str(where / "hf"))
        job.tokenizer.save_pretrained(where / "hf")
        return where / "hf"

    def register(path: Path, number: int, ev: dict, stage: str = "rejection_sampling") -> str | None:
        try:
            entry = make_entry(path, run=run_name, kind="policy", stage=stage, step=number,
                               metrics={k.replace("/", "_"): ev[k] for k in MEASURES if k in ev})
            # what it holds and measured in the id: a re-run of the same output directory adds entries
            # (or repeats one exactly), never conflicts
            tag = hashlib.sha256(entry.model_dump_json(exclude={"id", "created"}).encode()).hexdigest()[:12]
            entry = entry.model_copy(update={"id": f"{entry.id[:115]}-{tag}"})
            return open_registry(cfg.registry).register(entry).id
        except Exception as e:  # the run goes on; the checkpoint is on disk either way
            log(f"warning: round {number} not registered: {e}")
            return None

    job = start(policy_path)
    history = [{"iteration": 0, **job.held_out_eval()}]
    hf0 = export(job, out / "round_0")  # the starting model, so a losing round can be undone
    best = {"round": 0, "hf": hf0, "state": out / "round_0" / "policy",
            "score": promotion_score(history[0], cfg.promote_by), "id": register(hf0, 0, history[0])}
    log(f"round 0 (start): {_scores(history[0])}")
    curve = {}
    if cfg.best_of_k_eval:  # of the starting policy: best-of-K sampling as the alternative to training
        curve = job.best_of_k_curve(cfg.best_of_k_eval, cfg.best_of_k_seeds)
        log("best-of-K gold (starting policy): " + ", ".join(f"K={k}: {v:.3f}" for k, v in curve.items()))
    try:
        for number, kind in enumerate(cfg.rounds, start=1):
            where = out / f"round_{number}"
            if kind == "rejection_sampling":
                if job is None:
                    job = start(str(best["hf"]))
                elif best["round"] != number - 1:  # the last round lost: start again from the best
                    job.policy.run("load", str(best["state"]))
                    job.sync()
                stats = job.rejection_sampling_round(number, where)
                ev = job.held_out_eval()
                hf = export(job, where)
                state = where / "policy"
            else:  # PPO on top of the best model so far
                if job is not None:
                    stop(job)
                    job = None
                fields = {k: v for k, v in cfg.model_dump().items() if k in PPOConfig.model_fields}
                ppo_cfg = PPOConfig.model_validate({**fields, "output_dir": str(where),
                                                    "registry_run": f"{run_name}-round{number}",
                                                    "policy": {**fields["policy"], "path": str(best["hf"])},
                                                    "reward": {**fields["reward"], "path": reward_path}})
                summary = ppo.run(ppo_cfg, log=log)
                ckpt = latest_checkpoint(where)
                rows = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines()]
                ev = next(r for r in reversed(rows) if "val/gold" in r)
                stats = {"ppo_gold_initial": summary["gold_initial"]}
                hf, state = ckpt / "hf", None
            ev = {("ppo_iteration" if k == "iteration" else k): v for k, v in ev.items()}  # a PPO round's own count
            row = {"iteration": number, "round": kind, **stats, **ev}
            history.append(row)
            score = promotion_score(ev, cfg.promote_by)
            entry_id = register(hf, number, ev, stage=kind)
            promoted = score > best["score"]
            if promoted:
                best = {"round": number, "hf": hf, "state": state, "score": score, "id": entry_id}
            log(f"round {number} ({kind}): {_scores(ev)}"
                + (f", {stats['selected']} samples selected" if "selected" in stats else "")
                + (" -> promoted to best" if promoted else f" -> best stays round {best['round']}"))
    finally:
        if job is not None:
            stop(job)
    if best["id"]:
        try:
            open_registry(cfg.registry).promote(best["id"])
        except Exception as e:
            log(f"warning: best model not promoted in the registry: {e}")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    learning_curves(history, out / "report.png", title="rejection sampling rounds")
    shown = "test" if "test/gold" in history[0] else "val"  # what is reported; validation chose the best
    summary = {"rounds": cfg.rounds, "reported_split": shown, "promote_by": cfg.promote_by,
               "gold_per_round": [r[f"{shown}/gold"] for r in history],
               "gold_se_per_round": [r[f"{shown}/gold_se"] for r in history],
               "rm_per_round": [r[f"{shown}/rm_score"] for r in history],
               "val_gold_per_round": [r["val/gold"] for r in history],
               "val_rm_per_round": [r["val/rm_score"] for r in history], "best_round": best["round"],
               "best_model": str(best["hf"]), "best_entry": best["id"], "best_of_k_gold": curve,
               "report": str(out / "report.png")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    track_finished(cfg, out, "rejection_sampling", history, summary, out / "report.png", str(best["hf"]))
    log("\n=== rejection sampling summary ===\n" + "\n".join(
        f"round {i} ({'start' if i == 0 else cfg.rounds[i - 1]}): {_scores(r)}" for i, r in enumerate(history))
        + f"\nbest by {cfg.promote_by}: round {best['round']} -> {best['hf']}"
        + f"\nreport: {summary['report']}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    return scaffold.main("rejection_sampling", RSConfig, run, argv, DEFAULT_CONFIG, __doc__.split("\n")[0])


if __name__ == "__main__":
    main()

