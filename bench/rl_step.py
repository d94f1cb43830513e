"""Benchmark `rl_step` (issue #9, W1 + FLOPs utilisation + step breakdown), run by bench/run.py.

One GRPO (and one PPO) iteration of this product — `rlhf_cluster.ppo.PPORun.step()` on a private
local Ray cluster with the `tiny-cpu.yaml` layout (2 ZeRO-3 policy ranks, reference, reward, vLLM
engine; critic for PPO) — against one step of TRL's `GRPOTrainer` (bench/trl_grpo.py, in a child
process) on the same weights, prompts, dtype, batch and hyper-parameters, alternating. Then the
product's per-phase times as batch size, response length and model size change, the model FLOPs
of each step, and this machine's matmul peak in the run's dtype measured in the same run (fp32 for `rl_step`;
bf16 for `rl_step_bf16`, both sides in bf16, run only on a CPU with bf16 units).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BENCH_DIR, REPO_ROOT, builtin_assets, cpu_bf16, header, log, matmul_peak, median, read_jsonl
from rlhf_cluster.lib.files import replaced_dir

WORK = BENCH_DIR / "out" / "rl_step"  # git-ignored: model copies, prompts, run directories
PHASES = ["generate", "score", "advantages", "train", "sync"]


# --------------------------------------------------------------------------- inputs shared by both sides
def prepare(size: str, n_prompts: int) -> dict:
    """Copies of the built-in `size` policy, a 2-layer Llama reward model of the same width and
    tokenizer (random weights, seed 1), and the first `n_prompts` held-out prompts, under WORK."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from rlhf_cluster.lib.data import encode_prompt
    from rlhf_cluster.lib.tiny_models import count_parameters, llama_config

    assets = builtin_assets(size)
    root = WORK / "models" / size
    policy, reward = root / "policy", root / "reward-2layer"
    if not (policy / "config.json").exists():
        shutil.rmtree(policy, ignore_errors=True)
        shutil.copytree(assets.base, policy)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    if not (reward / "config.json").exists():
        torch.manual_seed(1)
        cfg = llama_config(size, tokenizer, num_labels=1)
        cfg.num_hidden_layers = 2
        rm = LlamaForSequenceClassification(cfg)
        with replaced_dir(reward) as tmp:
            rm.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    rows = read_jsonl(assets.file("prompts_test.jsonl"))[:n_prompts]
    prompts = WORK / f"prompts_eval_{n_prompts}.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    prompt_lens = [len(encode_prompt(tokenizer, r["messages"])) for r in rows]
    return {"size": size, "policy": str(policy), "reward": str(reward), "prompts": str(prompts),
            "prompt_tokens": prompt_lens, "params": _param_counts(policy, reward),
            "rm_parameters": count_parameters(LlamaForSequenceClassification.from_pretrained(reward))}


def _param_counts(policy: Path, reward: Path) -> dict:
    """Parameters that take part in matmuls (everything but the input embedding table) per model."""
    out = {}
    for name, path in (("policy", policy), ("reward", reward)):
        c = json.loads((path / "config.json").read_text())
        d, f, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
        kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d  # q,o + k,v + gate,up,down + 2 norms
        head = d * (v if name == "policy" else c.get("num_labels", 1))
        out[name] = {"layers": L, "hidden": d, "vocab": v, "matmul_parameters": L * per_layer + head + d,
                     "embedding_parameters": v * d}
    return out


# --------------------------------------------------------------------------- TRL contender (child process)
class TrlChild:
    """bench/trl_grpo.py in its own interpreter; one `step()` = one GRPOTrainer step."""

    def __init__(self, spec: dict, python: str = sys.executable):
        WORK.mkdir(parents=True, exist_ok=True)
        self.spec_path = WORK / f"trl_spec_{spec['size']}.json"
        self.spec_path.write_text(json.dumps(spec, indent=1))
        self.log_path = WORK / f"trl_{spec['size']}.log"
        self.stderr = open(self.log_path, "w")
        self.proc = subprocess.Popen([python, "-m", "bench.trl_grpo", str(self.spec_path)], cwd=REPO_ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     bufsize=1)
        self.ready = self._read("ready")

    def _read(self, event: str) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the TRL child exited (rc {self.proc.poll()}); see {self.log_path}")
            msg = json.loads(line)
            if msg.get("event") == event:
                return msg

    def step(self) -> dict:
        cpu = process_cpu_s([self.proc.pid])
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        msg = self._read("step")
        msg["cpu_s"] = process_cpu_s([self.proc.pid]) - cpu
        return msg

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.stderr.close()


# --------------------------------------------------------------------------- the product's side
def batch_tokens(run) -> dict:
    """Token counts of what the last step sampled."""
    samples = run.last_batch.samples
    return {"samples": len(samples), "prompt": sum(len(s["prompt_ids"]) for s in samples),
            "response": sum(len(s["response_ids"]) for s in samples)}


