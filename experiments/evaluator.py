"""One evaluator for every method, so that their numbers differ by the method alone: greedy responses to the test
prompts (gold ± s.e., helpfulness, safety, RM score, length), greedy validation gold, and four sampled responses
per test prompt for KL(pi || pi_SFT) (k1, nats). Nothing a method chooses (promotion, kept checkpoint) reads the
test split; test numbers are only reported."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path


class Evaluator:
    """One vLLM engine in this process (weights swapped per model), the SFT reference and the reward model."""

    def __init__(self, sft: Path, rm: Path, prompt_files: dict[str, Path], pairs_file: Path, max_new_tokens: int):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # one line per method, not vLLM's start-up log
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        from rlhf_cluster.lib.config import RolloutConfig
        from rlhf_cluster.lib.data import load_tokenized
        from rlhf_cluster.lib.generation import make_vllm

        self.rollout = RolloutConfig(max_new_tokens=max_new_tokens, temperature=1.0)
        self.tokenizer = AutoTokenizer.from_pretrained(sft)
        self.prompts = {split: load_tokenized(path, self.tokenizer, "prompts", self.rollout.max_model_len - 1)[0]
                        for split, path in prompt_files.items()}
        self.pairs = load_tokenized(pairs_file, self.tokenizer, "preferences", self.rollout.max_model_len)[0]
        self.llm, self.loaded, self.sft = make_vllm(str(sft), self.rollout, seed=0), Path(sft), Path(sft)
        self.reference = AutoModelForCausalLM.from_pretrained(sft).eval()
        self.rm = AutoModelForSequenceClassification.from_pretrained(rm).eval()

    def _use(self, model_dir: Path) -> None:
        from rlhf_cluster.lib.gold import load_weights

        if Path(model_dir) != self.loaded:
            load_weights(self.llm, model_dir)
            self.loaded = Path(model_dir)

    def _sample(self, split: str, n: int, seed: int | None) -> list:
        """n responses per prompt of `split`: greedy when `seed` is None, else seeded at temperature 1."""
        from rlhf_cluster.lib.generation import generate, sampling_params

        params = sampling_params(self.rollout, n=n, greedy=seed is None)
        return generate(self.llm, [p["prompt_ids"] for p in self.prompts[split]], params, seed=seed)

    def _texts(self, split: str, samples: list) -> list[str]:
        from rlhf_cluster.lib import task

        return [task.prompt_text(self.prompts[split][s.prompt_index]["messages"]) for s in samples]

    def _batches(self, seqs: list[list[int]], size: int = 32):
        """(start, input ids, attention mask) per padded chunk of `seqs`."""
        from rlhf_cluster.lib.data import pad_batch

        for i in range(0, len(seqs), size):
            yield i, *pad_batch(seqs[i:i + size], self.tokenizer.pad_token_id)

    def rm_scores(self, seqs: list[list[int]]) -> list[float]:
        import torch

        with torch.no_grad():
            return [x for _, ids, att in self._batches(seqs)
                    for x in self.rm(input_ids=ids, attention_mask=att).logits[:, 0].tolist()]

    def ref_logprob_sums(self, samples: list) -> list[float]:
        """log pi_SFT(response | prompt), summed over the response tokens (position t predicts token t+1)."""
        import torch

        from rlhf_cluster.lib.losses import sequence_token_logprobs

        out = []
        with torch.no_grad():
            for i, ids, att in self._batches(_seqs(samples)):
                lp = sequence_token_logprobs(self.reference, ids, att)
                for row, s in zip(lp, samples[i:i + len(lp)]):
                    start = len(s.prompt_ids) - 1
                    out.append(row[start:start + len(s.response_ids)].sum().item())
        return out

    def evaluate(self, model_dir: Path, seed: int) -> dict:
        """Greedy test and validation responses (gold, RM, length); four sampled test responses per prompt for KL."""
        from rlhf_cluster.lib.gold import gold_report

        self._use(model_dir)
        out = {}
        for split in ("test", "val"):
            greedy = self._sample(split, 1, None)
            gold = gold_report(self._texts(split, greedy), [s.text for s in greedy])
            out[f"{split}_gold"], out[f"{split}_gold_se"] = gold["gold"], gold["gold_se"]
            if split == "test":
                out |= {"helpfulness": gold["helpfulness"], "safety": gold["safety"],
                        "rm_score": statistics.fmean(self.rm_scores(_seqs(greedy))),
                        "length": statistics.fmean(len(s.response_ids) for s in greedy)}
        sampled = self._sample("test", 4, seed=1_000_003 * (seed + 1))
        ref = self.ref_logprob_sums(sampled)
        out["kl"] = statistics.fmean(sum(s.logprobs) - r for s, r in zip(sampled, ref))
        out["sampled_gold"] = gold_report(self._texts("test", sampled), [s.text for s in sampled])["gold"]
        return out

    def best_of_k(self, k: int, seed: int) -> dict:
        """The reward model picks one of K samples of the SFT policy per prompt. KL of best-of-K to the policy is
        at most log K - (K-1)/K (Stiennon et al. 2020; Beirami et al. 2024), reported as its KL. `oracle_gold`: the
        gold scorer picks instead: what a perfect reward model would reach at this K (a ceiling, reported only)."""
        from rlhf_cluster.lib import task
        from rlhf_cluster.lib.gold import gold_report

        self._use(self.sft)
        out = {}
        for split in ("test", "val"):
            samples = self._sample(split, k, seed=1_000_003 * (seed + 1) + 17)
            scores = self.rm_scores(_seqs(samples))
            texts = self._texts(split, samples)
            picked, oracle = [], []
            for i in range(0, len(samples), k):
                group = range(i, i + k)
                picked.append(max(group, key=lambda j: scores[j]))
                oracle.append(max(group, key=lambda j: task.gold_score(texts[j], samples[j].text).total))
            gold = gold_report([texts[j] for j in picked], [samples[j].text for j in picked])
            out[f"{split}_gold"], out[f"{split}_gold_se"] = gold["gold"], gold["gold_se"]
            if split == "test":
                out |= {"helpfulness": gold["helpfulness"], "safety": gold["safety"],
                        "rm_score": statistics.fmean(scores[j] for j in picked),
                        "length": statistics.fmean(len(samples[j].response_ids) for j in picked),
                        "oracle_gold": gold_report([texts[j] for j in oracle],
                                                   [samples[j].text for j in oracle])["gold"]}
        out["kl"] = math.log(k) - (k - 1) / k
        return out

    def rm_accuracy(self) -> dict:
        """How often the reward model scores the gold-chosen response of a test preference pair above the rejected."""
        chosen = self.rm_scores([p["chosen"].input_ids for p in self.pairs])
        rejected = self.rm_scores([p["rejected"].input_ids for p in self.pairs])
        wins = [float(c > r) for c, r in zip(chosen, rejected)]
        return {"accuracy": statistics.fmean(wins), "pairs": len(wins)}


def _seqs(samples: list) -> list[list[int]]:
    return [s.prompt_ids + s.response_ids for s in samples]
