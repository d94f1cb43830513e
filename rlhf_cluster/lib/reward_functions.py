"""Reward functions: Python callables that score responses against labels (verifiable rewards).

A reward function takes three lists of one length and returns one float per response:

    def my_reward(prompts: list[str], responses: list[str], labels: list) -> list[float]

`prompts` are the last user turns (the problems), `responses` the sampled answers (special tokens
removed), `labels` the data's label values (any JSON value: a reference answer, unit tests, ...).
It may instead return `{"rewards": [...], "metrics": {"name": [one float per response], ...}}`: the
metrics are logged as `reward/<source>/<name>` means (OpenRLHF's `extra_logs`). A config names one as
`fn: "package.module:function"` in `rewards:`; the reward actors import it and call it batched, with a
timeout (rlhf_cluster/actors/scorers.py). `exact_match` below is the one the built-in
verifiable task uses.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from fractions import Fraction


def load_function(spec: str) -> Callable:
    """`package.module:function` -> the callable, with a clear error for each way it can be wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module_name} has no callable {attr!r}")
    return fn


class RewardFunctionError(RuntimeError):
    """A reward function raised, ran past its timeout, or returned something other than one finite float
    per response. The coordinator skips the iteration and counts it (docs/reliability.md)."""


class FunctionReward:
    """A reward function called batched with a timeout (the reward actors, the reward service).

    The call runs in a worker thread: past `timeout_s` the coordinator gets a RewardFunctionError, and a
    fresh thread serves later calls (the stuck call cannot be stopped from Python; it is abandoned)."""

    def __init__(self, name: str, spec: str, timeout_s: float):
        from concurrent.futures import ThreadPoolExecutor

        self.name, self.spec, self.timeout_s = name, spec, timeout_s
        self.fn = load_function(spec)
        self.last_metrics: dict[str, list[float]] = {}  # the extra metrics of the last call, per response
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"reward-{name}")

    def __call__(self, prompts: list[str], responses: list[str], labels: list) -> list[float]:
        import math
        from concurrent.futures import ThreadPoolExecutor
        from concurrent.futures import TimeoutError as Timeout

        who = f"reward function {self.name!r} ({self.spec})"
        future = self.pool.submit(self.fn, prompts, responses, labels)
        try:
            out = future.result(timeout=self.timeout_s)
        except Timeout:
            self.pool.shutdown(wait=False)
            self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"reward-{self.name}")
            raise RewardFunctionError(f"{who} did not return within {self.timeout_s:g} s") from None
        except Exception as e:
            raise RewardFunctionError(f"{who} raised {type(e).__name__}: {e}") from None
        metrics = {}
        if isinstance(out, dict):
            if "rewards" not in out:
                raise RewardFunctionError(f"{who} returned a dict without 'rewards' (keys: {sorted(out)})")
            out, metrics = out["rewards"], out.get("metrics") or {}
            try:
                metrics = {str(k): [float(x) for x in v] for k, v in metrics.items()}
            except (TypeError, ValueError, AttributeError):
                raise RewardFunctionError(f"{who}: 'metrics' must map names to lists of floats") from None
            wrong = [k for k, v in metrics.items() if len(v) != len(responses)]
            if wrong:
                raise RewardFunctionError(f"{who}: metrics {wrong} do not have one value per response")
        try:
            values = [float(x) for x in out]
        except (TypeError, ValueError):
            raise RewardFunctionError(f"{who} must return a list of floats, returned {type(out).__name__}") from None
        if len(values) != len(responses):
            raise RewardFunctionError(f"{who} returned {len(values)} values for {len(responses)} responses")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise RewardFunctionError(f"{who} returned non-finite values at {len(bad)} of {len(values)} "
                                      f"responses (first: {values[bad[0]]} at {bad[0]})")
        self.last_metrics = metrics
        return values


_MARKUP = re.compile(r"<[^<>\s]*>")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_STATED = re.compile(r"(?:answer(?: is)?|####)\s*[:=]?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
# what normalise reads as a number: bounded digits and exponent, because Fraction("1e100000000") computes
# 10**100000000 while holding the GIL (minutes), and a timeout cannot stop it
_PLAIN_NUMBER = re.compile(r"-?\d{1,40}(?:\.\d{1,40})?(?:[eE][-+]?\d{1,3})?(?:/\d{1,40})?")


def final_answer(response: str) -> str | None:
    """The answer a response gives: the last \\boxed{...}, else what follows the last "answer (is)" or
    "####", else its last number; None when there is none. Special-token markup (`<|eot|>`, `</s>`) is
    dropped first: a served verifier sees responses decoded with it."""
    response = _MARKUP.sub("", response)
    for pattern in (_BOXED, _STATED):
        found = pattern.findall(response)
        if found:
            return found[-1].strip()
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def normalise(answer) -> str:
    """Exact-match form: numbers as reduced fractions (2, 2.0, 4/2 and 1,000 vs 1000 compare equal), other
    text lower-cased without spaces, `$` and a trailing period. Only numbers of at most 40 digits per part and
    exponents of at most 3 digits count as numbers: a label or response from a client cannot make it compute for
    long."""
    text = str(answer).strip().rstrip(".").replace("$", "").strip()
    number = text.replace(",", "").replace(" ", "")
    if _PLAIN_NUMBER.fullmatch(number):
        try:
            return str(Fraction(number))
        except ZeroDivisionError:
            pass
    return re.sub(r"\s+", "", text.lower())


def exact_match(prompts: list[str], responses: list[str], labels: list) -> list[float]:
    """1.0 where the response's final answer equals the label after normalisation, else 0.0."""
    out = []
    for response, label in zip(responses, labels, strict=True):
        answer = final_answer(response)
        out.append(float(answer is not None and normalise(answer) == normalise(label)))
    return out
