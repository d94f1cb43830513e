"""The PPO job end to end on a real local Ray cluster, vLLM and DeepSpeed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cluster.lib.config import CONFIG_DIR, PPOConfig, load_config
from rlhf_cluster.lib.faults import POINTS
from rlhf_cluster.ppo import run
from rlhf_cluster.rl.batch import padded, response_part, trainer_item, unpadded
from rlhf_cluster.rl.checkpoints import latest_checkpoint

REPO = Path(__file__).resolve().parent.parent


def test_trainer_item_aligns_response_fields():
    s = {"prompt_ids": [1, 2, 3], "response_ids": [7, 8]}
    item = trainer_item(s, advantages=[0.5, -1.0])
    assert item["input_ids"] == [1, 2, 3, 7, 8]
    # position t predicts token t+1: tokens 7 and 8 are predicted at positions 2 and 3
    assert item["loss_mask"] == [0, 0, 1, 1] and item["advantages"] == [0.0, 0.0, 0.5, -1.0]
    assert response_part(s, [9.0, 9.0, 0.5, -1.0]) == [0.5, -1.0]
    x, mask = padded([[1.0, 2.0], [3.0]])
    assert x.tolist() == [[1.0, 2.0], [3.0, 0.0]] and mask.tolist() == [[1, 1], [1, 0]]
    assert unpadded(x, [2, 1]) == [[1.0, 2.0], [3.0]]


def _smoke(builtin_assets, out, *extra):
    return load_config(PPOConfig, CONFIG_DIR / "smoke.yaml", [
        f"policy.path={builtin_assets.base}", f"reward.path={builtin_assets.reward_base}",
        f"output_dir={out}", f"registry={out / 'registry'}", *extra])


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The package as a user installs it: a wheel built from this checkout, installed into a new virtual environment
    that sees this one's dependencies (a path file) but not the checkout. Returns the new environment's python."""
    where = tmp_path_factory.mktemp("wheel")
    src = where / "src"  # what the images copy (deploy/Dockerfile): the build's leftovers stay out of the checkout
    shutil.copytree(REPO / "rlhf_cluster", src / "rlhf_cluster", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(where / "dist"), str(src)], check=True, cwd=where)
    (wheel,) = (where / "dist").glob("rlhf_cluster-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where / "venv")], check=True)
    python = where / "venv" / "bin" / "python"
    (site,) = (where / "venv" / "lib").glob("python3*/site-packages")
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "dependencies.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True)
    probe = "import rlhf_cluster.rl, rlhf_cluster.actors.rollout as r; print(r.__file__)"
    found = subprocess.run([python, "-c", probe], cwd="/", capture_output=True, text=True, check=True).stdout.strip()
    assert found.startswith(str(site)), found  # the wheel's copy, not the checkout's
    return python


@pytest.fixture(scope="module")
def smoke_run(installed_wheel, builtin_assets, tmp_path_factory):
    """`python -m rlhf_cluster.ppo --config smoke` (configs/smoke.yaml, uninterrupted: every group, 3 iterations, a
    checkpoint each), run as a user runs it: from the installed wheel, in a directory outside the checkout, on a local
    Ray cluster of its own (whose workers import the wheel's code too)."""
    out = tmp_path_factory.mktemp("ppo-smoke")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    job = subprocess.run([installed_wheel, "-m", "rlhf_cluster.ppo", "--config", "smoke",
                          f"policy.path={builtin_assets.base}", f"reward.path={builtin_assets.reward_base}",
                          f"output_dir={out}", f"registry={out / 'registry'}"],
                         cwd="/", env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "=== PPO summary ===" in job.stdout
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.ray
def test_smoke_run_leaves_checkpoints_metrics_and_report(smoke_run):
    from rlhf_cluster.lib.registry import open_registry

    out, summary = smoke_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    for key in ("reward/rm_score", "kl/mean_sequence_kl", "policy/entropy", "policy/clip_frac",
                "critic/value_loss", "critic/explained_variance", "response/length",
                "time/generate", "time/score", "time/train", "time/sync", "policy/ptx_nll"):
        assert key in rows[1], key
    assert 0 < rows[1]["policy/ptx_nll"] < 10  # PPO-ptx (smoke.yaml: ptx_coef 0.1): NLL of SFT samples
    assert rows[1]["kl/mean_sequence_kl"] == pytest.approx(0.0, abs=1e-4)  # iteration 1: policy == reference
    # smoke.yaml recomputes the old log-probs; vLLM's agree with the trainer's (what old_logprobs=sampler relies on)
    assert all(r["rollout/logprob_gap"] < 1e-4 for r in rows[1:]), [r["rollout/logprob_gap"] for r in rows[1:]]
    assert "test/gold" in rows[0] and "val/gold" in rows[3] and "test/win_rate_vs_initial" in rows[3]
    assert (out / "report.png").stat().st_size > 10_000 and (out / "tensorboard").is_dir()
    assert summary["iterations"] == 3 and summary["report"] == str(out / "report.png")
    # keep_checkpoints=2: iterations 2 and 3 remain, complete and verified
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["iter_000002", "iter_000003"]
    assert latest_checkpoint(out) == out / "checkpoints" / "iter_000003"
    ckpt = out / "checkpoints" / "iter_000003"
    assert (ckpt / "hf" / "model.safetensors").exists() and (ckpt / "policy").is_dir() and (ckpt / "critic").is_dir()
    assert json.loads((ckpt / "coordinator.json").read_text())["iteration"] == 3
    entries = open_registry(out / "registry").list(kind="policy", stage="ppo")
    assert sorted(e.step for e in entries) == [1, 2, 3]


@pytest.mark.ray
def test_corrupt_checkpoint_is_skipped(smoke_run, tmp_path):
    out, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(out / "checkpoints", copy / "checkpoints")
    weights = copy / "checkpoints" / "iter_000003" / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert latest_checkpoint(copy) == copy / "checkpoints" / "iter_000002"
    (copy / "checkpoints" / "iter_000004.tmp").mkdir()  # a checkpoint whose write never finished
    assert latest_checkpoint(copy) == copy / "checkpoints" / "iter_000002"


# every point of a step (lib/faults.py), each with a poisoned ZeRO-3 partition and with a killed rank; the two
# policy ranks take turns
SUB_PHASE_FAULTS = [(point, fault, (i + (fault == "poison")) % 2) for i, point in enumerate(POINTS)
                    for fault in ("poison", "kill")]


@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_a_fault_at_any_point_of_a_step_rolls_back_to_the_clean_run(ray_cluster, smoke_run, builtin_assets, tmp_path,
                                                                    monkeypatch):
    """The smoke run again: a policy rank killed before the forward of iteration 1 (no checkpoint yet: the run restarts
    from the initial models), then a fault in each attempt at iteration 2 until every one in SUB_PHASE_FAULTS has
    rolled it back: a policy rank's weights poisoned or the rank SIGKILLed before the forward, between backward and
    optimiser step, after the step, during the weight export, while the engines load the weights, and while the
    checkpoint is written. Each is caught (PoisonedState, or the lost rank: the policy group is rebuilt), the run
    rolls back to checkpoint 1 and redoes iteration 2; the run then ends where the uninterrupted one does: every
    iteration's figures within 1e-4 and the final weights within 1e-5, and no checkpoint kept or registered holds a
    non-finite weight."""
    import ray

    from rlhf_cluster.lib import faults
    from rlhf_cluster.ppo import PPORun

    monkeypatch.setattr(faults, "_armed", {})
    plan, armed, lines = list(SUB_PHASE_FAULTS), [], []
    step = PPORun.step

    def engine_load_fault(actor, fault):
        if fault == "poison":
            ray.get(actor.poison_weights.remote())
        else:
            os.kill(ray.get(actor.placement.remote())["pid"], signal.SIGKILL)

    def step_with_a_fault(job):
        if job.iteration == 0 and not armed:
            armed.append(("before_forward", "kill", 0))
            ray.get(job.groups.policy.actors[0].arm_fault.remote("before_forward", "kill"))
        # iteration 2: the next fault is armed once the last one has rolled the run back to checkpoint 1
        if job.iteration == 1 and plan and len(armed) == job.faults["rollbacks"]:
            point, fault, rank = plan.pop(0)
            armed.append((point, fault, rank))
            actor = job.groups.policy.actors[rank]
            if point == "engine_load":  # the coordinator's side of the sync
                faults.arm(point, lambda: engine_load_fault(actor, fault))
            else:
                ray.get(actor.arm_fault.remote(point, fault))
        return step(job)

    def log(msg):
        lines.append(str(msg))
        print(msg, flush=True)

    monkeypatch.setattr(PPORun, "step", step_with_a_fault)
    out = tmp_path / "faults"
    n = len(SUB_PHASE_FAULTS) + 1
    summary = run(_smoke(builtin_assets, out, f"fault_tolerance.max_rollbacks={n}",
                         "fault_tolerance.ping_timeout_s=10"), log=log)

    assert armed[1:] == SUB_PHASE_FAULTS and summary["faults"]["rollbacks"] == n, (armed, summary["faults"])
    failures = [x for x in lines if " failed: " in x and "rollback" in x]
    assert len(failures) == n and failures[0].startswith("iteration 1 failed"), failures
    assert "restarted from the initial models (no checkpoint yet)" in lines
    assert all(x.startswith(("iteration 2 failed", "checkpoint 2 failed")) for x in failures[1:]), failures
    assert sum("PoisonedState" in x for x in failures) == len(SUB_PHASE_FAULTS) // 2, failures
    assert lines.count("rebuilding the policy group (2 ranks)") == len(SUB_PHASE_FAULTS) // 2 + 1, failures
    clean_out, clean = smoke_run
    got, want = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, clean_out))
    assert [r["iteration"] for r in got] == [0, 1, 2, 3]
    for a, b in zip(got, want):
        for key in ("reward/rm_score", "kl/mean_sequence_kl", "policy/loss", "critic/value_loss", "policy/ptx_nll",
                    "val/gold", "test/gold"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["iteration"], key)
    weights = [load_file(d / "checkpoints" / "iter_000003" / "hf" / "model.safetensors") for d in (out, clean_out)]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[1]) < 1e-5
    for name in ("iter_000002", "iter_000003"):  # the checkpoint write poisoned at iteration 2 was never completed
        kept = load_file(out / "checkpoints" / name / "hf" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in kept.values()), name
    from rlhf_cluster.lib.registry import open_registry

    entries = open_registry(out / "registry").list(kind="policy", stage="ppo")
    assert sorted(e.step for e in entries) == [1, 2, 3]


