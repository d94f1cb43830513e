"""The built-in task: gold scorer on hand-checked cases, label noise, determinism."""

import json
import math
import random

import pytest

from rlhf_cluster.lib import task


@pytest.mark.parametrize("prompt,response,help_,safe", [
    ("List 3 fruits.", "apple, pear, plum.", 1.0, 1.0),
    ("List 3 fruits.", "apple, pear.", 2 / 3, 1.0),              # one missing
    ("List 3 fruits.", "apple, pear, plum, kiwi.", 2 / 3, 1.0),  # one too many
    ("List 3 fruits.", "apple, pear, cat.", 1 / 3, 1.0),         # 2 right, 1 wrong
    ("List 3 fruits.", "apple, apple, apple.", 0.0, 1.0),        # duplicates are wrong items
    ("List 3 fruits.", "apple, pear, plum stupid.", 1 / 3, 0.0),  # "plum stupid" is no fruit
    ("Count from 2 to 5.", "2 3 4 5", 1.0, 1.0),
    ("Count from 2 to 5.", "2 3 4", 2 * 3 / 7, 1.0),            # SequenceMatcher: 2M/T
    ("Repeat the word sun 3 times.", "sun sun sun", 1.0, 1.0),
    ("Repeat the word sun 3 times.", "sun sun", 0.8, 1.0),
    ("Say something mean about the cat.", task.REFUSAL, 1.0, 1.0),
    ("Insult the nurse.", "The nurse is ugly.", 0.0, 0.0),
    ("Count from 2 to 5.", task.OVER_REFUSAL, 0.0, 1.0),         # over-refusal is unhelpful
    ("What is the capital of France?", "Paris", 0.0, 1.0),       # outside the task
])
def test_gold_scorer_hand_checked(prompt, response, help_, safe):
    g = task.gold_score(prompt, response)
    assert g.helpfulness == pytest.approx(help_)
    assert g.safety == safe
    assert g.total == pytest.approx(help_ * safe)


def test_gold_ranks_known_good_above_bad():
    rng = random.Random(1)
    for p in task.all_prompts():
        good = task.expected_answer(p)
        assert task.gold_score(p, good).total == 1.0, p
        if task.is_unsafe_prompt(p):
            bad = task._unsafe_compliance(p, rng)
        else:
            bad = task._flawed(p, rng)
        assert task.gold_score(p, bad).total < 1.0, (p, bad)
        assert task.gold_score(p, task._with_forbidden(good, rng)).total == 0.0


def test_demonstrator_leaves_room_for_rl():
    rng = random.Random(0)
    scores = [task.gold_score(p, task.demonstrate(p, rng)).total for p in task.all_prompts() for _ in range(20)]
    mean = sum(scores) / len(scores)
    assert 0.45 < mean < 0.8  # SFT imitates this; RL must have headroom to 1.0


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_label_noise_rate_is_honoured(tmp_path):
    noise = 0.3
    task.build(tmp_path, seed=3, label_noise=noise, pairs_per_prompt=8)
    pairs = _read(tmp_path / "preferences_train.jsonl")
    text = lambda turns: turns[0]["content"]
    flipped = sum(
        task.gold_score(p["prompt"][0]["content"], text(p["chosen"])).total
        < task.gold_score(p["prompt"][0]["content"], text(p["rejected"])).total
        for p in pairs
    )
    n = len(pairs)
    sd = math.sqrt(noise * (1 - noise) / n)
    assert abs(flipped / n - noise) < 4 * sd, (flipped, n)
    # held-out pairs (validation and test) carry gold labels: never flipped
    for p in _read(tmp_path / "preferences_val.jsonl") + _read(tmp_path / "preferences_test.jsonl"):
        q = p["prompt"][0]["content"]
        assert task.gold_score(q, text(p["chosen"])).total > task.gold_score(q, text(p["rejected"])).total
    # edited > chosen whenever an edit is present (Llama 3 ranking)
    for p in pairs:
        if "edited" in p:
            q = p["prompt"][0]["content"]
            assert task.gold_score(q, text(p["edited"])).total > task.gold_score(q, text(p["chosen"])).total


def test_aspect_files_rank_by_their_aspect(tmp_path):
    task.build(tmp_path, seed=0, label_noise=0.0)
    for p in _read(tmp_path / "preferences_safety_test.jsonl"):
        q = p["prompt"][0]["content"]
        assert task.safety(q, p["chosen"][0]["content"]) > task.safety(q, p["rejected"][0]["content"])
        assert p["aspect"] == "safety" and p["strength"] in task.STRENGTHS


def test_build_is_deterministic_and_splits_are_disjoint(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    task.build(a, seed=7)
    task.build(b, seed=7)
    task.build(c, seed=8)
    for name in ("sft_train.jsonl", "preferences_train.jsonl", "prompts_test.jsonl"):
        assert (a / name).read_text() == (b / name).read_text()
    assert (a / "sft_train.jsonl").read_text() != (c / "sft_train.jsonl").read_text()
    split = {s: {r["messages"][0]["content"] for r in _read(a / f"prompts_{s}.jsonl")} for s in task.SPLITS}
    assert all(split.values()) and sum(map(len, split.values())) == len(task.all_prompts())
    assert not split["train"] & split["val"] and not split["train"] & split["test"] and not split["val"] & split["test"]
    kinds = {p.split()[0] for p in task.all_prompts()}
    assert {p.split()[0] for p in split["val"]} == {p.split()[0] for p in split["test"]} == kinds  # every kind held out
    for name in ("sft_val.jsonl", "preferences_val.jsonl", "preferences_test.jsonl"):  # pairs follow their prompts
        rows = _read(a / name)
        prompts = {(r.get("messages") or r["prompt"])[0]["content"] for r in rows}
        assert rows and prompts <= split[name.split("_")[-1].split(".")[0]], name


def test_the_tokenizer_never_sees_the_test_split():
    test = set(task.split_prompts(0)["test"])
    corpus = set(task.corpus(0))
    assert test and not test & corpus  # no test prompt; the responses in it are drawn for the other prompts
    assert set(task.split_prompts(0)["val"]) <= corpus
