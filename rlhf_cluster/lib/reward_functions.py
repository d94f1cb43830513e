"""Reward functions: Python callables that score responses against labels (verifiable rewards).

A reward function takes three lists of one length and returns one float per response:

    def my_reward(prompts: list[str], responses: list[str], labels: list) -> list[float]

`prompts` are the last user turns (the problems), `responses` the sampled answers (special tokens
removed), `labels` the data's label values (any JSON value: a reference answer, unit tests, ...).
A config names one as `fn: "package.module:function"` in `rewards:`; the reward actors import it and
call it batched, with a timeout (actors/scorers.py). `exact_match` below is the one the built-in
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


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_STATED = re.compile(r"(?:answer(?: is)?|####)\s*[:=]?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def final_answer(response: str) -> str | None:
    """The answer a response gives: the last \\boxed{...}, else what follows the last "answer (is)" or
    "####", else its last number; None when there is none."""
    for pattern in (_BOXED, _STATED):
        found = pattern.findall(response)
        if found:
            return found[-1].strip()
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def normalise(answer) -> str:
    """Exact-match form: numbers as reduced fractions (2, 2.0, 4/2 and 1,000 vs 1000 compare equal), other
    text lower-cased without spaces, `$` and a trailing period."""
    text = str(answer).strip().rstrip(".").replace("$", "").strip()
    number = text.replace(",", "").replace(" ", "")
    try:
        return str(Fraction(number))
    except (ValueError, ZeroDivisionError):
        return re.sub(r"\s+", "", text.lower())


def exact_match(prompts: list[str], responses: list[str], labels: list) -> list[float]:
    """1.0 where the response's final answer equals the label after normalisation, else 0.0."""
    out = []
    for response, label in zip(responses, labels, strict=True):
        answer = final_answer(response)
        out.append(float(answer is not None and normalise(answer) == normalise(label)))
    return out
