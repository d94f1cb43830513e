"""Typed job configuration: one pydantic model per job, YAML files, dotted CLI overrides.

    python -m rlhf_cluster.ppo --config configs/tiny-cpu.yaml trainer.zero_stage=2 seed=3

Every check runs here, before any Ray actor starts: unknown keys, wrong types,
impossible combinations and resource requests the cluster cannot satisfy fail with a
message that names the key. One module per concern; every name is imported from here:

    base.py      the strict base, ConfigError, the sections every job has, JobConfig, the presets
    groups.py    actor groups: ranks and resources, trainers, scorers, rollout engines, colocation
    stages.py    SFT, reward model, DPO and evaluation
    rl.py        PPO and its reward sources, fault tolerance and stabilisers; rejection sampling
    pipeline.py  the whole pipeline and a feedback round
    results.py   the results harness
    loading.py   YAML files and overrides -> a validated config
    keys.py      --help's key listing and "did you mean"

The cluster arithmetic (groups, colocation, whether a cluster holds a job) is rlhf_cluster/lib/placement.py.
"""

from rlhf_cluster.lib.config.base import (
    CONFIG_DIR,
    REPO_ROOT,
    BuiltinConfig,
    ConfigError,
    DataConfig,
    JobConfig,
    ModelSource,
    RayConfig,
    Strict,
    TrackingConfig,
    preset_or_path,
    presets,
)
from rlhf_cluster.lib.config.groups import (
    ColocateConfig,
    GroupResources,
    LoraConfig,
    OptimConfig,
    RolloutConfig,
    ScorerConfig,
    TrainerConfig,
)
from rlhf_cluster.lib.config.keys import config_keys, keys_help
from rlhf_cluster.lib.config.loading import load_config, parse_overrides
from rlhf_cluster.lib.config.pipeline import (
    SHARED_KEYS,
    FeedbackRoundConfig,
    PipelineConfig,
    PipelineFinalConfig,
    PipelineRewardConfig,
    PipelineSFTConfig,
)
from rlhf_cluster.lib.config.results import (
    DEFAULT_RESULT_METHODS,
    RESULT_METHODS,
    VERIFIABLE_VARIANTS,
    OveroptimisationSweepConfig,
    ResultsConfig,
    VerifiableSuiteConfig,
)
from rlhf_cluster.lib.config.rl import (
    EXACT_MATCH,
    AsyncRolloutConfig,
    DynamicSamplingConfig,
    FaultToleranceConfig,
    OverlongConfig,
    PPOConfig,
    RejectionSamplingConfig,
    RewardModelSpec,
    RewardServiceConfig,
    RewardSource,
    RSConfig,
)
from rlhf_cluster.lib.config.stages import DPOConfig, EvalConfig, RewardConfig, SFTConfig, StageConfig
from rlhf_cluster.lib.placement import check_resources, local_resources

__all__ = [
    "CONFIG_DIR", "DEFAULT_RESULT_METHODS", "EXACT_MATCH", "REPO_ROOT", "RESULT_METHODS", "SHARED_KEYS",
    "VERIFIABLE_VARIANTS", "AsyncRolloutConfig", "BuiltinConfig", "ColocateConfig", "ConfigError", "DataConfig",
    "DPOConfig", "DynamicSamplingConfig", "EvalConfig", "FaultToleranceConfig", "FeedbackRoundConfig",
    "GroupResources", "JobConfig", "LoraConfig", "ModelSource", "OptimConfig", "OverlongConfig",
    "OveroptimisationSweepConfig", "PipelineConfig", "PipelineFinalConfig", "PipelineRewardConfig",
    "PipelineSFTConfig", "PPOConfig", "RayConfig", "RejectionSamplingConfig", "ResultsConfig", "RewardConfig",
    "RewardModelSpec", "RewardServiceConfig", "RewardSource", "RolloutConfig", "RSConfig", "ScorerConfig",
    "SFTConfig", "StageConfig", "Strict", "TrackingConfig", "TrainerConfig", "VerifiableSuiteConfig",
    "check_resources", "config_keys", "keys_help", "load_config", "local_resources",
    "parse_overrides", "preset_or_path", "presets",
]
