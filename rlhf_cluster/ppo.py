"""The main job: RLHF with PPO (or GRPO / RLOO / REINFORCE++) across Ray actor groups.

    ray job submit --address http://HEAD:8265 -- python -m rlhf_cluster.ppo --config configs/tiny-cpu.yaml
    python -m rlhf_cluster.ppo                      # local Ray, built-in task, CPU
    python -m rlhf_cluster.ppo --resume             # continue from the last complete checkpoint

Objective (InstructGPT / Llama 2): maximise  E[r_φ(x, y)] − β·KL(π ‖ π_SFT)  (+ γ·log-likelihood of
SFT data: ptx_coef, "PPO-ptx", a separate step after each policy step). Each iteration:

    prompts  → rollout engines (vLLM) sample n responses each
    sequences → reference log-probs, reward scores, critic values, old policy log-probs
    rewards  = score at the last token − β·KL per token;  advantages by GAE (or a critic-free estimator)
    for each PPO epoch and mini-batch: clipped policy step (+ clipped value step)
    weight sync trainer → engines;  metrics;  every E iterations evaluate;  every K checkpoint
    over-optimisation (validation RM score up, validation gold down): warn, and with early_stop stop

Faults (docs/reliability.md): a dead rollout engine, reference or reward actor is restarted by Ray
and the call in flight is sent again (engines are re-synced first); a lost policy or critic rank
rebuilds its group and rolls the run back to the last complete checkpoint; non-finite rewards or
losses skip the update and are counted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from ray.exceptions import RayActorError, RayTaskError

from actors.group import gather
from actors.rollout import StaleWeights
from rlhf_cluster import scaffold
from rlhf_cluster.lib import algorithms as A
from rlhf_cluster.lib.config import CONFIG_DIR, PPOConfig
from rlhf_cluster.lib.overoptimisation import overoptimising

DEFAULT_CONFIG = CONFIG_DIR / "tiny-cpu.yaml"


# --------------------------------------------------------------------------- batch plumbing
def padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-token lists -> ([B, T] right-padded tensor, mask)."""
    width = max(len(r) for r in rows)
    x, mask = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        mask[i, : len(r)] = 1.0
    return x, mask


