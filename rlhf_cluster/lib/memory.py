"""Memory planner: what each actor group of an RL job needs per rank, before anything starts, and
whether the layout fits its devices (host memory on CPU, each GPU's memory on GPUs).

Per rank, with P the model's parameters, P_t the trainable ones (LoRA: the adapters), b bytes per value
of its dtype (4 fp32, 2 bf16), N ranks, ZeRO stage z, T tokens per micro-batch and s the longest
sequence (prompt + response budget), L layers, h hidden size, a attention heads, V vocabulary:

  weights      P b                         (/N with z = 3)
  gradients    P_t b                       (/N with z >= 2)
  optimizer    P_t (8 + 4 [b = 2])         Adam's two fp32 moments, + fp32 master weights under bf16
                                           (/N with z >= 1; in host memory with `offload`)
  activations  L T h (34 + 5 a s / h) b/2  kept for backward (Korthikanti et al. 2022, their 16-bit count
                                           scaled to b; the 5 a s / h attention-score term only on CPU, where
                                           attention materialises its scores: GPU kernels do not keep them);
                                           with gradient checkpointing L T h b (each layer's input) + one
                                           layer's worth; inference keeps one layer's worth
  logits       3 C V 4                     fp32 logits, log-softmax and its gradient of one chunk of C = min(T,
                                           lib/logprobs.default_chunk(V)) tokens: log-probs are taken a chunk at
                                           a time (inference: 2 C V 4; a reward or value head: none)
  KV cache     rollout.kv_cache_gib on CPU; on a GPU vLLM takes gpu_memory_utilization of the device,
               weights included
  process      the measured resident size of an idle actor of the kind (torch, transformers, DeepSpeed or
               vLLM imported) — host memory only

These are estimates: what the planner says is the arithmetic above, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1 << 30
# resident size of an actor process besides its model (measured with ps during the PPO smoke test on the
# tiny model, 2026-12-03: RolloutEngine 1.86 GiB with its 1 GiB KV cache, PolicyTrainer 0.69, Critic 0.70,
# ReferenceModel / RewardModel 0.63 GiB)
PROCESS_BYTES = {"trainer": int(0.7 * GIB), "scorer": int(0.63 * GIB), "engine": int(0.87 * GIB)}


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    lm_head: bool  # a causal LM's vocabulary projection (a reward / value head has none)
    lora_params: int = 0  # the adapters' parameters for the config's LoRA targets (0: no LoRA)


def model_shape(path: str, kind: str, lora=None) -> ModelShape:
    """The shape of the model at `path` (`kind`: causal_lm | reward | value), counted on the meta device: no
    weights are read. `lora`: the trainer's LoraConfig, to count its adapters."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    cls = {"causal_lm": transformers.AutoModelForCausalLM, "reward": transformers.AutoModelForSequenceClassification,
           "value": transformers.AutoModelForTokenClassification}[kind]
    if kind != "causal_lm":
        config.num_labels = 1
    with torch.device("meta"):
        model = cls.from_config(config)
    adapters = 0
    if lora is not None and lora.enabled:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in lora.target_modules:
                adapters += lora.rank * (module.in_features + module.out_features)
    text = getattr(config, "text_config", config)
    return ModelShape(params=sum(p.numel() for p in model.parameters()), layers=text.num_hidden_layers,
                      hidden=text.hidden_size, heads=text.num_attention_heads, vocab=text.vocab_size,
                      lm_head=kind == "causal_lm", lora_params=adapters)


@dataclass
class GroupNeed:
    """One group's estimate per rank, in bytes, by part."""

    name: str
    ranks: int
    gpus_per_rank: float
    parts: dict[str, int] = field(default_factory=dict)
    host_parts: dict[str, int] = field(default_factory=dict)  # what sits in host memory even on a GPU layout

    @property
    def per_rank(self) -> int:
        return sum(self.parts.values())


REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size (ZeRO 2 and 3), which we keep


