"""Where the samples come from: the training prompts' order, and the rollout producer.

The producer keeps the engines ahead of the learner. With `async_rollout.max_staleness: k` it has
batch i and the next k batches sent to the engines when the learner asks for batch i, so the engines
sample batches i+1..i+k while the learner trains on batch i (k = 0: one batch at a time, as a
synchronous step). Every batch is stamped with the policy version (learner updates) whose weights
sampled it; the weight sync after each update queues behind the batches already sent, so batch i is
at most k versions old when trained on — a batch older than that is never trained on (checked, and
sampled again). Engine calls run in the order they were sent, so seeded batches are reproducible.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ray.exceptions import RayActorError

from rlhf_cluster.lib.config import PPOConfig
from rlhf_cluster.lib.reward_functions import RewardFunctionError
from rlhf_cluster.rl.weights import WeightSync, short


def load_prompt_splits(cfg: PPOConfig, tokenizer, log=print) -> dict[str, list[dict]]:
    """{train, val[, test]} tokenized prompts: the config's files, or the built-in task's three splits.
    train: what the policy samples on; val: what chooses (best checkpoint, promotion); test: reported only."""
    from rlhf_cluster.lib.data import load_tokenized

    d = cfg.data
    if d.train:
        files = {"train": Path(d.train), "val": Path(d.eval or d.train)} | ({"test": Path(d.test)} if d.test else {})
    else:
        from rlhf_cluster.lib.builtin import ensure_builtin

        assets = ensure_builtin(cfg.builtin, log=log)
        files = {split: assets.file(f"prompts_{split}.jsonl") for split in ("train", "val", "test")}
    prompts = {}
    for split, path in files.items():
        prompts[split], report = load_tokenized(path, tokenizer, "prompts", d.max_prompt_tokens, d.on_bad_sample,
                                                keys=d.keys(), require_label=cfg.needs_labels())
        log(f"{split} prompts: {report}")
    return prompts


def reward_context(prompts: list[dict]) -> list[dict]:
    """What the reward side sees of each prompt besides the response: its last user turn, its label, and whether
    it is flagged unsafe (Llama 2's rule: the record's `unsafe`, or the built-in task's unsafe requests)."""
    from rlhf_cluster.lib.task import is_unsafe_prompt

    return [{"prompt": p["messages"][-1]["content"], "label": p.get("label"),
             "unsafe": bool(p.get("unsafe")) or is_unsafe_prompt(p["messages"][-1]["content"])} for p in prompts]


class PromptOrder:
    """The training prompts in a seeded order, reshuffled at every pass over the data."""

    def __init__(self, prompts: list[dict], rng: random.Random):
        self.prompts, self.rng = prompts, rng
        self.pos, self.epoch = 0, 0
        self.order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.prompts)))
        self.rng.shuffle(order)
        return order

    def take(self, n: int) -> list[dict]:
        batch = []
        while len(batch) < n:
            if self.pos == len(self.order):
                self.epoch, self.pos, self.order = self.epoch + 1, 0, self._shuffled()
            batch.append(self.prompts[self.order[self.pos]])
            self.pos += 1
        return batch

    def state_dict(self) -> dict:
        return {"data_pos": self.pos, "epoch": self.epoch, "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.epoch, self.order = state["data_pos"], state["epoch"], list(state["order"])


@dataclass
class Batch:
    """One iteration's samples: what was asked, and by which weights they were sampled."""

    index: int  # the iteration it is for
    prompts: list[dict]
    seed: int
    policy_version: int  # learner updates in the weights that sampled it
    calls: list = field(default_factory=list)  # engine calls in flight: (ObjectRef, prompts) per engine
    score_calls: dict = field(default_factory=dict)  # reference / reward calls chained on each engine call
    samples: list[dict] | None = None
    scores: dict | None = None  # {"ref": per-token log-probs, "score": rewards}, in sample order
    score_wait: float = 0.0
    reward_error: str | None = None  # a reward function failed on these samples: the step skips the batch

    def state_dict(self) -> dict:
        return {"index": self.index, "prompts": self.prompts, "seed": self.seed,
                "policy_version": self.policy_version, "samples": self.samples, "scores": self.scores,
                "reward_error": self.reward_error}


class RolloutProducer:
    def __init__(self, groups, weights: WeightSync, order: PromptOrder, cfg: PPOConfig, faults: dict, log=print):
        self.groups, self.weights, self.order, self.cfg = groups, weights, order, cfg
        self.faults, self.log = faults, log
        self.max_staleness = cfg.async_rollout.max_staleness
        self.queue: deque[Batch] = deque()
        self.overrides: dict | None = None  # RolloutConfig fields for training batches (bench/: the length sweep)

    # ---------------------------------------------------------------- training batches
    def batch_seed(self, index: int) -> int:
        return self.cfg.seed * 1_000_003 + index * 10_007

    def next_batch(self, iteration: int) -> Batch:
        """The batch for `iteration`, its samples collected; the next max_staleness batches stay in flight."""
        while not self.queue or (len(self.queue) < 1 + self.max_staleness
                                 and iteration + len(self.queue) < self.cfg.iterations):  # none past the last
            index = iteration + len(self.queue)
            self.queue.append(self._send(Batch(index, self.order.take(self.cfg.prompts_per_iteration),
                                               self.batch_seed(index), self.weights.policy_version)))
        batch = self.queue.popleft()
        self._collect(batch)
        if iteration - batch.policy_version > self.max_staleness:  # not by construction; never trained on
            self.log(f"batch {batch.index} is {iteration - batch.policy_version} versions old "
                     f"(max_staleness {self.max_staleness}); sampling it again")
            batch.policy_version, batch.samples, batch.scores = self.weights.policy_version, None, None
            self._collect(self._send(batch))
        return batch

    def keep_informative(self, batch: Batch) -> dict:
        """DAPO's dynamic sampling: drop the prompt groups whose samples all scored the same (no advantage
        under a group baseline) and sample more prompts with the latest weights, at most
        dynamic_sampling.max_extra_batches more batches, until `batch` holds prompts_per_iteration
        informative groups (the excess is dropped); fewer if the bound is hit. Returns its metrics."""
        import torch

        from rlhf_cluster.lib.algorithms import informative_groups

        k, want = self.cfg.rollout.samples_per_prompt, self.cfg.prompts_per_iteration
        prompts, samples, scores = [], [], {key: [] for key in batch.scores}
        sampled = uninformative = extra = 0
        part = batch
        while True:
            keep = informative_groups(torch.tensor(part.scores["score"]), k).tolist()
            sampled, uninformative = sampled + len(keep), uninformative + keep.count(False)
            for g in [g for g, ok in enumerate(keep) if ok][: want - len(prompts)]:
                rows = range(g * k, (g + 1) * k)  # a prompt's samples are contiguous
                samples += [dict(part.samples[i], prompt_index=len(prompts)) for i in rows]
                scores = {key: v + [part.scores[key][i] for i in rows] for key, v in scores.items()}
                prompts.append(part.prompts[g])
            if len(prompts) == want or extra == self.cfg.dynamic_sampling.max_extra_batches:
                break
            extra += 1
            part = Batch(batch.index, self.order.take(want), self.batch_seed(batch.index) + extra * 7_919,
                         self.weights.policy_version)
            self._collect(self._send(part))
        batch.prompts, batch.samples, batch.scores = prompts, samples, scores
        return {"rollout/filtered_frac": uninformative / sampled, "rollout/extra_batches": extra,
                "rollout/informative_prompts": len(prompts)}

    def _send(self, batch: Batch) -> Batch:
        from rlhf_cluster.actors.rollout import submit_across

        # nothing here waits on an engine (a restarting one would raise outside _collect's recovery)
        batch.calls = submit_across(self.groups.rollout, [p["prompt_ids"] for p in batch.prompts], self.overrides,
                                    batch.seed, version=self.weights.version,
                                    samples_per_prompt=self.cfg.rollout.samples_per_prompt)
        # each engine's samples go to a reference and a reward replica as soon as they exist (Ray passes the
        # result actor to actor): scoring overlaps the other engines' sampling, and the learner's step
        reference, reward = self.groups.reference.actors, self.groups.reward.actors
        engine_results = [ref for ref, _ in batch.calls]
        context, starts = reward_context(batch.prompts), [0]
        track = {"track": True} if self.cfg.rewards else {}  # per-source metrics of the training batches
        for _, count in batch.calls:
            starts.append(starts[-1] + count)
        # a partitioned group's ranks run each forward together: every rank gets every engine's samples and
        # scores its share once all are there (their results, in rank order, follow the samples)
        if self.cfg.reference.partition:
            ref_calls = [a.logprobs_of_share.remote(*engine_results) for a in reference]
        else:
            ref_calls = [reference[j % len(reference)].logprobs_of_samples.remote(r)
                         for j, r in enumerate(engine_results)]
        if self.cfg.reward_group.partition:
            score_calls = [a.score_share.remote(*engine_results) for a in reward]
        else:
            score_calls = [reward[j % len(reward)].score_samples.remote(r, context[starts[j]:starts[j + 1]], **track)
                           for j, r in enumerate(engine_results)]
        batch.score_calls = {"ref": ref_calls, "score": score_calls}
        batch.scores = None
        return batch

    def _collect(self, batch: Batch) -> None:
        """Wait for a batch. An engine that died (or came back with the initial weights) is waited for,
        every engine is re-synced, and this batch and those queued behind it are sent again."""
        from rlhf_cluster.actors.group import gather
        from rlhf_cluster.actors.rollout import StaleWeights, collect_across

        ft = self.cfg.fault_tolerance
        if batch.samples is not None:
            return
        for attempt in range(ft.actor_restarts + 1):
            try:
                samples = collect_across(batch.calls)
                t0 = time.time()
                try:
                    batch.scores = {k: [x for part in gather(refs) for x in part]
                                    for k, refs in batch.score_calls.items()}
                except RewardFunctionError as e:  # the user's function, not an actor, failed: skip the batch
                    batch.scores, batch.reward_error = None, str(e).strip().splitlines()[-1]
                batch.score_wait = time.time() - t0  # the part of the wait that was scoring (step timing)
                batch.samples, batch.calls, batch.score_calls = samples, [], {}
                self.weights.settle()
                return
            except (RayActorError, StaleWeights) as e:
                if attempt == ft.actor_restarts:
                    raise
                self.recover_engines(e)
                for b in [b for b in (batch, *self.queue) if b.samples is None]:  # sent before the re-sync
                    b.policy_version = self.weights.policy_version
                    self._send(b)

    def recover_engines(self, error: Exception) -> None:
        self.log(f"rollout engine failed ({short(error)}); waiting for its restart, re-syncing, sampling again")
        self.faults["engine_failures"] += 1
        self.groups.rollout.wait_alive(self.cfg.fault_tolerance.restart_timeout_s)
        self.weights.sync()

    def state_dict(self) -> list[dict]:
        """The batches in flight, waited for: a checkpoint stores their samples, so a resumed run trains on
        exactly the samples the uninterrupted one would (they came from weights it no longer has)."""
        for b in self.queue:
            self._collect(b)
        return [b.state_dict() for b in self.queue]

    def load_state_dict(self, batches: list[dict]) -> None:
        """Batches restored from a checkpoint; whatever was in flight is dropped (its results unread)."""
        self.queue = deque(Batch(b["index"], b["prompts"], b["seed"], b["policy_version"], samples=b["samples"],
                                 scores=b.get("scores"), reward_error=b.get("reward_error")) for b in batches)

    # ---------------------------------------------------------------- one-off sampling (evaluation, RS)
    def generate(self, prompt_ids: list[list[int]], overrides: dict | None = None,
                 seed: int | None = None) -> list[dict]:
        """Sample with the latest weights (after the batches in flight). An engine that died is
        restarted by Ray with the initial weights: wait for it, re-sync every engine, send again."""
        from rlhf_cluster.actors.rollout import StaleWeights, generate_across

        ft = self.cfg.fault_tolerance
        for attempt in range(ft.actor_restarts + 1):
            try:
                return generate_across(self.groups.rollout, prompt_ids, overrides, seed, version=self.weights.version)
            except (RayActorError, StaleWeights) as e:
                if attempt == ft.actor_restarts:
                    raise
                self.recover_engines(e)
