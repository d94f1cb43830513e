"""The supervised stages (SFT, reward model, DPO), one Ray Train worker group each, and the evaluation job."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_cluster.lib.config.base import DataConfig, JobConfig, ModelSource
from rlhf_cluster.lib.config.groups import OptimConfig, RolloutConfig, TrainerConfig


class StageConfig(JobConfig):
    """What the Ray Train stages (SFT, reward model, DPO) share: evaluation, checkpoints, retries."""

    eval_every: int = Field(20, ge=1)
    """optimizer steps between held-out evaluations"""
    checkpoint_every: int = Field(20, ge=1)
    """optimizer steps between Ray Train checkpoints"""
    keep_checkpoints: int = Field(2, ge=1)
    """Ray Train checkpoints kept"""
    max_failures: int = Field(2, ge=0)
    """worker-group restarts (from the last checkpoint) before giving up"""
    model: ModelSource = ModelSource()
    """the model this stage starts from"""
    data: DataConfig = DataConfig()
    """training and validation data"""
    trainer: TrainerConfig = TrainerConfig()
    """the DeepSpeed worker group"""

    def resource_groups(self) -> dict[str, tuple[float, float]]:
        return {"trainer": self.trainer.demand()}


class SFTConfig(StageConfig):
    output_dir: str = "runs/sft"
    trainer: TrainerConfig = TrainerConfig(optim=OptimConfig(lr=1e-3, warmup_steps=10))
    epochs: int = Field(2, ge=1)
    """passes over the training data"""
    packing: bool = False
    """pack samples into rows of data.max_sequence_tokens (block-diagonal attention, no padding)"""
    gold_eval: bool = True
    """sample held-out prompts with vLLM and gold-score them (built-in task only)"""
    rollout: RolloutConfig = RolloutConfig(samples_per_prompt=4, max_new_tokens=32)
    """sampling for the gold evaluation of the trained policy"""


class RewardConfig(StageConfig):
    output_dir: str = "runs/reward"
    trainer: TrainerConfig = TrainerConfig(optim=OptimConfig(lr=5e-4, warmup_steps=10))
    epochs: int = Field(2, ge=1)
    """passes over the preference pairs"""
    loss: Literal["bradley_terry", "margin", "ranking"] = "bradley_terry"
    """bradley_terry: -log sigmoid(r_chosen - r_rejected); margin: Llama 2's margin by preference strength;
    ranking: chosen above every other response
    """
    margins: dict[str, float] = {
        "significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0,
    }
    """Llama 2's margin per preference strength"""
    aspect: Literal["overall", "helpfulness", "safety"] = "overall"
    """which preference labels train it: overall, or one aspect (Llama 2 trains helpfulness and safety apart)"""
    builtin_init: Literal["sft", "reward_base"] = "reward_base"
    """model.path null: start from this built-in model"""


class DPOConfig(StageConfig):
    output_dir: str = "runs/dpo"
    trainer: TrainerConfig = TrainerConfig(optim=OptimConfig(lr=1e-4))
    epochs: int = Field(1, ge=1)
    """passes over the preference pairs"""
    beta: float = Field(0.1, gt=0.0)
    """DPO's beta: strength of the implicit KL constraint to the reference"""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO; ipo: IPO's squared loss"""
    nll_coef: float = Field(0.0, ge=0.0)
    """+ nll_coef x length-normalised NLL of chosen (RPO; Llama 3: 0.2)"""
    gold_eval: bool = True
    """sample held-out prompts with vLLM and gold-score them (built-in task only)"""
    rollout: RolloutConfig = RolloutConfig(samples_per_prompt=4, max_new_tokens=32)
    """sampling for the gold evaluation"""


class EvalConfig(JobConfig):
    """`python -m rlhf_cluster.evaluate`: gold-score one policy's samples on held-out prompts (no Ray)."""

    output_dir: str = "runs/evaluate"
    model: ModelSource = ModelSource()
    """path null: the built-in base policy"""
    prompts: str | None = None
    """a prompts file; null: the built-in held-out prompts"""
    rollout: RolloutConfig = RolloutConfig(samples_per_prompt=4, max_new_tokens=32)
    """how the policy samples"""
