"""The built-in task's gold score of responses, and of whole models sampled on held-out prompts.

The gold scorer (`task.gold_score`) is the task's hidden truth: jobs report it, nothing trains on it.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from pathlib import Path

from rlhf_cluster.lib import task


def standard_error(xs: list[float]) -> float:
    """Standard error of the mean, s / sqrt(n) with the sample standard deviation (0 for n < 2)."""
    return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k responses drawn without replacement from n samples, c of them correct,
    is correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021's unbiased estimator of pass@k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def gold_report(prompts: list[str], responses: list[str]) -> dict[str, float]:
    """Mean gold score (with its standard error) and its two aspects over (prompt text, response text) pairs."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("gold_report needs as many responses as prompts, at least one")
    scores = [task.gold_score(p, r) for p, r in zip(prompts, responses)]
    totals = [s.total for s in scores]
    return {
        "gold": statistics.fmean(totals),
        "gold_se": standard_error(totals),
        "helpfulness": statistics.fmean(s.helpfulness for s in scores),
        "safety": statistics.fmean(s.safety for s in scores),
        "n": len(scores),
    }


def verifier_report(prompts: list[str], responses: list[str], labels: list, verifier) -> dict[str, float]:
    """A verifiable task's gold: the share of responses the verifier accepts (pass@1 of these samples)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("verifier_report needs as many responses as prompts, at least one")
    scores = [float(s > 0) for s in verifier(prompts, responses, labels)]
    return {"gold": statistics.fmean(scores), "gold_se": standard_error(scores), "n": len(scores)}


def gold_eval(models: dict[str, Path], prompts_file: Path, rollout, seed: int, llm=None,
              verifier=None) -> dict[str, dict]:
    """Gold score of each model's sampled responses to the held-out prompts, with one vLLM engine; with a
    `verifier` (a reward function on labels) the gold is the share of responses it accepts.

    The engine starts once (about 30 s here) and swaps weights between models of the same
    architecture with `reload_weights`; pass `llm` to reuse an engine you already have.
    """
    from transformers import AutoTokenizer

    from rlhf_cluster.lib.data import load_tokenized
    from rlhf_cluster.lib.generation import generate, make_vllm, sampling_params

    first = next(iter(models.values()))
    tokenizer = AutoTokenizer.from_pretrained(first)
    records, _ = load_tokenized(prompts_file, tokenizer, "prompts", max_tokens=rollout.max_model_len - 1)
    prompt_ids = [r["prompt_ids"] for r in records]
    own = llm is None
    original = None if own else llm.model_config.model  # put a borrowed engine's weights back afterwards
    reports = {}
    for name, model_dir in models.items():
        t0 = time.time()
        if llm is None:
            llm = make_vllm(str(model_dir), rollout, seed=seed)
        else:
            load_weights(llm, model_dir)
        samples = generate(llm, prompt_ids, sampling_params(rollout, seed=seed))
        texts = [task.prompt_text(records[s.prompt_index]["messages"]) for s in samples]
        if verifier is None:
            reports[name] = gold_report(texts, [s.text for s in samples])
        else:
            reports[name] = verifier_report([records[s.prompt_index]["messages"][-1]["content"] for s in samples],
                                            [s.text for s in samples],
                                            [records[s.prompt_index].get("label") for s in samples], verifier)
        reports[name]["seconds"] = round(time.time() - t0, 1)
        reports[name]["examples"] = [[texts[i], samples[i].text] for i in range(0, len(samples), 37)][:4]
    if own:
        del llm
        gc.collect()
    else:
        load_weights(llm, original)
    return reports


def load_weights(llm, model_dir) -> None:
    """Swap the weights of a running vLLM engine in place (same architecture and tokenizer)."""
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
    llm.reset_prefix_cache()  # cached KV of the previous weights would be wrong
