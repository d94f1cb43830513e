"""Benchmark `rollout_engines`: generated tokens/s of vLLM (the product's engine, `make_vllm` in-process)
against Hugging Face transformers `generate` on the same model, prompts and sampling, alternating; the
vLLM/HF ratio.

Run through bench.run (`python -m bench.run --only rollout_engines [--quick]`), which records the
machine, versions and load around it. Module-level imports stay light (stdlib only): vLLM's worker
process imports this module for `VllmProbe`.
"""

from __future__ import annotations

import gc
import os
import time

from bench.common import builtin_assets, header, log, median, read_jsonl


class VllmProbe:
    """vLLM worker extension (bench only): how many threads and which cores the engine computes on."""

    def compute_threads(self) -> dict:
        import torch

        return {"torch_threads": torch.get_num_threads(), "cpu_affinity": sorted(os.sched_getaffinity(0)),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _eval_prompts(assets, tokenizer, n: int) -> list[list[int]]:
    from rlhf_cluster.lib.data import encode_prompt

    rows = read_jsonl(assets.file("prompts_test.jsonl"))
    if len(rows) < n:
        raise RuntimeError(f"the built-in task has {len(rows)} held-out prompts, the benchmark needs {n}")
    return [encode_prompt(tokenizer, r["messages"]) for r in rows[:n]]


def _hf_generate(model, prompt_ids: list[list[int]], pad_id: int, samples: int, max_new_tokens: int) -> int:
    """One batched HF `generate` call (left padding); returns the number of generated tokens."""
    import torch

    from rlhf_cluster.lib.data import pad_batch

    ids, att = pad_batch(prompt_ids, pad_id, side="left")
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             num_return_sequences=samples, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=pad_id)
    return int(out.shape[0] * (out.shape[1] - ids.shape[1]))


def _vllm_generate(llm, prompt_ids, params) -> int:
    from rlhf_cluster.lib.generation import generate

    return sum(len(s.response_ids) for s in generate(llm, prompt_ids, params))


