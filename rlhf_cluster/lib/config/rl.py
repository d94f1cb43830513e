"""The RL jobs' configs: PPO and its critic-free estimators, the reward sources, fault tolerance, asynchronous
rollout and DAPO's stabilisers, and rejection sampling, which runs PPO rounds too and so takes PPO's keys.
The rules between keys live on the models, so a bad combination fails when the config loads."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rlhf_cluster.lib import placement
from rlhf_cluster.lib.config.base import DataConfig, JobConfig, ModelSource, Strict
from rlhf_cluster.lib.config.groups import (
    ColocateConfig,
    GroupResources,
    OptimConfig,
    RolloutConfig,
    ScorerConfig,
    TrainerConfig,
)


class RewardServiceConfig(Strict):
    """A remote reward service in the reward slot (OpenRLHF's POST /get_reward protocol; this
    project's reward app speaks it): scores come over HTTP instead of from a local reward group."""

    url: str
    """e.g. http://reward.svc:8000/reward (the app's route prefix included)"""
    token_env: str = "RLHF_REWARD_TOKEN"
    """the driver's environment variable holding the bearer token"""
    batch_size: int = Field(64, ge=1, le=512)
    """queries per request (the app accepts at most 512)"""
    timeout_s: float = Field(60.0, gt=0.0)
    """per request"""
    retries: int = Field(5, ge=0)
    """retries of a failed request (connection errors, 5xx, 429), with backoff"""

    @model_validator(mode="after")
    def _http(self) -> RewardServiceConfig:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        return self


EXACT_MATCH = "rlhf_cluster.lib.reward_functions:exact_match"  # the built-in arithmetic task's verifier


class RewardSource(Strict):
    """One term of the reward (`rewards:` of a PPO config): a learned reward model, a Python function, or
    a remote endpoint; the reward is the weighted sum of the terms."""

    name: str
    """the source's name in metrics and messages"""
    model: str | None = None
    """a reward model directory (sequence classification, one output)"""
    fn: str | None = None
    """"package.module:function": (prompts, responses, labels) -> list[float]"""
    url: str | None = None
    """a reward service speaking OpenRLHF's POST /get_reward (query, prompts, labels)"""
    weight: float = 1.0
    """its weight in the sum"""
    timeout_s: float = Field(60.0, gt=0.0)
    """per call of a function or request to a url"""
    needs_label: bool = True
    """fn: a prompt without a label is a bad sample (data.on_bad_sample)"""
    token_env: str = "RLHF_REWARD_TOKEN"
    """url: the driver's environment variable holding the bearer token"""
    batch_size: int = Field(64, ge=1, le=512)
    """url: queries per request"""

    @model_validator(mode="after")
    def _one_kind(self) -> RewardSource:
        kinds = [k for k in ("model", "fn", "url") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(f"reward source {self.name!r} needs exactly one of model, fn, url (got {kinds or 'none'})")
        if self.fn:
            from rlhf_cluster.lib.reward_functions import load_function

            load_function(self.fn)  # importable and callable, before any actor starts
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"reward source {self.name!r}: url must start with http:// or https://")
        return self



class FaultToleranceConfig(Strict):
    """How the RL coordinators ride out actor failures and bad numbers (docs/reliability.md)."""

    actor_restarts: int = Field(3, ge=0)
    """Ray restarts of a rollout engine / reference / reward actor; the call in flight is retried"""
    max_rollbacks: int = Field(3, ge=0)
    """DeepSpeed groups (policy, critic) cannot rejoin their process group rank by rank: a lost rank means the
    group is rebuilt and the run rolls back to its last complete checkpoint, at most this many times per run
    """
    max_consecutive_skips: int = Field(3, ge=1)
    """iterations in a row whose update was skipped (non-finite rewards, losses or gradients) before the run
    halts
    """
    ping_timeout_s: float = Field(60.0, gt=0.0)
    """a rank that does not answer a ping within this many seconds after a failure is treated as lost"""
    restart_timeout_s: float = Field(600.0, gt=0.0)
    """how long to wait for Ray to bring a restarted actor back (a vLLM engine needs tens of seconds)"""


class AsyncRolloutConfig(Strict):
    """Asynchronous rollout (rlhf_cluster/rl/rollout.py): the engines sample the next batches while the
    learner trains. A sample is trained on at most `max_staleness` policy versions after the weights that
    sampled it; 0 is the synchronous step. With old_logprobs=recompute, stale samples get truncated
    importance weights (the recomputed policy's log-probs over the engine's, capped at `is_cap`); with
    old_logprobs=sampler, PPO's ratio is taken against the engine's weights themselves (off-policy PPO:
    the clip bounds the step; no extra forward pass)."""

    max_staleness: int = Field(0, ge=0)
    """policy versions a sample may be behind the learner when trained on; 0: the synchronous step"""
    is_cap: float = Field(2.0, ge=1.0)
    """TIS's truncation C (OpenRLHF and Yao et al. use 2)"""


class OverlongConfig(Strict):
    """DAPO's overlong handling: a soft penalty on responses that approach the generation budget
    (rollout.max_new_tokens), and/or no loss on responses cut off by it (their reward judges an unfinished answer)."""

    buffer: int | None = Field(None, ge=1)
    """set: penalty ramps from 0 at max_new_tokens - buffer to -penalty at it"""
    penalty: float = Field(1.0, ge=0.0)
    """the penalty at the budget (the ramp's depth)"""
    mask_truncated: bool = False
    """no loss on responses that hit rollout.max_new_tokens"""


class DynamicSamplingConfig(Strict):
    """DAPO's dynamic sampling (grpo / rloo): prompt groups whose samples all scored the same carry no
    advantage; drop them and sample more prompts, at most `max_extra_batches` more batches per iteration,
    until the batch holds prompts_per_iteration informative groups (or the bound is hit)."""

    enabled: bool = False
    """drop prompt groups whose samples all scored alike and sample more prompts"""
    max_extra_batches: int = Field(2, ge=0)
    """at most this many extra batches per iteration"""


class PPOConfig(JobConfig):
    """PPO (or a critic-free estimator) with a KL penalty to the reference policy."""

    output_dir: str = "runs/ppo"
    policy: ModelSource = ModelSource()
    """null: the built-in SFT policy"""
    reward: ModelSource = ModelSource()
    """null: the built-in reward model"""
    reward_service: RewardServiceConfig | None = None
    """set: score over HTTP instead of a local reward group"""
    combine: Literal["weighted_sum", "llama2"] = "weighted_sum"
    """how several reward terms (`rewards`; rejection sampling: `reward_models`) combine: weighted_sum, or Llama 2's
    rule: the `safety` term where the prompt is flagged unsafe (its record's `unsafe: true`, or the built-in task's
    unsafe requests) or the safety term's sigmoid is below safety_threshold, else the `helpfulness` term"""
    safety_threshold: float = Field(0.15, gt=0.0, lt=1.0)
    """on the sigmoid of the safety score"""
    rewards: list[RewardSource] = []
    """set: the reward is the weighted sum of these sources (models, functions on labels, endpoints), in place of
    `reward` / `reward_service`
    """
    data: DataConfig = DataConfig()
    """prompts (train, validation, test)"""
    trainer: TrainerConfig = TrainerConfig(num_ranks=2, num_cpus_per_rank=0.5,
                                           optim=OptimConfig(lr=1e-5, weight_decay=0.0))
    """the policy's DeepSpeed group"""
    critic: TrainerConfig = TrainerConfig(num_ranks=1, num_cpus_per_rank=0.25,
                                          optim=OptimConfig(lr=5e-5, weight_decay=0.0))
    """the critic's DeepSpeed group (estimator gae)"""
    reference: ScorerConfig = ScorerConfig(num_cpus_per_rank=0.25)
    """the frozen reference policy's group (the KL penalty)"""
    reward_group: ScorerConfig = ScorerConfig(num_cpus_per_rank=0.25)
    """the reward group: a local reward model, the reward-service client, or the rewards sources"""
    rollout: RolloutConfig = RolloutConfig(samples_per_prompt=4, num_cpus_per_engine=0.25)
    """the vLLM engines and how they sample"""
    estimator: str = "gae"
    """advantages, a row of lib/algorithms.py's ESTIMATORS: gae (with a critic), grpo, rloo (a group baseline),
    reinforce_pp"""
    iterations: int = Field(20, ge=1)
    """iterations of the run (sample, score, update, sync)"""
    stop_after_iterations: int | None = Field(None, ge=1)
    """end this session early; --resume continues"""
    prompts_per_iteration: int = Field(16, ge=1)
    """prompts sampled per iteration"""
    mini_batches: int = Field(1, ge=1)
    """optimiser steps per PPO epoch over one iteration's samples"""
    ppo_epochs: int = Field(1, ge=1)
    """passes over an iteration's samples"""
    old_logprobs: Literal["auto", "recompute", "sampler"] = "auto"
    """Where the behaviour policy's log-probs (PPO's ratio, the KL penalty) come from. `recompute`: a forward
    pass of the policy trainer over each batch (OpenRLHF, veRL). `sampler`: the log-probs the rollout engine
    returned with each sampled token, which saves that pass; equal up to rounding when engine and trainer
    compute in the same dtype (fp32 on CPU: tests/test_actors.py), not in bf16 on GPUs. `auto`: sampler where
    the models compute in fp32 (measured gap < 1e-4 per token, tests/test_ppo.py), recompute in bf16 (measured
    mean gap 1.3e-3 per token on a CPU, docs/performance.md).
    """
    async_rollout: AsyncRolloutConfig = AsyncRolloutConfig()
    """sample the next batches while the learner trains"""
    clip_eps: float = Field(0.2, gt=0.0)
    """the ratio's lower bound 1 - clip_eps (and upper, unless clip_eps_high)"""
    clip_eps_high: float | None = Field(None, gt=0.0)
    """DAPO's clip-higher: upper bound 1 + clip_eps_high (e.g. 0.28)"""
    dual_clip: float | None = Field(None, gt=1.0)
    """dual-clip PPO's c > 1: bounds the loss of negative-advantage tokens with huge ratios"""
    value_clip_eps: float = Field(0.2, gt=0.0)
    """the critic's value clip around the old values"""
    entropy_coef: float = Field(0.0, ge=0.0)
    """entropy bonus coefficient"""
    ptx_coef: float = Field(0.0, ge=0.0)
    """PPO-ptx (InstructGPT): after each policy step, a step on ptx_coef x NLL of SFT/pretraining data"""
    ptx_data: str | None = None
    """JSONL of conversations (SFT format); null: the built-in SFT data"""
    ptx_batch_size: int = Field(16, ge=1)
    """SFT samples per PPO-ptx step"""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """discount"""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE's lambda"""
    whiten_advantages: bool = True
    """whiten GAE advantages over the batch"""
    reward_clip: float | None = Field(None, gt=0.0)
    """clip rewards to [-reward_clip, reward_clip]"""
    normalize_rewards: bool = False
    """normalise rewards by a running standard deviation"""
    kl_coef: float = Field(0.05, ge=0.0)
    """KL penalty coefficient beta (the start value with kl_target)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimator: k1 (log ratio), k2, k3 (Schulman's); of the reward penalty and the kl/* metrics"""
    kl_mode: Literal["reward", "loss"] = "reward"
    """reward: -kl_coef x KL on every token of the reward (InstructGPT; what GAE needs); loss: the reward is the score
    alone and kl_coef x k3 KL is a term of the policy loss (GRPO, DeepSeekMath), so no KL noise becomes the
    advantage of a group whose scores are all equal (a 0/1 verifier's usual case)"""
    kl_target: float | None = Field(None, gt=0.0)
    """set: adaptive KL controller (Ziegler et al.)"""
    kl_horizon: int = Field(10000, ge=1)
    """the adaptive controller's horizon"""
    loss_agg: Literal["token", "sequence", "sequence_sum", "sequence_sum_norm"] = "token"
    """token: mean over the mini-batch's tokens; sequence: mean over sequences of their token means;
    sequence_sum: of their token sums; sequence_sum_norm: token sums over rollout.max_new_tokens (Dr. GRPO);
    lib/algorithms.py
    """
    grpo_scale_by_std: bool = True
    """false: Dr. GRPO's advantage r - mean(group), no division by the group std"""
    overlong: OverlongConfig = OverlongConfig()
    """DAPO's overlong penalty and filter"""
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    """DAPO's dynamic sampling"""
    eval_every: int = Field(5, ge=1)
    """iterations between held-out evaluations"""
    eval_temperature: float = Field(0.0, ge=0.0)
    """0: greedy, so evaluations are comparable"""
    eval_samples_per_prompt: int = Field(4, ge=1)
    """sampled responses per prompt for the sampled KL / RM / gold (and pass@k, k = this, with a verifier)"""
    eval_verifier: str | None = None
    """"package.module:function" deciding which held-out responses are correct (score > 0): the evaluation then
    reports accuracy (greedy, the `gold` that chooses), pass@1 and pass@k; null: the first function of `rewards`
    that reads labels, else the built-in task's gold scorer"""
    early_stop: Literal["none", "val_gold"] = "none"
    """Reward over-optimisation (Gao et al. 2022): when, over the last `overoptimisation_patience` evaluations,
    the validation RM score rose while validation gold fell, the run warns; with early_stop=val_gold it also
    stops there (and keeps a checkpoint at every new best validation gold, so the best one survives)
    """
    overoptimisation_patience: int = Field(2, ge=1)
    """evaluations the over-optimisation rule looks back over"""
    checkpoint_every: int = Field(10, ge=1)
    """iterations between checkpoints"""
    keep_checkpoints: int = Field(2, ge=1)
    """checkpoints kept (the newest; the best by validation gold is kept too)"""
    checkpoint_storage: str | None = None
    """where checkpoints go: null, <output_dir>/checkpoints; or a storage URI (s3://bucket/prefix, gs://..., any
    filesystem pyarrow opens; file:///path for a local one) that every rank writes its own files to and reads
    them back from, so on a cluster of several nodes no rank needs another node's disk (rlhf_cluster/lib/storage.py)
    """
    registry: str | None = None
    """redis://... or a directory; null: $REDIS_URL or the embedded default"""
    fault_tolerance: FaultToleranceConfig = FaultToleranceConfig()
    """how failures and bad numbers are ridden out"""
    colocate: ColocateConfig = ColocateConfig()
    """groups that share devices"""
    registry_run: str | None = None
    """the `run` of this job's registry entries; null: output_dir's name"""

    # true where a pipeline (or a feedback round) fills in the reward models from the registry and checks their
    # names itself: this config then checks neither the names nor combine=llama2's terms
    rewards_from_registry: ClassVar[bool] = False

    @field_validator("checkpoint_storage")
    @classmethod
    def _storage_scheme(cls, v: str | None) -> str | None:
        schemes = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
        if v and "://" in v and v.split("://")[0] not in schemes:
            raise ValueError(f"checkpoint_storage {v!r}: the scheme must be one of {', '.join(schemes)} (pyarrow.fs)")
        return v

    @model_validator(mode="after")
    def _one_way_to_reward(self) -> PPOConfig:
        if self.rewards:
            if self.reward_service or self.reward.path:
                raise ValueError("rewards replaces reward / reward_service: set one of them, not both")
            names = [r.name for r in self.rewards]
            if len(set(names)) != len(names):
                raise ValueError(f"rewards names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _partitioned_reward_is_one_model(self) -> PPOConfig:
        if self.reward_group.partition and (self.rewards or self.reward_service):
            raise ValueError("reward_group.partition shards one local reward model (reward.path) across the ranks; "
                             f"it does not apply to {'rewards' if self.rewards else 'reward_service'}")
        return self

    def _combined_terms(self) -> tuple[str, list[str]]:
        """(the key, the names) of what `combine` combines; rejection sampling combines its reward_models."""
        return "rewards", [r.name for r in self.rewards]

    @model_validator(mode="after")
    def _llama2_rule_has_its_terms(self) -> PPOConfig:
        if self.rewards_from_registry:
            return self
        key, names = self._combined_terms()
        if self.combine == "llama2" and not {"helpfulness", "safety"} <= set(names):
            raise ValueError(f"combine=llama2 needs {key} named 'helpfulness' and 'safety' (got {names})")
        return self

    def needs_labels(self) -> bool:
        """Some reward function reads labels: prompts without one are bad samples."""
        return any(r.fn and r.needs_label for r in self.rewards)

    def verifier(self) -> str | None:
        """The function that decides correctness in evaluation (`eval_verifier`), or None: the built-in gold."""
        builtin = EXACT_MATCH if self.builtin.task == "arithmetic" and not self.data.train else None
        return self.eval_verifier or next((r.fn for r in self.rewards if r.fn and r.needs_label), builtin)

    @model_validator(mode="after")
    def _verifiable_task_has_a_verifier(self) -> PPOConfig:
        if self.eval_verifier:
            from rlhf_cluster.lib.reward_functions import load_function

            load_function(self.eval_verifier)
        if (self.builtin.task == "arithmetic" and not self.data.train
                and not (self.rewards or self.reward_service or self.reward.path)):
            raise ValueError("builtin.task=arithmetic has no reward model: score it with a function on its labels, "
                             "rewards: [{name: exact_match, fn: 'rlhf_cluster.lib.reward_functions:exact_match'}] "
                             "(configs/verifiable-grpo.yaml)")
        return self

    @field_validator("estimator")
    @classmethod
    def _estimator_is_a_row(cls, name: str) -> str:
        from rlhf_cluster.lib.algorithms import estimator

        estimator(name)  # or the error listing the rows
        return name

    @property
    def needs_critic(self) -> bool:
        """Whether the estimator trains a critic (the job then starts the critic group)."""
        from rlhf_cluster.lib.algorithms import estimator

        return estimator(self.estimator).needs_critic

    @property
    def needs_groups(self) -> bool:
        """Whether the estimator's baseline is the group of samples of a prompt."""
        from rlhf_cluster.lib.algorithms import estimator

        return estimator(self.estimator).needs_groups

    @model_validator(mode="after")
    def _stabilisers_fit(self) -> PPOConfig:
        if self.dynamic_sampling.enabled and not self.needs_groups:
            raise ValueError(f"dynamic_sampling needs a group baseline (an estimator like grpo or rloo), "
                             f"not estimator={self.estimator}")
        if self.overlong.buffer is not None and self.overlong.buffer > self.rollout.max_new_tokens:
            raise ValueError(f"overlong.buffer={self.overlong.buffer} is longer than rollout.max_new_tokens="
                             f"{self.rollout.max_new_tokens}")
        return self

    @model_validator(mode="after")
    def _token_budgets_hold_a_sequence(self) -> PPOConfig:
        longest = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        for name in ("trainer", "critic", "reference", "reward_group"):
            budget = getattr(self, name).max_tokens_per_micro_batch
            if budget is not None and budget < longest:
                raise ValueError(f"{name}.max_tokens_per_micro_batch={budget} cannot hold the longest sequence: "
                                 f"data.max_prompt_tokens {self.data.max_prompt_tokens} + rollout.max_new_tokens "
                                 f"{self.rollout.max_new_tokens} = {longest} tokens")
        return self

    @model_validator(mode="after")
    def _group_estimators_need_samples(self) -> PPOConfig:
        if self.needs_groups and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"estimator={self.estimator} needs rollout.samples_per_prompt >= 2")
        return self

    def resolve_precision(self, flags: set[str]) -> str:
        """JobConfig's, and `old_logprobs: auto` follows the policy's dtype."""
        line = super().resolve_precision(flags)
        if self.old_logprobs == "auto":
            self.old_logprobs = "sampler" if self.policy.dtype == "float32" else "recompute"
            line += f"; old log-probs: {self.old_logprobs} (auto)"
        return line

    def group_resources(self) -> dict[str, GroupResources]:
        """Every actor group of the job under its config key (rollout engines as ranks)."""
        return placement.group_resources(self)

    def colocated_sets(self) -> list[list[str]]:
        """The sets of groups (config keys) that share a placement group, per `colocate`."""
        return placement.colocated_sets(self)

    @model_validator(mode="after")
    def _colocated_groups_fit(self) -> PPOConfig:
        placement.check_colocation(self)
        transport = self.rollout.weight_transport
        if transport != "object_store" and not self.trainer.num_gpus_per_rank:
            raise ValueError(f"rollout.weight_transport={transport} sends from GPU: trainer.num_gpus_per_rank > 0")
        if transport == "ipc" and not self.colocate.all:
            raise ValueError("rollout.weight_transport=ipc shares GPU memory: it needs colocate.all "
                             "(trainer rank i and engine i on the same GPU); use nccl otherwise")
        return self

    def resource_groups(self) -> dict[str, tuple[float, float]]:
        return {name: g.demand() for name, g in self.group_resources().items()}


class RejectionSamplingConfig(Strict):
    """One rejection-sampling round: K samples per prompt, keep the best by reward, fine-tune on it."""

    samples_per_prompt: int = Field(8, ge=1)
    """K"""
    temperature: float = Field(1.0, gt=0.0)
    """sampling temperature of the K samples"""
    prompts_per_round: int | None = Field(None, ge=1)
    """null: every training prompt"""
    score_threshold: float | None = None
    """keep the best sample only if its reward is at least this"""
    dedup: bool = True
    """drop a selected response already selected for the same prompt"""
    epochs: int = Field(2, ge=1)
    """SFT epochs over the selected set"""
    lr: float = Field(2e-4, gt=0.0)
    """learning rate of the fine-tuning on the selected samples"""


class RewardModelSpec(Strict):
    name: str
    """its name (helpfulness and safety for combine=llama2)"""
    path: str
    """a reward model directory"""
    weight: float = 1.0
    """its weight with combine=weighted_sum"""


class RSConfig(PPOConfig):
    """Iterative rounds (Llama 2): rejection sampling, optionally PPO on top; each round starts
    from the best model so far by held-out evaluation."""

    output_dir: str = "runs/rejection-sampling"
    rounds: list[Literal["rejection_sampling", "ppo"]] = ["rejection_sampling"]
    """the rounds, in order: rejection_sampling and/or ppo"""
    rs: RejectionSamplingConfig = RejectionSamplingConfig()
    """each rejection-sampling round"""
    promote_by: Literal["val_gold", "val_rm"] = "val_gold"
    """the validation metric that picks the best model: gold score of greedy responses to the validation prompts
    (a small human-judged set, in a real deployment) or the reward model's score of them
    """
    best_of_k_eval: list[int] = []
    """e.g. [1, 2, 4, 8]: gold score of best-of-K at the end"""
    best_of_k_seeds: int = Field(2, ge=1)
    """seeds of the best-of-K evaluation"""
    reward_models: list[RewardModelSpec] = []
    """several reward models combined (weighted sum, or Llama 2's safety/helpfulness rule); empty: the single
    `reward` model, or `rewards` (models, functions, endpoints, as in PPO)
    """
    def _combined_terms(self) -> tuple[str, list[str]]:
        if self.rewards:
            return super()._combined_terms()
        return "reward_models", [m.name for m in self.reward_models]

    @model_validator(mode="after")
    def _rounds_and_models(self) -> RSConfig:
        if not self.rounds:
            raise ValueError("rounds must name at least one round")
        if self.rewards_from_registry:
            return self
        if self.rewards and self.reward_models:
            raise ValueError("rewards replaces reward_models (both combine reward sources): set one of them")
        names = [m.name for m in self.reward_models]
        if len(set(names)) != len(names):
            raise ValueError(f"reward_models names must be unique, got {names}")
        return self