# One optimiser step per batch, as TRL's side takes: one mini-batch, and one micro-batch of 32 per rank.
# The product's old log-probs come from vLLM (tiny-cpu.yaml's `old_logprobs: sampler`).
# Packed micro-batches (tiny-cpu.yaml packs) as large as 32 padded sequences of the longest W1 length (128
# tokens) for the trainers, 16 for the scorers (their micro_batch_size).
OURS = ["mini_batches=1", "trainer.micro_batch_size=32", "trainer.max_tokens_per_micro_batch=4096",
        "critic.max_tokens_per_micro_batch=4096", "reference.max_tokens_per_micro_batch=2048",
        "reward_group.max_tokens_per_micro_batch=2048"]
# The same step as the product ran it before this benchmark's optimisations (bench/README.md, "Before /
# after"): a second policy forward for the old log-probs, padded micro-batches of 16.
BEFORE = ["old_logprobs=recompute", "trainer.micro_batch_size=16", "trainer.max_tokens_per_micro_batch=null",
          "critic.max_tokens_per_micro_batch=null", "reference.max_tokens_per_micro_batch=null",
          "reward_group.max_tokens_per_micro_batch=null"]


def start_ours(inputs: dict, estimator: str, settings: dict, tag: str, extra: list[str] = ()):
    from rlhf_cluster.lib.config import CONFIG_DIR, PPOConfig, check_resources, load_config

    out = WORK / "runs" / f"{tag}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"policy.path={inputs['policy']}", f"reward.path={inputs['reward']}",
                 f"builtin.size={inputs['size']}", f"data.train={inputs['prompts']}", f"data.eval={inputs['prompts']}",
                 f"estimator={estimator}", f"rollout.samples_per_prompt={settings['samples_per_prompt']}",
                 f"rollout.max_new_tokens={settings['max_new_tokens']}",
                 f"rollout.temperature={settings['temperature']}",
                 f"prompts_per_iteration={settings['prompts']}", f"kl_coef={settings['beta']}",
                 f"trainer.optim.lr={settings['lr']}", "iterations=1000", "eval_every=100000",
                 "checkpoint_every=100000", f"output_dir={out}", f"registry={out / 'registry'}",
                 f"precision={'bf16' if settings['dtype'] == 'bfloat16' else 'fp32'}", *OURS, *extra]
    cfg = load_config(PPOConfig, CONFIG_DIR / "tiny-cpu.yaml", overrides)
    import ray

    res = ray.cluster_resources()
    check_resources(cfg, res.get("CPU", 0.0), res.get("GPU", 0.0))
    t = time.perf_counter()
    from rlhf_cluster.ppo import PPORun

    run = PPORun(cfg, inputs["policy"], inputs["reward"], log=lambda m: None)
    run.bench_dtype = cfg.policy.dtype  # what `precision: auto` (tiny-cpu.yaml) chose on this machine
    return run, time.perf_counter() - t, overrides, cfg.old_logprobs


def process_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes have used so far, from /proc (0 for one that is gone)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def actor_pids(run) -> list[int]:
    """The processes of every actor of a PPORun (the vLLM engine core runs inside its actor) and the driver."""
    import ray._private.state as state

    ids = {a._actor_id.hex() for g in run.groups.all() for a in g.actors}
    return [os.getpid()] + [a["Pid"] for actor_id, a in state.actors().items()
                            if actor_id in ids and a["State"] == "ALIVE"]


def our_step(run) -> dict:
    pids = getattr(run, "_bench_pids", None) or actor_pids(run)
    run._bench_pids = pids
    cpu = process_cpu_s(pids)
    t = time.perf_counter()
    m = run.step()
    seconds = time.perf_counter() - t
    cpu = process_cpu_s(pids) - cpu
    run.iteration += 1
    if m.get("skipped"):
        raise RuntimeError(f"the product skipped an iteration: {m.get('skip_reason')}")
    phases = {p: m[f"time/{p}"] for p in PHASES if f"time/{p}" in m}
    return {"seconds": seconds, "phases": phases, "overhead": seconds - sum(phases.values()),
            "tokens": batch_tokens(run), "rm_score": m["reward/rm_score"], "kl": m["kl/mean_sequence_kl"],
            "response_length": m["response/length"], "staleness": m["rollout/staleness"],
            "idle": {"engines": m["idle/engines"], "trainer": m["idle/trainer"]},
            "coordinator_cpu_s": m["coordinator/cpu_s"], "cpu_s": cpu}