def unpadded(x: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    return [x[i, :n].tolist() for i, n in enumerate(lengths)]


def trainer_item(sample: dict, **response_fields: list[float]) -> dict:
    """A trainer item: full sequence, loss mask and per-token fields over the response positions.

    Position t of a trainer array predicts token t+1, so the response starts at len(prompt) - 1.
    """
    pad = len(sample["prompt_ids"]) - 1
    item = {"input_ids": sample["prompt_ids"] + sample["response_ids"],
            "loss_mask": [0] * pad + [1] * len(sample["response_ids"])}
    for key, values in response_fields.items():
        item[key] = [0.0] * pad + list(values)
    return item


def response_part(sample: dict, full: list[float]) -> list[float]:
    return full[len(sample["prompt_ids"]) - 1:]


# --------------------------------------------------------------------------- the run
class PPORun:
    """Holds the actor groups and the loop state; `train()` is the algorithm."""

    def __init__(self, cfg: PPOConfig, policy_path: str, reward_path: str, log=print):
        import ray
        from transformers import AutoTokenizer

        from actors.group import ActorGroup, colocated_placement_group
        from actors.rollout import engine_class
        from actors.scorers import ReferenceModel, RemoteRewardModel, RewardModel
        from actors.trainer import Critic, PolicyTrainer
        from rlhf_cluster.lib.data import load_tokenized

        self.cfg, self.log, self.ray = cfg, log, ray
        self.out = Path(cfg.output_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.policy_path, self.reward_path = policy_path, reward_path
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        max_prompt = cfg.data.max_prompt_tokens
        # train: what the policy samples on; val: what chooses (best checkpoint, promotion); test: reported only
        self.prompts: dict[str, list[dict]] = {}
        for split, path in self._data_files().items():
            self.prompts[split], report = load_tokenized(path, self.tokenizer, "prompts", max_prompt,
                                                         cfg.data.on_bad_sample)
            log(f"{split} prompts: {report}")
        self.train_prompts = self.prompts["train"]
        self.ptx_data = []
        if cfg.ptx_coef > 0:
            self.ptx_data, report = load_tokenized(self._ptx_file(), self.tokenizer, "sft",
                                                   cfg.data.max_sequence_tokens, cfg.data.on_bad_sample)
            log(f"ptx data: {report}")

        n_rollouts = cfg.prompts_per_iteration * cfg.rollout.samples_per_prompt
        steps = self.total_train_steps()
        # each actor picks DeepSpeed's accelerator itself (rlhf_cluster.lib.deepspeed_setup), unless the driver says
        env = {"RLHF_TORCH_THREADS": "1"} | {k: os.environ[k] for k in ("DS_ACCELERATOR",) if k in os.environ}
        # replicas without peers are restarted by Ray; reference and reward calls are re-sent by Ray too,
        # rollout calls by `generate` (after a re-sync: a restarted engine holds the initial weights)
        restarts = cfg.fault_tolerance.actor_restarts
        replica = {"max_restarts": restarts, "max_task_retries": restarts}
        t0 = time.time()
        with_critic = self.uses_critic()
        log("starting actor groups: policy trainer, reference, reward, rollout" + (", critic" if with_critic else ""))
        trainer = self.trainer_config()
        # colocated groups (cfg.colocate) share one placement group: rank i of each in bundle i
        resources = cfg.group_resources()
        self.shared_pgs, pg = [], {}
        for names in cfg.colocated_sets():
            names = [n for n in names if n != "critic" or with_critic]
            self.shared_pgs.append(colocated_placement_group({n: resources[n] for n in names}, trainer.placement))
            pg |= {n: self.shared_pgs[-1] for n in names}
            log(f"colocated: {' + '.join(names)}")
        self.policy = ActorGroup(PolicyTrainer, trainer, policy_path, trainer.model_dump(), steps,
                                 cfg.policy.dtype, cfg.seed, name="policy", env=env, wait=False, pg=pg.get("trainer"))
        self.reference = ActorGroup(ReferenceModel, cfg.reference, policy_path, cfg.policy.dtype, name="reference",
                                    env=env, wait=False, pg=pg.get("reference"), **replica)
        if cfg.reward_service:  # scores over HTTP; the bearer token travels in the actors' environment
            svc = cfg.reward_service
            token = {svc.token_env: os.environ[svc.token_env]} if svc.token_env in os.environ else {}
            self.reward = ActorGroup(RemoteRewardModel, cfg.reward_group, svc.url, policy_path, svc.token_env,
                                     svc.batch_size, svc.timeout_s, svc.retries, name="reward", env=env | token,
                                     wait=False, pg=pg.get("reward_group"), **replica)
        else:
            self.reward = ActorGroup(RewardModel, cfg.reward_group, reward_path, cfg.reward.dtype, name="reward",
                                     env=env, wait=False, pg=pg.get("reward_group"), **replica)
        self.critic = None
        if with_critic:
            # the critic starts from the reward model (its head too), or the policy when scores come over HTTP
            self.critic = ActorGroup(Critic, cfg.critic, reward_path or policy_path, cfg.critic.model_dump(), steps,
                                     cfg.reward.dtype, cfg.seed, name="critic", env=env, wait=False,
                                     pg=pg.get("critic"))
        self.rollout = ActorGroup(engine_class(cfg.rollout.engine), resources["rollout"], policy_path,
                                  cfg.rollout.model_dump(), cfg.seed, cfg.policy.dtype, name="rollout",
                                  env={"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(cfg.rollout.kv_cache_gib)))},
                                  wait=False, max_restarts=restarts, pg=pg.get("rollout"))
        for group in self.groups():
            group.wait()
        self.init_transport()
        log(f"actor groups up in {time.time() - t0:.0f}s; {n_rollouts} samples per iteration"
            + (f"; weights sync over {self.transport}" if self.transport != "object_store" else ""))

        self.kl_ctl = (A.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else A.FixedKLController(cfg.kl_coef))
        self.reward_stats = A.RunningMeanStd()
        self.iteration, self.data_pos, self.epoch = 0, 0, 0
        self.rng = random.Random(cfg.seed)
        self.order = self._shuffled()
        self.history: list[dict] = []
        self.baseline_eval: dict[str, list[str]] = {}  # the initial policy's held-out responses (win-rate)
        self.best: tuple[float, str] | None = None
        self.weights_version = 0  # bumped by every sync; engines refuse to sample with another version
        self.faults = {"rollbacks": 0, "engine_failures": 0, "skipped_iterations": 0}
        self.consecutive_skips = 0
        self.stopped_early: int | None = None  # the iteration early_stop ended the run at
        self.unregistered: list = []  # registry entries waiting for the registry to come back
        self.start_state: dict | None = None

    # what a subclass (rejection sampling) changes
    def total_train_steps(self) -> int:
        per_iteration = self.cfg.ppo_epochs * self.cfg.mini_batches * (2 if self.cfg.ptx_coef > 0 else 1)
        return self.cfg.iterations * per_iteration

    def uses_critic(self) -> bool:
        return self.cfg.estimator == "gae"

    def trainer_config(self):
        return self.cfg.trainer

    def _data_files(self) -> dict[str, Path]:
        """{train, val[, test]} prompt files: the config's, or the built-in task's three splits."""
        d = self.cfg.data
        if d.train:
            return {"train": Path(d.train), "val": Path(d.eval or d.train)} | ({"test": Path(d.test)} if d.test else {})
        from rlhf_cluster.lib.builtin import ensure_builtin

        assets = ensure_builtin(self.cfg.builtin, log=self.log)
        return {split: assets.file(f"prompts_{split}.jsonl") for split in ("train", "val", "test")}

    def _ptx_file(self) -> Path:
        if self.cfg.ptx_data:
            return Path(self.cfg.ptx_data)
        from rlhf_cluster.lib.builtin import ensure_builtin

        return ensure_builtin(self.cfg.builtin, log=self.log).file("sft_train.jsonl")

    def ptx_batch(self, step: int) -> list[dict]:
        """PPO-ptx samples for the policy step `step` of this iteration: drawn from a seed of the
        iteration and step (no state to checkpoint, so a resumed run draws the same)."""
        rng = random.Random(self.cfg.seed * 1_000_003 + self.iteration * 10_007 + step)
        picked = rng.sample(self.ptx_data, min(self.cfg.ptx_batch_size, len(self.ptx_data)))
        return [{"input_ids": s.input_ids, "loss_mask": s.loss_mask[1:]} for s in picked]

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.train_prompts)))
        self.rng.shuffle(order)
        return order

    def next_prompts(self) -> list[dict]:
        """The next prompts_per_iteration prompts, reshuffled at every pass over the data."""
        batch = []
        while len(batch) < self.cfg.prompts_per_iteration:
            if self.data_pos == len(self.order):
                self.epoch, self.data_pos, self.order = self.epoch + 1, 0, self._shuffled()
            batch.append(self.train_prompts[self.order[self.data_pos]])
            self.data_pos += 1
        return batch

    # ---------------------------------------------------------------- one iteration
    def step(self) -> dict:
        cfg, timing = self.cfg, {}
        clock = time.time()

        def lap(name):
            nonlocal clock
            timing[f"time/{name}"] = time.time() - clock
            clock = time.time()

        # 1. sample
        prompts = self.next_prompts()
        samples = self.generate([p["prompt_ids"] for p in prompts],
                                seed=self.cfg.seed * 1_000_003 + self.iteration * 10_007)
        lap("generate")

        # 2. score: reference, reward, critic and the policy's own (old) log-probs, in parallel
        items = [trainer_item(s) for s in samples]
        seqs = [it["input_ids"] for it in items]
        refs = {"ref": self.reference.split_call("logprobs", seqs), "score": self.reward.split_call("score", seqs)}
        if cfg.old_logprobs == "recompute":
            refs["old"] = self.policy.split_call(
                "logprobs", items, self.policy.micro_batches_per_rank(len(items), cfg.trainer.micro_batch_size))
        if self.critic:
            refs["values"] = self.critic.split_call(
                "values", items, self.critic.micro_batches_per_rank(len(items), cfg.critic.micro_batch_size))
        got = {k: [x for part in gather(v) for x in part] for k, v in refs.items()}
        lap("score")

        # 3. rewards and advantages (pure functions, on [B, T] response tensors)
        lengths = [len(s["response_ids"]) for s in samples]
        sampler_lp, mask = padded([s["logprobs"] for s in samples])  # the engine's log-prob of each sampled token
        old_lp = sampler_lp
        if cfg.old_logprobs == "recompute":
            old_lp, _ = padded([response_part(s, lp) for s, lp in zip(samples, got["old"])])
        ref_lp, _ = padded([response_part(s, lp) for s, lp in zip(samples, got["ref"])])
        raw_scores = torch.tensor(got["score"])
        scores = raw_scores
        if cfg.normalize_rewards:
            self.reward_stats.update(scores)
            scores = self.reward_stats.normalize(scores)
        if cfg.reward_clip:
            scores = A.clip_rewards(scores, cfg.reward_clip)
        kl = A.kl_estimate(old_lp, ref_lp, cfg.kl_estimator) * mask
        rewards = A.token_level_rewards(scores, kl, mask, self.kl_ctl.value)
        n = cfg.rollout.samples_per_prompt
        if cfg.estimator == "gae":
            values, _ = padded([response_part(s, v) for s, v in zip(samples, got["values"])])
            advantages, returns = A.gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
        elif cfg.estimator == "grpo":
            advantages = A.grpo_advantages(rewards.sum(-1), mask, n)
        elif cfg.estimator == "rloo":
            advantages = A.rloo_advantages(rewards.sum(-1), mask, n)
        else:
            advantages = A.reinforce_pp_advantages(rewards, mask, cfg.gamma)
        if cfg.whiten_advantages and cfg.estimator == "gae":
            advantages = A.whiten(advantages, mask)
        lap("advantages")
        bad = [name for name, x in (("reward", raw_scores), ("reference log-prob", ref_lp), ("log-prob", old_lp),
                                    ("advantage", advantages)) if not torch.isfinite(x).all()]
        if bad:  # no update from poisoned numbers: the iteration is skipped and counted
            return {"skipped": 1, "skip_reason": "non-finite " + ", ".join(bad),
                    "reward/rm_score": raw_scores[torch.isfinite(raw_scores)].mean().item() if
                    torch.isfinite(raw_scores).any() else None, **timing}

        # 4. PPO epochs over mini-batches
        fields = {"old_logprobs": unpadded(old_lp, lengths), "advantages": unpadded(advantages, lengths)}
        if self.critic:
            fields |= {"old_values": unpadded(values, lengths), "returns": unpadded(returns, lengths)}
        batch = [trainer_item(s, **{k: v[i] for k, v in fields.items()}) for i, s in enumerate(samples)]
        policy_metrics, critic_metrics, ptx_metrics = [], [], []
        for _ in range(cfg.ppo_epochs):
            order = list(range(len(batch)))
            self.rng.shuffle(order)
            size = -(-len(batch) // cfg.mini_batches)
            for start in range(0, len(batch), size):
                mb = [batch[i] for i in order[start:start + size]]
                calls = {"policy": self.policy.split_call(
                    "train_step", mb, "ppo", self.policy.micro_batches_per_rank(len(mb), cfg.trainer.micro_batch_size),
                    clip_eps=cfg.clip_eps, entropy_coef=cfg.entropy_coef, dual_clip=cfg.dual_clip,
                    loss_agg=cfg.loss_agg)}
                if self.critic:
                    calls["critic"] = self.critic.split_call(
                        "train_step", mb, "value",
                        self.critic.micro_batches_per_rank(len(mb), cfg.critic.micro_batch_size),
                        clip_eps=cfg.value_clip_eps, loss_agg=cfg.loss_agg)
                policy_metrics += gather(calls["policy"])
                if self.critic:
                    critic_metrics += gather(calls["critic"])
                if cfg.ptx_coef > 0:  # PPO-ptx: keep the likelihood of SFT data (InstructGPT, DeepSpeed-Chat)
                    ptx = self.ptx_batch(len(ptx_metrics))
                    ptx_metrics += gather(self.policy.split_call(
                        "train_step", ptx, "ptx", self.policy.micro_batches_per_rank(len(ptx),
                                                                                      cfg.trainer.micro_batch_size),
                        coef=cfg.ptx_coef))
        lap("train")

        # 5. weight sync: trainer -> every engine, in place
        self.sync_weights()
        lap("sync")

        mean_kl = (kl.sum(-1)).mean().item()
        self.kl_ctl.update(mean_kl, len(samples))
        metrics = {
            "reward/rm_score": raw_scores.mean().item(),
            "reward/total": rewards.sum(-1).mean().item(),
            "kl/mean_sequence_kl": mean_kl,
            "kl/coef": self.kl_ctl.value,
            "policy/loss": _weighted(policy_metrics, "loss"),
            "policy/entropy": _weighted(policy_metrics, "entropy"),
            "policy/clip_frac": _weighted(policy_metrics, "clip_frac"),
            "policy/lr": policy_metrics[-1]["lr"],
            "policy/skipped_micro_batches": sum(m["skipped_micro_batches"] for m in policy_metrics),
            "policy/skipped_optimizer_steps": sum(m["skipped_optimizer_steps"] for m in policy_metrics),
            "response/length": sum(lengths) / len(lengths),
            "response/finished": sum(s["finished"] for s in samples) / len(samples),
        }
        if cfg.old_logprobs == "recompute":  # engine vs trainer on the same tokens: 0 up to rounding in fp32
            metrics["rollout/logprob_gap"] = ((old_lp - sampler_lp).abs() * mask).sum().item() / mask.sum().item()
        if ptx_metrics:
            metrics["policy/ptx_nll"] = _weighted(ptx_metrics, "nll")
        if self.critic:
            metrics["critic/value_loss"] = _weighted(critic_metrics, "loss")
            metrics["critic/explained_variance"] = A.explained_variance(values, returns, mask).item()
        if all(m["skipped_micro_batches"] == m["micro_batches"] for m in policy_metrics):
            metrics.update(skipped=1, skip_reason="non-finite policy loss in every micro-batch")
        metrics.update(timing)
        return metrics

    # ---------------------------------------------------------------- sampling and sync, riding out engine failures
    def generate(self, prompt_ids: list[list[int]], overrides: dict | None = None,
                 seed: int | None = None) -> list[dict]:
        """Sample on the rollout engines. An engine that died is restarted by Ray with the initial
        weights: wait for it, re-sync every engine, and send the same (seeded) request again."""
        from actors.rollout import generate_across

        ft = self.cfg.fault_tolerance
        for attempt in range(ft.actor_restarts + 1):
            try:
                return generate_across(self.rollout, prompt_ids, overrides, seed, version=self.weights_version)
            except (RayActorError, StaleWeights) as e:
                if attempt == ft.actor_restarts:
                    raise
                self.log(f"rollout engine failed ({_short(e)}); waiting for its restart, re-syncing, sampling again")
                self.faults["engine_failures"] += 1
                self.rollout.wait_alive(ft.restart_timeout_s)
                self.sync_weights()

    def init_transport(self) -> None:
        """GPU transports (rollout.weight_transport): vLLM's trainer engines, set up once. NCCL: one
        group per engine, hosted by trainer rank 0; IPC: one client for every engine."""
        transport = self.cfg.rollout.weight_transport
        if transport == "nccl":
            tp = self.cfg.rollout.tensor_parallel_size
            for engine in self.rollout.actors:
                addr, port = self.ray.get(self.policy.actors[0].rendezvous_address.remote())
                self.policy.run("init_weight_transfer", "nccl", [engine], addr, port, 1 + tp)
        elif transport == "ipc":
            self.policy.run("init_weight_transfer", "ipc", self.rollout.actors)
        self.transport = transport

    def sync_weights(self) -> None:
        """Trainer -> every engine, in place: ZeRO-3 partitions gathered, then vLLM's NCCL / CUDA IPC
        transport on GPUs, or buckets in the object store."""
        ft = self.cfg.fault_tolerance
        version = self.weights_version + 1
        if self.transport != "object_store":
            try:
                self.policy.run("send_weights")
                gather([e.set_version.remote(version) for e in self.rollout.actors])
                self.weights_version = version
                return
            except RayActorError as e:  # a restarted engine left the transfer group: keep going without it
                self.log(f"{self.transport} weight transfer failed ({_short(e)}); "
                         "syncing through the object store from now on")
                self.faults["engine_failures"] += 1
                self.transport = "object_store"
                self.rollout.wait_alive(ft.restart_timeout_s)
        buckets = [ref for part in self.policy.run("export_weights") for ref in part]
        for attempt in range(ft.actor_restarts + 1):
            try:
                gather([e.update_weights.remote(buckets, version) for e in self.rollout.actors])
                break
            except RayActorError as e:
                if attempt == ft.actor_restarts:
                    raise
                self.log(f"rollout engine failed during sync ({_short(e)}); waiting for its restart")
                self.faults["engine_failures"] += 1
                self.rollout.wait_alive(ft.restart_timeout_s)
        self.weights_version = version

    # ---------------------------------------------------------------- evaluation
    def held_out_eval(self) -> dict:
        """`val/*` (what chooses) and `test/*` (reported only) metrics of the current policy."""
        out = {}
        for split in ("val", "test"):
            if split in self.prompts:
                out |= self.split_eval(split)
        return out

    def split_eval(self, split: str) -> dict:
        """Greedy responses to one held-out split: RM score, gold score with its standard error, KL
        to the reference, win-rate against the initial policy; keys `<split>/...`."""
        from rlhf_cluster.lib import task
        from rlhf_cluster.lib.gold import gold_report

        cfg, prompts = self.cfg, self.prompts[split]
        samples = self.generate([p["prompt_ids"] for p in prompts],
                                {"samples_per_prompt": 1, "temperature": cfg.eval_temperature})
        items = [trainer_item(s) for s in samples]
        seqs = [it["input_ids"] for it in items]
        scores = self.reward.map("score", seqs)
        ref = self.reference.map("logprobs", seqs)
        kl = [sum(a - b for a, b in zip(s["logprobs"], response_part(s, r))) for s, r in zip(samples, ref)]
        texts = [task.prompt_text(prompts[s["prompt_index"]]["messages"]) for s in samples]
        responses = [s["text"] for s in samples]
        gold = gold_report(texts, responses)
        baseline = self.baseline_eval.setdefault(split, responses)
        wins = [(task.gold_score(p, a).total > task.gold_score(p, b).total) +
                0.5 * (task.gold_score(p, a).total == task.gold_score(p, b).total)
                for p, a, b in zip(texts, responses, baseline)]
        return {f"{split}/rm_score": sum(scores) / len(scores), f"{split}/gold": gold["gold"],
                f"{split}/gold_se": gold["gold_se"], f"{split}/helpfulness": gold["helpfulness"],
                f"{split}/safety": gold["safety"], f"{split}/kl": sum(kl) / len(kl),
                f"{split}/win_rate_vs_initial": sum(wins) / len(wins),
                f"{split}/example": f"{texts[0]!r} -> {responses[0]!r}", **self.sampled_eval(split)}

    def sampled_eval(self, split: str) -> dict:
        """`eval_samples_per_prompt` responses per prompt at the rollout temperature (seeded alike at every evaluation):
        KL(policy || reference) estimated as the mean over responses of sum log pi - log pi_ref (k1, unbiased
        on samples of the policy, unlike the greedy `kl`), with the RM and gold scores of the same
        responses: the three numbers of the over-optimisation curve (Gao et al. 2022)."""
        from rlhf_cluster.lib import task
        from rlhf_cluster.lib.gold import gold_report

        prompts = self.prompts[split]
        samples = self.generate([p["prompt_ids"] for p in prompts],
                                {"samples_per_prompt": self.cfg.eval_samples_per_prompt},
                                seed=self.cfg.seed * 1_000_003 + 999_983)
        seqs = [trainer_item(s)["input_ids"] for s in samples]
        scores = self.reward.map("score", seqs)
        ref = self.reference.map("logprobs", seqs)
        kl = [sum(a - b for a, b in zip(s["logprobs"], response_part(s, r))) for s, r in zip(samples, ref)]
        gold = gold_report([task.prompt_text(prompts[s["prompt_index"]]["messages"]) for s in samples],
                           [s["text"] for s in samples])
        return {f"{split}/sampled_kl": sum(kl) / len(kl), f"{split}/sampled_rm_score": sum(scores) / len(scores),
                f"{split}/sampled_gold": gold["gold"],
                f"{split}/sampled_length": sum(len(s["response_ids"]) for s in samples) / len(samples)}

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The coordinator's part of the run state (the groups save their own)."""
        return {"iteration": self.iteration, "data_pos": self.data_pos, "epoch": self.epoch,
                "order": list(self.order), "rng": _rng_state(self.rng), "kl_ctl": self.kl_ctl.state_dict(),
                "reward_stats": self.reward_stats.state_dict(), "baseline_eval": self.baseline_eval,
                "history": list(self.history), "best": self.best, "faults": dict(self.faults),
                "consecutive_skips": self.consecutive_skips, "stopped_early": self.stopped_early,
                "unregistered": [e.model_dump(mode="json") for e in self.unregistered]}

    def load_state_dict(self, state: dict) -> None:
        from rlhf_cluster.lib.registry import Entry

        self.iteration, self.data_pos, self.epoch = state["iteration"], state["data_pos"], state["epoch"]
        self.order, self.history = list(state["order"]), list(state["history"])
        self.baseline_eval = dict(state["baseline_eval"])
        self.best = tuple(state["best"]) if state["best"] else None
        self.rng.setstate(_rng_tuple(state["rng"]))
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.reward_stats.load_state_dict(state["reward_stats"])
        self.consecutive_skips = state.get("consecutive_skips", 0)
        self.stopped_early = state.get("stopped_early")
        pending = [Entry.model_validate(e) for e in state.get("unregistered", [])]
        self.unregistered += [e for e in pending if e.id not in {u.id for u in self.unregistered}]
        # the metrics log restarts from the restored state: rows of iterations after it are redone
        (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def save_checkpoint(self, row: dict) -> Path:
        """Atomic: everything is written under a .tmp name, hashed into a manifest, then renamed.
        Never from a poisoned state: non-finite weights raise PoisonedState (the run rolls back)."""
        from rlhf_cluster.lib.registry import checkpoint_manifest

        for group in self.trainer_groups():
            if not all(group.run("weights_finite")):
                raise PoisonedState(f"the {group.name} weights are not finite; no checkpoint written")
        name = f"iter_{self.iteration:06d}"
        root = self.out / "checkpoints"
        tmp, final = root / (name + ".tmp"), root / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.policy.run("save", str(tmp / "policy"))
        if self.critic:
            self.critic.run("save", str(tmp / "critic"))
        self.policy.run("save_pretrained", str(tmp / "hf"))
        self.tokenizer.save_pretrained(tmp / "hf")
        val_gold = row.get("val/gold")
        best = self.best
        if val_gold is not None and (best is None or val_gold > best[0]):  # chosen on validation, never test
            best = (val_gold, name)
        state = self.state_dict() | {"val_gold": val_gold, "best": best}
        (tmp / "coordinator.json").write_text(json.dumps(state))
        (tmp / "manifest.json").write_text(json.dumps(checkpoint_manifest(tmp)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.best = best
        self._prune(root)
        self._register(final, {k.replace("/", "_"): row[k] for k in ("val/gold", "test/gold") if k in row})
        return final

    def _prune(self, root: Path) -> None:
        """Keep the last `keep_checkpoints` and the best by validation gold score."""
        done = sorted(p for p in root.glob("iter_*") if not p.name.endswith(".tmp"))
        keep = set(done[-self.cfg.keep_checkpoints:])
        if self.best:
            keep.add(root / self.best[1])
        for p in done:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def _register(self, path: Path, metrics: dict[str, float]) -> None:
        from rlhf_cluster.lib.registry import make_entry

        run = self.cfg.registry_run or self.out.name
        self.unregistered.append(make_entry(path / "hf", run=run, kind="policy", stage="ppo", step=self.iteration,
                                            metrics=metrics))
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
            self.log(f"registry unavailable ({_short(e)}); "
                     f"{len(self.unregistered)} checkpoint(s) wait to be registered")
            return False

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "coordinator.json").read_text())
        self.policy.run("load", str(path / "policy"))
        if self.critic:
            self.critic.run("load", str(path / "critic"))
        self.load_state_dict(state)
        self.sync_weights()
        self.log(f"resumed from {path} (iteration {self.iteration})")

    # ---------------------------------------------------------------- faults
    def trainer_groups(self) -> list:
        return [g for g in (self.policy, self.critic) if g is not None]

    def replica_groups(self) -> list:
        return [self.rollout, self.reference, self.reward]

    def rank_lost(self) -> bool:
        """Some DeepSpeed rank is dead or stuck (its peers' errors are then a consequence)."""
        return not all(g.responsive(self.cfg.fault_tolerance.ping_timeout_s) for g in self.trainer_groups())

    def recover(self, error: Exception) -> None:
        """Rebuild what died and roll back to the last complete checkpoint (or the start): the
        iterations since are redone, so none is lost or counted twice. Bounded by max_rollbacks."""
        ft = self.cfg.fault_tolerance
        self.faults["rollbacks"] += 1
        if self.faults["rollbacks"] > ft.max_rollbacks:
            raise RunHalted(f"giving up: iteration {self.iteration + 1} failed after {ft.max_rollbacks} "
                               f"rollbacks (fault_tolerance.max_rollbacks); last failure: {_short(error)}") from error
        self.log(f"iteration {self.iteration + 1} failed: {_short(error)}; "
                 f"rollback {self.faults['rollbacks']}/{ft.max_rollbacks}")
        rebuilt = []
        for group in self.trainer_groups():  # a lost rank breaks the process group: rebuild all ranks
            if not group.responsive(ft.ping_timeout_s):
                self.log(f"rebuilding the {group.name} group ({group.world_size} ranks)")
                group.restart()
                rebuilt.append(group)
                self._drop_transport_if_rebuilt(group)
        for group in self.replica_groups():
            try:
                group.wait_alive(ft.restart_timeout_s)
            except RayActorError:  # out of Ray restarts
                self.log(f"restarting the {group.name} group")
                group.restart()
        ckpt = latest_checkpoint(self.out)
        if ckpt is not None:
            self.load_checkpoint(ckpt)
            return
        # no checkpoint yet: back to the start (fresh trainer groups hold the initial weights)
        for group in self.trainer_groups():
            if group not in rebuilt:
                group.restart()
                self._drop_transport_if_rebuilt(group)
        faults = dict(self.faults)
        self.load_state_dict(self.start_state)
        self.faults = faults
        self.sync_weights()
        self.log("restarted from the initial models (no checkpoint yet)")

    def _drop_transport_if_rebuilt(self, group) -> None:
        if group is self.policy and self.transport != "object_store":  # its transfer group went with it
            self.log(f"{self.transport} weight transfer ended with the old trainer ranks; "
                     "syncing through the object store from now on")
            self.transport = "object_store"

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        from tqdm import tqdm

        cfg, ft = self.cfg, self.cfg.fault_tolerance
        metrics_file = (self.out / "metrics.jsonl").open("a")
        writer = _tensorboard(self.out / "tensorboard")
        if self.iteration == 0 and not self.history:
            initial = self.held_out_eval()
            self.history.append({"iteration": 0, **initial})
            metrics_file.write(json.dumps(self.history[-1]) + "\n")
            self.log(f"initial policy: validation gold {initial['val/gold']:.3f}, RM {initial['val/rm_score']:.3f}")
        if self.start_state is None:
            self.start_state = self.state_dict()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc="ppo", file=sys.stdout,
                   disable=not sys.stdout.isatty() and not os.environ.get("RLHF_PROGRESS"))
        stop_at = min(cfg.iterations, cfg.stop_after_iterations or cfg.iterations)
        while self.iteration < stop_at and self.stopped_early is None:
            try:
                row = self.iterate(metrics_file, writer)
            except (RayActorError, PoisonedState) as e:
                self.recover(e)
                bar.n = self.iteration
                continue
            except RayTaskError as e:  # a rank's error may only be the echo of a peer that died
                if not self.rank_lost():
                    raise
                self.recover(e)
                bar.n = self.iteration
                continue
            bar.update(1)
            if row.get("skipped"):
                self.faults["skipped_iterations"] += 1
                self.consecutive_skips += 1
                self.log(f"iter {row['iteration']} skipped: {row['skip_reason']} "
                         f"({self.consecutive_skips} in a row, at most {ft.max_consecutive_skips})")
                if self.consecutive_skips >= ft.max_consecutive_skips:
                    raise RunHalted(f"halting: {self.consecutive_skips} iterations in a row skipped "
                                       f"({row['skip_reason']}); no checkpoint was written from them. "
                                       "Check the reward model and the learning rate.")
            else:
                self.consecutive_skips = 0
                bar.set_postfix(rm=f"{row['reward/rm_score']:.2f}", kl=f"{row['kl/mean_sequence_kl']:.2f}")
                self.log(_progress_line(row))
            if row.get("val/overoptimising"):
                stop = cfg.early_stop == "val_gold"
                self.log(f"warning: reward over-optimisation: over the last {cfg.overoptimisation_patience} "
                         "evaluations the validation RM score rose while validation gold fell"
                         + ("; stopping (early_stop=val_gold)" if stop else ""))
                if stop:
                    self.stopped_early = self.iteration
            new_best = "val/gold" in row and (self.best is None or row["val/gold"] > self.best[0])
            if (self.iteration % cfg.checkpoint_every == 0 or self.iteration in (cfg.iterations, stop_at)
                    or self.stopped_early or (new_best and cfg.early_stop != "none")):
                path = self.save_checkpoint(row)
                self.log(f"checkpoint {path}")
        bar.close()
        writer.close()
        metrics_file.close()
        return self.finish()

    def iterate(self, metrics_file, writer) -> dict:
        """One iteration: step, evaluation when due, the metrics row."""
        metrics = self.step()
        self.iteration += 1
        if not metrics.get("skipped") and (self.iteration % self.cfg.eval_every == 0
                                           or self.iteration == self.cfg.iterations):
            metrics.update(self.held_out_eval())
            evals = [(h["val/rm_score"], h["val/gold"]) for h in self.history if "val/gold" in h]
            evals.append((metrics["val/rm_score"], metrics["val/gold"]))
            metrics["val/overoptimising"] = int(overoptimising(evals, self.cfg.overoptimisation_patience))
        row = {"iteration": self.iteration, **metrics}
        self.history.append(row)
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                writer.add_scalar(k, v, self.iteration)
        return row

    def finish(self) -> dict:
        from rlhf_cluster.lib.report import learning_curves

        if not self.flush_registry():
            pending = [e.model_dump(mode="json") for e in self.unregistered]
            (self.out / "unregistered.json").write_text(json.dumps(pending, indent=1))
            self.log(f"warning: {len(self.unregistered)} checkpoint(s) not registered; listed in "
                     f"{self.out / 'unregistered.json'} (a --resume registers them)")
        shown = "test" if "test" in self.prompts else "val"  # what the figures report; val chose the checkpoint
        evals = [h for h in self.history if f"{shown}/gold" in h]
        first, last = evals[0], evals[-1]
        chosen = max((h for h in evals if "val/gold" in h), key=lambda h: h["val/gold"])  # first of equal bests
        summary = {
            "iterations": self.iteration, "reported_split": shown,
            "gold_initial": first[f"{shown}/gold"], "gold_final": last[f"{shown}/gold"],
            "gold_final_se": last[f"{shown}/gold_se"],
            "rm_initial": first[f"{shown}/rm_score"], "rm_final": last[f"{shown}/rm_score"],
            "kl_final": last[f"{shown}/kl"], "kl_final_sampled": last[f"{shown}/sampled_kl"],
            "win_rate_vs_initial": last[f"{shown}/win_rate_vs_initial"],
            "val_gold_initial": first["val/gold"], "val_gold_final": last["val/gold"],
            # the evaluation with the best validation gold, and what the reported split says of it
            "best_val_iteration": chosen["iteration"], "best_val_gold": chosen["val/gold"],
            "gold_at_best_val": chosen[f"{shown}/gold"], "gold_at_best_val_se": chosen[f"{shown}/gold_se"],
            "stopped_early_at": self.stopped_early,
            "best_checkpoint": self.best[1] if self.best else None,
            "report": str(self.out / "report.png"), "metrics": str(self.out / "metrics.jsonl"),
            "checkpoints": str(self.out / "checkpoints"),
            "faults": dict(self.faults), "unregistered_checkpoints": len(self.unregistered),
        }
        learning_curves(self.history, self.out / "report.png", title=f"PPO ({self.cfg.estimator})")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.log("\n".join([
            "", "=== PPO summary ===",
            f"{f'gold score ({shown}):':<23}{summary['gold_initial']:.3f} -> {summary['gold_final']:.3f}"
            f" ± {summary['gold_final_se']:.3f} (s.e.)",
            f"validation gold:       {summary['val_gold_initial']:.3f} -> {summary['val_gold_final']:.3f}"
            f" (best checkpoint by it: {summary['best_checkpoint']})",
            f"reward-model score:    {summary['rm_initial']:.3f} -> {summary['rm_final']:.3f}",
            f"KL to reference:       {summary['kl_final']:.3f} on greedy responses, "
            f"{summary['kl_final_sampled']:.3f} sampled",
            f"best by validation:    iteration {summary['best_val_iteration']}, {shown} gold there "
            f"{summary['gold_at_best_val']:.3f}" + (f"; stopped early at iteration {self.stopped_early}"
                                                    if self.stopped_early else ""),
            f"win-rate vs initial:   {summary['win_rate_vs_initial']:.2f}",
            "faults ridden out:     " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.faults.items()),
            f"report:      {summary['report']}",
            f"metrics:     {summary['metrics']}",
            f"checkpoints: {summary['checkpoints']}",
        ]))
        return summary

    def groups(self) -> list:
        return [g for g in (self.rollout, self.policy, self.reference, self.reward, self.critic) if g is not None]

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for g in self.groups():
            g.shutdown()
        for pg in self.shared_pgs:
            remove_placement_group(pg)


