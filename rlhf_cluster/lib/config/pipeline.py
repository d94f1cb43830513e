"""Configs that run several stages from one file: the whole pipeline (SFT -> reward models -> rejection sampling
/ PPO) and a feedback round of the service loop. Their stage sections are the stages' own configs, less the keys
the pipeline sets for every stage."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from rlhf_cluster.lib.config.base import JobConfig
from rlhf_cluster.lib.config.rl import RSConfig
from rlhf_cluster.lib.config.stages import RewardConfig, SFTConfig

# a pipeline's stages take these from the top level
SHARED_KEYS = ("seed", "output_dir", "ray", "builtin", "precision", "tracking")


def _owned_by_pipeline(stage: BaseModel, where: str, keys: tuple[str, ...] = (), job: str = "the pipeline") -> None:
    """A stage section must not set what the pipeline (or a feedback round) sets for every stage (or fills from the
    registry)."""
    default = type(stage)()
    for key in SHARED_KEYS + keys:
        if getattr(stage, key) != getattr(default, key):
            top = f"the top-level `{key}`" if key in SHARED_KEYS + ("registry",) else "the registry"
            raise ValueError(f"{where}.{key} is set by {job} (from {top}); remove it from {where}")


class PipelineSFTConfig(SFTConfig):
    """The pipeline's SFT stage: SFTConfig's keys, or an already trained policy."""

    use_existing: str | None = None
    """an HF policy directory registered as this stage's output; nothing trains"""


class PipelineRewardConfig(RewardConfig):
    """One reward-model stage of the pipeline: RewardConfig's keys plus a name and a weight."""

    name: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]{0,31}$")
    """null: the aspect"""
    weight: float = 1.0
    """in final.combine=weighted_sum"""
    use_existing: str | None = None
    """an HF reward-model directory registered as this stage's output"""

    @property
    def key(self) -> str:
        return self.name or self.aspect


class PipelineFinalConfig(RSConfig):
    """The pipeline's last stage: RSConfig's rounds, whose policy and reward model(s) the pipeline
    fills in from the registry (the SFT stage's policy, the reward stages' models)."""

    output_dir: str = "runs/rejection-sampling"
    rounds: list[Literal["rejection_sampling", "ppo"]] = ["rejection_sampling", "ppo"]
    rewards_from_registry: ClassVar[bool] = True  # the reward models come from the registry, checked by the job


class PipelineConfig(JobConfig):
    """SFT -> reward model(s) -> rejection-sampling / PPO rounds -> evaluation, from one config.

    Each stage's model is registered in the checkpoint registry; the next stage reads it from
    there. seed, output_dir, ray, builtin, precision (and registry) are shared: stage sections leave them out.
    """

    output_dir: str = "runs/pipeline"
    registry: str | None = None
    """redis://... or a directory; null: $REDIS_URL or the embedded default"""
    sft: PipelineSFTConfig = PipelineSFTConfig()
    """the SFT stage"""
    reward_models: list[PipelineRewardConfig] = [PipelineRewardConfig()]
    """the reward-model stages"""
    final: PipelineFinalConfig = PipelineFinalConfig()
    """the rejection-sampling / PPO rounds"""
    final_reward: str | None = None
    """RM of PPO rounds and of */rm_score; null: `overall` if trained, else the first"""
    rerun: list[str] = []
    """stages to run again although their registered output is intact; [all]: every stage"""

    def stage_names(self) -> list[str]:
        return ["sft", *(f"reward_{r.key}" for r in self.reward_models), "final"]

    def final_reward_name(self) -> str:
        names = [r.key for r in self.reward_models]
        return self.final_reward or ("overall" if "overall" in names else names[0])

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        _owned_by_pipeline(self.sft, "sft")
        for i, rm in enumerate(self.reward_models):
            _owned_by_pipeline(rm, f"reward_models.{i}")
        _owned_by_pipeline(self.final, "final", ("registry", "policy", "reward", "reward_models"))
        if not self.reward_models:
            raise ValueError("reward_models must hold at least one reward model")
        names = [r.key for r in self.reward_models]
        if len(set(names)) != len(names):
            raise ValueError(f"reward_models names must be unique (a name defaults to the aspect), got {names}")
        if self.final.combine == "llama2" and not {"helpfulness", "safety"} <= set(names):
            raise ValueError(f"final.combine=llama2 needs reward models named 'helpfulness' and 'safety', got {names}")
        if self.final_reward is not None and self.final_reward not in names:
            raise ValueError(f"final_reward={self.final_reward!r} names none of the reward models {names}")
        unknown = sorted(set(self.rerun) - set(self.stage_names()) - {"all"})
        if unknown:
            raise ValueError(f"rerun names unknown stages {unknown}; the stages are {self.stage_names()} (or all)")
        return self


class FeedbackRoundConfig(JobConfig):
    """One round of the service loop: the preferences collected since the last round -> the reward model continued
    on them (with a replay share of earlier pairs), measured on held-out feedback -> rejection-sampling / PPO
    rounds from the served policy -> the best promoted, which the policy service then serves.
    seed, output_dir, ray, builtin, precision (and registry) are shared: `reward` and `rl` leave them out."""

    output_dir: str = "runs/feedback-rounds"
    """round_<n>/ per round; rounds.json: the rounds so far and the feedback cursor the next one starts from"""
    registry: str | None = None
    """redis://... or a directory; null: $REDIS_URL or the embedded default (the policy service's registry)"""
    feedback: str | None = None
    """the feedback store: redis://..., a SQLite file; null: $RLHF_FEEDBACK, $REDIS_URL or the default file"""
    min_pairs: int = Field(8, ge=1)
    """fewer new preference pairs than this: no round (the cursor stays, the feedback waits for the next)"""
    heldout_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    """share of the new feedback's prompts kept out of training: the new reward model's accuracy is measured
    there (the old model's too, for comparison)"""
    replay: str | None = None
    """earlier preference pairs mixed into the reward model's training; null: the built-in task's training pairs"""
    replay_ratio: float = Field(1.0, ge=0.0)
    """earlier pairs per new pair"""
    reward: RewardConfig = RewardConfig(epochs=2, loss="margin")
    """how the reward model is continued: RewardConfig's keys; `model.path` null = the registry's served reward
    model (else the built-in one); `data.train` / `data.eval` are the round's"""
    rl: PipelineFinalConfig = PipelineFinalConfig(rounds=["rejection_sampling"])
    """the policy rounds: RSConfig's keys; they start from the registry's served policy (else the built-in SFT
    policy) and promote their best by validation"""

    @model_validator(mode="after")
    def _owned(self) -> FeedbackRoundConfig:
        _owned_by_pipeline(self.reward, "reward", job="the feedback round")
        _owned_by_pipeline(self.rl, "rl", ("registry", "policy", "reward", "reward_models"), job="the feedback round")
        if self.reward.data.train or self.reward.data.eval:
            raise ValueError("reward.data.train / reward.data.eval are the round's (new feedback + replay, "
                             "held-out feedback); remove them")
        return self
