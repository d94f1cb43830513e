"""Fault injection with real processes: actors killed with SIGKILL in the middle of a PPO run and a
`kill -9` of redis-server under the registry (a killed job resumed: tests/test_ppo.py). What each
test does and what it observed is written up in docs/reliability.md."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest

from rlhf_cluster.actors.group import free_port
from rlhf_cluster.lib.config import CONFIG_DIR, PPOConfig, load_config
from rlhf_cluster.ppo import run
from rlhf_cluster.rl.checkpoints import latest_checkpoint
from tests.helpers import start_redis

pytestmark = [pytest.mark.ray, pytest.mark.long]


def _smoke(builtin_assets, out, *extra):
    return load_config(PPOConfig, CONFIG_DIR / "smoke.yaml", [
        f"policy.path={builtin_assets.base}", f"reward.path={builtin_assets.reward_base}",
        f"output_dir={out}", f"registry={out / 'registry'}", *extra])


def kill_actor(class_name: str) -> int:
    """SIGKILL the process of the (first) live actor of this class: a crash, not a polite ray.kill."""
    import ray._private.state as state

    alive = [a for a in state.actors().values() if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]
    assert alive, f"no live {class_name} actor"
    pid = alive[0]["Pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def logger(lines: list[str]):
    """The job's log: kept in `lines` (what the chaos steps and assertions read) and printed."""
    def log(msg):
        lines.append(str(msg))
        print(msg, flush=True)
    return log


def checkpoint_written(out):
    """ckpt(i): a chaos step's condition, true once checkpoint i of the run in `out` is complete."""
    return lambda i: lambda: (out / "checkpoints" / f"iter_{i:06d}").exists()


class Chaos(threading.Thread):
    """Runs (wait-for, action) steps in order beside the job; records what it did and any error."""

    def __init__(self, steps, timeout: float = 900):
        super().__init__(daemon=True)
        self.steps, self.timeout, self.done, self.error = steps, timeout, [], None

    def run(self):
        try:
            deadline = time.time() + self.timeout
            for name, ready, action in self.steps:
                while not ready():
                    if time.time() > deadline:
                        raise TimeoutError(f"chaos step {name!r} never became due")
                    time.sleep(0.1)
                self.done.append((name, action()))
        except Exception as e:  # reported by the test
            self.error = e


def test_killed_actors_and_redis_lose_no_iteration(ray_cluster, builtin_assets, tmp_path):
    """SIGKILL a rollout engine, the reward actor and the critic, separately, each in a different
    iteration, and kill -9 redis-server (the registry) for two checkpoints: the run finishes with
    iterations 1..4 and checkpoints 1..4 each exactly once, all of them in the registry."""
    import ray
    import ray._private.state as state

    from rlhf_cluster.lib.registry import RedisRegistry

    job_id = ray.get_runtime_context().get_job_id()
    out = tmp_path / "run"
    port, redis_dir = free_port(), tmp_path / "redis"
    redis_dir.mkdir()
    redis = {"proc": start_redis(port, redis_dir)}
    url = f"redis://127.0.0.1:{port}/0"
    lines: list[str] = []
    log, ckpt = logger(lines), checkpoint_written(out)

    def kill_redis():
        redis["proc"].kill()
        redis["proc"].wait(10)
        return "redis-server killed"

    def restart_redis():
        redis["proc"] = start_redis(port, redis_dir)
        return "redis-server restarted"

    chaos = Chaos([
        ("rollout", ckpt(1), lambda: (time.sleep(0.5), kill_actor("RolloutEngine"))[1]),
        ("reward", ckpt(2), lambda: (time.sleep(0.5), kill_actor("RewardModel"))[1]),
        ("redis down", ckpt(2), kill_redis),
        ("critic", ckpt(3), lambda: kill_actor("Critic")),
        ("redis up", lambda: any("rebuilding the critic group" in x for x in lines), restart_redis),
    ])
    cfg = _smoke(builtin_assets, out, "iterations=4", f"registry={url}", "eval_every=2")
    before = set(state.actors())  # actors of earlier tests in this session (same job) are not counted
    chaos.start()
    try:
        summary = run(cfg, log=log)
    finally:
        chaos.join(timeout=60)
        redis["proc"].kill()
    assert chaos.error is None, chaos.error
    assert [name for name, _ in chaos.done] == ["rollout", "reward", "redis down", "critic", "redis up"]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]  # no gap, no duplicate
    assert not any(r.get("skipped") for r in rows)
    assert summary["iterations"] == 4
    # the engine came back with the initial weights and was re-synced before sampling again; the
    # reward actor's call was re-sent by Ray; the critic's loss rolled the run back once
    restarts = {"RolloutEngine": 0, "RewardModel": 0}
    for actor_id, a in state.actors().items():
        if actor_id not in before and a["JobID"] == job_id and a["ActorClassName"] in restarts:
            restarts[a["ActorClassName"]] += a["NumRestarts"]
    assert restarts == {"RolloutEngine": 1, "RewardModel": 1}, restarts
    assert summary["faults"]["engine_failures"] >= 1, lines
    assert summary["faults"]["rollbacks"] == 1, lines
    assert any("resumed from" in x and "iter_000003" in x for x in lines), lines
    kept = {"iter_000003", "iter_000004", summary["best_checkpoint"]}  # the last two and the best
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(kept)
    assert latest_checkpoint(out).name == "iter_000004"
    # every checkpoint registered once, including those written while redis-server was down
    restarted = start_redis(port, redis_dir)  # a third process on the same AOF: nothing lost
    try:
        entries = RedisRegistry(url).list(kind="policy", stage="ppo")
    finally:
        restarted.kill()
    assert sorted(e.step for e in entries) == [1, 2, 3, 4]
    assert summary["unregistered_checkpoints"] == 0


