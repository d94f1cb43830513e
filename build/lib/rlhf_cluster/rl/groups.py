"""The actor groups of an RL job, started side by side from one config (and stopped together).

policy trainer (DeepSpeed ranks), reference and reward replicas, the critic (GAE only), the rollout
engines (vLLM); groups named in `colocate` share one placement group.
"""

from __future__ import annotations

import os
import time

from rlhf_cluster.lib.config import PPOConfig, TrainerConfig


class RLGroups:
    """`policy`, `reference`, `reward`, `critic` (or None) and `rollout`: ActorGroups."""

    def __init__(self, cfg: PPOConfig, policy_path: str, reward_path: str | None, *, trainer: TrainerConfig,
                 train_steps: int, with_critic: bool, log=print):
        self.cfg = cfg
        if None in (cfg.policy.dtype, cfg.reward.dtype) or cfg.old_logprobs == "auto":  # not via scaffold.connect
            from rlhf_cluster.lib.precision import cpu_flags

            log(cfg.resolve_precision(cpu_flags()))
        t0 = time.time()
        log("starting actor groups: policy trainer, reference, reward, rollout" + (", critic" if with_critic else ""))
        self.policy = self.reference = self.reward = self.critic = self.rollout = None
        self.shared_pgs = []
        try:
            self._start(cfg, policy_path, reward_path, trainer, train_steps, with_critic, log)
        except BaseException:  # what did start is stopped: its placement groups would hold the CPUs
            self.shutdown()
            raise
        self.startup_seconds = time.time() - t0
        self.log_nodes(log)

    def log_nodes(self, log) -> None:
        """On a cluster of several nodes, how each group's ranks spread over them (one line)."""
        import ray

        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) > 1:
            spread = {g.name: g.nodes() for g in self.all()}
            log("ranks on nodes: " + ", ".join(f"{name} {len(ids)} on {len(set(ids))}" for name, ids in spread.items())
                + f" (the cluster has {len(alive)} nodes)")

    def _start(self, cfg: PPOConfig, policy_path, reward_path, trainer, train_steps, with_critic, log):
        from rlhf_cluster.actors.group import ActorGroup, colocated_placement_group
        from rlhf_cluster.actors.rollout import engine_class
        from rlhf_cluster.actors.scorers import ReferenceModel, RemoteRewardModel, RewardModel, RewardSources
        from rlhf_cluster.actors.trainer import Critic, PolicyTrainer

        # each actor picks DeepSpeed's accelerator itself (rlhf_cluster.lib.deepspeed_setup), unless the driver says
        env = {"RLHF_TORCH_THREADS": "1"} | {k: os.environ[k] for k in ("DS_ACCELERATOR",) if k in os.environ}
        # replicas without peers are restarted by Ray; reference and reward calls are re-sent by Ray too,
        # rollout calls by the rollout producer (after a re-sync: a restarted engine holds the initial weights)
        restarts = cfg.fault_tolerance.actor_restarts
        replica = {"max_restarts": restarts, "max_task_retries": restarts}
        # colocated groups (cfg.colocate) share one placement group: rank i of each in bundle i
        resources = cfg.group_resources()
        pg = {}
        for names in cfg.colocated_sets():
            names = [n for n in names if n != "critic" or with_critic]
            self.shared_pgs.append(colocated_placement_group({n: resources[n] for n in names}, trainer.placement))
            pg |= {n: self.shared_pgs[-1] for n in names}
            log(f"colocated: {' + '.join(names)}")
        sleep = cfg.colocate.sleep
        self.policy = ActorGroup(PolicyTrainer, trainer, policy_path, trainer.model_dump(), train_steps,
                                 cfg.policy.dtype, cfg.seed, sleep, name="policy", env=env, wait=False,
                                 pg=pg.get("trainer"))
        ref = cfg.reference  # partitioned ranks share a process group: a lost one means a rebuild, not a restart
        self.reference = ActorGroup(ReferenceModel, ref, policy_path, cfg.policy.dtype, ref.micro_batch_size,
                                    ref.max_tokens_per_micro_batch, ref.partition, ref.offload, name="reference",
                                    env=env, wait=False, pg=pg.get("reference"), **({} if ref.partition else replica))
        if cfg.rewards:  # a weighted sum of models, functions and endpoints, every rank holding all of them
            tokens = {r.token_env: os.environ[r.token_env] for r in cfg.rewards if r.url and r.token_env in os.environ}
            rg = cfg.reward_group
            self.reward = ActorGroup(RewardSources, rg, [r.model_dump() for r in cfg.rewards], policy_path,
                                     cfg.reward.dtype, rg.micro_batch_size, rg.max_tokens_per_micro_batch,
                                     cfg.combine, cfg.safety_threshold, name="reward", env=env | tokens, wait=False,
                                     pg=pg.get("reward_group"), **replica)
        elif cfg.reward_service:  # scores over HTTP; the bearer token travels in the actors' environment
            svc = cfg.reward_service
            token = {svc.token_env: os.environ[svc.token_env]} if svc.token_env in os.environ else {}
            self.reward = ActorGroup(RemoteRewardModel, cfg.reward_group, svc.url, policy_path, svc.token_env,
                                     svc.batch_size, svc.timeout_s, svc.retries, name="reward", env=env | token,
                                     wait=False, pg=pg.get("reward_group"), **replica)
        else:
            rg = cfg.reward_group
            self.reward = ActorGroup(RewardModel, rg, reward_path, cfg.reward.dtype, rg.micro_batch_size,
                                     rg.max_tokens_per_micro_batch, rg.partition, rg.offload, name="reward", env=env,
                                     wait=False, pg=pg.get("reward_group"), **({} if rg.partition else replica))
        if with_critic:
            # the critic starts from the reward model (its head too), or the policy when scores come over HTTP
            self.critic = ActorGroup(Critic, cfg.critic, reward_path or policy_path, cfg.critic.model_dump(),
                                     train_steps, cfg.reward.dtype, cfg.seed, sleep, name="critic", env=env, wait=False,
                                     pg=pg.get("critic"))
        self.rollout = ActorGroup(engine_class(cfg.rollout.engine), resources["rollout"], policy_path,
                                  cfg.rollout.model_dump(), cfg.seed, cfg.policy.dtype, sleep, name="rollout",
                                  env={"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(cfg.rollout.kv_cache_gib)))},
                                  wait=False, max_restarts=restarts, pg=pg.get("rollout"))
        for group in self.all():
            group.wait()

    def all(self) -> list:
        return [g for g in (self.rollout, self.policy, self.reference, self.reward, self.critic) if g is not None]

    def trainers(self) -> list:
        """DeepSpeed groups that train (their states are checkpointed)."""
        return [g for g in (self.policy, self.critic) if g is not None]

    def partitioned(self) -> list:
        """Scoring groups whose ranks hold ZeRO-3 shards (`partition`)."""
        cfg = self.cfg
        return [g for g, c in ((self.reference, cfg.reference), (self.reward, cfg.reward_group)) if c.partition]

    def process_groups(self) -> list:
        """Groups whose ranks form one process group: a lost rank means the whole group is rebuilt."""
        return self.trainers() + self.partitioned()

    def replicas(self) -> list:
        """Groups whose ranks Ray restarts one by one."""
        return [g for g in (self.rollout, self.reference, self.reward) if g not in self.partitioned()]

    def rank_lost(self) -> bool:
        """Some process-group rank is dead or stuck (its peers' errors are then a consequence)."""
        return not all(g.responsive(self.cfg.fault_tolerance.ping_timeout_s) for g in self.process_groups())

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for g in self.all():
            g.shutdown()
        for pg in self.shared_pgs:
            remove_placement_group(pg)


def plan_memory(cfg: PPOConfig, policy_path: str, reward_path: str | None, with_critic: bool, log=print) -> None:
    """The memory plan of the groups RLGroups would start (rlhf_cluster/lib/memory.py), printed; a layout
    that cannot fit its devices is refused here, with the numbers, before any actor starts."""
    import ray

    from rlhf_cluster.lib.config import ConfigError
    from rlhf_cluster.lib.memory import GIB, plan_ppo

    res = ray.cluster_resources()
    host = int(res.get("memory", 0) + res.get("object_store_memory", 0)) or None
    device = int(cfg.ray.gpu_memory_gib * GIB) if cfg.ray.gpu_memory_gib else None
    if device is None:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_properties(0).total_memory
    if cfg.rewards:
        rewards = [r.model for r in cfg.rewards if r.model]
    else:
        rewards = [reward_path] if reward_path and not cfg.reward_service else []
    critic = (reward_path or policy_path) if with_critic else None
    plan = plan_ppo(cfg, policy_path, rewards, critic, host, device)
    log(plan.table())
    if plan.problems:
        raise ConfigError("this layout does not fit its devices:\n  " + "\n  ".join(plan.problems)
                          + "\n(fewer or smaller micro-batches, more ranks with zero_stage 3, offload, "
                          "a smaller rollout.kv_cache_gib / gpu_memory_utilization, or no colocation)")
