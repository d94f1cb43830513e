"""The sections that describe an actor group: its ranks and what each asks Ray for, how it trains (DeepSpeed,
optimiser, LoRA) or samples (the rollout engines), and which groups share devices. Jobs and actors both read
them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_cluster.lib.config.base import Strict


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
