"""Weight versions and the sync trainer -> rollout engines.

`version` counts syncs: an engine refuses to sample with another version than the caller expects (a
restarted engine holds the initial weights), so stale weights are never sampled from silently.
`policy_version` is the number of learner updates the engines' weights hold: what a sample is stamped with.
"""

from __future__ import annotations

from ray.exceptions import RayActorError

from rlhf_cluster.lib import faults
from rlhf_cluster.lib.config import PPOConfig


class PoisonedState(RuntimeError):
    """Trainer weights went non-finite: the run rolls back instead of syncing or saving them."""


def short(e: Exception) -> str:
    """First line of an error, for a log line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class WeightSync:
    def __init__(self, groups, cfg: PPOConfig, faults: dict, log=print):
        self.groups, self.cfg, self.faults, self.log = groups, cfg, faults, log
        self.version = 0
        self.policy_version = 0
        self.pending: list = []  # engine updates sent without waiting (ordered before the engines' next calls)
        self.transport = "object_store"
        self.engines_asleep = False  # colocate.sleep: the engines released their GPU memory for a training phase
        self._init_transport()

    def _init_transport(self) -> None:
        """GPU transports (rollout.weight_transport): vLLM's trainer engines, set up once. NCCL: one
        group per engine, hosted by trainer rank 0; IPC: one client for every engine."""
        import ray

        policy, rollout = self.groups.policy, self.groups.rollout
        transport = self.cfg.rollout.weight_transport
        if transport == "nccl":
            tp = self.cfg.rollout.tensor_parallel_size
            for engine in rollout.actors:
                addr, port = ray.get(policy.actors[0].rendezvous_address.remote())
                policy.run("init_weight_transfer", "nccl", [engine], addr, port, 1 + tp)
        elif transport == "ipc":
            policy.run("init_weight_transfer", "ipc", rollout.actors)
        self.transport = transport

    def sleep_phases(self, phase: str) -> dict:
        """colocate.sleep: before "generate" the trainers move their states to host memory; before "train" the
        engines sleep. Returns the device GiB each side freed (the trainers wake themselves when a call needs
        their states; the engines wake in `sync`)."""
        from rlhf_cluster.actors.group import gather

        if not self.cfg.colocate.sleep:
            return {}
        if phase == "generate":
            freed = sum(b for g in self.groups.trainers() for b in g.run("sleep"))
            return {"memory/trainers_slept_gib": freed / 2**30}
        freed = sum(gather([e.sleep.remote() for e in self.groups.rollout.actors]))
        self.engines_asleep = True
        return {"memory/engines_slept_gib": freed / 2**30}

    def _wake(self, tags: list[str]) -> None:
        from rlhf_cluster.actors.group import gather

        if self.engines_asleep:
            gather([e.wake.remote(tags) for e in self.groups.rollout.actors])

    def sync(self, policy_version: int | None = None, wait: bool = True, clear_kv_cache: bool = False) -> None:
        """The weight sync (`_sync`), with sleeping engines woken around it: their weights first, the KV cache
        once the new weights are in. Weights that are not finite are never sent (PoisonedState: the run rolls
        back). `clear_kv_cache` (after a rollback): the engines zero their KV caches, so nothing computed with
        the weights rolled back from (NaN from a poisoned forward) reaches a later sample."""
        if not all(self.groups.policy.run("weights_finite")):
            raise PoisonedState("the policy weights are not finite; not synced to the engines")
        self._wake(["weights"])
        self._sync(policy_version, wait)
        self._wake(["kv_cache"])
        self.engines_asleep = False
        if clear_kv_cache:
            self.clear_kv_caches()

    def clear_kv_caches(self) -> None:
        """Every engine zeroes its KV cache (rlhf_cluster/actors/rollout.py, `clear_kv_cache`)."""
        from rlhf_cluster.actors.group import gather

        gather([e.clear_kv_cache.remote() for e in self.groups.rollout.actors])

    def _sync(self, policy_version: int | None = None, wait: bool = True) -> None:
        """Trainer -> every engine, in place: ZeRO-3 partitions gathered, then vLLM's NCCL / CUDA IPC
        transport on GPUs, or buckets in the object store. `wait=False` (object store only): the
        engines load the weights after the calls already queued on them, and the caller goes on; a
        failure surfaces as StaleWeights or RayActorError at the engine's next call."""
        from rlhf_cluster.actors.group import gather

        ft = self.cfg.fault_tolerance
        rollout = self.groups.rollout
        version = self.version + 1
        if policy_version is not None:
            self.policy_version = policy_version
        if self.transport != "object_store":
            try:
                self.groups.policy.run("send_weights")
                gather([e.set_version.remote(version) for e in rollout.actors])
                self.version = version
                return
            except RayActorError as e:  # a restarted engine left the transfer group: keep going without it
                self.log(f"{self.transport} weight transfer failed ({short(e)}); "
                         "syncing through the object store from now on")
                self.faults["engine_failures"] += 1
                self.transport = "object_store"
                rollout.wait_alive(ft.restart_timeout_s)
        buckets = [ref for part in self.groups.policy.run("export_weights") for ref in part]
        if not wait:
            self.settle()
            self.pending += [e.update_weights.remote(buckets, version) for e in rollout.actors]
            faults.at("engine_load")
            self.version = version
            return
        for attempt in range(ft.actor_restarts + 1):
            try:
                loads = [e.update_weights.remote(buckets, version) for e in rollout.actors]
                faults.at("engine_load")
                gather(loads)
                break
            except RayActorError as e:
                if attempt == ft.actor_restarts:
                    raise
                self.log(f"rollout engine failed during sync ({short(e)}); waiting for its restart")
                self.faults["engine_failures"] += 1
                rollout.wait_alive(ft.restart_timeout_s)
        self.version = version

    def settle(self) -> None:
        """Forget finished unwaited updates; a failed one needs nothing here (see `sync`)."""
        import ray

        done, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
        for ref in done:
            try:
                ray.get(ref)
            except RayActorError:
                pass

    def trainer_rebuilt(self, group) -> None:
        """A rebuilt policy group took its GPU transfer group with it: the object store from now on."""
        if group is self.groups.policy and self.transport != "object_store":
            self.log(f"{self.transport} weight transfer ended with the old trainer ranks; "
                     "syncing through the object store from now on")
            self.transport = "object_store"