class RunHalted(scaffold.RunFailed):
    """The run stopped itself: too many failures or skipped updates in a row (the message says which)."""


class PoisonedState(RuntimeError):
    """Trainer weights went non-finite: the run rolls back instead of saving them."""


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _weighted(rows: list[dict], key: str) -> float:
    n = sum(r["items"] for r in rows if key in r)
    return sum(r[key] * r["items"] for r in rows if key in r) / max(1, n)


def _progress_line(row: dict) -> str:
    parts = [f"iter {row['iteration']}", f"rm {row['reward/rm_score']:.3f}", f"kl {row['kl/mean_sequence_kl']:.3f}",
             f"len {row['response/length']:.1f}"]
    for split in ("val", "test"):
        if f"{split}/gold" in row:
            parts.append(f"{split} gold {row[f'{split}/gold']:.3f}")
    parts.append("time " + " ".join(f"{k[5:]}={v:.1f}s" for k, v in row.items() if k.startswith("time/")))
    return " | ".join(parts)


def _rng_state(rng: random.Random) -> list:
    version, state, gauss = rng.getstate()
    return [version, list(state), gauss]


def _rng_tuple(s: list) -> tuple:
    return s[0], tuple(s[1]), s[2]


def _tensorboard(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


# --------------------------------------------------------------------------- entry point
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


def resolve_models(cfg: PPOConfig, log=print) -> tuple[str, str | None]:
    """The policy to start from and the reward model; the built-in ones are trained first if missing.
    With a reward service and no reward.path, there is no local reward model (None)."""
    if cfg.policy.path and (cfg.reward.path or cfg.reward_service):
        return cfg.policy.path, cfg.reward.path
    from rlhf_cluster.reward import ensure_builtin_sft_and_rm

    log("using the built-in SFT policy and reward model (trained first if missing)")
    sft, rm = ensure_builtin_sft_and_rm(cfg.builtin)
    return cfg.policy.path or str(sft), cfg.reward.path or str(rm)


def run(cfg: PPOConfig, resume: bool = False, log=print) -> dict:
    """Validate, connect, build the groups, train, report. Bad configs fail before any actor starts."""
    scaffold.connect(cfg, log_to_driver=False)
    policy_path, reward_path = resolve_models(cfg, log)
    scorer = reward_path if not cfg.reward_service else f"{cfg.reward_service.url} (reward service)"
    log(f"policy: {policy_path}\nreward model: {scorer}\noutput: {Path(cfg.output_dir).resolve()}")
    ckpt = latest_checkpoint(Path(cfg.output_dir).resolve()) if resume else None
    if resume and ckpt is None:
        log("no complete checkpoint to resume from; starting from the beginning")
    if not resume and (Path(cfg.output_dir) / "metrics.jsonl").exists():
        (Path(cfg.output_dir) / "metrics.jsonl").unlink()  # a fresh run starts a fresh log
    job = PPORun(cfg, policy_path, reward_path, log)
    try:
        if ckpt is not None:
            job.load_checkpoint(ckpt)
        return job.train()
    finally:
        job.shutdown()


def main(argv: list[str] | None = None) -> dict:
    def flags(ap):
        ap.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")

    return scaffold.main("ppo", PPOConfig, run, argv, DEFAULT_CONFIG, __doc__.split("\n")[0], flags)


if __name__ == "__main__":
    main()
