"""A verifiable task: arithmetic problems with exact answers, in four levels of difficulty.

    level 1  single-digit addition              "What is 3+4?"     "3+4 = 7. The answer is 7."
    level 2  two-digit addition, digit by digit "What is 58+23?"   "8+3 = 11, 5+2+1 = 8. The answer is 81."
    level 3  single-digit multiplication        "What is 7*8?"     "7*8 = 56. The answer is 56."
    level 4  two steps                          "What is (6+7)*4?" "6+7 = 13, 13*4 = 52. The answer is 52."

Every prompt record carries its answer as `label` (and its `level`), so the shipped verifier
`rlhf_cluster.lib.reward_functions:exact_match` scores a response against it. A demonstration writes each step
as an equation ("a fact") and ends with "The answer is N.", which is what exact_match reads.

The splits are disjoint by question: what trains (train), what chooses (val) and what is reported (test) never
share one. The base model starts from random weights and knows only what the train split shows it, so a held-out
question is one whose every fact some training demonstration writes out (`steps`), in a combination no
training question has: level 1's "3+4 = 7" is a step of a level 2 demonstration, level 4's two steps are the
steps of other level 4 problems. The held-out splits measure how reliably a policy carries out the procedure on
new questions, which is what RL on the train split can improve; a fact nothing taught, no policy could know.

Build the data set:  python -m rlhf_cluster.lib.arithmetic build OUT [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rlhf_cluster.lib.files import write_atomic

LEVELS = {1: "single-digit addition", 2: "two-digit addition, digit by digit",
          3: "single-digit multiplication", 4: "two steps: (a+b)*c"}
# held-out problems per level and split; "train" is the most each level trains on (level 1 and 3 have fewer)
SPLIT_SIZES = {"train": 400, "val": 12, "test": 12}


def all_problems(level: int) -> list[tuple[str, int]]:
    """Every distinct (question, answer) of a level, in a fixed order."""
    if level == 1:
        return [(f"What is {a}+{b}?", a + b) for a in range(10) for b in range(10)]
    if level == 2:
        return [(f"What is {a}+{b}?", a + b) for a in range(10, 100) for b in range(10, 100)]
    if level == 3:
        return [(f"What is {a}*{b}?", a * b) for a in range(1, 10) for b in range(1, 10)]
    if level == 4:
        return [(f"What is ({a}+{b})*{c}?", (a + b) * c) for a in range(1, 10) for b in range(1, 10)
                for c in range(2, 10)]
    raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level}")


def steps(question: str, answer: int) -> list[str]:
    """The facts a demonstration writes out, in order, as equations ("8+3 = 11", "13*4 = 52")."""
    expr = question.removeprefix("What is ").removesuffix("?")
    if expr.startswith("("):  # (a+b)*c
        inner, _, factor = expr[1:].partition(")*")
        a, b = inner.split("+")
        s = int(a) + int(b)
        return [f"{inner} = {s}", f"{s}*{factor} = {answer}"]
    op = "*" if "*" in expr else "+"
    a, b = expr.split(op)
    if len(a) == 2 and len(b) == 2:  # two-digit addition: units, then tens with the carry
        units = int(a[1]) + int(b[1])
        tens = f"{a[0]}+{b[0]}+1" if units >= 10 else f"{a[0]}+{b[0]}"
        return [f"{a[1]}+{b[1]} = {units}", f"{tens} = {int(a[0]) + int(b[0]) + units // 10}"]
    return [f"{expr} = {answer}"]


def solution(question: str, answer: int) -> str:
    """The demonstration: its steps, then the answer the way exact_match reads it."""
    return f"{', '.join(steps(question, answer))}. The answer is {answer}."


def split_problems(seed: int) -> dict[str, list[dict]]:
    """Each level's problems shuffled (seeded); the first are candidates to hold out, the next (up to
    SPLIT_SIZES['train']) train. A candidate is held out (val first, then test) only if every one of its facts is
    a step of some training demonstration; candidates that are not covered are left out of every split."""
    rng = random.Random(seed)
    held = SPLIT_SIZES["val"] + SPLIT_SIZES["test"]
    candidates, train = {}, []
    for level in LEVELS:
        problems = all_problems(level)
        rng.shuffle(problems)
        n_candidates = min(2 * held, len(problems) // 2)
        candidates[level] = problems[:n_candidates]
        train += [{"question": q, "answer": a, "level": level}
                  for q, a in problems[n_candidates:n_candidates + SPLIT_SIZES["train"]]]
    taught = {f for p in train for f in steps(p["question"], p["answer"])}
    out: dict[str, list[dict]] = {"train": train, "val": [], "test": []}
    for level, problems in candidates.items():
        covered = [(q, a) for q, a in problems if set(steps(q, a)) <= taught][:held]
        if len(covered) < held:
            raise RuntimeError(f"level {level}: only {len(covered)} of {held} held-out candidates are covered")
        out["val"] += [{"question": q, "answer": a, "level": level} for q, a in covered[:SPLIT_SIZES["val"]]]
        out["test"] += [{"question": q, "answer": a, "level": level} for q, a in covered[SPLIT_SIZES["val"]:]]
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
        write_atomic(out / name, "".join(json.dumps(r) + "\n" for r in rows))
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
