"""The update: PPO epochs over shuffled mini-batches on the policy group (and the critic's value
step on the same mini-batch), each policy step followed by a PPO-ptx step when ptx_coef > 0."""

from __future__ import annotations

import random

from rlhf_cluster.actors.group import gather
from rlhf_cluster.lib.config import PPOConfig


class Learner:
    def __init__(self, groups, cfg: PPOConfig, rng: random.Random, ptx_data: list):
        self.groups, self.cfg, self.rng, self.ptx_data = groups, cfg, rng, ptx_data
        self.kl_coef = 0.0  # kl_mode loss: the KL term's coefficient this iteration (the coordinator sets it)

    def update(self, batch: list[dict], iteration: int) -> dict[str, list[dict]]:
        """Trainer items with old_logprobs, advantages (and old_values, returns, is_weights, ref_logprobs) ->
        the per-rank metrics of every step: {"policy": [...], "critic": [...], "ptx": [...]}."""
        cfg, policy, critic = self.cfg, self.groups.policy, self.groups.critic
        out = {"policy": [], "critic": [], "ptx": []}
        for _ in range(cfg.ppo_epochs):
            order = list(range(len(batch)))
            self.rng.shuffle(order)
            size = -(-len(batch) // cfg.mini_batches)
            for start in range(0, len(batch), size):
                mb = [batch[i] for i in order[start:start + size]]
                calls = {"policy": policy.split_call(
                    "train_step", mb, "ppo", clip_eps=cfg.clip_eps, entropy_coef=cfg.entropy_coef,
                    dual_clip=cfg.dual_clip, loss_agg=cfg.loss_agg, clip_eps_high=cfg.clip_eps_high,
                    norm_length=cfg.rollout.max_new_tokens, kl_coef=self.kl_coef)}
                if critic:
                    calls["critic"] = critic.split_call("train_step", mb, "value", clip_eps=cfg.value_clip_eps,
                                                        loss_agg=cfg.loss_agg, norm_length=cfg.rollout.max_new_tokens)
                for name, refs in calls.items():
                    out[name] += gather(refs)
                if cfg.ptx_coef > 0:  # PPO-ptx: keep the likelihood of SFT data (InstructGPT, DeepSpeed-Chat)
                    ptx = self.ptx_batch(iteration, len(out["ptx"]))
                    out["ptx"] += gather(policy.split_call("train_step", ptx, "ptx", coef=cfg.ptx_coef))
        return out

    def ptx_batch(self, iteration: int, step: int) -> list[dict]:
        """PPO-ptx samples for the policy step `step` of an iteration: drawn from a seed of the
        iteration and step (no state to checkpoint, so a resumed run draws the same)."""
        rng = random.Random(self.cfg.seed * 1_000_003 + iteration * 10_007 + step)
        picked = rng.sample(self.ptx_data, min(self.cfg.ptx_batch_size, len(self.ptx_data)))
        return [{"input_ids": s.input_ids, "loss_mask": s.loss_mask[1:]} for s in picked]