def test_nonfinite_rewards_skip_updates_then_halt(ray_cluster, builtin_assets, tmp_path):
    """A reward model that returns NaN: each iteration's update is skipped and counted, the weights
    stay as they were, and after `max_consecutive_skips` in a row the run halts with a message."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    bad_rm = tmp_path / "nan-rm"
    model = AutoModelForSequenceClassification.from_pretrained(builtin_assets.reward_base)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(bad_rm)
    AutoTokenizer.from_pretrained(builtin_assets.reward_base).save_pretrained(bad_rm)
    out = tmp_path / "run"
    # the HF engine (starts in seconds) and no critic: this test is about the coordinator's numerics
    cfg = _smoke(builtin_assets, out, f"reward.path={bad_rm}", "estimator=grpo", "rollout.engine=hf",
                 "fault_tolerance.max_consecutive_skips=2")
    lines: list[str] = []
    with pytest.raises(RuntimeError, match=r"halting: 2 iterations in a row skipped \(non-finite reward"):
        run(cfg, log=lines.append)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r.get("skipped")) for r in rows] == [(0, None), (1, 1), (2, 1)]
    assert any("iter 1 skipped: non-finite reward" in x for x in lines), lines
    # the checkpoint written after the skipped iteration 1 holds the initial weights, untouched
    saved = load_file(out / "checkpoints" / "iter_000001" / "hf" / "model.safetensors")
    initial = load_file(builtin_assets.base / "model.safetensors")
    assert all(torch.equal(saved[k], initial[k]) for k in initial)
    assert not (out / "checkpoints" / "iter_000002").exists()


def test_engine_killed_under_async_rollout_is_restarted_and_its_batch_sampled_again(ray_cluster, builtin_assets,
                                                                                    tmp_path):
    """Asynchronous rollout (max_staleness 1): the engine is SIGKILLed right after checkpoint 1, with the
    next batch sent to it. Ray restarts it with the initial weights; the producer waits for it, re-syncs,
    and sends the lost batch (and any queued behind it) again. No iteration is lost, none is trained on
    a sample older than the bound, and the regenerated batch comes from the current weights."""
    out = tmp_path / "run"
    lines: list[str] = []

    def log(msg):
        lines.append(str(msg))
        print(msg, flush=True)

    chaos = Chaos([("rollout", lambda: (out / "checkpoints" / "iter_000001").exists(),
                    lambda: kill_actor("RolloutEngine"))])
    cfg = _smoke(builtin_assets, out, "estimator=grpo", "async_rollout.max_staleness=1", "iterations=3")
    chaos.start()
    try:
        summary = run(cfg, log=log)
    finally:
        chaos.join(timeout=60)
    assert chaos.error is None, chaos.error
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert not any(r.get("skipped") for r in rows)
    assert all(0 <= r["rollout/staleness"] <= 1 for r in rows[1:]), [r["rollout/staleness"] for r in rows[1:]]
    assert summary["faults"]["engine_failures"] >= 1 and summary["faults"]["rollbacks"] == 0, lines
    assert any("rollout engine failed" in x and "sampling again" in x for x in lines), lines


def test_a_lost_policy_rank_rolls_back_and_repeated_losses_give_up(ray_cluster, builtin_assets, tmp_path,
                                                                   monkeypatch):
    """A policy trainer rank (a DeepSpeed ZeRO-3 rank: its peer cannot go on) SIGKILLs itself before the forward of
    iteration 2 (a fault point, lib/faults.py): the coordinator rebuilds the policy group, rolls back to checkpoint 1
    and redoes the iteration. The other rank dies between backward and optimiser step of the redo, with
    fault_tolerance.max_rollbacks=1: the run gives up with the documented message (exit status 1 from the job),
    leaving checkpoint 1 complete and iterations 0-1 logged once. (Every point of a step, each with a lost rank,
    rolls back to where the clean run goes: tests/test_ppo.py.)"""
    import ray

    from rlhf_cluster.ppo import PPORun, RunHalted
    from rlhf_cluster.scaffold import RunFailed

    out = tmp_path / "run"
    lines: list[str] = []
    kills = [(1, "before_forward"), (0, "before_optimizer_step")]
    step = PPORun.step

    def step_with_a_kill(job):
        if job.iteration == 1 and kills and job.faults["rollbacks"] == 2 - len(kills):
            rank, point = kills.pop(0)
            ray.get(job.groups.policy.actors[rank].arm_fault.remote(point, "kill"))
        return step(job)

    monkeypatch.setattr(PPORun, "step", step_with_a_kill)
    # the HF engine (starts in seconds) and no critic: this test is about the policy group
    cfg = _smoke(builtin_assets, out, "estimator=grpo", "ptx_coef=0", "rollout.engine=hf", "iterations=3",
                 "eval_every=3", "checkpoint_every=1", "keep_checkpoints=3", "fault_tolerance.max_rollbacks=1")
    with pytest.raises(RunHalted) as halted:
        run(cfg, log=logger(lines))
    assert kills == [] and isinstance(halted.value, RunFailed)  # the job exits EXIT_RUN_FAILED (1)
    assert any(re.match(r"iteration 2 failed: .*rollback 1/1$", x) for x in lines), lines
    assert "rebuilding the policy group (2 ranks)" in lines
    assert any("resumed from" in x and "iter_000001" in x for x in lines), lines
    assert re.match(r"giving up: iteration 2 failed after 1 rollbacks \(fault_tolerance.max_rollbacks\); "
                    r"last failure: ", str(halted.value)), str(halted.value)
    # what is left: checkpoint 1 complete (its manifest verified), iterations 0-1 logged once each
    assert latest_checkpoint(out).name == "iter_000001"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]


def test_a_reward_actor_killed_mid_call_is_restarted_and_the_call_sent_again(ray_cluster, builtin_assets, tmp_path):
    """Provably in flight: a reward source that takes 1.5 s per call and logs its start and end
    (tests.reward_fns:slow_logged). After checkpoint 1 the chaos step waits for a call that started and has not
    ended, and SIGKILLs the process making it; Ray restarts the reward actor and re-sends the call
    (max_task_retries): the log shows that call started in the killed process, never ended there, and ran to its end
    in the new one, once. The run loses no iteration and skips none."""
    from tests.reward_fns import SLOW_CALLS

    SLOW_CALLS.unlink(missing_ok=True)
    out = tmp_path / "run"
    victim: dict = {}

    def calls() -> list[tuple[str, int, str]]:
        text = SLOW_CALLS.read_text() if SLOW_CALLS.exists() else ""
        return [(kind, int(pid), key) for kind, pid, key in (line.split() for line in text.splitlines())]

    def call_in_flight() -> bool:
        if not (out / "checkpoints" / "iter_000001").exists():
            return False
        log = calls()
        ended = {(pid, key) for kind, pid, key in log if kind == "end"}
        open_calls = [(pid, key) for kind, pid, key in log if kind == "start" and (pid, key) not in ended]
        if open_calls:
            victim["pid"], victim["key"] = open_calls[-1]
        return bool(open_calls)

    def kill():
        os.kill(victim["pid"], signal.SIGKILL)
        return victim["pid"]

    chaos = Chaos([("reward call in flight", call_in_flight, kill)])
    cfg = _smoke(builtin_assets, out, "estimator=grpo", "ptx_coef=0", "rollout.engine=hf", "iterations=3",
                 "eval_every=3", "reward.path=null",
                 "rewards=[{name: slow, fn: 'tests.reward_fns:slow_logged', needs_label: false}]")
    chaos.start()
    try:
        summary = run(cfg)
    finally:
        chaos.join(timeout=60)
    assert chaos.error is None, chaos.error
    assert [name for name, _ in chaos.done] == ["reward call in flight"]
    pid, key = victim["pid"], victim["key"]
    log = calls()
    assert ("start", pid, key) in log and ("end", pid, key) not in log  # killed mid-call
    again = [p for kind, p, k in log if kind == "end" and k == key]
    assert len(again) == 1 and again[0] != pid, log  # the same call, run to its end once, in the restarted actor
    assert not any(kind == "start" and p == pid for kind, p, _ in log[log.index(("start", pid, key)) + 1:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3] and not any(r.get("skipped") for r in rows)
    assert summary["faults"]["rollbacks"] == 0 and summary["faults"]["reward_errors"] == 0
    SLOW_CALLS.unlink(missing_ok=True)
