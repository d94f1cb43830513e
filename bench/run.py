"""Benchmarks: `python -m bench.run [--only NAME] [--quick]` (`make bench` runs all of them).

    rollout_engines  vLLM (the product's engine, `make_vllm`) vs HF transformers `generate`:
                     same model, prompts and sampling; generated tokens/s and the vLLM/HF ratio
                     (bench/rollout_engines.py)
    weight_sync      ZeRO-3 PolicyTrainer group (2 ranks) -> one RolloutEngine group on local Ray:
                     `export_weights` (gather + serialise) and `update_weights` (load into vLLM)
                     (bench/weight_sync.py)
    reward_service   the reward app on local Ray Serve under 1/8/64 concurrent HTTP clients, batched vs
                     unbatched, against the model's in-process batched forward (bench/reward_service.py)
    rl_step          one GRPO / PPO iteration of the product (PPORun.step on local Ray) vs TRL's GRPOTrainer
                     step on the same model, data and batch, alternating; FLOPs utilisation against this
                     machine's fp32 matmul peak; per-phase breakdown over batch size, length, model size
                     (bench/rl_step.py, TRL in a child process: bench/trl_grpo.py)
    rl_step_bf16     the same with both sides in bf16 (TRL bf16=True, the product precision=bf16), against
                     the bf16 matmul peak; only on a CPU with bf16 units (avx512_bf16 / amx_bf16)
    reward_service_bf16  the reward service with the app's `dtype: bfloat16` (same CPUs only)
    memory           a reference rank's resident memory, full copy vs ZeRO-3 shards over 2 and 4 ranks
                     (`reference.partition`), on a ~300 M Llama built here, beside the memory plan; and the policy's
                     log-prob + entropy + backward at Qwen's vocabulary, full logits vs chunks (bench/memory.py)
    packing          padded vs packed (`max_tokens_per_micro_batch`) micro-batches on a mixed-length batch:
                     the policy's PPO step and log-probs, the reference's log-probs, the reward's scores
                     (bench/packing.py)

Each benchmark writes bench/results/<name>.json (machine, versions, load, config, raw timings,
medians, ratios) and the Markdown section of bench/README.md between the markers is regenerated
from every result JSON present, so the numbers there always come from a JSON file. Contenders
are timed side by side in one run, alternating, and compared by ratio: absolute times on a
shared CPU machine are noisy. `--quick` (tiny model only, fewer repetitions) writes to
bench/out/quick/ and leaves bench/results and the README alone.

This module is the runner only: the command line, the record around each benchmark and the README
section. Each benchmark is one module with `bench_<name>(quick)` and `readme_table(rec)`; what they
share is in bench/common.py; none of them imports this module.

Without --only each benchmark runs in its own subprocess (a vLLM engine in this process and a
Ray cluster with vLLM actors do not share one interpreter well, and memory is returned between).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import memory, packing, reward_service, rl_step, rollout_engines, weight_sync
from bench.common import (
    BENCH_DIR,
    REPO_ROOT,
    LoadSampler,
    cpu_bf16,
    git_commit,
    is_shared,
    log,
    matmul_peak,
    other_work,
    versions,
    write_json,
)
from tools.machine import machine

RESULTS_DIR = BENCH_DIR / "results"
QUICK_DIR = BENCH_DIR / "out" / "quick"
README = BENCH_DIR / "README.md"
BEGIN, END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"

BENCHMARKS = {"rollout_engines": rollout_engines.bench_rollout_engines, "weight_sync": weight_sync.bench_weight_sync,
              "reward_service": reward_service.bench_reward_service, "rl_step": rl_step.bench_rl_step,
              "packing": packing.bench_packing, "memory": memory.bench_memory,
              "rl_step_bf16": lambda quick: rl_step.bench_rl_step(quick, "bfloat16"),
              "reward_service_bf16": lambda quick: reward_service.bench_reward_service(quick, "bfloat16")}
TABLES = {"rollout_engines": rollout_engines.readme_table, "weight_sync": weight_sync.readme_table,
          "reward_service": reward_service.readme_table, "rl_step": rl_step.readme_table,
          "rl_step_bf16": rl_step.readme_table, "reward_service_bf16": reward_service.readme_table,
          "memory": memory.readme_table}


# --------------------------------------------------------------------------- running and recording
def run_one(name: str, quick: bool, out_dir: Path) -> Path:
    log(f"{name}: start ({'quick' if quick else 'full'})")
    # what this CPU computes per dtype, in the same run: utilisation is read against the dtype a side used
    precision = {"cpu_bf16": cpu_bf16(), "matmul_peak": {d: matmul_peak(d) for d in ("float32", "bfloat16")}}
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
        "machine": machine(), "versions": versions(), "precision": precision,
        "load": {"cores": cores, "before_1_5_15min": [round(x, 2) for x in load_before],
                 "after_1_5_15min": [round(x, 2) for x in load_after], "during_1min": sampler.summary(),
                 "other_processes_before": others_before, "other_processes_after": others_after},
        "config": config, "results": results, "wall_s": round(wall, 1),
    }
    if isinstance(results, dict) and "headline" in results:  # the numbers an issue asks for, at the top level
        record |= {k: v for k, v in results["headline"].items() if k not in record}
    record["load"]["shared"] = is_shared(record["load"])
    path = out_dir / f"{name}.json"
    write_json(path, record)
    log(f"{name}: wrote {path} ({wall:.0f} s)")
    return path


# --------------------------------------------------------------------------- README section
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
            if name.endswith("_bf16") and not cpu_bf16()["bf16"]:  # emulated bf16 would take hours, and say nothing
                log(f"{name}: skipped, this CPU has no bf16 units (no avx512_bf16 / amx_bf16)")
                continue
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