def _bytes(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def _chunk(tokens: int, vocab: int) -> int:
    """Tokens whose logits are live at once: log-probs are taken a chunk at a time (lib/logprobs.py)."""
    from rlhf_cluster.lib.logprobs import default_chunk

    return min(tokens, default_chunk(vocab))


def _layer_activations(shape: ModelShape, tokens: int, seq: int, b: int, on_gpu: bool) -> int:
    """What one layer keeps for backward over `tokens` tokens (Korthikanti et al.'s count, scaled to b bytes)."""
    scores = 0 if on_gpu else 5 * shape.heads * seq / shape.hidden
    return int(tokens * shape.hidden * (34 + scores) * b / 2)


def trainer_need(name: str, shape: ModelShape, t, dtype: str, tokens: int, seq: int) -> GroupNeed:
    """A DeepSpeed group (policy or critic) under its TrainerConfig `t`."""
    b, n = _bytes(dtype), t.num_ranks
    trainable = shape.lora_params or shape.params
    weights = shape.params * b // (n if t.zero_stage == 3 else 1)
    grads = trainable * b // (n if t.zero_stage >= 2 else 1)
    if t.zero_stage >= 2:  # the contiguous reduce bucket, DeepSpeed's reduce_bucket_size elements, filled as grads come
        grads += min(REDUCE_BUCKET_ELEMENTS, trainable) * b
    optim = trainable * (8 + (4 if b == 2 else 0)) // (n if t.zero_stage >= 1 else 1)
    layer = _layer_activations(shape, tokens, seq, b, t.num_gpus_per_rank > 0)
    act = (shape.layers * tokens * shape.hidden * b + layer if t.gradient_checkpointing else shape.layers * layer)
    logits = 3 * _chunk(tokens, shape.vocab) * shape.vocab * 4 if shape.lm_head else 0
    need = GroupNeed(name, n, t.num_gpus_per_rank,
                     {"weights": weights, "gradients": grads, "optimizer": optim, "activations": act + logits})
    if t.offload:  # ZeRO-Offload: optimizer state (and with ZeRO-3 the parameters) live in host memory
        need.host_parts["optimizer"] = need.parts.pop("optimizer")
        if t.zero_stage == 3:
            need.host_parts["weights"] = need.parts.pop("weights")
    return need


def scorer_need(name: str, shape: ModelShape, g, dtype: str, tokens: int, seq: int) -> GroupNeed:
    """A frozen model (reference, reward model) under its ScorerConfig `g`: a full copy per rank, or with
    `partition` a 1/num_ranks ZeRO-3 shard (in host memory with `offload`), and one layer's transient activations
    (the layer's gathered weights, one layer's worth, are left out as for the ZeRO-3 trainer)."""
    b = _bytes(dtype)
    act = _layer_activations(shape, tokens, seq, b, g.num_gpus_per_rank > 0)
    logits = 2 * _chunk(tokens, shape.vocab) * shape.vocab * 4 if shape.lm_head else 0
    weights = shape.params * b // (g.num_ranks if g.partition else 1)
    need = GroupNeed(name, g.num_ranks, g.num_gpus_per_rank, {"weights": weights, "activations": act + logits})
    if g.offload:
        need.host_parts["weights"] = need.parts.pop("weights")
    return need


def engine_need(shape: ModelShape, rollout, dtype: str, device_bytes: int | None) -> GroupNeed:
    """A vLLM engine: its weights and KV cache (on a GPU, its preallocated share of the device)."""
    weights = shape.params * _bytes(dtype) // rollout.tensor_parallel_size
    need = GroupNeed("rollout", rollout.num_engines, rollout.num_gpus_per_engine, {"weights": weights})
    if rollout.num_gpus_per_engine and device_bytes:
        need.parts["kv_cache"] = max(0, int(rollout.gpu_memory_utilization * device_bytes) - weights)
    else:
        need.parts["kv_cache"] = max(1, round(rollout.kv_cache_gib)) * GIB  # VLLM_CPU_KVCACHE_SPACE
    return need


def ppo_needs(cfg, shapes: dict[str, ModelShape], device_bytes: int | None = None) -> list[GroupNeed]:
    """Every group of a PPO job (`cfg`: PPOConfig with dtypes resolved); `shapes`: policy, rewards (the local
    reward models, a list: none with a remote or function reward), critic (estimator gae, else None)."""
    seq = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens

    def tokens(g) -> int:
        return g.max_tokens_per_micro_batch or g.micro_batch_size * seq

    policy_dtype, reward_dtype = cfg.policy.dtype or "float32", cfg.reward.dtype or "float32"
    needs = [trainer_need("trainer", shapes["policy"], cfg.trainer, policy_dtype, tokens(cfg.trainer), seq),
             scorer_need("reference", shapes["policy"], cfg.reference, policy_dtype, tokens(cfg.reference), seq),
             engine_need(shapes["policy"], cfg.rollout, policy_dtype, device_bytes)]
    rewards = [scorer_need("reward_group", shape, cfg.reward_group, reward_dtype, tokens(cfg.reward_group), seq)
               for shape in shapes.get("rewards", [])]
    if rewards:  # every rank holds each reward model (`rewards:` may name several)
        needs.append(GroupNeed("reward_group", rewards[0].ranks, rewards[0].gpus_per_rank,
                               {k: sum(r.parts[k] for r in rewards) for k in rewards[0].parts},
                               {k: sum(r.host_parts[k] for r in rewards) for k in rewards[0].host_parts}))
    if shapes.get("critic") is not None:
        needs.append(trainer_need("critic", shapes["critic"], cfg.critic, reward_dtype, tokens(cfg.critic), seq))
    return needs


def _process(need: GroupNeed) -> int:
    return PROCESS_BYTES["engine" if need.name == "rollout" else
                         "trainer" if need.name in ("trainer", "critic") else "scorer"]


@dataclass
class Plan:
    needs: list[GroupNeed]
    host_bytes: int  # what every rank together needs of host memory
    host_capacity: int | None
    gpu_loads: dict[str, tuple[int, int | None]]  # a GPU (a group's, or a colocated set's) -> (need, capacity)
    problems: list[str]

    def table(self) -> str:
        """The plan as the lines a job prints before it starts its actors."""
        cols = ["weights", "gradients", "optimizer", "activations", "kv_cache"]
        lines = ["memory plan (GiB per rank; estimates, rlhf_cluster/lib/memory.py):",
                 f"  {'group':<13}{'ranks':>6}" + "".join(f"{c:>12}" for c in cols) + f"{'total':>10}"]
        for n in self.needs:
            cells = "".join(f"{n.parts[c] / GIB:>12.3f}" if c in n.parts else f"{'-':>12}" for c in cols)
            lines.append(f"  {n.name:<13}{n.ranks:>6}{cells}{n.per_rank / GIB:>10.3f}")
            if n.host_parts:
                lines.append(f"  {'':<19}offloaded to host memory: " + ", ".join(
                    f"{k} {v / GIB:.3f}" for k, v in n.host_parts.items()))
        cap = f" of {self.host_capacity / GIB:.1f} GiB" if self.host_capacity else ""
        lines.append(f"  host memory, all ranks with their processes: {self.host_bytes / GIB:.2f} GiB{cap}")
        for where, (need, capacity) in self.gpu_loads.items():
            lines.append(f"  {where}: {need / GIB:.2f} GiB" + (f" of {capacity / GIB:.1f} GiB" if capacity else
                                                            " (device memory unknown: set ray.gpu_memory_gib)"))
        return "\n".join(lines)


def sleeping_load(group: list[GroupNeed]) -> tuple[int, int]:
    """colocate.sleep on one shared GPU: (device bytes, host bytes). The device holds the larger phase:
    generating (the engine whole, the trainers' bf16 weights, the scorers) or training (the trainers whole, the
    scorers; the engine asleep). The host holds what the other phase put aside: the engine's weights (vLLM
    sleep level 1) or the trainers' gradients and optimizer state (DeepSpeed offload_states)."""
    trainers = [n for n in group if n.name in ("trainer", "critic")]
    engine = [n for n in group if n.name == "rollout"]
    scorers = sum(n.per_rank for n in group if n not in trainers + engine)
    generating = scorers + sum(n.per_rank for n in engine) + sum(n.parts.get("weights", 0) for n in trainers)
    training = scorers + sum(n.per_rank for n in trainers)
    put_aside = max(sum(n.parts.get("weights", 0) for n in engine),
                    sum(n.per_rank - n.parts.get("weights", 0) - n.parts.get("activations", 0) for n in trainers))
    return max(generating, training), put_aside


def check(needs: list[GroupNeed], colocated: list[list[str]], host_capacity: int | None,
          device_bytes: int | None, sleep: bool = False) -> Plan:
    """Whether the needs fit: on GPUs each device holds its ranks (colocated groups share one: their needs add
    up, or with `sleep` (colocate.sleep) the larger phase's; a lone group's rank gets num_gpus_per_rank of one,
    or several whole ones), and host memory holds every process, what CPU-only groups need, and what was
    offloaded."""
    by_name = {n.name: n for n in needs}
    problems, gpu_loads = [], {}
    shared = {name for names in colocated for name in names}
    host_aside = 0
    for names in colocated:
        group = [by_name[x] for x in names if x in by_name and by_name[x].gpus_per_rank]
        if group:
            load = sum(n.per_rank for n in group)
            if sleep:
                load, aside = sleeping_load(group)
                host_aside += aside * group[0].ranks
            where = " + ".join(n.name for n in group) + (" asleep by turns" if sleep else "") + " (one GPU per rank)"
            gpu_loads[where] = (load, device_bytes)
    for n in needs:
        if n.gpus_per_rank and n.name not in shared:
            capacity = int(n.gpus_per_rank * device_bytes) if device_bytes else None
            gpu_loads[f"{n.name} ({n.gpus_per_rank:g} GPU per rank)"] = (n.per_rank, capacity)
    for where, (need, capacity) in gpu_loads.items():
        if capacity and need > capacity:
            problems.append(f"{where} needs {need / GIB:.2f} GiB but has {capacity / GIB:.1f} GiB")
    host = host_aside + sum((0 if n.gpus_per_rank else n.per_rank) + sum(n.host_parts.values()) + _process(n)
                            for n in needs for _ in range(n.ranks))
    if host_capacity and host > host_capacity:
        problems.append(f"host memory: all ranks need {host / GIB:.2f} GiB but the cluster has "
                        f"{host_capacity / GIB:.1f} GiB")
    return Plan(needs, host, host_capacity, gpu_loads, problems)


def plan_ppo(cfg, policy_path: str, reward_paths: list[str], critic_path: str | None, host_capacity: int | None,
             device_bytes: int | None) -> Plan:
    """The plan of a PPO (or rejection-sampling) job whose model paths are known."""
    shapes = {"policy": model_shape(policy_path, "causal_lm", cfg.trainer.lora),
              "rewards": [model_shape(p, "reward") for p in reward_paths],
              "critic": model_shape(critic_path, "value", cfg.critic.lora) if critic_path else None}
    return check(ppo_needs(cfg, shapes, device_bytes), cfg.colocated_sets(), host_capacity, device_bytes,
                 sleep=cfg.colocate.sleep)