# --------------------------------------------------------------------------- FLOPs
def step_flops(params: dict, tokens: dict, side: str, estimator: str, old_logprobs: str = "sampler") -> dict:
    """Model FLOPs of one step: 2·N per token for a forward pass, 6·N per token for forward + backward,
    N = the parameters in matmuls (the input embedding table is a lookup); attention's own
    (context-length) term is left out: at <= 80-token sequences it adds about 1-2 %. Every forward
    covers prompt + response tokens (generation: prefill + decode)."""
    n_pol, n_rm = params["policy"]["matmul_parameters"], params["reward"]["matmul_parameters"]
    seq = tokens["prompt"] + tokens["response"]
    f = {"generate": 2 * n_pol * seq, "reference": 2 * n_pol * seq, "reward": 2 * n_rm * seq,
         "train": 6 * n_pol * seq}
    if side == "ours":
        if old_logprobs == "recompute":  # a second policy forward for the sampling policy's log-probs
            f["old_logprobs"] = 2 * n_pol * seq
        if estimator == "gae":  # the critic starts from the reward model: values + value step
            f["critic_values"] = 2 * n_rm * seq
            f["critic_train"] = 6 * n_rm * seq
    f["total"] = sum(f.values())
    return f


# --------------------------------------------------------------------------- the benchmark
def _summary(steps: list[dict]) -> dict:
    secs = [s["seconds"] for s in steps]
    toks = [s["tokens"]["response"] for s in steps]
    out = {"steps": len(steps), "median_step_s": median(secs),
           "median_tokens_per_s": median([t / s for t, s in zip(toks, secs)]),
           "median_response_tokens": median(toks)}
    if steps and "cpu_s" in steps[0]:  # every process of the side: core-seconds per step, and cores kept busy
        out["median_cpu_s"] = median([s["cpu_s"] for s in steps])
        out["median_cores_busy"] = median([s["cpu_s"] / s["seconds"] for s in steps])
    if steps and "coordinator_cpu_s" in steps[0]:
        out["median_coordinator_cpu_s"] = median([s["coordinator_cpu_s"] for s in steps])
    if steps and "idle" in steps[0]:
        out["median_idle"] = {g: median([s["idle"][g] for s in steps]) for g in ("engines", "trainer")}
    if steps and "phases" in steps[0]:
        out["median_phases_s"] = {p: median([s["phases"].get(p, 0.0) for s in steps]) for p in PHASES}
        out["median_phases_s"]["overhead"] = median([s["overhead"] for s in steps])
    return out


def _trl_record(msg: dict, prompt_tokens: int) -> dict:
    tokens = {"prompt": prompt_tokens, "response": round(msg["completion_tokens"] or 0)}
    return {"seconds": msg["seconds"], "cpu_s": msg["cpu_s"], "tokens": tokens,
            "kl": msg.get("kl"), "reward": msg.get("reward"), "mean_completion_length": msg["mean_completion_length"]}


def set_staleness(run, k: int) -> None:
    """Switch the running PPORun between synchronous (0) and asynchronous rollout (k) between steps; the
    old log-probs stay the sampler's (tiny-cpu.yaml), so the PPO ratio is taken against the engine's weights."""
    run.producer.max_staleness = k
    run.asynchronous = k > 0


def settle_into(run, k: int) -> None:
    """Untimed steps after a switch to staleness k: a synchronous side first trains off the batches
    still in flight (so its timed steps sample their own); an asynchronous one fills its pipeline."""
    set_staleness(run, k)
    if k == 0:
        while run.producer.queue:
            our_step(run)
    else:  # the batch in flight had the other sides' time to finish: a step that is not steady state
        our_step(run)


