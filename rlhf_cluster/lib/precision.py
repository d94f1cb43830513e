"""Which dtype the models compute in: `precision: auto | fp32 | bf16` (every job's config).

`auto` takes bf16 where the hardware has it — on GPUs, and on CPUs whose flags show bf16 matrix support
(avx512_bf16 / amx_bf16: measured on an Intel Xeon with AMX, a 2048² matmul ran 6.6x faster in bf16) —
and fp32 elsewhere (without those units bf16 is emulated and slower than fp32). A model whose own `dtype`
is set keeps it. Trainers keep fp32 master weights under DeepSpeed's bf16 (rlhf_cluster.lib.deepspeed_setup).
"""

from __future__ import annotations

import os
from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU flags torch may use here: /proc/cpuinfo's (empty where it is not there), less the AVX-512 and AMX
    ones when torch is held below AVX-512 (`ATEN_CPU_CAPABILITY=avx2` or `default`): bf16 is then emulated."""
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    except OSError:
        pass
    capped = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if capped and not capped.startswith("avx512"):
        flags = {f for f in flags if not f.startswith(("avx512", "amx"))}
    return flags


def choose(precision: str, on_gpu: bool, flags: set[str]) -> tuple[str, str]:
    """(torch dtype name, why) for `precision` on this hardware."""
    if precision != "auto":
        return DTYPES[precision], f"precision={precision}"
    if on_gpu:
        return "bfloat16", "auto: the job's groups run on GPUs"
    found = sorted(f for f in BF16_CPU_FLAGS if f in flags)
    if found:
        return "bfloat16", f"auto: this CPU has bf16 units ({', '.join(found)})"
    return "float32", f"auto: this CPU has no bf16 units (no {' / '.join(BF16_CPU_FLAGS)}), so fp32 is faster"