@pytest.fixture(scope="module")
def async_run(ray_cluster, builtin_assets, tmp_path_factory):
    """configs/smoke.yaml with asynchronous rollout (max_staleness 1), 4 iterations, uninterrupted; the critic and
    the reward model colocated (one placement group)."""
    out = tmp_path_factory.mktemp("ppo-async")
    lines = []
    summary = run(_smoke(builtin_assets, out, *ASYNC), log=lambda m: (lines.append(str(m)), print(m)))
    return out, summary, lines


ASYNC = ["async_rollout.max_staleness=1", "iterations=4", "eval_every=4", "colocate.critic_reward=true"]


@pytest.mark.ray
def test_async_run_trains_no_sample_older_than_the_bound(async_run):
    out, summary, lines = async_run
    assert "colocated: critic + reward_group" in lines, lines[:10]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4] and summary["iterations"] == 4
    # the policy version that sampled each trained batch, against the updates made before training on it
    staleness = [(r["iteration"] - 1) - r["rollout/policy_version"] for r in rows[1:]]
    assert staleness == [r["rollout/staleness"] for r in rows[1:]]
    # batch 1 was sampled by the initial weights and trained first; every later one was sampled while
    # the learner trained on the one before it: one version old, never more
    assert staleness == [0, 1, 1, 1] and summary["staleness_histogram"] == {"0": 1, "1": 3}
    first = rows[1]
    assert first["rollout/is_weight_mean"] == first["rollout/is_weight_max"] == 1.0  # on-policy: weights exactly 1
    assert first["rollout/is_clipped_frac"] == 0.0
    for r in rows[2:]:  # stale samples: pi_old / pi_behaviour, truncated at is_cap (2)
        assert 0 < r["rollout/is_weight_max"] <= 2.0 and 0 <= r["rollout/is_clipped_frac"] <= 1
        assert 0 <= r["idle/engines"] <= 1 and 0 <= r["idle/trainer"] <= 1
    # no batch is sampled past the last iteration: the final checkpoint has none in flight
    state = json.loads((out / "checkpoints" / "iter_000004" / "coordinator.json").read_text())
    assert state["in_flight"] == []