def compare(inputs: dict, estimator: str, settings: dict, trl: TrlChild | None, reps: int, tag: str,
            points: list[dict] = (), point_steps: int = 1, extra: list[str] = (), async_levels: list[int] = (),
            block: int = 1) -> dict:
    """Warm-up step of each side (untimed), then `reps` rounds over the sides — the product synchronous,
    the product with each `async_levels` staleness (the same running PPORun, switched between steps), and
    TRL when given — in an order that rotates every round; each side takes `block` timed steps per round
    (after untimed ones that settle a switch, see settle_into). Then, on the same running PPORun
    (synchronous), the sweep `points` (prompts per step, max new tokens): after each change one untimed
    step, then `point_steps` timed ones."""
    run, start_s, overrides, old_logprobs = start_ours(inputs, estimator, settings, tag, extra)
    samples = settings["prompts"] * settings["samples_per_prompt"]
    prompt_tokens = sum(inputs["prompt_tokens"]) * settings["samples_per_prompt"]
    sides = ["ours", *[f"async{k}" for k in async_levels], *(["trl"] if trl is not None else [])]
    timed: dict[str, list] = {side: [] for side in sides}
    order, swept = [], []
    try:
        warm = {"ours_start_s": start_s}
        t = time.perf_counter()
        our_step(run)
        warm["ours_first_step_s"] = time.perf_counter() - t
        if trl is not None:
            warm["trl_first_step_s"] = trl.step()["seconds"]
        log(f"rl_step/{tag}: warm ({', '.join(f'{k} {v:.1f}' for k, v in warm.items())}); {reps} rounds of "
            f"{', '.join(sides)}, {block} timed step(s) each")
        for rep in range(reps):
            turn = sides[rep % len(sides):] + sides[:rep % len(sides)]
            order.append(turn)
            for side in turn:
                if side == "trl":
                    timed[side] += [_trl_record(trl.step(), prompt_tokens) for _ in range(block)]
                    continue
                k = 0 if side == "ours" else int(side[5:])
                settle_into(run, k)
                timed[side] += [our_step(run) for _ in range(block)]
            log(f"rl_step/{tag} round {rep + 1}/{reps}: " + ", ".join(
                f"{side} {timed[side][-1]['seconds']:.1f} s" for side in turn))
        settle_into(run, 0)
        for p in points:
            run.cfg.prompts_per_iteration = p["prompts"]
            run.producer.overrides = {"max_new_tokens": p["max_new_tokens"]}  # training batches' engine calls
            our_step(run)
            rows = [our_step(run) for _ in range(point_steps)]
            s = _summary(rows)
            swept.append({"model": inputs["size"], **p, "rows": rows, **s})
            log(f"rl_step/{tag} sweep {p}: {s['median_step_s']:.1f} s/step, "
                + " ".join(f"{k} {v:.1f}" for k, v in s["median_phases_s"].items()))
    finally:
        run.shutdown()
    ours, theirs = timed["ours"], timed.get("trl", [])
    res = {"estimator": estimator, "model": inputs["size"], "tag": tag, "old_logprobs": old_logprobs,
           "dtype": run.bench_dtype,
           "prompts": settings["prompts"],
           "samples_per_step": samples, "max_new_tokens": settings["max_new_tokens"], "overrides": overrides,
           "order": order, "block": block, "warmup": warm, "ours": ours, "ours_summary": _summary(ours),
           "sweep": swept}
    if async_levels:
        res["async"] = {str(k): {"max_staleness": k, "steps": timed[f"async{k}"],
                                 "summary": _summary(timed[f"async{k}"])} for k in async_levels}
        best = min(res["async"].values(), key=lambda a: a["summary"]["median_step_s"])
        res["async_speedup"] = res["ours_summary"]["median_step_s"] / best["summary"]["median_step_s"]
        res["async_best_staleness"] = best["max_staleness"]
    if theirs:
        res |= {"trl": theirs, "trl_summary": _summary(theirs)}
        res["speedup_vs_trl"] = res["trl_summary"]["median_step_s"] / res["ours_summary"]["median_step_s"]
        res["paired_speedups"] = [t["seconds"] / o["seconds"] for o, t in zip(ours, theirs)]
        res["tokens_per_s_ratio"] = (res["ours_summary"]["median_tokens_per_s"]
                                     / res["trl_summary"]["median_tokens_per_s"])
        if async_levels:
            res["speedup_vs_trl_best"] = res["trl_summary"]["median_step_s"] / min(
                res["ours_summary"]["median_step_s"], best["summary"]["median_step_s"])
    return res


