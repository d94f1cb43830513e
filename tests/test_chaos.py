"""The chaos run (`make chaos`, docs/reliability.md): a seeded PPO run during which a fault injector kills actors of
every kind (SIGKILL: a crash, not a polite ray.kill) and poisons the trainer's weights at seeded points: during an
iteration's step, while the weights are synced to the engines, while a checkpoint is written, and while a reference
call is in flight. The run must finish with every iteration once, and end where the clean run of the same seed
ends: restarted scorers and engines re-run the same seeded calls, and a rollback resumes exactly, so the final
weights equal the clean run's to 1e-5 whatever the schedule.

The injector lives here. Each schedule comes from its seed and is printed, so a failure replays with
`pytest tests/test_chaos.py -k "seed<N>"`; where a fault lands inside its phase depends on timing (the delay is
seeded, the machine's speed is not), and what landed where is printed too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cluster import rejection_sampling
from rlhf_cluster.lib.config import CONFIG_DIR, PPOConfig, RSConfig, load_config
from rlhf_cluster.ppo import PPORun, run
from rlhf_cluster.rejection_sampling import RejectionSamplingRun
from rlhf_cluster.rl.checkpoints import CheckpointStore
from rlhf_cluster.rl.rollout import RolloutProducer
from rlhf_cluster.rl.weights import WeightSync

pytestmark = [pytest.mark.ray, pytest.mark.chaos]

ITERATIONS = 4
# every kind of actor the run has (GAE: a critic), and a poisoned trainer partition, at each moment it can meet
FAULTS = {
    "RolloutEngine": ("step", "sync", "checkpoint"),
    "RewardModel": ("step", "checkpoint"),
    "ReferenceModel": ("reference call", "step"),
    "Critic": ("step", "checkpoint"),
    "PolicyTrainer": ("step", "sync", "checkpoint"),
    "poisoned weights": ("step",),
}
# how long after its moment begins a fault may land: a step takes seconds, a sync or a checkpoint well under one
MAX_DELAY = {"step": 1.0, "sync": 0.05, "checkpoint": 0.1, "reference call": 0.0}
SEEDS = tuple(range(10))  # between them every kind and every moment (the last test checks)


@dataclass
class Fault:
    iteration: int
    kind: str
    moment: str  # step | sync | checkpoint | reference call; in a rejection-sampling round: sampling | scoring
    delay: float  # seconds after the moment begins
    fired: str | None = None  # what happened, once it did


def schedule(seed: int) -> list[Fault]:
    """Three faults in three of the four iterations, kinds and moments drawn from FAULTS."""
    rng = random.Random(seed)
    kinds = rng.sample(sorted(FAULTS), 3)
    faults = []
    for i, kind in zip(sorted(rng.sample(range(1, ITERATIONS + 1), 3)), kinds):
        moment = rng.choice(FAULTS[kind])
        faults.append(Fault(i, kind, moment, round(rng.uniform(0.0, MAX_DELAY[moment]), 2)))
    return faults


def _cfg(builtin_assets, out, *extra) -> PPOConfig:
    return load_config(PPOConfig, CONFIG_DIR / "smoke.yaml", [
        f"policy.path={builtin_assets.base}", f"reward.path={builtin_assets.reward_base}", f"output_dir={out}",
        f"registry={out / 'registry'}", f"iterations={ITERATIONS}", "eval_every=2", "keep_checkpoints=4",
        "fault_tolerance.max_rollbacks=6", *extra])


@pytest.fixture(scope="module")
def clean_run(ray_cluster, builtin_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("chaos-clean")
    return out, run(_cfg(builtin_assets, out))


class Injector:
    """Wraps the coordinator's own calls (in this process: the test is the job's driver) so that a fault fires at
    its moment: the step of its iteration, the weight sync at the end of it, the checkpoint written after it, or
    the reference call of its step while it runs."""

    def __init__(self, faults: list[Fault], monkeypatch, seed: int, log):
        self.faults, self.rng, self.log = faults, random.Random(seed * 7919), log
        self.coordinator: PPORun | None = None
        self.threads: list[threading.Thread] = []
        inj = self
        self.in_step = False
        step, sync, save, send = PPORun.step, WeightSync.sync, CheckpointStore.save, RolloutProducer._send

        def wrapped_step(run_self, *a, **k):
            inj.coordinator, inj.in_step = run_self, True
            try:
                with inj.phase("step", run_self.iteration + 1):
                    return step(run_self, *a, **k)
            finally:
                inj.in_step = False

        def wrapped_sync(sync_self, *a, **k):
            with inj.phase("sync", inj.coordinator.iteration + 1 if inj.coordinator else 0):
                return sync(sync_self, *a, **k)

        def wrapped_save(store_self, iteration, *a, **k):
            with inj.phase("checkpoint", iteration):
                return save(store_self, iteration, *a, **k)

        def wrapped_send(producer, batch):
            batch = send(producer, batch)
            if inj.in_step:  # a training batch (not an evaluation's): its reference calls are chained on the engines'
                inj.reference_call(inj.coordinator.iteration + 1, [r for r, _ in batch.calls], batch.score_calls["ref"])
            return batch

        rs_round, rs_generate, rs_scores = (RejectionSamplingRun.rejection_sampling_round,
                                            RejectionSamplingRun.generate, RejectionSamplingRun.scores)
        self.round = None

        def wrapped_round(job, number, *a, **k):
            inj.round = number
            try:
                return rs_round(job, number, *a, **k)
            finally:
                inj.round = None

        def wrapped_generate(job, *a, **k):
            with inj.phase("sampling", inj.round):
                return rs_generate(job, *a, **k)

        def wrapped_scores(job, *a, **k):
            with inj.phase("scoring", inj.round):
                return rs_scores(job, *a, **k)

        monkeypatch.setattr(RejectionSamplingRun, "rejection_sampling_round", wrapped_round)
        monkeypatch.setattr(RejectionSamplingRun, "generate", wrapped_generate)
        monkeypatch.setattr(RejectionSamplingRun, "scores", wrapped_scores)
        monkeypatch.setattr(PPORun, "step", wrapped_step)
        monkeypatch.setattr(WeightSync, "sync", wrapped_sync)
        monkeypatch.setattr(CheckpointStore, "save", wrapped_save)
        monkeypatch.setattr(RolloutProducer, "_send", wrapped_send)

    def reference_call(self, iteration: int, engine_refs: list, reference_refs: list) -> None:
        """Kill the reference actor while its call runs: once the engines' samples (its input) exist and before
        its log-probs do."""
        import ray

        def where() -> str:
            ray.wait(engine_refs, num_returns=len(engine_refs))
            return f"its call was running (input ready, result not): {not ray_ready(reference_refs)}"

        self._start_due("reference call", iteration, where)

    @contextlib.contextmanager
    def phase(self, moment: str, iteration: int):
        running = [True]
        self._start_due(moment, iteration, lambda: f"{moment} still running: {running[0]}")
        try:
            yield
        finally:
            running[0] = False

    def _start_due(self, moment: str, iteration: int, where) -> None:
        """Each fault due at this moment acts on a thread of its own, `delay` s later; `where()`, called just before
        it acts, says whether it landed inside its phase."""
        for f in self.faults:
            if f.fired is None and f.iteration == iteration and f.moment == moment:
                f.fired = "pending"
                t = threading.Thread(target=self._act_later, args=(f, where), daemon=True)
                t.start()
                self.threads.append(t)

    def _act_later(self, fault: Fault, where) -> None:
        time.sleep(fault.delay)
        try:
            landed = where()
            fault.fired = f"{self.act(fault)}; {landed}"
        except Exception as e:  # the assertion on `fired` reports it
            fault.fired = f"injector error: {e!r}"[:500]
            return
        self.log(f"chaos: iteration {fault.iteration}, {fault.moment} +{fault.delay}s: {fault.fired}")

    def act(self, fault: Fault) -> str:
        import ray
        import ray._private.state as state

        if fault.kind == "poisoned weights":  # rank 0's ZeRO-3 partition of one matrix becomes NaN in place
            ray.get(self.coordinator.groups.policy.actors[0].poison_weights.remote(), timeout=60)
            return "policy rank 0 weights poisoned"
        alive = sorted((a["ActorID"], a["Pid"]) for a in state.actors().values()
                       if a["ActorClassName"] == fault.kind and a["State"] == "ALIVE")
        assert alive, f"no live {fault.kind} actor"
        _, pid = self.rng.choice(alive)
        os.kill(pid, signal.SIGKILL)
        return f"{fault.kind} pid {pid} killed"

    def join(self):
        for t in self.threads:
            t.join(60)


def ray_ready(refs) -> bool:
    import ray

    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    return len(ready) == len(refs)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_a_chaos_run_ends_where_the_clean_run_ends(clean_run, builtin_assets, tmp_path, monkeypatch, seed):
    clean_out, clean_summary = clean_run
    faults = schedule(seed)
    print(f"\nchaos seed {seed}: " + "; ".join(f"iteration {f.iteration}: {f.kind} at {f.moment} +{f.delay}s"
                                              for f in faults), flush=True)
    lines: list[str] = []

    def log(msg):
        lines.append(str(msg))
        print(msg, flush=True)

    injector = Injector(faults, monkeypatch, seed, log)
    out = tmp_path / "chaos"
    summary = run(_cfg(builtin_assets, out), log=log)
    injector.join()
    print(f"chaos seed {seed}: faults {summary['faults']}; " + "; ".join(f"{f.kind}: {f.fired}" for f in faults))
    assert all(f.fired and f.fired != "pending" and "injector error" not in f.fired for f in faults), \
        [(f.kind, f.fired) for f in faults]
    assert all(f.fired.endswith("True") for f in faults if f.moment in ("reference call", "sync", "checkpoint")), \
        [(f.kind, f.fired) for f in faults]  # these landed inside their phase
    if any(f.kind == "poisoned weights" and f.fired.endswith("True") for f in faults):  # caught before a save
        assert any("failed: PoisonedState" in x and "rollback" in x for x in lines), lines[-30:]

    # every iteration once, none skipped, and each one's figures equal the clean run's
    got, want = rows(out), rows(clean_out)
    assert [r["iteration"] for r in got] == list(range(ITERATIONS + 1))
    assert not any(r.get("skipped") for r in got)
    for a, b in zip(got, want):
        for key in ("reward/rm_score", "kl/mean_sequence_kl", "policy/loss", "critic/value_loss", "val/gold"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["iteration"], key)
    # the final weights equal the clean run's
    final = f"iter_{ITERATIONS:06d}"
    a = load_file(clean_out / "checkpoints" / final / "hf" / "model.safetensors")
    b = load_file(out / "checkpoints" / final / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"chaos seed {seed}: final weights' largest difference from the clean run's: {diff:.1e}")
    assert diff < 1e-5
    assert summary["iterations"] == clean_summary["iterations"] == ITERATIONS
    # the faults that break a DeepSpeed group or poison a state were ridden out by rollbacks, the others without
    rollbacks = sum(f.kind in ("PolicyTrainer", "Critic", "poisoned weights") for f in faults)
    assert summary["faults"]["rollbacks"] <= rollbacks, summary["faults"]
    assert torch.isfinite(torch.cat([t.flatten() for t in b.values()])).all()


def test_the_schedules_cover_every_kind_and_moment():
    """The three seeds' schedules, between them, kill every kind of actor and poison the weights; and a
    schedule is a function of its seed (what makes a failure replayable)."""
    drawn = [f for s in SEEDS for f in schedule(s)]
    assert {f.kind for f in drawn} == set(FAULTS), sorted({f.kind for f in drawn})
    assert {f.moment for f in drawn} >= {"step", "sync", "checkpoint", "reference call"}, drawn
    assert [schedule(1)] == [schedule(1)] and schedule(0) != schedule(1)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_a_rejection_sampling_round_under_chaos_keeps_and_trains_what_the_clean_round_does(ray_cluster, builtin_assets,
                                                                                          tmp_path, monkeypatch):
    """A rejection-sampling round (sample 8 per prompt, score, keep the best, SFT on them) with a rollout engine
    SIGKILLed while it samples and the reward actor while it scores: the producer waits for the engine's restart,
    re-syncs and samples again with the same seeds, Ray re-sends the scoring call; the round keeps exactly the
    clean round's samples (selected.jsonl byte for byte) and trains to the same weights (1e-5)."""
    def cfg(out):
        return load_config(RSConfig, CONFIG_DIR / "rejection-sampling-tiny.yaml", [
            f"policy.path={builtin_assets.base}", f"reward.path={builtin_assets.reward_base}", f"output_dir={out}",
            f"registry={out / 'registry'}", "rs.prompts_per_round=16", "best_of_k_eval=[1]", "best_of_k_seeds=1"])

    clean = rejection_sampling.run(cfg(tmp_path / "clean"))
    rng = random.Random(0)
    faults = [Fault(1, "RolloutEngine", "sampling", round(rng.uniform(0.0, 0.1), 2)),
              Fault(1, "RewardModel", "scoring", round(rng.uniform(0.0, 0.05), 2))]
    print("\nchaos (rejection sampling): " + "; ".join(f"{f.kind} at {f.moment} +{f.delay}s" for f in faults))
    lines: list[str] = []

    def log(msg):
        lines.append(str(msg))
        print(msg, flush=True)

    injector = Injector(faults, monkeypatch, 0, log)
    summary = rejection_sampling.run(cfg(tmp_path / "chaos"), log=log)
    injector.join()
    assert all(f.fired and f.fired.endswith("still running: True") for f in faults), [f.fired for f in faults]
    assert any("rollout engine failed" in x for x in lines), lines[-20:]
    a, b = (tmp_path / "clean" / "round_1"), (tmp_path / "chaos" / "round_1")
    assert (a / "selected.jsonl").read_bytes() == (b / "selected.jsonl").read_bytes()
    wa, wb = load_file(a / "hf" / "model.safetensors"), load_file(b / "hf" / "model.safetensors")
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"chaos (rejection sampling): final weights' largest difference from the clean round's: {diff:.1e}")
    assert diff < 1e-5
    assert summary["gold_per_round"] == pytest.approx(clean["gold_per_round"], abs=1e-6)
