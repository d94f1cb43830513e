"""Reward functions the tests name in `rewards: [{fn: "tests.reward_fns:..."}]` (the Ray workers import
them from the repository root, their working directory, as a user's module is imported from theirs)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path


def label_length(prompts: list[str], responses: list[str], labels: list) -> list[float]:
    """Depends on the label only: shows which label reached each response."""
    return [float(len(str(label))) for label in labels]


def prompt_and_label(prompts: list[str], responses: list[str], labels: list) -> list[float]:
    """1.0 where the label is the prompt's answer as the test data writes it ("What is a+b?" -> a+b)."""
    out = []
    for prompt, label in zip(prompts, labels):
        a, b = prompt.removeprefix("What is ").removesuffix("?").split("+")
        out.append(float(int(a) + int(b) == int(label)))
    return out


def raises(prompts, responses, labels):
    raise ValueError("the verifier is broken")


def hangs(prompts, responses, labels):
    time.sleep(30)
    return [0.0] * len(responses)


def nan(prompts, responses, labels):
    return [float("nan")] * len(responses)


CALLS = Path(tempfile.gettempdir()) / "rlhf-cluster-tests-reward-calls"  # the test removes it before a run


def fails_on_second_batch(prompts, responses, labels):
    """Raises on the second call with 8 responses (a training batch of 4 prompts x 2 samples in the test; its
    evaluations score 7 or 28), counted in CALLS across processes; else 1 - length / 100."""
    if len(responses) == 8:
        n = int(CALLS.read_text()) + 1 if CALLS.exists() else 1
        CALLS.write_text(str(n))
        if n == 2:
            raise RuntimeError("second batch fails")
    return [1.0 - len(r) / 100.0 for r in responses]


def short(prompts, responses, labels):
    """Shorter is better: 1 - characters / 100."""
    return [1.0 - len(r) / 100.0 for r in responses]


def helpfulness(prompts, responses, labels):
    return [2.0] * len(responses)


def safety(prompts, responses, labels):
    """Unsafe-looking (below Llama 2's threshold, logit 0.15 = -1.73) where the response hedges."""
    return [-5.0 if r.startswith("I think") else 3.0 for r in responses]


def with_metrics(prompts, responses, labels):
    """OpenRLHF-style: rewards and per-response extra metrics."""
    return {"rewards": [1.0] * len(responses), "metrics": {"length": [float(len(r)) for r in responses]}}


SLOW_CALLS = Path(tempfile.gettempdir()) / "rlhf-cluster-tests-slow-reward-calls"  # removed by the test


def slow_logged(prompts, responses, labels):
    """1 - length / 100, after 1.5 s, with "start PID KEY" and "end PID KEY" lines in SLOW_CALLS around it (KEY: a
    hash of the responses): a test sees a call in flight, kills its process, and sees the same call again in the
    restarted actor."""
    key = hashlib.sha256(json.dumps(responses).encode()).hexdigest()[:12]
    with SLOW_CALLS.open("a") as fh:
        fh.write(f"start {os.getpid()} {key}\n")
    time.sleep(1.5)
    with SLOW_CALLS.open("a") as fh:
        fh.write(f"end {os.getpid()} {key}\n")
    return [1.0 - len(r) / 100.0 for r in responses]