def bench_rl_step(quick: bool, dtype: str = "float32") -> tuple[dict, dict]:
    """Both sides in `dtype`: float32 (rl_step), or bfloat16 (rl_step_bf16: TRL with bf16=True, ours with
    precision=bf16; on a CPU with bf16 units only)."""
    import ray

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.pop("RAY_ADDRESS", None)  # always a private local cluster, never someone else's
    size = "tiny" if quick else "small"
    settings = {"prompts": 16, "samples_per_prompt": 4, "max_new_tokens": 32 if quick else 64, "temperature": 1.0,
                "beta": 0.04, "lr": 2.0e-4, "seed": 0, "dtype": dtype}
    reps, ppo_reps, point_steps = (2, 1, 1) if quick else (4, 2, 1)  # 4 pairs: each side first twice
    points = ([{"prompts": 8, "max_new_tokens": 32}] if quick else
              [{"prompts": 8, "max_new_tokens": 64}, {"prompts": 32, "max_new_tokens": 64},
               {"prompts": 16, "max_new_tokens": 16}, {"prompts": 16, "max_new_tokens": 32}])
    config = {
        "model": size, "settings": settings, "reps": {"grpo_vs_trl": reps, "ppo": ppo_reps, "sweep": point_steps},
        "dtype": dtype, "sweep_points": points, "model_size_point": None if quick else "tiny",
        "ours": "rlhf_cluster.ppo.PPORun (configs/tiny-cpu.yaml + overrides, among them " + " ".join(OURS) + ") on "
                "ray.init(address='local', num_cpus=4): 2 ZeRO-3 policy ranks (0.5 CPU, 1 torch thread each), "
                "reference, reward (and critic for PPO), one vLLM engine; one step = PPORun.step(): generate + score "
                "(reference, reward [, values], in parallel; old log-probs from vLLM: old_logprobs=sampler) + "
                "advantages + one optimiser step + weight sync",
        "before": "the GRPO step with " + " ".join(BEFORE) + " (the product's previous defaults: a second policy "
                  "forward for the old log-probs, micro-batches of 16), in its own PPORun after the others",
        "trl": f"trl.GRPOTrainer in a child process (bench/trl_grpo.py), use_cpu, {dtype} "
               f"(bf16={dtype == 'bfloat16'}), HF generate "
               "(use_vllm=False), per_device_train_batch_size = prompts x samples, gradient_accumulation_steps 1, "
               "steps_per_generation 1, num_iterations 1, beta 0.04, torch's default threads",
        "same": "policy weights (a copy of the built-in HF directory), 2-layer Llama reward model, the first 16 "
                "built-in held-out prompts (chat template, generation prompt), samples, max new tokens, temperature "
                "1, top-p 1, no top-k, beta, lr 2e-4, AdamW betas (0.9, 0.95), eps 1e-5, weight decay 0, grad clip 1,"
                " cosine schedule, one optimiser step per batch; responses stop at EOS on both sides",
        "timing": "wall time of one step after one untimed warm-up step on each side; sides alternate "
                  "(ours, trl), (trl, ours), ...; TRL: from 'go' to on_step_end in the child; PPO: ours only "
                  "(TRL 1.x has no PPO trainer in its main API), compared with the GRPO run's TRL median",
        "sweep": "on the GRPO run after the comparison: prompts per step and max new tokens changed on the running "
                 "PPORun (cfg.prompts_per_iteration; max_new_tokens as a RolloutConfig override of the engine "
                 "call); one untimed step after each change; the tiny model in its own PPORun",
        "flops": "2·N per token forward, 6·N per token forward+backward, N = parameters in matmuls (input "
                 "embedding excluded); attention's context term excluded (~1-2 % here); prompt + response tokens; "
                 "generation counted as one forward over every sample's prompt + response",
        "env": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS")},
    }
    peak_before = matmul_peak(dtype)
    log(f"rl_step: {dtype} matmul peak {peak_before['best_gflops']:.1f} GFLOP/s (best), "
        f"{peak_before['median_gflops']:.1f} (median), {peak_before['torch_threads']} threads")
    inputs = {size: prepare(size, settings["prompts"])}
    spec = {"size": size, "policy": inputs[size]["policy"], "reward": inputs[size]["reward"],
            "prompts": inputs[size]["prompts"], "output_dir": str(WORK / "runs" / "trl"),
            "prompts_per_step": settings["prompts"], "samples_per_prompt": settings["samples_per_prompt"],
            "max_new_tokens": settings["max_new_tokens"], "temperature": settings["temperature"],
            "beta": settings["beta"], "clip_eps": 0.2, "lr": settings["lr"], "betas": [0.9, 0.95], "eps": 1e-5,
            "weight_decay": 0.0, "grad_clip": 1.0, "seed": 0, "max_steps": 100, "dtype": dtype}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}})
    trl = None
    runs = []
    try:
        trl = TrlChild(spec)
        trl_ready = trl.ready
        log(f"rl_step: TRL ready in {trl_ready['load_s']:.1f} s ({trl_ready['versions']})")
        runs.append(compare(inputs[size], "grpo", settings, trl, reps, f"grpo-{size}", points, point_steps,
                            async_levels=[1, 2], block=1 if quick else 2))
        trl.close()
        trl = None
        runs.append(compare(inputs[size], "gae", settings, None, ppo_reps, f"ppo-{size}"))
        if not quick:
            inputs["tiny"] = prepare("tiny", settings["prompts"])
            runs.append(compare(inputs["tiny"], "grpo", settings, None, 2, "grpo-tiny"))
        # before / after: the GRPO step as the product ran it before the optimisations, same run and machine
        runs.append(compare(inputs[size], "grpo", settings, None, ppo_reps + 1, f"grpo-{size}-before", extra=BEFORE))
    finally:
        if trl is not None:
            trl.close()
        ray.shutdown()
    peak_after = matmul_peak(dtype)
    peak = max(peak_before["best_gflops"], peak_after["best_gflops"])
    log(f"rl_step: {dtype} matmul peak after {peak_after['best_gflops']:.1f} GFLOP/s (best)")

    def util(rows: list[dict], side: str, estimator: str, model: str, old_logprobs: str = "sampler") -> dict:
        fl = [step_flops(inputs[model]["params"], s["tokens"], side, estimator, old_logprobs) for s in rows]
        rates = [f["total"] / s["seconds"] / 1e9 for f, s in zip(fl, rows)]
        return {"median_step_gflop": median([f["total"] for f in fl]) / 1e9, "median_gflops": median(rates),
                "utilisation": median(rates) / peak,
                "gflop_by_phase_median": {k: median([f[k] for f in fl]) / 1e9 for k in fl[0]}}

    for res in runs:
        res["flops_ours"] = util(res["ours"], "ours", res["estimator"], res["model"], res["old_logprobs"])
        if "trl" in res:
            res["flops_trl"] = util(res["trl"], "trl", "grpo", res["model"])
        for row in res["sweep"]:
            row["flops_ours"] = util(row["rows"], "ours", "grpo", row["model"], res["old_logprobs"])
        for a in res.get("async", {}).values():
            a["flops_ours"] = util(a["steps"], "ours", res["estimator"], res["model"], res["old_logprobs"])
    grpo, ppo, before = runs[0], runs[1], runs[-1]
    grpo["before_after"] = {"before_overrides": BEFORE,
                            "before_median_step_s": before["ours_summary"]["median_step_s"],
                            "after_median_step_s": grpo["ours_summary"]["median_step_s"],
                            "speedup": before["ours_summary"]["median_step_s"] / grpo["ours_summary"]["median_step_s"],
                            "before_phases_s": before["ours_summary"]["median_phases_s"],
                            "after_phases_s": grpo["ours_summary"]["median_phases_s"]}
    ppo["step_time_vs_trl_grpo"] = grpo["trl_summary"]["median_step_s"] / ppo["ours_summary"]["median_step_s"]
    headline = {"speedup_vs_trl": grpo["speedup_vs_trl"], "dtype": grpo["dtype"], "trl_dtype": dtype,
                "model": size,
                "ours_grpo_median_step_s": grpo["ours_summary"]["median_step_s"],
                "trl_grpo_median_step_s": grpo["trl_summary"]["median_step_s"],
                "ours_ppo_median_step_s": ppo["ours_summary"]["median_step_s"],
                "ours_grpo_tokens_per_s": grpo["ours_summary"]["median_tokens_per_s"],
                "trl_grpo_tokens_per_s": grpo["trl_summary"]["median_tokens_per_s"],
                "flops_utilisation_ours_grpo": grpo["flops_ours"]["utilisation"],
                "flops_utilisation_ours_ppo": ppo["flops_ours"]["utilisation"],
                "flops_utilisation_trl_grpo": grpo["flops_trl"]["utilisation"],
                "matmul_peak_gflops": peak,
                "speedup_vs_before": grpo["before_after"]["speedup"],
                # asynchronous rollout (issue #15): the same PPORun switched between staleness 0, 1, 2
                "async_speedup": grpo["async_speedup"], "async_best_staleness": grpo["async_best_staleness"],
                "ours_grpo_async_median_step_s": {k: a["summary"]["median_step_s"] for k, a in grpo["async"].items()},
                "speedup_vs_trl_best": grpo["speedup_vs_trl_best"],
                "idle_sync": grpo["ours_summary"]["median_idle"],
                "idle_async": {k: a["summary"]["median_idle"] for k, a in grpo["async"].items()},
                # CPU-seconds every process of a side used per step, and how many cores that kept busy
                "cpu_s_per_step": {"sync": grpo["ours_summary"].get("median_cpu_s"),
                                   **{f"async{k}": a["summary"].get("median_cpu_s") for k, a in grpo["async"].items()},
                                   "trl": grpo["trl_summary"].get("median_cpu_s")},
                "cores_busy": {"sync": grpo["ours_summary"].get("median_cores_busy"),
                               **{f"async{k}": a["summary"].get("median_cores_busy") for k, a in grpo["async"].items()},
                               "trl": grpo["trl_summary"].get("median_cores_busy")},
                "coordinator_cpu_s_per_step": grpo["ours_summary"].get("median_coordinator_cpu_s"),
                # rl_step: both sides fp32; rl_step_bf16: both bf16 (a CPU with bf16 units), issue #16's 1.3x row
                "cpu_bf16": cpu_bf16(),
                # issue #15: TRL bf16 / the product's best configuration (target 2.0); #16: the synchronous step (1.3)
                "speedup_vs_trl_bf16": grpo["speedup_vs_trl_best"] if dtype == "bfloat16" else None,
                "sync_speedup_vs_trl_bf16": grpo["speedup_vs_trl"] if dtype == "bfloat16" else None,
                "targets": {"speedup_vs_trl_ge_2": grpo["speedup_vs_trl"] >= 2.0,
                            "flops_utilisation_ge_0.5": grpo["flops_ours"]["utilisation"] >= 0.5,
                            "async_speedup_ge_1.4": grpo["async_speedup"] >= 1.4,
                            "idle_lt_0.25": max(max(a["summary"]["median_idle"].values())
                                                for a in grpo["async"].values()) < 0.25}}
    results = {"headline": headline, "runs": runs,
               "peak": {"before": peak_before, "after": peak_after, "peak_gflops": peak},
               "trl_child": {"ready": trl_ready, "spec": spec},
               "inputs": {k: {"params": v["params"], "rm_parameters": v["rm_parameters"],
                              "prompt_tokens": v["prompt_tokens"]} for k, v in inputs.items()}}
    return config, results


