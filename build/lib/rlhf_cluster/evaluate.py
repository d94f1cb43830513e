"""Gold-score a policy on the held-out prompts of the built-in task (or a prompts file).

    python -m rlhf_cluster.evaluate [--model DIR] [--prompts FILE] [--samples 4] [key=value ...]

With no arguments it builds the built-in task and models if needed and evaluates the
base policy with vLLM. The same `gold_report` is what the training jobs log.
"""

from __future__ import annotations

import json
import time

from rlhf_cluster import scaffold
from rlhf_cluster.lib import task
from rlhf_cluster.lib.config import EvalConfig
from rlhf_cluster.lib.gold import gold_report


def run(cfg: EvalConfig, model: str | None = None, prompts: str | None = None, samples: int | None = None,
        max_new_tokens: int | None = None, seed: int | None = None) -> dict:
    """Sample `rollout.samples_per_prompt` responses per prompt with vLLM and gold-score them; the
    flags, when given, replace the config keys they name."""
    from transformers import AutoTokenizer

    from rlhf_cluster.lib.builtin import ensure_builtin
    from rlhf_cluster.lib.data import load_tokenized
    from rlhf_cluster.lib.generation import generate, make_vllm, sampling_params

    cfg.model.path = model or cfg.model.path
    cfg.prompts = prompts or cfg.prompts
    cfg.rollout.samples_per_prompt = samples or cfg.rollout.samples_per_prompt
    cfg.rollout.max_new_tokens = max_new_tokens or cfg.rollout.max_new_tokens
    cfg.seed = cfg.seed if seed is None else seed
    if cfg.model.path is None or cfg.prompts is None:
        assets = ensure_builtin(cfg.builtin.model_copy(update={"seed": cfg.seed}))
        cfg.model.path = cfg.model.path or str(assets.base)
        cfg.prompts = cfg.prompts or str(assets.file("prompts_test.jsonl"))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    records, report = load_tokenized(cfg.prompts, tokenizer, "prompts", max_tokens=cfg.rollout.max_model_len - 1)
    print(f"prompts: {report}")
    t0 = time.time()
    llm = make_vllm(cfg.model.path, cfg.rollout, seed=cfg.seed)
    drawn = generate(llm, [r["prompt_ids"] for r in records], sampling_params(cfg.rollout))  # engine-seeded
    texts = [task.prompt_text(records[s.prompt_index]["messages"]) for s in drawn]
    result = gold_report(texts, [s.text for s in drawn])
    result["seconds"] = round(time.time() - t0, 1)
    print(f"model: {cfg.model.path}")
    k = cfg.rollout.samples_per_prompt
    for i in range(0, min(3 * k, len(drawn)), k):
        print(f"  {texts[i]!r} -> {drawn[i].text!r}")
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    def flags(ap):
        ap.add_argument("--model", help="HF model directory (default: the built-in base policy)")
        ap.add_argument("--prompts", help="prompts JSONL (default: the built-in held-out prompts)")
        ap.add_argument("--samples", type=int, help="responses per prompt (default 4)")
        ap.add_argument("--max-new-tokens", type=int, help="(default 32)")
        ap.add_argument("--seed", type=int)

    return scaffold.main("evaluate", EvalConfig, run, argv, description=__doc__.split("\n")[0], add_flags=flags)


if __name__ == "__main__":
    main()
