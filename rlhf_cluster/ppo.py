"""The main job: RLHF with PPO (or GRPO / RLOO / REINFORCE++) across Ray actor groups.

    ray job submit --address http://HEAD:8265 -- python -m rlhf_cluster.ppo --config configs/tiny-cpu.yaml
    python -m rlhf_cluster.ppo                      # local Ray, built-in task, CPU
    python -m rlhf_cluster.ppo --resume             # continue from the last complete checkpoint

Objective (InstructGPT / Llama 2): maximise  E[r_φ(x, y)] − β·KL(π ‖ π_SFT)  (+ γ·log-likelihood of
SFT data: ptx_coef, "PPO-ptx", a separate step after each policy step). Each iteration:

    batch    = producer.next_batch(i)       prompts → rollout engines (vLLM), n responses each    rl/rollout.py
    scored   = score_batch(batch)           reference, reward, critic, old policy log-probs       rl/scoring.py
    rewards  = score at the last token − β·KL per token;  advantages by GAE or a critic-free
               estimator;  asynchronous: truncated importance weights   (lib/algorithms.py, here)
    learner.update(items)                   PPO epochs × mini-batches: clipped policy (+ value) steps rl/learner.py
    weights.sync()                          trainer → engines, in place                           rl/weights.py
    metrics;  every E iterations evaluate() (val chooses, test reports)  rl/evaluation.py
    every K iterations store.save()         atomic checkpoint, registry                           rl/checkpoints.py
    over-optimisation (validation RM score up, validation gold down): warn, and with early_stop stop

The groups (rl/groups.py) start side by side. With async_rollout.max_staleness = k > 0 the engines
sample batches i+1..i+k while the learner trains on batch i; a sample is never more than k policy
versions old, and a checkpoint stores the batches in flight, so --resume repeats nothing.

Faults (docs/reliability.md): a dead rollout engine, reference or reward actor is restarted by Ray
and the call in flight is sent again (engines are re-synced first); a lost policy or critic rank
rebuilds its group and rolls the run back to the last complete checkpoint; non-finite rewards or
losses skip the update and are counted.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from ray.exceptions import RayActorError, RayTaskError

from rlhf_cluster import scaffold
from rlhf_cluster.lib import algorithms as A
from rlhf_cluster.lib.config import CONFIG_DIR, ConfigError, PPOConfig
from rlhf_cluster.lib.overoptimisation import overoptimising
from rlhf_cluster.lib.tracking import Tracker
from rlhf_cluster.rl.batch import trainer_item, unpadded
from rlhf_cluster.rl.checkpoints import CheckpointStore, PoisonedState, latest_of_run
from rlhf_cluster.rl.evaluation import HeldOutEval
from rlhf_cluster.rl.groups import RLGroups, plan_memory
from rlhf_cluster.rl.learner import Learner
from rlhf_cluster.rl.rollout import PromptOrder, RolloutProducer, load_prompt_splits
from rlhf_cluster.rl.scoring import score_batch
from rlhf_cluster.rl.weights import WeightSync, short

DEFAULT_CONFIG = CONFIG_DIR / "tiny-cpu.yaml"


class PPORun:
    """The loop state and the parts it composes (rlhf_cluster/rl/); `train()` is the algorithm."""

    def __init__(self, cfg: PPOConfig, policy_path: str, reward_path: str | None, log=print):
        from transformers import AutoTokenizer

        from rlhf_cluster.lib.data import load_tokenized

        self.cfg, self.log = cfg, log
        self.out = Path(cfg.output_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        self.prompts = load_prompt_splits(cfg, self.tokenizer, log)
        ptx_data = []
        if cfg.ptx_coef > 0:
            ptx_data, report = load_tokenized(self._ptx_file(), self.tokenizer, "sft", cfg.data.max_sequence_tokens,
                                              cfg.data.on_bad_sample)
            log(f"ptx data: {report}")
        steps = cfg.iterations * cfg.ppo_epochs * cfg.mini_batches * (2 if cfg.ptx_coef > 0 else 1)
        self.groups = RLGroups(cfg, policy_path, reward_path, trainer=cfg.trainer, train_steps=steps,
                               with_critic=cfg.needs_critic, log=log)
        self.faults = {"rollbacks": 0, "engine_failures": 0, "skipped_iterations": 0, "reward_errors": 0}
        self.weights = WeightSync(self.groups, cfg, self.faults, log)
        self.rng = random.Random(cfg.seed)  # data order and mini-batch order, in the order they are drawn
        self.order = PromptOrder(self.prompts["train"], self.rng)
        self.producer = RolloutProducer(self.groups, self.weights, self.order, cfg, self.faults, log)
        self.learner = Learner(self.groups, cfg, self.rng, ptx_data)
        self.evaluate = HeldOutEval(self.groups, self.producer, self.prompts, cfg, log)
        self.store = CheckpointStore(self.out, self.groups, self.tokenizer, cfg, log)
        self.asynchronous = cfg.async_rollout.max_staleness > 0
        # stale samples: PPO's ratio starts from the recomputed policy, and truncated importance weights
        # carry the step from the engine's weights to it; with old_logprobs=sampler the ratio itself is
        # taken against the engine's weights (off-policy PPO: its clip bounds the step)
        self.importance_weights = self.asynchronous and cfg.old_logprobs == "recompute"
        log(f"actor groups up in {self.groups.startup_seconds:.0f}s; "
            f"{cfg.prompts_per_iteration * cfg.rollout.samples_per_prompt} samples per iteration"
            + (f"; weights sync over {self.weights.transport}" if self.weights.transport != "object_store" else "")
            + (f"; asynchronous rollout, samples at most {cfg.async_rollout.max_staleness} policy version(s) old, "
               + ("truncated importance weights" if self.importance_weights else "PPO ratio against the sampler")
               if self.asynchronous else ""))

        self.kl_ctl = (A.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else A.FixedKLController(cfg.kl_coef))
        self.reward_stats = A.RunningMeanStd()
        self.iteration = 0
        self.history: list[dict] = []
        self.consecutive_skips = 0
        self.stopped_early: int | None = None  # the iteration early_stop ended the run at
        self.start_state: dict | None = None
        self.last_batch = None  # the batch of the last step (bench/ reads its token counts)

    def _ptx_file(self) -> Path:
        if self.cfg.ptx_data:
            return Path(self.cfg.ptx_data)
        from rlhf_cluster.lib.builtin import ensure_builtin

        return ensure_builtin(self.cfg.builtin, log=self.log).file("sft_train.jsonl")

    # ---------------------------------------------------------------- one iteration
    def step(self) -> dict:
        cfg, timing = self.cfg, {}
        clock = started = time.time()
        cpu_started = time.process_time()

        def lap(name):
            nonlocal clock
            timing[f"time/{name}"] = time.time() - clock
            clock = time.time()

        # 1. sample (asynchronous: the next batches are already generating behind this one); with dynamic
        # sampling, prompt groups whose samples all scored alike are replaced by more sampled prompts.
        # colocate.sleep: the trainers' states leave the shared GPUs while the engines generate
        timing |= self.weights.sleep_phases("generate")
        batch = self.last_batch = self.producer.next_batch(self.iteration)
        if batch.reward_error:  # a reward function raised, hung or returned non-finite values: counted, skipped
            self.faults["reward_errors"] = self.faults.get("reward_errors", 0) + 1
            return {"skipped": 1, "skip_reason": batch.reward_error, **timing}
        filtered = self.producer.keep_informative(batch) if cfg.dynamic_sampling.enabled else {}
        samples, staleness = batch.samples, self.iteration - batch.policy_version
        lap("generate")
        if not samples:
            return {"skipped": 1, "skip_reason": "dynamic sampling found no prompt group with differing rewards",
                    **filtered, **timing}
        timing["time/generate"] -= batch.score_wait  # waited for scoring chained on the engines' calls

        # 2. score: reference, reward, critic and the policy's own (old) log-probs, in parallel
        s = score_batch(self.groups, samples, recompute=cfg.old_logprobs == "recompute", done=batch.scores)
        lap("score")
        timing["time/score"] += batch.score_wait
        batch.score_wait = 0.0

        # 3. rewards and advantages (pure functions, on [B, T] response tensors)
        mask, old_lp, raw_scores = s.mask, s.old_logprobs, s.scores
        scores, overlong = raw_scores, None
        if cfg.overlong.buffer:  # DAPO's soft overlong penalty, part of the reward
            overlong = A.overlong_penalty(torch.tensor(s.lengths), cfg.rollout.max_new_tokens, cfg.overlong.buffer,
                                          cfg.overlong.penalty)
            scores = scores + overlong
        if cfg.normalize_rewards:
            self.reward_stats.update(scores)
            scores = self.reward_stats.normalize(scores)
        if cfg.reward_clip:
            scores = A.clip_rewards(scores, cfg.reward_clip)
        kl = A.kl_estimate(old_lp, s.ref_logprobs, cfg.kl_estimator) * mask
        # kl_mode reward: -beta KL on every token of the reward; loss: the reward is the score, KL is in the loss
        rewards = A.token_level_rewards(scores, kl, mask, self.kl_ctl.value if cfg.kl_mode == "reward" else 0.0)
        estimator = A.estimator(cfg.estimator)
        advantages, returns = estimator.fn(A.AdvantageInputs(
            rewards, mask, s.values, cfg.rollout.samples_per_prompt, cfg.gamma, cfg.lam, cfg.grpo_scale_by_std))
        if cfg.whiten_advantages and estimator.whiten:
            advantages = A.whiten(advantages, mask)
        fields = {"old_logprobs": old_lp, "advantages": advantages}
        if cfg.kl_mode == "loss":
            fields["ref_logprobs"] = s.ref_logprobs
            self.learner.kl_coef = self.kl_ctl.value
        if self.groups.critic:
            fields |= {"old_values": s.values, "returns": returns}
        if self.importance_weights:  # samples of older weights: truncated importance weights (1 when on-policy)
            stale = torch.full((len(samples),), staleness > 0)
            fields["is_weights"], is_cut = A.truncated_is_weights(old_lp, s.sampler_logprobs, mask, stale,
                                                                  cfg.async_rollout.is_cap)
        lap("advantages")
        bad = [name for name, x in (("reward", raw_scores), ("reference log-prob", s.ref_logprobs),
                                    ("log-prob", old_lp), ("advantage", advantages)) if not torch.isfinite(x).all()]
        if bad:  # no update from poisoned numbers: the iteration is skipped and counted
            self.weights.clear_kv_caches()  # a NaN the engines computed must not reach the next samples
            return {"skipped": 1, "skip_reason": "non-finite " + ", ".join(bad),
                    "reward/rm_score": raw_scores[torch.isfinite(raw_scores)].mean().item() if
                    torch.isfinite(raw_scores).any() else None, **timing}

        # 4. PPO epochs over mini-batches (colocate.sleep: the engines release the shared GPUs first)
        timing |= self.weights.sleep_phases("train")
        lists = {k: unpadded(v, s.lengths) for k, v in fields.items()}
        items = [trainer_item(x, **{k: v[i] for k, v in lists.items()}) for i, x in enumerate(samples)]
        if cfg.overlong.mask_truncated:  # DAPO's overlong filtering: no loss on responses the budget cut off
            for it, x in zip(items, samples):
                if not x["finished"]:
                    it["loss_mask"] = [0] * len(it["loss_mask"])
        stats = self.learner.update(items, self.iteration)
        lap("train")

        # 5. weight sync: trainer -> every engine, in place (asynchronous: queued behind the batches in flight)
        self.weights.sync(policy_version=self.iteration + 1, wait=not self.asynchronous)
        lap("sync")

        mean_kl = (kl.sum(-1)).mean().item()
        self.kl_ctl.update(mean_kl, len(samples))
        policy = stats["policy"]
        seconds = time.time() - started
        metrics = {
            "reward/rm_score": raw_scores.mean().item(),
            "reward/total": rewards.sum(-1).mean().item(),
            "kl/mean_sequence_kl": mean_kl,
            "kl/coef": self.kl_ctl.value,
            "policy/loss": _weighted(policy, "loss"),
            "policy/entropy": _weighted(policy, "entropy"),
            "policy/clip_frac": _weighted(policy, "clip_frac"),
            "policy/lr": policy[-1]["lr"],
            "policy/skipped_micro_batches": sum(m["skipped_micro_batches"] for m in policy),
            "policy/skipped_optimizer_steps": sum(m["skipped_optimizer_steps"] for m in policy),
            "response/length": sum(s.lengths) / len(s.lengths),
            "response/finished": sum(x["finished"] for x in samples) / len(samples),
            **filtered,
            "rollout/policy_version": batch.policy_version,
            "rollout/staleness": staleness,
            # steady-state share of the step each side waited: the engines for the batch they sampled,
            # the trainer for its optimiser steps (its old-log-prob forward counts as idle here)
            "idle/engines": max(0.0, 1 - max(x.get("engine_seconds", 0.0) for x in samples) / seconds),
            "idle/trainer": max(0.0, 1 - sum(m["seconds"] for m in policy + stats["ptx"])
                                / self.groups.policy.world_size / seconds),
            # CPU the coordinator process itself spent on the step (moving samples and per-token fields, the
            # advantage math): what a data plane between actors would save
            "coordinator/cpu_s": time.process_time() - cpu_started,
        }
        if cfg.kl_mode == "loss":
            metrics["policy/kl_loss"] = _weighted(policy, "kl_loss")
        if cfg.rewards:  # each source's mean score and the functions' extra metrics, over the batches scored
            sums = {}
            for part in self.groups.reward.run("drain_metrics"):
                for key, (total, count) in part.items():
                    acc = sums.setdefault(key, [0.0, 0])
                    acc[0], acc[1] = acc[0] + total, acc[1] + count
            metrics |= {key: total / count for key, (total, count) in sums.items() if count}
        if overlong is not None:
            metrics["reward/overlong_penalty"] = overlong.float().mean().item()
        if cfg.old_logprobs == "recompute":  # engine vs trainer on the same tokens
            gap = (old_lp - s.sampler_logprobs).abs() * mask
            metrics["rollout/logprob_gap"] = gap.sum().item() / mask.sum().item()
            metrics["rollout/logprob_gap_max"] = gap.max().item()
        if self.importance_weights:
            w = fields["is_weights"]
            metrics |= {"rollout/is_weight_mean": (w.sum() / mask.sum()).item(),
                        "rollout/is_weight_max": w.max().item(), "rollout/is_clipped_frac": is_cut.item()}
        if stats["ptx"]:
            metrics["policy/ptx_nll"] = _weighted(stats["ptx"], "nll")
        if self.groups.critic:
            metrics["critic/value_loss"] = _weighted(stats["critic"], "loss")
            metrics["critic/explained_variance"] = A.explained_variance(s.values, returns, mask).item()
        if all(m["skipped_micro_batches"] == m["micro_batches"] for m in policy):
            metrics.update(skipped=1, skip_reason="non-finite policy loss in every micro-batch")
        metrics.update(timing)
        return metrics

    # ---------------------------------------------------------------- state and checkpoints
    def state_dict(self) -> dict:
        """The coordinator's part of the run state (the groups save their own), with the batches in flight."""
        return {"iteration": self.iteration, **self.order.state_dict(), "rng": _rng_state(self.rng),
                "kl_ctl": self.kl_ctl.state_dict(), "reward_stats": self.reward_stats.state_dict(),
                "baseline_eval": self.evaluate.baseline, "history": list(self.history), **self.store.state_dict(),
                "faults": dict(self.faults), "consecutive_skips": self.consecutive_skips,
                "stopped_early": self.stopped_early, "in_flight": self.producer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.history = state["iteration"], list(state["history"])
        self.order.load_state_dict(state)
        self.evaluate.baseline = dict(state["baseline_eval"])
        self.store.load_state_dict(state)
        self.rng.setstate(_rng_tuple(state["rng"]))
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.reward_stats.load_state_dict(state["reward_stats"])
        self.consecutive_skips = state.get("consecutive_skips", 0)
        self.stopped_early = state.get("stopped_early")
        self.producer.load_state_dict(state.get("in_flight", []))
        # the metrics log restarts from the restored state: rows of iterations after it are redone
        (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def load_checkpoint(self, path: Path | str) -> None:
        self.load_state_dict(self.store.load(path))
        self.weights.sync(policy_version=self.iteration, clear_kv_cache=True)
        self.log(f"resumed from {path} (iteration {self.iteration})")

    # ---------------------------------------------------------------- faults
    def recover(self, error: Exception, failed: str | None = None) -> None:
        """Rebuild what died and roll back to the last complete checkpoint (or the start): the
        iterations since are redone, so none is lost or counted twice. Bounded by max_rollbacks.
        `failed`: what failed, for the log (default: the next iteration)."""
        ft = self.cfg.fault_tolerance
        failed = failed or f"iteration {self.iteration + 1}"
        self.faults["rollbacks"] += 1
        if self.faults["rollbacks"] > ft.max_rollbacks:
            raise RunHalted(f"giving up: {failed} failed after {ft.max_rollbacks} "
                            f"rollbacks (fault_tolerance.max_rollbacks); last failure: {short(error)}") from error
        self.log(f"{failed} failed: {short(error)}; rollback {self.faults['rollbacks']}/{ft.max_rollbacks}")
        rebuilt = []
        for group in self.groups.process_groups():  # a lost rank breaks the process group: rebuild all ranks
            if not group.responsive(ft.ping_timeout_s):
                self.log(f"rebuilding the {group.name} group ({group.world_size} ranks)")
                group.restart()
                rebuilt.append(group)
                self.weights.trainer_rebuilt(group)
        for group in self.groups.replicas():
            try:
                group.wait_alive(ft.restart_timeout_s)
            except RayActorError:  # out of Ray restarts
                self.log(f"restarting the {group.name} group")
                group.restart()
        ckpt = latest_of_run(self.cfg, self.out)
        if ckpt is not None:
            self.load_checkpoint(ckpt)
            return
        # no checkpoint yet: back to the start (fresh trainer groups hold the initial weights)
        for group in self.groups.trainers():
            if group not in rebuilt:
                group.restart()
                self.weights.trainer_rebuilt(group)
        faults = dict(self.faults)
        self.load_state_dict(self.start_state)
        self.faults.update(faults)
        self.weights.sync(policy_version=0, clear_kv_cache=True)
        self.log("restarted from the initial models (no checkpoint yet)")

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        tracker = self.tracker = Tracker(cfg, self.out, "ppo")
        if self.iteration == 0 and not self.history:
            initial = self.evaluate()
            self.history.append({"iteration": 0, **initial})
            self.append_metrics(self.history[-1])
            tracker.log(initial, 0)
            self.log(f"initial policy: validation gold {initial['val/gold']:.3f}, RM {initial['val/rm_score']:.3f}")
        if self.start_state is None:
            self.start_state = self.state_dict()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc="ppo", file=sys.stdout,
                   disable=not sys.stdout.isatty() and not os.environ.get("RLHF_PROGRESS"))
        stop_at = min(cfg.iterations, cfg.stop_after_iterations or cfg.iterations)
        while self.iteration < stop_at and self.stopped_early is None:
            # a dead rank or a poisoned state, met by the step or by the checkpoint after it, rolls back
            failed = None  # the next iteration
            try:
                row = self.iterate(tracker)
                failed = f"checkpoint {self.iteration}"
                self.conclude(row, bar, stop_at)
            except (RayActorError, PoisonedState) as e:
                self.recover(e, failed)
                bar.n = self.iteration
            except RayTaskError as e:  # a rank's error may only be the echo of a peer that died
                if not self.groups.rank_lost():
                    raise
                self.recover(e, failed)
                bar.n = self.iteration
        bar.close()
        return self.finish()

    def conclude(self, row: dict, bar, stop_at: int) -> None:
        """After an iteration: count a skip (halting after too many in a row), flag over-optimisation, and
        write the checkpoint when one is due."""
        cfg, ft = self.cfg, self.cfg.fault_tolerance
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
        best = self.store.best
        new_best = "val/gold" in row and (best is None or row["val/gold"] > best[0])
        if (self.iteration % cfg.checkpoint_every == 0 or self.iteration in (cfg.iterations, stop_at)
                or self.stopped_early or (new_best and cfg.early_stop != "none")):
            path = self.store.save(self.iteration, self.state_dict(), row)
            self.log(f"checkpoint {path}")

    def iterate(self, tracker) -> dict:
        """One iteration: step, evaluation when due, the metrics row."""
        metrics = self.step()
        self.iteration += 1
        if not metrics.get("skipped") and (self.iteration % self.cfg.eval_every == 0
                                           or self.iteration == self.cfg.iterations):
            metrics.update(self.evaluate())
            evals = [(h["val/rm_score"], h["val/gold"]) for h in self.history if "val/gold" in h]
            evals.append((metrics["val/rm_score"], metrics["val/gold"]))
            metrics["val/overoptimising"] = int(overoptimising(evals, self.cfg.overoptimisation_patience))
        row = {"iteration": self.iteration, **metrics}
        self.history.append(row)
        self.append_metrics(row)
        tracker.log(metrics, self.iteration)
        return row

    def append_metrics(self, row: dict) -> None:
        """One row onto metrics.jsonl, the file closed after it: no open handle keeps a buffered row that would
        land after a rollback has rewritten the file from the restored history."""
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    def finish(self) -> dict:
        from rlhf_cluster.lib.report import learning_curves

        if not self.store.flush_registry():
            pending = [e.model_dump(mode="json") for e in self.store.unregistered]
            (self.out / "unregistered.json").write_text(json.dumps(pending, indent=1))
            self.log(f"warning: {len(self.store.unregistered)} checkpoint(s) not registered; listed in "
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
            "best_checkpoint": self.store.best[1] if self.store.best else None,
            "report": str(self.out / "report.png"), "metrics": str(self.out / "metrics.jsonl"),
            "checkpoints": self.store.where(),
            "faults": dict(self.faults), "unregistered_checkpoints": len(self.store.unregistered),
            # how many trained batches were 0, 1, ... policy versions old (asynchronous rollout)
            "staleness_histogram": {str(k): n for k, n in sorted(Counter(
                h["rollout/staleness"] for h in self.history if "rollout/staleness" in h).items())},
        }
        verifiable = f"{shown}/pass@1" in last
        if verifiable:  # a verifiable task: gold is greedy accuracy; pass@k from eval_samples_per_prompt samples
            k = self.cfg.eval_samples_per_prompt
            summary |= {"k": k, "pass@1_initial": first[f"{shown}/pass@1"], "pass@1_final": last[f"{shown}/pass@1"],
                        f"pass@{k}_initial": first[f"{shown}/pass@{k}"], f"pass@{k}_final": last[f"{shown}/pass@{k}"],
                        "accuracy_by_level_final": {key.rsplit("_", 1)[1]: v for key, v in last.items()
                                                    if key.startswith(f"{shown}/accuracy/level_")}}
        learning_curves(self.history, self.out / "report.png", title=f"PPO ({self.cfg.estimator})")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.tracker.finish(summary, self.out / "report.png", summary["best_checkpoint"] or summary["checkpoints"])
        gold_name = f"greedy accuracy ({shown}):" if verifiable else f"gold score ({shown}):"
        passes = []  # the verifiable task's lines
        if verifiable:
            passes = [f"{f'pass@{k} ({shown}):':<24}{summary[f'pass@{k}_initial']:.3f} -> "
                      f"{summary[f'pass@{k}_final']:.3f}" for k in sorted({1, self.cfg.eval_samples_per_prompt})]
            if summary["accuracy_by_level_final"]:
                passes.append("by level (greedy):      " + ", ".join(
                    f"{level} {acc:.2f}" for level, acc in summary["accuracy_by_level_final"].items()))
        self.log("\n".join([
            "", "=== PPO summary ===",
            f"{gold_name:<24}{summary['gold_initial']:.3f} -> {summary['gold_final']:.3f}"
            f" ± {summary['gold_final_se']:.3f} (s.e.)",
            *passes,
            f"validation gold:        {summary['val_gold_initial']:.3f} -> {summary['val_gold_final']:.3f}"
            f" (best checkpoint by it: {summary['best_checkpoint']})",
            f"reward score:           {summary['rm_initial']:.3f} -> {summary['rm_final']:.3f}",
            f"KL to reference:        {summary['kl_final']:.3f} on greedy responses, "
            f"{summary['kl_final_sampled']:.3f} sampled",
            f"best by validation:     iteration {summary['best_val_iteration']}, {shown} gold there "
            f"{summary['gold_at_best_val']:.3f}" + (f"; stopped early at iteration {self.stopped_early}"
                                                    if self.stopped_early else ""),
            f"win-rate vs initial:    {summary['win_rate_vs_initial']:.2f}",
            "faults ridden out:      " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.faults.items()),
            f"report:      {summary['report']}",
            f"metrics:     {summary['metrics']}",
            f"checkpoints: {summary['checkpoints']}",
        ]))
        return summary

    def shutdown(self) -> None:
        self.groups.shutdown()