# --------------------------------------------------------------------------- README section
def _before_after_lines(grpo: dict) -> list[str]:
    ba = grpo.get("before_after")
    if not ba:  # recorded before the before/after run existed
        return []
    ph_b, ph_a = ba["before_phases_s"], ba["after_phases_s"]
    phases = ", ".join(f"{p} {ph_b[p]:.2f} → {ph_a[p]:.2f}" for p in ("generate", "score", "train", "sync"))
    return [f"Before / after (same run): the GRPO step with `{' '.join(ba['before_overrides'])}` (the previous "
            f"defaults) took {ba['before_median_step_s']:.1f} s, with the current ones "
            f"{ba['after_median_step_s']:.1f} s: **{ba['speedup']:.2f}×** ({phases} s)."]


def _async_lines(h: dict) -> list[str]:
    if "async_speedup" not in h:  # recorded before asynchronous rollout existed
        return []
    idle = "; ".join(f"staleness {k}: engines {100 * v['engines']:.0f} %, trainer {100 * v['trainer']:.0f} %"
                     for k, v in {"0": h["idle_sync"], **h["idle_async"]}.items())
    bf16 = (f"**{h['speedup_vs_trl_bf16']:.2f}×** for the best configuration (target ≥ 2.0 — "
            f"**{'met' if h['speedup_vs_trl_bf16'] >= 2.0 else 'missed'}**), **{h['sync_speedup_vs_trl_bf16']:.2f}×** "
            f"for the synchronous step (target ≥ 1.3 — **{'met' if h['sync_speedup_vs_trl_bf16'] >= 1.3 else 'missed'}"
            "**)" if h.get("speedup_vs_trl_bf16") else
            "see rl_step_bf16 (both sides bf16, on a CPU with bf16 units)" if h["cpu_bf16"]["bf16"] else
            "not measured: this CPU has no bf16 units (no avx512_bf16 / amx_bf16), so both sides ran fp32, "
            "the best precision here")
    return [f"Asynchronous rollout (the same PPORun switched between steps; old log-probs from the sampler): "
            f"**{h['async_speedup']:.2f}×** the synchronous step at max_staleness {h['async_best_staleness']} "
            f"(target ≥ 1.4 — **{'met' if h['targets']['async_speedup_ge_1.4'] else 'missed'}**); best product "
            f"configuration vs TRL: {h['speedup_vs_trl_best']:.2f}×; vs TRL in bf16: {bf16}. Median idle share of "
            f"a step ({idle}; target < 25 % for both under async — "
            f"**{'met' if h['targets']['idle_lt_0.25'] else 'missed'}**).  ", *_cpu_lines(h)]


