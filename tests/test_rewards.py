"""Verifiable rewards: labels in prompt data, reward functions beside reward models and endpoints
(`rewards:` in a PPO config), the shipped exact-match verifier, and what happens when a function fails."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray

from rlhf_cluster.lib.config import CONFIG_DIR, ConfigError, PPOConfig, RSConfig, load_config
from rlhf_cluster.lib.data import DataError, encode_prompt, load_tokenized
from rlhf_cluster.lib.reward_functions import exact_match, final_answer, load_function, normalise

MATH = "tests/data/math_prompts.jsonl"


# --------------------------------------------------------------------------- the verifier, configs, data
def test_exact_match_reads_the_final_answer():
    responses = ["The answer is 42.", r"so \boxed{1/2}", "2+2 = 4", "#### 1,000", "no idea", "x = 3.0",
                 "Answer: Paris", "7, not 8", r"\boxed{8} or maybe 7"]
    labels = ["42", "0.5", 4, "1000", "1", 3, "paris", "8", "8"]
    labels[7] = "7"  # "7, not 8": the last number is the answer
    assert exact_match([""] * 9, responses, labels) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert final_answer("The answer is 5<|end|>") == "5" and final_answer("x = 3</s>") == "3"
    assert final_answer("nothing here") is None and normalise("1,000.") == "1000" == normalise(1000.0)
    assert normalise(" Paris ") == "paris" and normalise("4/2") == normalise("2")
    assert normalise(1e-05) == normalise("0.00001") and normalise("2.5e3") == "2500"


def test_a_hostile_label_or_answer_cannot_make_exact_match_compute_for_long():
    """Fraction("1e100000000") would compute 10**100000000 holding the GIL for minutes, past any timeout."""
    import time

    t0 = time.monotonic()
    huge = "9" * 10**6
    assert exact_match(["q"] * 4, ["answer: 1e100000000", "\\boxed{1e100000000}", huge, "7"],
                       ["1e100000000", "1e100000000", huge, "1e100000000"]) == [1.0, 1.0, 1.0, 0.0]
    assert normalise("1e100000000") == "1e100000000"  # read as text: equal only to the same text
    assert time.monotonic() - t0 < 1.0


def test_reward_sources_are_checked_before_anything_starts():
    ok = load_config(PPOConfig, None, ["rewards=[{name: exact, fn: 'rlhf_cluster.lib.reward_functions:exact_match'}]"])
    assert ok.needs_labels() and ok.rewards[0].weight == 1.0
    for overrides, message in [
        (["rewards=[{name: a}]"], "needs exactly one of model, fn, url"),
        (["rewards=[{name: a, fn: x.y:z, url: 'http://h'}]"], "needs exactly one"),
        (["rewards=[{name: a, fn: 'no_such_module_zz:f'}]"], "cannot import 'no_such_module_zz'"),
        (["rewards=[{name: a, fn: 'rlhf_cluster.lib.reward_functions:nope'}]"], "has no callable 'nope'"),
        (["rewards=[{name: a, fn: 'just_a_name'}]"], "must look like 'package.module:function'"),
        (["rewards=[{name: a, url: 'ftp://h'}]"], "url must start with http"),
        (["rewards=[{name: a, model: m}, {name: a, model: n}]"], "names must be unique"),
        (["rewards=[{name: a, model: m}]", "reward.path=/x"], "rewards replaces reward / reward_service"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(PPOConfig, None, overrides)
    with pytest.raises(ConfigError, match="rewards replaces reward_models"):
        load_config(RSConfig, None, ["rewards=[{name: a, model: m}]", "reward_models=[{name: b, path: /m}]"])


def test_prompt_records_carry_labels(tokenizer, tmp_path):
    rows, report = load_tokenized(MATH, tokenizer, "prompts", 64)
    assert len(rows) == 8 and rows[0]["label"] == "5" and "label" not in rows[5]
    assert rows[0]["messages"] == [{"role": "user", "content": "What is 2+3?"}]  # a plain `prompt` string
    assert rows[0]["prompt_ids"] == encode_prompt(tokenizer, rows[0]["messages"])
    # a function that reads labels: the unlabelled row is counted and skipped, or an error naming it
    rows, report = load_tokenized(MATH, tokenizer, "prompts", 64, require_label=True)
    assert len(rows) == 7 and report.skipped == {"missing_label": 1} and report.examples["missing_label"] == [5]
    with pytest.raises(DataError, match=r"math_prompts.jsonl, record 5: missing label"):
        load_tokenized(MATH, tokenizer, "prompts", 64, "error", require_label=True)
    other = tmp_path / "answers.jsonl"
    other.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}], "answer": 4}) + "\n")
    rows, _ = load_tokenized(other, tokenizer, "prompts", 64, keys={"label": "answer"}, require_label=True)
    assert rows[0]["label"] == 4
    with pytest.raises(DataError, match="no field 'messages' or 'prompt'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"question": "2+2?"}) + "\n")
        load_tokenized(bad, tokenizer, "prompts", 64)
    assert load_function("tests.reward_fns:label_length")([""], [""], ["abc"]) == [3.0]


# --------------------------------------------------------------------------- the reward actors
class _Recorder(BaseHTTPRequestHandler):
    """A reward endpoint speaking OpenRLHF's /get_reward: records each body, answers 1.0 per query."""

    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Recorder.bodies.append(body)
        out = json.dumps({"rewards": [1.0] * len(body["query"])}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _samples(tokenizer, rows):
    """Engine-shaped samples, two per prompt, with a short response each."""
    out = []
    for i, row in enumerate(rows):
        for text in ("5", "I think 17"):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            out.append({"prompt_index": i, "prompt_ids": row["prompt_ids"], "response_ids": ids})
    return out


@pytest.mark.ray
def test_reward_sources_sum_models_functions_and_endpoints(ray_cluster, builtin_assets, tokenizer, endpoint):
    from rlhf_cluster.actors.group import ActorGroup
    from rlhf_cluster.actors.scorers import RewardModel, RewardSources
    from rlhf_cluster.lib.config import GroupResources
    from rlhf_cluster.rl.rollout import reward_context

    rows, _ = load_tokenized(MATH, tokenizer, "prompts", 64, require_label=True)
    rows = rows[:3]
    samples, context = _samples(tokenizer, rows), reward_context(rows)
    res = GroupResources(num_cpus_per_rank=0.25)
    sources = [{"name": "len", "fn": "tests.reward_fns:label_length", "weight": 2.0},
               {"name": "sum", "fn": "tests.reward_fns:prompt_and_label", "weight": 1.0},
               {"name": "rm", "model": str(builtin_assets.reward_base), "weight": 0.5},
               {"name": "remote", "url": endpoint, "weight": 0.25}]
    group = ActorGroup(RewardSources, res, sources, str(builtin_assets.base), name="reward-sources")
    rm = ActorGroup(RewardModel, res, str(builtin_assets.reward_base), name="reward-model")
    try:
        _Recorder.bodies.clear()
        got = ray.get(group.actors[0].score_samples.remote(samples, context))
        rm_scores = ray.get(rm.actors[0].score_samples.remote(samples))
        # label "5" (1 char) / "17" / "8": 2 x len + 1 (a+b == label) + 0.5 x rm + 0.25 x 1.0 (the endpoint)
        lengths = [1, 1, 2, 2, 1, 1]
        want = [2 * n + 1.0 + 0.5 * r + 0.25 for n, r in zip(lengths, rm_scores)]
        assert got == pytest.approx(want, abs=1e-5)
        # the endpoint got each sample's rendered prompt and its label, as OpenRLHF's protocol defines
        body = _Recorder.bodies[-1]
        assert body["labels"] == ["5", "5", "17", "17", "8", "8"]
        assert body["prompts"][2] == tokenizer.decode(rows[1]["prompt_ids"], skip_special_tokens=False)
        assert body["query"][2].startswith(body["prompts"][2]) and len(body["query"]) == 6
    finally:
        group.shutdown()
        rm.shutdown()


@pytest.mark.ray
def test_llama2_rule_over_sources_and_their_tracked_metrics(ray_cluster, builtin_assets, tokenizer):
    """combine=llama2 takes the safety term where the prompt is flagged or the safety score is below the threshold,
    else helpfulness; training calls (track=True) leave per-source means and the functions' extra metrics for
    the coordinator, evaluation calls none."""
    from rlhf_cluster.actors.group import ActorGroup
    from rlhf_cluster.actors.scorers import RewardSources
    from rlhf_cluster.lib.config import GroupResources
    from rlhf_cluster.rl.rollout import reward_context

    rows, _ = load_tokenized(MATH, tokenizer, "prompts", 64, require_label=True)
    samples, context = _samples(tokenizer, rows[:3]), reward_context(rows[:3])
    assert not any(c["unsafe"] for c in context)
    context[1]["unsafe"] = True  # as a record with "unsafe": true gives
    sources = [{"name": "helpfulness", "fn": "tests.reward_fns:helpfulness"},
               {"name": "safety", "fn": "tests.reward_fns:safety"},
               {"name": "extra", "fn": "tests.reward_fns:with_metrics"}]
    group = ActorGroup(RewardSources, GroupResources(num_cpus_per_rank=0.25), sources, str(builtin_assets.base),
                       combine="llama2", safety_threshold=0.15, name="reward-llama2")
    try:
        actor = group.actors[0]
        assert ray.get(actor.score_samples.remote(samples, context)) == [2.0, -5.0, 3.0, -5.0, 2.0, -5.0]
        assert ray.get(actor.drain_metrics.remote()) == {}  # an untracked (evaluation) call
        ray.get(actor.score_samples.remote(samples, context, track=True))
        got = ray.get(actor.drain_metrics.remote())
        # responses "5" and "I think 17", three times: length mean (1 + 10) / 2
        assert got == {"reward/helpfulness": [12.0, 6], "reward/safety": [-6.0, 6], "reward/extra": [6.0, 6],
                       "reward/extra/length": [33.0, 6]}
        assert ray.get(actor.drain_metrics.remote()) == {}
    finally:
        group.shutdown()
    with pytest.raises(ConfigError, match="combine=llama2 needs rewards named 'helpfulness' and 'safety'"):
        load_config(PPOConfig, None, ["combine=llama2", "rewards=[{name: h, fn: 'tests.reward_fns:helpfulness'}]"])


@pytest.mark.ray
@pytest.mark.parametrize("fn,message", [
    ("raises", r"reward function 'f' \(tests.reward_fns:raises\) raised ValueError: the verifier is broken"),
    ("nan", r"returned non-finite values at 2 of 2 responses \(first: nan at 0\)"),
    ("hangs", r"did not return within 1 s"),
])
def test_a_failing_function_is_a_clear_error_and_the_actor_lives_on(ray_cluster, builtin_assets, tokenizer, fn,
                                                                     message):
    from rlhf_cluster.actors.group import ActorGroup
    from rlhf_cluster.actors.scorers import RewardSources
    from rlhf_cluster.lib.config import GroupResources
    from rlhf_cluster.lib.reward_functions import RewardFunctionError
    from rlhf_cluster.rl.rollout import reward_context

    rows, _ = load_tokenized(MATH, tokenizer, "prompts", 64)
    samples, context = _samples(tokenizer, rows[:1]), reward_context(rows[:1])
    sources = [{"name": "f", "fn": f"tests.reward_fns:{fn}", "timeout_s": 1.0}]
    group = ActorGroup(RewardSources, GroupResources(num_cpus_per_rank=0.25), sources, str(builtin_assets.base),
                       name=f"reward-{fn}")
    try:
        with pytest.raises(RewardFunctionError, match=message):
            ray.get(group.actors[0].score_samples.remote(samples, context))
        assert group.run("ping") == [0]  # the actor is alive and answers (a hung call keeps only its thread)
    finally:
        group.shutdown()


@pytest.mark.ray
def test_a_run_skips_the_iteration_a_function_fails_and_goes_on(ray_cluster, builtin_assets, tmp_path, monkeypatch):
    """PPO on labelled prompts with a function reward: the iteration whose reward call fails is skipped and
    counted, the run keeps its state and finishes; the labels reached the function. Its advantages come from a
    test-only estimator registered as one row of lib/algorithms.py's table: adding an estimator is one function
    and one row, and the job runs it."""
    from rlhf_cluster.lib import algorithms as A
    from rlhf_cluster.ppo import run
    from tests.reward_fns import CALLS

    seen = []

    def batch_mean_baseline(x: A.AdvantageInputs):
        """A = score - the batch's mean score, on every token (no critic, no groups)."""
        scores = x.rewards.sum(-1)
        seen.append(scores)
        return (scores - scores.mean()).unsqueeze(-1) * x.mask.to(scores.dtype), None

    monkeypatch.setitem(A.ESTIMATORS, "batch_mean_baseline", A.Estimator(batch_mean_baseline))
    CALLS.unlink(missing_ok=True)
    out = tmp_path / "fn-run"
    cfg = load_config(PPOConfig, None, [
        f"policy.path={builtin_assets.base}", f"output_dir={out}", f"registry={out / 'registry'}",
        f"data.train={MATH}", f"data.eval={MATH}", "estimator=batch_mean_baseline", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=8", "prompts_per_iteration=4", "iterations=3", "eval_every=3", "checkpoint_every=1",
        "trainer.num_ranks=1", "ray.num_cpus=4",
        "rewards=[{name: short, fn: 'tests.reward_fns:fails_on_second_batch'}]"])
    lines: list[str] = []
    summary = run(cfg, log=lines.append)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # after iteration 0
    assert [bool(r.get("skipped")) for r in rows] == [False, True, False]
    assert "reward function 'short' (tests.reward_fns:fails_on_second_batch) raised RuntimeError: second batch fails" \
        in rows[1]["skip_reason"]
    assert summary["iterations"] == 3 and summary["faults"]["reward_errors"] == 1
    assert any("7 samples kept, skipped 1 missing_label" in line for line in lines)  # the unlabelled prompt
    assert 0.0 < rows[0]["reward/rm_score"] <= 1.0  # the function's 1 - length / 100
    assert rows[0]["reward/short"] == pytest.approx(rows[0]["reward/rm_score"])  # the one source, tracked
    assert len(seen) == 2  # the two iterations that were not skipped took their advantages from the row
    assert all(s.dim() == 1 and len(s) >= 2 and s.isfinite().all() for s in seen)  # one total reward per sample


# --------------------------------------------------------------------------- the arithmetic task's data
def test_arithmetic_task_data(tmp_path, tokenizer):
    from rlhf_cluster.lib import arithmetic

    counts = arithmetic.build(tmp_path, seed=0)
    splits = arithmetic.split_problems(0)
    assert splits == arithmetic.split_problems(0) and splits != arithmetic.split_problems(1)  # seeded
    questions = {name: {p["question"] for p in rows} for name, rows in splits.items()}
    assert not (questions["train"] & questions["val"] or questions["train"] & questions["test"]
                or questions["val"] & questions["test"])  # disjoint by problem
    for name in ("val", "test"):
        assert sorted({p["level"] for p in splits[name]}) == [1, 2, 3, 4] and len(splits[name]) == 48
    # each level's first 48 shuffled problems (40 of level 3's 81) are the held-out candidates: level 1 trains on 52
    assert sum(p["level"] == 1 for p in splits["train"]) == 52 and sum(p["level"] == 3 for p in splits["train"]) == 41
    assert counts["prompts_train.jsonl"] == len(splits["train"]) == 52 + 400 + 41 + 400
    # every fact a held-out question needs is a step of some training demonstration
    taught = {f for p in splits["train"] for f in arithmetic.steps(p["question"], p["answer"])}
    for name in ("val", "test"):
        assert all(set(arithmetic.steps(p["question"], p["answer"])) <= taught for p in splits[name])
    # the demonstrations are what the shipped verifier accepts, for every problem of every split
    for rows in splits.values():
        demos = [arithmetic.solution(p["question"], p["answer"]) for p in rows]
        assert exact_match([p["question"] for p in rows], demos, [str(p["answer"]) for p in rows]) == [1.0] * len(rows)
    assert arithmetic.solution("What is 3+4?", 7) == "3+4 = 7. The answer is 7."
    assert arithmetic.solution("What is 58+23?", 81) == "8+3 = 11, 5+2+1 = 8. The answer is 81."
    assert arithmetic.solution("What is 78+53?", 131) == "8+3 = 11, 7+5+1 = 13. The answer is 131."
    assert arithmetic.solution("What is 41+23?", 64) == "1+3 = 4, 4+2 = 6. The answer is 64."
    assert arithmetic.solution("What is (6+7)*4?", 52) == "6+7 = 13, 13*4 = 52. The answer is 52."
    rows, report = load_tokenized(tmp_path / "prompts_test.jsonl", tokenizer, "prompts", 64, "error",
                                  require_label=True)
    assert len(rows) == 48 and rows[0]["label"] == str(splits["test"][0]["answer"])
    sft = [json.loads(x) for x in (tmp_path / "sft_train.jsonl").read_text().splitlines()]
    assert len(sft) + counts["sft_val.jsonl"] == counts["prompts_train.jsonl"]
    assert {m["role"] for m in sft[0]["messages"]} == {"user", "assistant"}


def test_pass_at_k_against_hand_computed_values():
    from rlhf_cluster.lib.gold import pass_at_k

    # n=4 samples, c=1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6; pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    # n=8, c=2, k=3: 1 - C(6,3)/C(8,3) = 1 - 20/56
    assert pass_at_k(8, 2, 3) == pytest.approx(1 - 20 / 56)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_arithmetic_task_needs_a_verifier_and_gets_exact_match_for_evaluation():
    with pytest.raises(ConfigError, match="builtin.task=arithmetic has no reward model"):
        load_config(PPOConfig, None, ["builtin.task=arithmetic"])
    cfg = load_config(PPOConfig, "configs/verifiable-grpo.yaml", [])
    assert cfg.verifier() == "rlhf_cluster.lib.reward_functions:exact_match" and cfg.needs_labels()
    # with a learned reward model only, the built-in task's verifier still judges evaluations
    cfg = load_config(PPOConfig, None, ["builtin.task=arithmetic", "reward.path=/some/rm"])
    assert cfg.verifier() == "rlhf_cluster.lib.reward_functions:exact_match" and not cfg.needs_labels()
    assert load_config(PPOConfig, None, []).verifier() is None  # the helpful task: its gold scorer
    with pytest.raises(ConfigError, match="cannot import"):
        load_config(PPOConfig, None, ["eval_verifier=no_such_module:f"])


@pytest.fixture(scope="module")
def arithmetic_assets(builtin_cfg):
    from rlhf_cluster.lib.builtin import ensure_builtin

    return ensure_builtin(builtin_cfg.model_copy(update={"task": "arithmetic"}))


def test_arithmetic_assets_split_digits(arithmetic_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(arithmetic_assets.base)
    pieces = [tok.decode([i]) for i in tok("What is 58-23?")["input_ids"]]
    assert pieces[-6:] == ["5", "8", "-", "2", "3", "?"]  # one token per digit
    assert "arithmetic" in arithmetic_assets.root.name and (arithmetic_assets.data / "prompts_test.jsonl").exists()


def test_preference_stages_refuse_the_arithmetic_task(builtin_cfg, arithmetic_assets):
    from rlhf_cluster import dpo, reward
    from rlhf_cluster.lib.config import DPOConfig, RewardConfig

    for module, cls in ((reward, RewardConfig), (dpo, DPOConfig)):
        cfg = load_config(cls, None, ["builtin.task=arithmetic", f"builtin.cache_dir={builtin_cfg.cache_dir}",
                                      "model.path=/any/model"])
        with pytest.raises(ConfigError, match="the built-in arithmetic task has no preferences data"):
            module.resolve(cfg)


@pytest.mark.ray
@pytest.mark.long
def test_arithmetic_run_reports_pass_at_k_per_level(ray_cluster, builtin_cfg, arithmetic_assets, tmp_path):
    """configs/verifiable-grpo.yaml on the built-in arithmetic task, shortened and from the random base model:
    the evaluation judges with exact_match (greedy accuracy as gold, per level, pass@1 and pass@k), the summary
    and the report say so. (That GRPO raises pass@1 is a results-run target: docs/results-verifiable.md.) The
    random base model answers nothing right, so every group scores alike and the preset's dynamic sampling would
    skip the iteration: it is off here (tests/test_ppo.py runs it)."""
    from rlhf_cluster.ppo import run

    out = tmp_path / "arith"
    cfg = load_config(PPOConfig, "configs/verifiable-grpo.yaml", [
        f"policy.path={arithmetic_assets.base}", f"output_dir={out}", f"registry={out / 'registry'}",
        f"builtin.cache_dir={builtin_cfg.cache_dir}", "iterations=1", "eval_every=1", "eval_samples_per_prompt=2",
        "prompts_per_iteration=4", "rollout.samples_per_prompt=2", "trainer.num_ranks=1",
        "dynamic_sampling.enabled=false"])
    lines: list[str] = []
    summary = run(cfg, log=lines.append)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for split in ("val", "test"):
        assert {f"{split}/pass@1", f"{split}/pass@2", f"{split}/gold", f"{split}/accuracy/level_4"} <= rows[1].keys()
        assert f"{split}/helpfulness" not in rows[1]  # the helpful task's aspects mean nothing here
        assert 0.0 <= rows[1][f"{split}/pass@1"] <= rows[1][f"{split}/pass@2"] <= 1.0
    assert summary["k"] == 2 and set(summary["accuracy_by_level_final"]) == {"1", "2", "3", "4"}
    assert summary["gold_final"] == rows[1]["test/gold"] and "pass@2_final" in summary
    text = "\n".join(lines)
    assert "greedy accuracy (test):" in text and "pass@2 (test):" in text and "by level (greedy):" in text
    assert (out / "report.png").stat().st_size > 10_000


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.long
def test_a_rejection_sampling_round_keeps_what_a_reward_function_scores_best(ray_cluster, builtin_assets, tmp_path):
    """`rewards:` in a rejection-sampling round: the reward actors score every sample with the function (here:
    shorter is better), given its prompt and label, and the round keeps per prompt the sample it scored highest."""
    from rlhf_cluster import rejection_sampling

    out = tmp_path / "rs"
    rejection_sampling.run(load_config(RSConfig, CONFIG_DIR / "rejection-sampling-tiny.yaml", [
        f"policy.path={builtin_assets.base}", f"output_dir={out}", f"registry={out / 'registry'}",
        f"builtin.cache_dir={builtin_assets.root.parent}",
        "rewards=[{name: short, fn: 'tests.reward_fns:short', needs_label: false}]",
        "rs.prompts_per_round=8", "rs.samples_per_prompt=4", "rs.epochs=1", "best_of_k_eval=[1]",
        "best_of_k_seeds=1"]))
    kept = [json.loads(line) for line in (out / "round_1" / "selected.jsonl").read_text().splitlines()]
    assert 0 < len(kept) <= 8
    # the function's score of the kept response, 1 - characters / 100: the function read it decoded from its
    # tokens, selected.jsonl keeps the engine's text, and on an untrained model's byte soup the two can differ by
    # a replacement character or two (seen: 0.63 against 0.64)
    for row in kept:
        assert row["reward"] == pytest.approx(1 - len(row["messages"][-1]["content"]) / 100, abs=0.03), row
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["selected_mean_reward"] >= rows[1]["all_mean_reward"]  # the best of 4, by the function
