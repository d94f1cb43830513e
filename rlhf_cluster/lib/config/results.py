"""The results harness's config: every method at one sample budget over seeds, the over-optimisation sweep and
the verifiable-reward suite. It lives beside the jobs' configs until the harness takes it along."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_cluster.lib.config.base import JobConfig, RayConfig, Strict

RESULT_METHODS = ("sft", "best_of_k", "rejection_sampling", "ppo", "grpo", "rloo", "reinforce_pp", "dpo", "ipo",
                  "rs_ppo", "ppo_async", "grpo_async")
# the recorded run's default: every method but the asynchronous-rollout variants (a run of their own, see
# docs/performance.md; `methods=[ppo, grpo, ppo_async, grpo_async]` compares them side by side)
DEFAULT_RESULT_METHODS = RESULT_METHODS[:-2]


class OveroptimisationSweepConfig(Strict):
    """Gao et al. (2022) on the built-in task: PPO runs at several KL coefficients, evaluated every few
    iterations, give (sqrt KL, proxy RM score, gold) points; repeated with each reward-model size."""

    kl_coefs: list[float] = [0.0, 0.02]
    """KL coefficients, one run each"""
    iterations: int = Field(24, ge=2)
    """iterations per run"""
    eval_every: int = Field(3, ge=1)
    """iterations between evaluations"""
    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "grpo"
    """the runs' advantage estimator"""
    reward_sizes: list[Literal["tiny", "small"]] = ["tiny", "small"]
    """reward-model sizes, a sweep each"""
    seed: int = 0
    """seed of the sweep's runs"""


VERIFIABLE_VARIANTS = ("grpo", "clip_higher", "dynamic_sampling", "overlong", "dr_grpo")


class VerifiableSuiteConfig(Strict):
    """GRPO on the built-in arithmetic task (configs/verifiable-grpo.yaml) from its SFT policy: vanilla (`grpo`)
    and with each DAPO-family stabiliser switched on, evaluated by the exact-match verifier (pass@1, pass@8)."""

    variants: list[Literal[VERIFIABLE_VARIANTS]] = list(VERIFIABLE_VARIANTS)  # type: ignore[valid-type]
    """grpo (vanilla), clip_higher, dynamic_sampling, overlong (penalty and truncation mask), dr_grpo"""
    iterations: int = Field(300, ge=1)
    """iterations per run"""
    eval_every: int = Field(50, ge=1)
    """iterations between held-out evaluations"""
    variant_seeds: list[int] | None = None
    """seeds of the variants not in `every_seed`; null: every seed"""
    every_seed: list[Literal[VERIFIABLE_VARIANTS]] = ["grpo", "dynamic_sampling"]  # type: ignore[valid-type]
    """variants that run with every seed (`seeds`): vanilla grpo and the candidates for the preset, which
    validation chooses among (configs/verifiable-grpo.yaml is dynamic_sampling)"""
    resume: bool = False
    """keep the runs `results_file` already holds from a suite with the same settings (the variant lists aside)
    and the same SFT policy, and run only the missing ones: an interrupted suite loses one run, not hours"""


class ResultsConfig(JobConfig):
    """`python -m experiments`: every method on the built-in task at one sample budget, over seeds.

    Online methods sample `samples_per_method` responses in all; offline ones (DPO, IPO) train on the
    built-in preference pairs. Every method's output is scored by one evaluator (greedy test gold, sampled KL
    to the SFT policy), and nothing that a method chooses reads the test split.
    """

    output_dir: str = "runs/results"
    ray: RayConfig = RayConfig(num_cpus=4)
    """logical CPUs of a local cluster, as the presets the methods run"""
    seeds: list[int] = [0, 1, 2]
    """seeds, a full run of every method each"""
    methods: list[Literal[RESULT_METHODS]] = list(DEFAULT_RESULT_METHODS)  # type: ignore[valid-type]
    """the methods to run: sft, best_of_k, rejection_sampling, ppo, grpo, rloo, reinforce_pp, dpo, ipo, rs_ppo,
    ppo_async, grpo_async; by default every one but the asynchronous-rollout variants (ppo_async, grpo_async)"""
    samples_per_method: int = Field(1024, ge=64)
    """responses sampled by each online method (its training budget)"""
    prompts_per_iteration: int = Field(16, ge=1)
    """PPO-family batch: prompts x rollout samples per iteration"""
    samples_per_prompt: int = Field(4, ge=2)
    """rollout samples per prompt of the PPO-family methods"""
    rs_samples_per_prompt: int = Field(8, ge=2)
    """K of a rejection-sampling round"""
    best_of_k: int = Field(16, ge=2)
    """K of best-of-K sampling from the SFT policy (inference-time, no training)"""
    eval_points: int = Field(2, ge=1)
    """validation/test evaluations along a PPO-family run (and one at its start)"""
    overoptimisation: OveroptimisationSweepConfig | None = OveroptimisationSweepConfig()
    """the over-optimisation sweep; null: none"""
    results_file: str | None = None
    """where the JSON goes; null: <output_dir>/results.json (<output_dir>/verifiable.json for that suite)"""
    suite: Literal["methods", "verifiable"] = "methods"
    """methods: every method on the built-in helpful task; verifiable: GRPO and its stabilisers on the
    arithmetic task (docs/results-verifiable.md)"""
    verifiable: VerifiableSuiteConfig = VerifiableSuiteConfig()
    """the verifiable suite's runs"""

    @model_validator(mode="after")
    def _budget(self) -> ResultsConfig:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        per_iteration = self.prompts_per_iteration * self.samples_per_prompt
        if self.samples_per_method % per_iteration:
            raise ValueError(f"samples_per_method={self.samples_per_method} must be a multiple of "
                             f"prompts_per_iteration x samples_per_prompt = {per_iteration}")
        if (self.samples_per_method // 2) % self.rs_samples_per_prompt:
            raise ValueError(f"samples_per_method / 2 must be a multiple of rs_samples_per_prompt="
                             f"{self.rs_samples_per_prompt} (rejection-sampling rounds spend it in halves)")
        return self