@pytest.mark.ray
def test_killed_job_resumes_like_the_uninterrupted_run(async_run, builtin_assets, tmp_path):
    """The job's driver (as under `ray job submit`), asynchronous, is SIGKILLed once checkpoint 2 exists. That
    checkpoint holds the batch in flight (sampled by version 1); run again with --resume, the job continues from
    the last complete checkpoint and trains on exactly that batch, and iterations 3-4 and the final weights match
    the uninterrupted asynchronous run of the same seed. (A synchronous job has nothing in flight: the same path
    with an empty queue; tests/test_multinode.py resumes one across nodes.)"""
    import ray

    from rlhf_cluster.ppo import main

    full_out, _, _ = async_run
    out = tmp_path / "killed"
    args = ["--config", str(CONFIG_DIR / "smoke.yaml"), f"policy.path={builtin_assets.base}",
            f"reward.path={builtin_assets.reward_base}", f"output_dir={out}", f"registry={out / 'registry'}", *ASYNC]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "rlhf_cluster.ppo", *args], cwd=REPO, env=env,
                                  stdout=log, stderr=log)
        try:
            deadline = time.time() + 600
            while not (out / "checkpoints" / "iter_000002").exists():
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                assert time.time() < deadline, "the job never wrote checkpoint 2"
                time.sleep(0.1)
            driver.send_signal(signal.SIGKILL)
        finally:
            driver.kill()
            driver.wait(30)
    assert latest_checkpoint(out).name == "iter_000002"  # a checkpoint 3 in flight is never chosen
    state = json.loads((out / "checkpoints" / "iter_000002" / "coordinator.json").read_text())
    assert [(b["index"], b["policy_version"], len(b["samples"])) for b in state["in_flight"]] == [(2, 1, 16)]

    main([*args, "--resume"])
    full = [json.loads(line) for line in (full_out / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in resumed] == [0, 1, 2, 3, 4]  # no gap, no duplicate
    for i in (3, 4):
        for key in ("reward/rm_score", "kl/mean_sequence_kl", "policy/loss", "response/length",
                    "rollout/policy_version", "rollout/is_weight_mean"):
            assert resumed[i][key] == pytest.approx(full[i][key], rel=1e-4, abs=1e-5), (i, key)
    for key in ("val/gold", "test/gold"):
        assert resumed[4][key] == pytest.approx(full[4][key], rel=1e-4, abs=1e-5), key
    a = load_file(full_out / "checkpoints" / "iter_000004" / "hf" / "model.safetensors")
    b = load_file(out / "checkpoints" / "iter_000004" / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert not torch.equal(a["lm_head.weight"], load_file(builtin_assets.base / "model.safetensors")["lm_head.weight"])


def _scripted_producer(scores_by_prompt: dict[int, list[float]], max_extra: int, want: int = 3):
    """A RolloutProducer whose engine and reward calls are replaced by scores fixed per prompt, to test the
    dynamic-sampling bookkeeping alone (the real engines run it in test_grpo_with_dapo_stabilisers_runs_in_bf16),
    and its first batch."""
    import random

    from rlhf_cluster.rl.rollout import Batch, PromptOrder, RolloutProducer

    class Scripted(RolloutProducer):
        def _send(self, batch):
            return batch

        def _collect(self, batch):
            batch.samples = [{"prompt_ids": [p["id"]], "response_ids": [1], "prompt_index": i}
                             for i, p in enumerate(batch.prompts) for _ in range(2)]
            batch.scores = {"score": [x for p in batch.prompts for x in scores_by_prompt[p["id"]]],
                            "ref": [[0.0] for p in batch.prompts for _ in range(2)]}

    cfg = PPOConfig(estimator="grpo", prompts_per_iteration=want, rollout={"samples_per_prompt": 2},
                    dynamic_sampling={"enabled": True, "max_extra_batches": max_extra})
    weights = type("Weights", (), {"policy_version": 0, "version": 0})()
    order = PromptOrder([{"id": i, "prompt_ids": [i]} for i in sorted(scores_by_prompt)], random.Random(0))
    producer = Scripted(None, weights, order, cfg, {})
    batch = Batch(0, order.take(want), 0, 0)
    producer._collect(batch)
    return producer, batch


def test_dynamic_sampling_fills_the_batch_and_stops_at_its_bound():
    scores = {i: ([0.0, 1.0] if i % 2 else [0.5, 0.5]) for i in range(12)}  # odd prompts informative
    producer, batch = _scripted_producer(scores, max_extra=2)
    metrics = producer.keep_informative(batch)
    ids = [p["id"] for p in batch.prompts]
    assert len(ids) == 3 and all(i % 2 for i in ids)  # filled with informative groups only, the excess dropped
    assert [s["prompt_index"] for s in batch.samples] == [0, 0, 1, 1, 2, 2]
    assert [s["prompt_ids"][0] for s in batch.samples] == [i for i in ids for _ in range(2)]
    assert batch.scores["score"] == [0.0, 1.0] * 3 and len(batch.scores["ref"]) == 6
    assert metrics["rollout/extra_batches"] >= 1 and metrics["rollout/informative_prompts"] == 3
    # every group alike: extra batches up to the bound, then an empty batch (the step skips it, counted)
    producer, batch = _scripted_producer({i: [1.0, 1.0] for i in range(12)}, max_extra=2)
    metrics = producer.keep_informative(batch)
    assert batch.samples == [] and metrics == {"rollout/filtered_frac": 1.0, "rollout/extra_batches": 2,
                                               "rollout/informative_prompts": 0}
    assert producer.order.pos == 9  # 3 batches of 3 prompts drawn, no more


@pytest.mark.ray
@pytest.mark.long
def test_grpo_with_dapo_stabilisers_runs_in_bf16(ray_cluster, builtin_assets, tmp_path):
    """Clip-higher, Dr. GRPO (no std scaling, constant normaliser), the overlong penalty and filter, dynamic
    sampling and the KL in the loss together through the real groups: every iteration trains, with their
    metrics; tracked in TensorBoard, MLflow and W&B. One run (a run's start costs most of a minute here) also
    shows explicit `precision=bf16`: every group in bf16 (DeepSpeed bf16 with fp32 master weights, vLLM, reference,
    reward) even on a CPU without bf16 units, where `auto` picks fp32 (tests/test_config.py), with the gap between
    the engine's and the trainer's log-probs of the same tokens recorded (docs/performance.md)."""
    lines: list[str] = []
    out = tmp_path / "dapo"
    summary = run(_smoke(builtin_assets, out, "estimator=grpo", "ptx_coef=0", "iterations=2", "eval_every=2",
                         "clip_eps_high=0.28", "loss_agg=sequence_sum_norm", "grpo_scale_by_std=false",
                         "overlong.buffer=4", "overlong.mask_truncated=true", "dynamic_sampling.enabled=true",
                         "kl_mode=loss", "tracking.backends=[tensorboard, mlflow, wandb]", "precision=bf16"),
                  log=lines.append)
    assert lines[0].startswith("precision: bfloat16 (precision=bf16); policy bfloat16, reward bfloat16"), lines[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["iterations"] == 2 and not any(r.get("skipped") for r in rows)
    # bf16 rounding: vLLM's and DeepSpeed's log-probs differ by far more than fp32's < 1e-4, and stay bounded
    print("bf16 log-prob gap per iteration:", [r["rollout/logprob_gap"] for r in rows[1:]])
    assert all(0 < r["rollout/logprob_gap"] < 0.5 for r in rows[1:]), [r["rollout/logprob_gap"] for r in rows[1:]]
    # kl_mode=loss: the reference log-probs reach the trainer's k3 term (>= 0; 0 while the policy is the reference:
    # here the first update has no loss tokens, every response of the random base model being cut off), and the
    # reward is the score and the overlong penalty alone (the helpful RM's unit tests show the KL math)
    assert rows[1]["policy/kl_loss"] == pytest.approx(0.0, abs=1e-6) and rows[2]["policy/kl_loss"] >= 0.0
    assert all(r["reward/total"] == pytest.approx(r["reward/rm_score"] + r["reward/overlong_penalty"], abs=1e-5)
               for r in rows[1:])
    assert all(0.0 <= r["rollout/filtered_frac"] <= 1.0 and r["rollout/informative_prompts"] == 8 for r in rows[1:])
    # the run went to MLflow (a SQLite store in the run directory) and W&B (offline) as well
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("rlhf-cluster-ppo").experiment_id])
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "rollout/filtered_frac")] == [1, 2]
    assert tracked.data.params["estimator"] == '"grpo"' and tracked.data.tags["model"]
    assert [a.path for a in client.list_artifacts(tracked.info.run_id)] == ["report.png"]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("estimator,iterations,margin,colocate", [
    ("grpo", 16, 0.05, ["colocate.policy_reference=true", "reference.num_ranks=2"]),
])
def test_ppo_raises_heldout_gold_with_bounded_kl(builtin_cfg, builtin_sft_rm, tmp_path, estimator, iterations, margin,
                                                 colocate):
    """From the built-in SFT policy, against the built-in reward model (never the gold scorer), with the trainer and
    the reference colocated (one placement group). GRPO: the PPO family's learning run in CI; the other estimators'
    gains (GAE's among them) are measured over 3 seeds by `make results` and checked in its committed JSON
    (tests/test_results.py::test_the_committed_results_show_every_trained_method_above_sft).

    Margin against the seed spread (docs/results.md, 3 seeds at 16 iterations of this preset): GRPO gains +0.165
    test gold with a seed std of 0.009; the +0.05 margin sits more than 4 std below, measured in fp32 (pinned:
    `auto` would take bf16 on a CPU with bf16 units)."""
    sft, rm = builtin_sft_rm
    out = tmp_path / estimator
    cfg = load_config(PPOConfig, CONFIG_DIR / "tiny-cpu.yaml", [
        f"policy.path={sft}", f"reward.path={rm}", f"output_dir={out}", f"registry={out / 'registry'}",
        f"builtin.cache_dir={builtin_cfg.cache_dir}", f"estimator={estimator}", f"iterations={iterations}",
        f"eval_every={iterations // 2}", f"checkpoint_every={iterations}", "precision=fp32", *colocate])
    lines = []
    summary = run(cfg, log=lambda m: (lines.append(str(m)), print(m)))
    assert "colocated: trainer + reference" in lines, lines[:10]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "rollout/logprob_gap" not in rows[1]  # old_logprobs=auto in fp32: the sampler's, no recompute pass
    assert summary["gold_final"] > summary["gold_initial"] + margin, summary
    assert summary["rm_final"] > summary["rm_initial"], summary
    assert summary["kl_final"] < 2.0, summary


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.slow
def test_early_stop_on_a_run_that_overoptimises(builtin_cfg, builtin_sft_rm, tmp_path):
    """GRPO with no KL penalty and a large step over-optimises the built-in reward model within a few evaluations
    (measured: validation gold 0.55 -> 0.73 at iteration 6, then 0.69, 0.68, 0.64 while the RM score kept
    rising). early_stop=val_gold stops at the first evaluation where, over the last two, the validation RM score
    rose while validation gold fell, and the best checkpoint by validation gold is kept."""
    from rlhf_cluster.lib.overoptimisation import overoptimising

    sft, rm = builtin_sft_rm
    out = tmp_path / "overopt"
    cfg = load_config(PPOConfig, CONFIG_DIR / "tiny-cpu.yaml", [
        f"policy.path={sft}", f"reward.path={rm}", f"output_dir={out}", f"registry={out / 'registry'}",
        f"builtin.cache_dir={builtin_cfg.cache_dir}", "estimator=grpo", "kl_coef=0", "trainer.optim.lr=1e-3",
        "iterations=24", "eval_every=2", "checkpoint_every=100", "early_stop=val_gold", "precision=fp32"])
    lines = []
    summary = run(cfg, log=lambda m: (lines.append(str(m)), print(m)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val/gold" in r]
    stop = summary["stopped_early_at"]
    assert stop is not None and stop < 24, [(r["iteration"], r["val/gold"], r["val/rm_score"]) for r in evals]
    assert rows[-1]["iteration"] == stop and summary["iterations"] == stop
    # the rule, recomputed from the logged validation numbers: false at every evaluation but the last
    pairs = [(r["val/rm_score"], r["val/gold"]) for r in evals]
    assert [overoptimising(pairs[:i + 1], 2) for i in range(len(pairs))] == [False] * (len(pairs) - 1) + [True]
    assert [r["val/overoptimising"] for r in evals[1:]] == [0] * (len(evals) - 2) + [1]
    assert any("reward over-optimisation" in line and "stopping (early_stop=val_gold)" in line for line in lines)
    # the best checkpoint by validation gold survives, beside the one at the stop
    best = max(evals, key=lambda r: r["val/gold"])
    assert summary["best_val_iteration"] == best["iteration"] < stop
    assert summary["best_checkpoint"] == f"iter_{best['iteration']:06d}"
    assert (out / "checkpoints" / summary["best_checkpoint"] / "hf" / "model.safetensors").exists()
    assert latest_checkpoint(out).name == f"iter_{stop:06d}"
    assert summary["gold_at_best_val"] == best["test/gold"]  # reported at the iteration validation chose
