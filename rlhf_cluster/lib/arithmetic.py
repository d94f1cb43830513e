"""A verifiable task: arithmetic problems with exact answers, in four levels of difficulty.

    level 1  single-digit addition                "What is 3+4?"          7
    level 2  two-digit addition and subtraction   "What is 58-23?"        35
    level 3  single-digit by single-digit times   "What is 7*8?"          56
    level 4  two steps                            "What is (6+7)*4?"      52

Every prompt record carries its answer as `label` (and its `level`), so the shipped verifier
`rlhf_cluster.lib.reward_functions:exact_match` scores a response against it. Demonstrations state the
answer as "The answer is N." (level 4 shows the intermediate step first), which is what exact_match reads.
The splits are disjoint by problem; what trains (train), what chooses (val) and what is reported (test)
never share a question.

Build the data set:  python -m rlhf_cluster.lib.arithmetic build OUT [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

LEVELS = {1: "single-digit addition", 2: "two-digit addition and subtraction",
          3: "single-digit multiplication", 4: "two steps: (a+b)*c"}
# problems per level and split (fewer where a level has fewer distinct problems: level 1 has 100, level 3 81)
SPLIT_SIZES = {"train": 400, "val": 12, "test": 12}


def all_problems(level: int) -> list[tuple[str, int]]:
    """Every distinct (question, answer) of a level, in a fixed order."""
    if level == 1:
        return [(f"What is {a}+{b}?", a + b) for a in range(10) for b in range(10)]
    if level == 2:
        add = [(f"What is {a}+{b}?", a + b) for a in range(10, 100, 3) for b in range(10, 100, 7)]
        sub = [(f"What is {a}-{b}?", a - b) for a in range(10, 100, 3) for b in range(10, 100, 7) if a >= b]
        return add + sub
    if level == 3:
        return [(f"What is {a}*{b}?", a * b) for a in range(1, 10) for b in range(1, 10)]
    if level == 4:
        return [(f"What is ({a}+{b})*{c}?", (a + b) * c) for a in range(1, 10) for b in range(1, 10)
                for c in range(2, 10)]
    raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level}")


def solution(question: str, answer: int) -> str:
    """The demonstration: the answer stated the way exact_match reads it; level 4 shows its first step."""
    if question.startswith("What is ("):
        inner, _, factor = question.removeprefix("What is (").removesuffix("?").partition(")*")
        a, b = inner.split("+")
        return f"{inner} = {int(a) + int(b)}, and {int(a) + int(b)}*{factor} = {answer}. The answer is {answer}."
    return f"The answer is {answer}."


def split_problems(seed: int) -> dict[str, list[dict]]:
    """Each level's problems shuffled (seeded) and cut into train / val / test: val and test first, so the
    small levels still have held-out problems; the rest, up to its size, trains."""
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for level in LEVELS:
        problems = all_problems(level)
        rng.shuffle(problems)
        held = SPLIT_SIZES["val"] + SPLIT_SIZES["test"]
        parts = {"val": problems[:SPLIT_SIZES["val"]], "test": problems[SPLIT_SIZES["val"]:held],
                 "train": problems[held:held + SPLIT_SIZES["train"]]}
        for split, rows in parts.items():
            out[split] += [{"question": q, "answer": a, "level": level} for q, a in rows]
    for rows in out.values():
        rng.shuffle(rows)
    return out


def build(out: Path, seed: int = 0) -> dict[str, int]:
    """prompts_{train,val,test}.jsonl (messages, label, level) and sft_{train,val}.jsonl (the demonstrations
    of the train problems, a few held back for the SFT stage's validation loss); returns row counts."""
    splits = split_problems(seed)
    user = [{"role": "user", "content": ""}]

    def prompt(p: dict) -> dict:
        return {"messages": [dict(user[0], content=p["question"])], "label": str(p["answer"]), "level": p["level"]}

    def demo(p: dict) -> dict:
        return {"messages": [{"role": "user", "content": p["question"]},
                             {"role": "assistant", "content": solution(p["question"], p["answer"])}]}

    n_sft_val = len(splits["train"]) // 20
    files = {f"prompts_{split}.jsonl": [prompt(p) for p in rows] for split, rows in splits.items()}
    files["sft_train.jsonl"] = [demo(p) for p in splits["train"][n_sft_val:]]
    files["sft_val.jsonl"] = [demo(p) for p in splits["train"][:n_sft_val]]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, out / name)
    (out / "task.json").write_text(json.dumps({"task": "arithmetic", "seed": seed, "levels": LEVELS,
                                               "split_sizes": SPLIT_SIZES}) + "\n")
    return {name: len(rows) for name, rows in files.items()}


def corpus(seed: int = 0) -> list[str]:
    """Texts a tokenizer for this task is trained on: the train split's questions and demonstrations only."""
    return [t for p in split_problems(seed)["train"] for t in (p["question"], solution(p["question"], p["answer"]))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rlhf_cluster.lib.arithmetic")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the arithmetic task's prompts (with labels) and demonstrations as JSONL")
    b.add_argument("out", type=Path)
    b.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name, n in build(args.out, args.seed).items():
        print(f"{args.out / name}: {n} rows")


if __name__ == "__main__":
    main()
