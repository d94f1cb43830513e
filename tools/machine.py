"""The machine a record was made on, as bench/ and experiments/ write it into their JSON: one copy, since neither
may import the other. Standard library only: vLLM's worker process imports bench.common, and with it this."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo; None where there is none (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name, or what the platform says where /proc has none."""
    return cpu_model() or platform.processor() or platform.machine()


def usable_cpus() -> int:
    """The cores this process may run on (its affinity, e.g. a container's share), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> dict:
    """Platform, Python, CPUs and memory: the `machine` record of every benchmark JSON."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus()}
    model = cpu_model()
    if model is not None:
        info["cpu_model"] = model
    try:
        mem = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()}
        info["memory_gib"] = round(mem["MemTotal"] / 2**20, 1)
        info["memory_available_gib"] = round(mem["MemAvailable"] / 2**20, 1)
    except (OSError, KeyError, ValueError):
        pass
    return info