def rollout_one_size(size: str, reps: int, n_prompts: int, samples: int, max_new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cluster.lib.config import RolloutConfig
    from rlhf_cluster.lib.generation import make_vllm, sampling_params
    from rlhf_cluster.lib.tiny_models import count_parameters

    assets = builtin_assets(size)
    tokenizer = AutoTokenizer.from_pretrained(assets.base)
    prompts = _eval_prompts(assets, tokenizer, n_prompts)
    cfg = RolloutConfig(samples_per_prompt=samples, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0)
    expected = n_prompts * samples * max_new_tokens
    warm: dict = {}

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(assets.base, dtype=torch.float32).eval()
    warm["hf_load_s"] = time.perf_counter() - t
    params_count = count_parameters(model)
    torch.manual_seed(0)
    t = time.perf_counter()
    _hf_generate(model, prompts, tokenizer.pad_token_id, samples, max_new_tokens)
    warm["hf_first_generate_s"] = time.perf_counter() - t

    log(f"rollout_engines/{size}: starting vLLM ({params_count / 1e6:.2f} M parameters)")
    t = time.perf_counter()
    llm = make_vllm(str(assets.base), cfg, seed=0, worker_extension_cls="bench.rollout_engines.VllmProbe")
    warm["vllm_engine_start_s"] = time.perf_counter() - t
    # sampling_params(cfg) as the rollout actors use it, with the length fixed: both engines generate
    # exactly max_new_tokens per sample (a random-weight model would otherwise stop at random places)
    params = sampling_params(cfg)
    params.ignore_eos = True
    t = time.perf_counter()
    _vllm_generate(llm, prompts, params)
    warm["vllm_first_generate_s"] = time.perf_counter() - t
    probe = llm.collective_rpc("compute_threads")[0]
    log(f"rollout_engines/{size}: warm ({', '.join(f'{k} {v:.1f}' for k, v in warm.items())}); {reps} reps")

    seconds: dict[str, list[float]] = {"vllm": [], "hf": []}
    order = []
    runners = {"vllm": lambda: _vllm_generate(llm, prompts, params),
               "hf": lambda: _hf_generate(model, prompts, tokenizer.pad_token_id, samples, max_new_tokens)}
    try:
        for rep in range(reps):
            pair = ["vllm", "hf"] if rep % 2 == 0 else ["hf", "vllm"]
            order.append(pair)
            for name in pair:
                t = time.perf_counter()
                tokens = runners[name]()
                seconds[name].append(time.perf_counter() - t)
                if tokens != expected:
                    raise RuntimeError(f"{name} generated {tokens} tokens, expected {expected}")
            log(f"rollout_engines/{size} rep {rep + 1}/{reps}: vLLM {expected / seconds['vllm'][-1]:.0f} tok/s, "
                f"HF {expected / seconds['hf'][-1]:.0f} tok/s")
    finally:
        _shutdown_vllm(llm)
        llm = runners = None
        gc.collect()

    tps = {k: [expected / s for s in v] for k, v in seconds.items()}
    med = {k: median(v) for k, v in tps.items()}
    paired = [v / h for v, h in zip(tps["vllm"], tps["hf"])]
    return {
        "model": size, "parameters": params_count, "model_dir": str(assets.base),
        "prompts": n_prompts, "samples_per_prompt": samples, "max_new_tokens": max_new_tokens,
        "generated_tokens_per_call": expected, "repetitions": reps, "order": order,
        "seconds": seconds, "tokens_per_s": tps, "median_tokens_per_s": med,
        "ratio_vllm_over_hf": med["vllm"] / med["hf"],
        "paired_ratios": paired, "median_paired_ratio": median(paired),
        "warmup": warm, "vllm_worker": probe, "hf_torch_threads": torch.get_num_threads(),
    }


def _shutdown_vllm(llm) -> None:
    """Stop the engine's processes now rather than whenever the garbage collector gets to them."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # best effort: dropping the reference and gc follow
        log(f"vLLM shutdown: {e!r}")


def bench_rollout_engines(quick: bool) -> tuple[dict, list[dict]]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # tiny calls take about a second: more repetitions buy a steadier median on a noisy machine
    config = {"sizes": ["tiny"] if quick else ["tiny", "small"],
              "repetitions": {"tiny": 3} if quick else {"tiny": 9, "small": 5},
              "prompts": 16, "samples_per_prompt": 4, "max_new_tokens": 32, "temperature": 1.0, "top_p": 1.0,
              "dtype": "float32", "fixed_length": True,
              "vllm": "rlhf_cluster.lib.generation.make_vllm in-process (enforce_eager), generate() with "
                      "sampling_params(cfg) + ignore_eos, logprobs=0, one call for all prompts",
              "hf": "AutoModelForCausalLM.generate, all prompts in one left-padded batch, num_return_sequences=4, "
                    "do_sample, top_k=0, min_new_tokens=max_new_tokens, KV cache on",
              "timing": "wall time of one call that generates every sample; warm-up calls untimed; "
                        "contenders alternate (vllm,hf),(hf,vllm),...",
              "env": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                                                     "OMP_NUM_THREADS", "VLLM_CPU_NUM_OF_RESERVED_CPU")}}
    results = [rollout_one_size(size, config["repetitions"][size], config["prompts"], config["samples_per_prompt"],
                                config["max_new_tokens"]) for size in config["sizes"]]
    return config, results


# --------------------------------------------------------------------------- README section
def readme_table(rec: dict) -> list[str]:
    c = rec["config"]
    lines = [f"### rollout_engines — generated tokens/s, vLLM vs HF `generate` (`{rec['_file']}`)", "",
             *header(rec),
             f"{c['prompts']} built-in held-out prompts × {c['samples_per_prompt']} samples × "
             f"{c['max_new_tokens']} new tokens (fixed length) = one call, temperature {c['temperature']:g}, "
             f"{c['dtype']}; medians over alternating repetitions after an untimed warm-up of each.", "",
             "| model | parameters | reps | vLLM tok/s | HF tok/s | vLLM / HF (ratio of medians) "
             "| vLLM / HF (median of paired reps) | vLLM worker threads (cores) | HF threads |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rec["results"]:
        w = r["vllm_worker"]
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['repetitions']} | "
                     f"{r['median_tokens_per_s']['vllm']:,.0f} | "
                     f"{r['median_tokens_per_s']['hf']:,.0f} | **{r['ratio_vllm_over_hf']:.2f}×** | "
                     f"{r['median_paired_ratio']:.2f}× | {w['torch_threads']} "
                     f"({','.join(map(str, w['cpu_affinity']))}) | {r['hf_torch_threads']} |")
    return lines + [""]