class RunHalted(scaffold.RunFailed):
    """The run stopped itself: too many failures or skipped updates in a row (the message says which)."""


def _weighted(rows: list[dict], key: str) -> float:
    n = sum(r["items"] for r in rows if key in r)
    return sum(r[key] * r["items"] for r in rows if key in r) / max(1, n)


def _progress_line(row: dict) -> str:
    parts = [f"iter {row['iteration']}", f"rm {row['reward/rm_score']:.3f}", f"kl {row['kl/mean_sequence_kl']:.3f}",
             f"len {row['response/length']:.1f}"]
    for split in ("val", "test"):
        if f"{split}/gold" in row:
            parts.append(f"{split} gold {row[f'{split}/gold']:.3f}")
        if f"{split}/pass@1" in row:
            parts.append(f"{split} pass@1 {row[f'{split}/pass@1']:.3f}")
    parts.append("time " + " ".join(f"{k[5:]}={v:.1f}s" for k, v in row.items() if k.startswith("time/")))
    return " | ".join(parts)


def _rng_state(rng: random.Random) -> list:
    version, state, gauss = rng.getstate()
    return [version, list(state), gauss]


def _rng_tuple(s: list) -> tuple:
    return s[0], tuple(s[1]), s[2]


# --------------------------------------------------------------------------- entry point
def run(cfg: PPOConfig, resume: bool = False, log=print) -> dict:
    """Validate, connect, build the groups, train, report. Bad configs fail before any actor starts."""
    from rlhf_cluster.prerequisites import resolve_models

    scaffold.connect(cfg, log_to_driver=False, log=log)
    policy_path, reward_path = resolve_models(cfg, log)
    scorer = (" + ".join(f"{r.weight:g} x {r.name} ({r.model or r.fn or r.url})" for r in cfg.rewards) if cfg.rewards
              else f"{cfg.reward_service.url} (reward service)" if cfg.reward_service else reward_path)
    log(f"policy: {policy_path}\nreward model: {scorer}\noutput: {Path(cfg.output_dir).resolve()}")
    plan_memory(cfg, policy_path, reward_path, with_critic=cfg.needs_critic, log=log)
    if cfg.checkpoint_storage:  # reachable and writable before any actor starts
        from rlhf_cluster.lib.storage import StorageError, check_writable

        try:
            check_writable(cfg.checkpoint_storage)
        except StorageError as e:
            raise ConfigError(f"checkpoint_storage: {e}") from e
    ckpt = latest_of_run(cfg, Path(cfg.output_dir).resolve()) if resume else None
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
