"""One batch through the scoring groups, in parallel: reference log-probs, reward scores, critic values
and (when asked) the policy's own log-probs; returned as [B, T] tensors over the response tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_cluster.actors.group import gather
from rlhf_cluster.rl.batch import padded, response_part, trainer_item


@dataclass
class Scored:
    mask: torch.Tensor  # [B, T] 1 on response tokens
    lengths: list[int]
    sampler_logprobs: torch.Tensor  # the engine's log-prob of each sampled token (the behaviour policy)
    old_logprobs: torch.Tensor  # PPO's old log-probs: recomputed by the trainer, or the sampler's
    ref_logprobs: torch.Tensor
    scores: torch.Tensor  # [B] raw reward-model scores
    values: torch.Tensor | None  # critic values (GAE)


def score_batch(groups, samples: list[dict], recompute: bool, done: dict | None = None) -> Scored:
    """`done`: reference log-probs and rewards already computed (the rollout producer chains them on the
    engines' calls), {"ref": [...], "score": [...]}; the rest is computed here."""
    items = [trainer_item(s) for s in samples]
    seqs = [it["input_ids"] for it in items]
    refs = {} if done else {"ref": groups.reference.split_call("logprobs", seqs),
                            "score": groups.reward.split_call("score", seqs)}
    if recompute:
        refs["old"] = groups.policy.split_call("logprobs", items)
    if groups.critic:
        refs["values"] = groups.critic.split_call("values", items)
    got = (done or {}) | {k: [x for part in gather(v) for x in part] for k, v in refs.items()}

    def response(key: str) -> torch.Tensor:
        return padded([response_part(s, full) for s, full in zip(samples, got[key])])[0]

    sampler_lp, mask = padded([s["logprobs"] for s in samples])
    return Scored(mask=mask, lengths=[len(s["response_ids"]) for s in samples], sampler_logprobs=sampler_lp,
                  old_logprobs=response("old") if recompute else sampler_lp, ref_logprobs=response("ref"),
                  scores=torch.tensor(got["score"]), values=response("values") if groups.critic else None)