def _cpu_lines(h: dict) -> list[str]:
    busy, cpu = h.get("cores_busy") or {}, h.get("cpu_s_per_step") or {}
    if not busy or None in busy.values():  # recorded before the CPU accounting existed
        return []
    sides = ", ".join(f"{side} {cpu[side]:.1f} core-s ({busy[side]:.2f} cores)" for side in busy)
    return [f"CPU per step, every process of a side (/proc; the product: its actors and the driver): {sides}; "
            f"the coordinator itself {h['coordinator_cpu_s_per_step']:.2f} s.  "]


def _phase_cells(s: dict) -> str:
    ph = s["median_phases_s"]
    return " | ".join(f"{ph[p]:.2f}" for p in [*PHASES, "overhead"])


def readme_table(rec: dict) -> list[str]:
    res, c, st = rec["results"], rec["config"], rec["config"]["settings"]
    h, peak = res["headline"], res["peak"]
    grpo, ppo = res["runs"][0], res["runs"][1]
    pol = res["inputs"][h["model"]]["params"]["policy"]
    ready = res["trl_child"]["ready"]
    lines = [f"### {rec['name']} — one GRPO / PPO step of the product vs TRL `GRPOTrainer`, {c['dtype']} "
             f"(`{rec['_file']}`)", "",
             *header(rec),
             f"Policy `{h['model']}` ({ready['policy_parameters'] / 1e6:.2f} M parameters, {pol['layers']} layers), "
             f"2-layer Llama reward model ({res['inputs'][h['model']]['rm_parameters'] / 1e6:.2f} M), "
             f"{st['prompts']} built-in held-out prompts × {st['samples_per_prompt']} samples, ≤ "
             f"{st['max_new_tokens']} new tokens (stop at EOS), temperature {st['temperature']:g}, KL β "
             f"{st['beta']:g}, lr {st['lr']:g}, one optimiser step per batch, {c['dtype']} on both sides; TRL "
             f"{ready['versions']['trl']} with HF `generate` and {ready['torch_threads']} torch threads. "
             "Untimed warm-up step on each side, then steps alternating (ours, TRL), (TRL, ours), …; medians. "
             "Model FLOPs per step = 2·N per token for each forward (generation, reference, reward, critic values, "
             "and the old-log-prob pass where it runs), 6·N per token for each training step, N = matmul parameters, "
             f"over prompt + response tokens; peak = the best {c.get('dtype', 'float32')} `torch.mm` 2048² timed in "
             "the same process for "
             f"3 s before and after the benchmark ({peak['before']['best_gflops']:.1f} and "
             f"{peak['after']['best_gflops']:.1f} GFLOP/s, {peak['before']['torch_threads']} threads): "
             f"{peak['peak_gflops']:.1f} GFLOP/s.", "",
             "| side | algorithm | timed steps | median step s | generated tokens / step | tokens/s "
             f"| model GFLOP / step | GFLOP/s | of {c.get('dtype', 'float32')} peak | TRL step time / this step time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def row(side, algo, s, fl, ratio):
        return (f"| {side} | {algo} | {s['steps']} | {s['median_step_s']:.1f} | {s['median_response_tokens']:,.0f} | "
                f"{s['median_tokens_per_s']:,.0f} | {fl['median_step_gflop']:,.0f} | {fl['median_gflops']:.1f} | "
                f"{100 * fl['utilisation']:.0f} % | {ratio} |")

    lines += [row("product (PPORun.step)", "GRPO", grpo["ours_summary"], grpo["flops_ours"],
                  f"**{grpo['speedup_vs_trl']:.2f}×**"),
              row("TRL GRPOTrainer", "GRPO", grpo["trl_summary"], grpo["flops_trl"], "1.00×"),
              row("product (PPORun.step)", "PPO (GAE, critic)", ppo["ours_summary"], ppo["flops_ours"],
                  f"{ppo['step_time_vs_trl_grpo']:.2f}× (not alternated)")]
    for k, a in grpo.get("async", {}).items():
        ratio = grpo["trl_summary"]["median_step_s"] / a["summary"]["median_step_s"]
        lines.append(row(f"product, asynchronous rollout (max_staleness {k})", "GRPO", a["summary"], a["flops_ours"],
                         f"{ratio:.2f}×"))
    paired = ", ".join(f"{x:.2f}" for x in grpo["paired_speedups"])
    lines += ["", f"Paired TRL / product GRPO step-time ratios: {paired}; tokens/s ratio of medians "
                  f"{grpo['tokens_per_s_ratio']:.2f}×.  ",
              f"Targets: speedup vs TRL ≥ 2.0 — **{'met' if h['targets']['speedup_vs_trl_ge_2'] else 'missed'}** "
              f"({h['speedup_vs_trl']:.2f}×); FLOPs utilisation ≥ 50 % end to end — "
              f"**{'met' if h['targets']['flops_utilisation_ge_0.5'] else 'missed'}** "
              f"({100 * h['flops_utilisation_ours_grpo']:.0f} % for GRPO).", "",
              *_async_lines(h), *_before_after_lines(grpo), "",
              "Step breakdown of the product (seconds, medians; `score` = reference and reward (and critic values "
              "for PPO; old log-probs in the *before* row) computed in parallel by their groups; `train` = the "
              "policy (and critic) "
              "optimiser step; `sync` = trainer → vLLM weight sync; overhead = step wall time − the phases):", "",
              "| model | algorithm | prompts × samples | max new tokens | steps | step s | generate | score "
              f"| advantages | train | sync | overhead | tokens/s | of {c.get('dtype', 'float32')} peak |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = []
    for r in res["runs"]:
        algo = "GRPO" if r["estimator"] == "grpo" else "PPO"
        if r.get("tag", "").endswith("-before"):
            algo += " *before*"
        rows.append((r["model"], algo, r["prompts"], r["max_new_tokens"], r["ours_summary"], r["flops_ours"]))
        for p in r["sweep"]:
            rows.append((p["model"], algo, p["prompts"], p["max_new_tokens"], p, p["flops_ours"]))
    for model, algo, prompts, tokens, s, fl in rows:
        lines.append(f"| {model} | {algo} | {prompts} × {st['samples_per_prompt']} | {tokens} | {s['steps']} | "
                     f"{s['median_step_s']:.2f} | {_phase_cells(s)} | {s['median_tokens_per_s']:,.0f} | "
                     f"{100 * fl['utilisation']:.0f} % |")
    return lines + [""]
