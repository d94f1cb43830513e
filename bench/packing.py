"""Benchmark `packing`: padded vs packed micro-batches (`max_tokens_per_micro_batch`) on a mixed-length
RL batch, for the groups a PPO step runs: the policy trainer's PPO step and log-prob pass (ZeRO-3, 2 ranks),
the reference's log-probs and the reward model's scores.

The batch: 64 sequences of built-in SFT conversations strung together and cut to lengths drawn uniformly
from 16..128 tokens (seeded), as responses that stop early and late make a rollout batch. Padded: micro-batches of 8
sequences, each padded to its longest. Packed: sequences packed first-fit into rows as wide as the
longest, as many rows per micro-batch as fit 8 x that width tokens (the same peak micro-batch size).
Both layouts run on the same groups, alternating (that they give the same log-probs, values, scores
and PPO loss is tested in tests/test_actors.py).

Run through bench.run (`python -m bench.run --only packing [--quick]`). Module-level imports stay light.
"""

from __future__ import annotations

import os
import random
import time

from bench.common import builtin_assets, header, log, median

MICRO = 8
N_SEQUENCES = 64
LENGTHS = (16, 128)


def mixed_batch(assets, seed: int = 0) -> list[dict]:
    """Trainer items of mixed lengths: built-in SFT conversations (13-40 tokens) strung together and cut
    to a length drawn from LENGTHS; the first conversation is the prompt, the rest the response."""
    from transformers import AutoTokenizer

    from rlhf_cluster.lib.data import load_tokenized

    tokenizer = AutoTokenizer.from_pretrained(assets.base)
    samples, _ = load_tokenized(assets.file("sft_train.jsonl"), tokenizer, "sft", LENGTHS[1])
    rng = random.Random(seed)
    items = []
    for _ in range(N_SEQUENCES):
        n, ids = rng.randint(*LENGTHS), []
        prompt = len(rng.choice(samples).input_ids)
        while len(ids) < n:
            ids += rng.choice(samples).input_ids
        prompt = min(prompt, n // 2)
        items.append({"input_ids": ids[:n], "loss_mask": [0] * (prompt - 1) + [1] * (n - prompt)})
    return items


def one_size(size: str, reps: int) -> dict:
    import ray

    from rlhf_cluster.actors.group import ActorGroup
    from rlhf_cluster.actors.scorers import ReferenceModel, RewardModel
    from rlhf_cluster.actors.trainer import PolicyTrainer
    from rlhf_cluster.lib.config import ScorerConfig, TrainerConfig
    from rlhf_cluster.lib.packing import micro_batch_rows

    assets = builtin_assets(size)
    items = mixed_batch(assets)
    lengths = [len(it["input_ids"]) for it in items]
    budget = MICRO * max(lengths)
    shape = {"sequences": len(items), "tokens": sum(lengths), "max_length": max(lengths),
             "padded_tokens": sum(len(mb) * max(lengths[r[0]] for r in mb)
                                  for mb in micro_batch_rows(lengths, MICRO, None)),
             "max_tokens_per_micro_batch": budget}
    env = {"RLHF_TORCH_THREADS": "1"}  # as the product's groups (rlhf_cluster/rl/groups.py)
    trainer = TrainerConfig(num_ranks=2, num_cpus_per_rank=0.5, zero_stage=3, micro_batch_size=MICRO)
    scorer = ScorerConfig(num_ranks=1, num_cpus_per_rank=0.5, micro_batch_size=MICRO)
    policy = ActorGroup(PolicyTrainer, trainer, str(assets.base), trainer.model_dump(), 1000, name="bench-policy",
                        env=env)
    ref = ActorGroup(ReferenceModel, scorer, str(assets.base), name="bench-reference", env=env)
    rm = ActorGroup(RewardModel, scorer, str(assets.reward_base), name="bench-reward", env=env)
    try:
        lp = policy.map("logprobs", items)
        rng = random.Random(1)
        ppo = [dict(it, old_logprobs=old, advantages=[rng.gauss(0, 1)] * len(old)) for it, old in zip(items, lp)]
        calls = {
            "policy_ppo_step": lambda: ray.get(policy.split_call("train_step", ppo, "ppo")),
            "policy_logprobs": lambda: policy.map("logprobs", items),
            "reference_logprobs": lambda: ref.map("logprobs", [it["input_ids"] for it in items]),
            "reward_scores": lambda: rm.map("score", [it["input_ids"] for it in items]),
        }
        layouts = {"padded": None, "packed": budget}
        times = {c: {k: [] for k in layouts} for c in calls}
        shape["packed_tokens"] = sum(len(mb) * max(lengths) for mb in micro_batch_rows(lengths, MICRO, budget))
        shape["micro_batches"] = {k: len(micro_batch_rows(lengths, MICRO, v)) for k, v in layouts.items()}
        for rep in range(reps + 1):  # rep 0 warms up, untimed
            for layout, tokens in (layouts.items() if rep % 2 else reversed(layouts.items())):
                for group in (policy, ref, rm):
                    group.run("set_micro_batching", MICRO, tokens)
                for name, call in calls.items():
                    t = time.perf_counter()
                    call()
                    if rep:
                        times[name][layout].append(time.perf_counter() - t)
            if rep:
                log(f"packing/{size} rep {rep}/{reps}: " + ", ".join(
                    f"{n} {times[n]['padded'][-1]:.2f}/{times[n]['packed'][-1]:.2f} s" for n in calls))
    finally:
        for group in (policy, ref, rm):
            group.shutdown()
    medians = {n: {k: median(v) for k, v in t.items()} for n, t in times.items()}
    return {"model": size, **shape, "repetitions": reps, "seconds": times, "median_s": medians,
            "speedup": {n: m["padded"] / m["packed"] for n, m in medians.items()}}


def bench_packing(quick: bool) -> tuple[dict, list[dict]]:
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # always a private local cluster
    config = {"sizes": ["tiny"] if quick else ["tiny", "small"], "repetitions": 3 if quick else 7,
              "batch": f"{N_SEQUENCES} sequences of built-in SFT conversations strung together, cut to lengths "
                       f"uniform in {LENGTHS[0]}..{LENGTHS[1]} tokens (seed 0)",
              "padded": f"micro-batches of {MICRO} sequences padded to their longest",
              "packed": f"first-fit rows as wide as the longest sequence, rows per micro-batch up to "
                        f"{MICRO} x that width tokens (max_tokens_per_micro_batch)",
              "policy": "PolicyTrainer ActorGroup, 2 ranks, ZeRO-3, fp32, one PPO optimiser step per call",
              "scorers": "ReferenceModel / RewardModel ActorGroups, 1 rank each",
              "dtype": "float32 (every group)", "ray": "ray.init(address='local', num_cpus=4)"}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        results = [one_size(size, config["repetitions"]) for size in config["sizes"]]
    finally:
        ray.shutdown()
    return config, results


# --------------------------------------------------------------------------- README section
def readme_table(rec: dict) -> list[str]:
    c = rec["config"]
    lines = [f"### packing — padded vs packed micro-batches on a mixed-length batch (`{rec['_file']}`)", "",
             *header(rec),
             f"Batch: {c['batch']}. Padded: {c['padded']}. Packed: {c['packed']}. {c['policy']}; {c['scorers']}. "
             "Medians over the repetitions, the two layouts alternating on the same groups.", "",
             "| model | tokens | padded tokens | packed tokens | micro-batches padded → packed | phase "
             "| padded s | packed s | padded / packed |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in rec["results"]:
        for i, (name, m) in enumerate(r["median_s"].items()):
            lead = (f"| {r['model']} | {r['tokens']} | {r['padded_tokens']} | {r['packed_tokens']} | "
                    f"{r['micro_batches']['padded']} → {r['micro_batches']['packed']} " if i == 0 else "| | | | | ")
            lines.append(f"{lead}| {name} | {m['padded']:.3f} | {m['packed']:.3f} | {r['speedup'][name]:.2f}× |")
    return lines + [""]
