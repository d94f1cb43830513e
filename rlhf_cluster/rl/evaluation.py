"""Held-out evaluation of the current policy: `val/*` (what chooses: best checkpoint, early stop,
promotion) and `test/*` (reported only). Greedy responses give the comparable scores; sampled ones
give the over-optimisation curve's three numbers (KL, RM, gold)."""

from __future__ import annotations

from rlhf_cluster.lib.config import PPOConfig
from rlhf_cluster.rl.batch import response_part, trainer_item
from rlhf_cluster.rl.rollout import reward_context


class HeldOutEval:
    def __init__(self, groups, producer, prompts: dict[str, list[dict]], cfg: PPOConfig, log=print):
        self.groups, self.producer, self.prompts, self.cfg, self.log = groups, producer, prompts, cfg, log
        self.baseline: dict[str, list[str]] = {}  # the initial policy's responses per split (win-rate)

    def __call__(self) -> dict:
        out = {}
        for split in ("val", "test"):
            if split in self.prompts:
                out |= self.split_eval(split)
        return out

    def _kl_and_scores(self, samples: list[dict], prompts: list[dict]) -> tuple[list[float], list[float]]:
        """KL to the reference and reward of each sample; the rewards are NaN (and the error logged) when a
        reward function fails: an evaluation reports, it does not stop the run."""
        from rlhf_cluster.lib.reward_functions import RewardFunctionError

        seqs = [trainer_item(s)["input_ids"] for s in samples]
        try:
            scores = self.groups.reward.map("score_samples", samples, reward_context(prompts))
        except RewardFunctionError as e:
            self.log(f"evaluation without rewards: {str(e).strip().splitlines()[-1]}")
            scores = [float("nan")] * len(samples)
        ref = self.groups.reference.map("logprobs", seqs)
        kl = [sum(a - b for a, b in zip(s["logprobs"], response_part(s, r))) for s, r in zip(samples, ref)]
        return kl, scores

    def split_eval(self, split: str) -> dict:
        """Greedy responses to one held-out split: RM score, gold score with its standard error, KL
        to the reference, win-rate against the initial policy; keys `<split>/...`."""
        from rlhf_cluster.lib import task
        from rlhf_cluster.lib.gold import gold_report

        prompts = self.prompts[split]
        samples = self.producer.generate([p["prompt_ids"] for p in prompts],
                                         {"samples_per_prompt": 1, "temperature": self.cfg.eval_temperature})
        kl, scores = self._kl_and_scores(samples, prompts)
        texts = [task.prompt_text(prompts[s["prompt_index"]]["messages"]) for s in samples]
        responses = [s["text"] for s in samples]
        gold = gold_report(texts, responses)
        baseline = self.baseline.setdefault(split, responses)
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
        samples = self.producer.generate([p["prompt_ids"] for p in prompts],
                                         {"samples_per_prompt": self.cfg.eval_samples_per_prompt},
                                         seed=self.cfg.seed * 1_000_003 + 999_983)
        kl, scores = self._kl_and_scores(samples, prompts)
        gold = gold_report([task.prompt_text(prompts[s["prompt_index"]]["messages"]) for s in samples],
                           [s["text"] for s in samples])
        return {f"{split}/sampled_kl": sum(kl) / len(kl), f"{split}/sampled_rm_score": sum(scores) / len(scores),
                f"{split}/sampled_gold": gold["gold"],
                f"{split}/sampled_length": sum(len(s["response_ids"]) for s in samples) / len(samples)}
