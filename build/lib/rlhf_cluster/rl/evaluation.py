"""Held-out evaluation of the current policy: `val/*` (what chooses: best checkpoint, early stop,
promotion) and `test/*` (reported only). Greedy responses give the comparable scores; sampled ones
give the over-optimisation curve's three numbers (KL, RM, gold) and, on a verifiable task, pass@k.

`gold` is the task's truth: the built-in gold scorer, or on a verifiable task (a verifier: `eval_verifier`
or the first reward function reading labels) the share of greedy responses the verifier accepts.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from rlhf_cluster.lib.config import PPOConfig
from rlhf_cluster.rl.batch import response_part, trainer_item
from rlhf_cluster.rl.rollout import reward_context


class HeldOutEval:
    def __init__(self, groups, producer, prompts: dict[str, list[dict]], cfg: PPOConfig, log=print):
        from rlhf_cluster.lib.reward_functions import FunctionReward

        self.groups, self.producer, self.prompts, self.cfg, self.log = groups, producer, prompts, cfg, log
        self.baseline: dict[str, list[float]] = {}  # the initial policy's gold per prompt and split (win-rate)
        spec = cfg.verifier()
        self.verifier = FunctionReward("eval_verifier", spec, timeout_s=600.0) if spec else None

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

    def gold(self, samples: list[dict], prompts: list[dict]) -> list[float]:
        """Each sample's gold: 1/0 by the verifier (an error here stops the evaluation: it is what chooses),
        else the built-in gold scorer's total."""
        from rlhf_cluster.lib import task

        if self.verifier is not None:
            ctx = [prompts[s["prompt_index"]] for s in samples]
            verdicts = self.verifier([p["messages"][-1]["content"] for p in ctx], [s["text"] for s in samples],
                                     [p.get("label") for p in ctx])
            return [float(v > 0) for v in verdicts]
        return [task.gold_score(task.prompt_text(prompts[s["prompt_index"]]["messages"]), s["text"]).total
                for s in samples]

    def split_eval(self, split: str) -> dict:
        """Greedy responses to one held-out split: RM score, gold score with its standard error, KL
        to the reference, win-rate against the initial policy; keys `<split>/...`."""
        from rlhf_cluster.lib import task
        from rlhf_cluster.lib.gold import gold_report, standard_error

        prompts = self.prompts[split]
        samples = self.producer.generate([p["prompt_ids"] for p in prompts],
                                         {"samples_per_prompt": 1, "temperature": self.cfg.eval_temperature})
        kl, scores = self._kl_and_scores(samples, prompts)
        texts = [task.prompt_text(prompts[s["prompt_index"]]["messages"]) for s in samples]
        gold = self.gold(samples, prompts)
        baseline = self.baseline.setdefault(split, gold)
        wins = [(a > b) + 0.5 * (a == b) for a, b in zip(gold, baseline)]
        out = {f"{split}/rm_score": sum(scores) / len(scores), f"{split}/gold": statistics.fmean(gold),
               f"{split}/gold_se": standard_error(gold), f"{split}/kl": sum(kl) / len(kl),
               f"{split}/win_rate_vs_initial": sum(wins) / len(wins),
               f"{split}/example": f"{texts[0]!r} -> {samples[0]['text']!r}"}
        if self.verifier is None:
            aspects = gold_report(texts, [s["text"] for s in samples])
            out |= {f"{split}/helpfulness": aspects["helpfulness"], f"{split}/safety": aspects["safety"]}
        else:
            out |= {f"{split}/accuracy/level_{level}": acc for level, acc in by_level(samples, prompts, gold).items()}
        return out | self.sampled_eval(split)

    def sampled_eval(self, split: str) -> dict:
        """`eval_samples_per_prompt` responses per prompt at the rollout temperature (seeded alike at every evaluation):
        KL(policy || reference) estimated as the mean over responses of sum log pi - log pi_ref (k1, unbiased
        on samples of the policy, unlike the greedy `kl`), with the RM and gold scores of the same
        responses: the three numbers of the over-optimisation curve (Gao et al. 2022). With a verifier, also
        pass@1 and pass@n (n = eval_samples_per_prompt, Chen et al. 2021's unbiased estimator)."""
        from rlhf_cluster.lib.gold import pass_at_k

        prompts = self.prompts[split]
        n = self.cfg.eval_samples_per_prompt
        samples = self.producer.generate([p["prompt_ids"] for p in prompts], {"samples_per_prompt": n},
                                         seed=self.cfg.seed * 1_000_003 + 999_983)
        kl, scores = self._kl_and_scores(samples, prompts)
        gold = self.gold(samples, prompts)
        out = {f"{split}/sampled_kl": sum(kl) / len(kl), f"{split}/sampled_rm_score": sum(scores) / len(scores),
               f"{split}/sampled_gold": statistics.fmean(gold),
               f"{split}/sampled_length": sum(len(s["response_ids"]) for s in samples) / len(samples)}
        if self.verifier is not None:
            correct = defaultdict(int)
            for s, g in zip(samples, gold):
                correct[s["prompt_index"]] += int(g > 0)
            for k in sorted({1, n}):
                out[f"{split}/pass@{k}"] = statistics.fmean(pass_at_k(n, correct[i], k) for i in range(len(prompts)))
        return out


def by_level(samples: list[dict], prompts: list[dict], gold: list[float]) -> dict:
    """Mean gold per prompt `level` (prompts without one are left out)."""
    groups = defaultdict(list)
    for s, g in zip(samples, gold):
        level = prompts[s["prompt_index"]].get("level")
        if level is not None:
            groups[level].append(g)
    return {level: statistics.fmean(gs) for level, gs in sorted(groups.items(), key=lambda kv: str(kv[0]))}
