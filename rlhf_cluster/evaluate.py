"""Gold-score a policy on the held-out prompts of the built-in task (or a prompts file).

    python -m rlhf_cluster.evaluate [--model DIR] [--prompts FILE] [--samples 4]

With no arguments it builds the built-in task and models if needed and evaluates the
base policy with vLLM. The same `gold_report` is what the training jobs log.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from rlhf_cluster import task
from rlhf_cluster.builtin import ensure_builtin
from rlhf_cluster.config import BuiltinConfig, RolloutConfig


def gold_report(prompts: list[str], responses: list[str]) -> dict[str, float]:
    """Mean gold score and its two aspects over (prompt text, response text) pairs."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("gold_report needs as many responses as prompts, at least one")
    scores = [task.gold_score(p, r) for p, r in zip(prompts, responses)]
    return {
        "gold": statistics.fmean(s.total for s in scores),
        "helpfulness": statistics.fmean(s.helpfulness for s in scores),
        "safety": statistics.fmean(s.safety for s in scores),
        "n": len(scores),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m rlhf_cluster.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model directory (default: the built-in base policy)")
    ap.add_argument("--prompts", help="prompts JSONL (default: the built-in held-out prompts)")
    ap.add_argument("--samples", type=int, default=4, help="responses per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from rlhf_cluster.data import load_tokenized
    from rlhf_cluster.generation import generate, make_vllm, sampling_params

    assets = ensure_builtin(BuiltinConfig(seed=args.seed))
    model = args.model or str(assets.base)
    prompts_file = args.prompts or assets.file("prompts_eval.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(model)
    records, report = load_tokenized(prompts_file, tokenizer, "prompts", max_tokens=128)
    print(f"prompts: {report}")
    cfg = RolloutConfig(samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens)
    t0 = time.time()
    llm = make_vllm(model, cfg, seed=args.seed)
    samples = generate(llm, [r["prompt_ids"] for r in records], sampling_params(cfg))  # engine-seeded
    texts = [task.prompt_text(records[s.prompt_index]["messages"]) for s in samples]
    result = gold_report(texts, [s.text for s in samples])
    result["seconds"] = round(time.time() - t0, 1)
    print(f"model: {model}")
    for s in samples[: 3 * args.samples : args.samples]:
        print(f"  {texts[samples.index(s)]!r} -> {s.text!r}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
