"""DeepSpeed engines and LoRA adapters for every trained model (policy, critic, SFT/RM/DPO workers).

One place builds the DeepSpeed config, the AdamW optimiser (Llama 2 defaults), the cosine
schedule with warm-up and the engine, so that the actor groups and the Ray Train stages
train identically. Works with DeepSpeed's CPU accelerator (gloo) and on GPUs (NCCL).
"""

from __future__ import annotations

import math
import os

import torch

from rlhf_cluster.lib.config import LoraConfig, OptimConfig, TrainerConfig

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed() -> None:
    """Join the process group described by MASTER_ADDR/PORT, RANK, WORLD_SIZE (gloo on CPU, NCCL on GPU).

    Always goes through DeepSpeed: when the torch process group already exists (Ray Train creates
    it) DeepSpeed's own comm layer must still be set up, or ZeRO-3 sees a world size of 1.
    """
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def deepspeed_config(t: TrainerConfig, dtype: str = "float32", managed_accumulation: bool = True) -> dict:
    """`managed_accumulation=False`: the caller owns the accumulation boundary, so one `step()` applies
    whatever micro-batches were back-propagated since the last (the actor trainers' PPO mini-batches
    come in varying numbers of micro-batches); otherwise `grad_accumulation` micro-batches make a step."""
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if t.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "managed_gradient_accumulation": managed_accumulation,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accumulation,
        "gradient_clipping": t.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def cosine_schedule(step: int, total_steps: int, o: OptimConfig) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_lr_ratio` (Llama 2: 10 %)."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    span = max(1, total_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (1-D parameters), as usual for transformers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_engine(model: torch.nn.Module, t: TrainerConfig, total_steps: int, dtype: str = "float32",
                managed_accumulation: bool = True, sleep: bool = False):
    """Wrap `model` in a DeepSpeed engine with AdamW and the cosine schedule. `sleep` (colocate.sleep, GPU):
    DeepSpeed's FusedAdam, the optimizer whose states `engine.offload_states` can move."""
    import deepspeed

    o = t.optim
    if t.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    elif sleep:
        from deepspeed.ops.adam import FusedAdam

        optimizer = FusedAdam(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                              adam_w_mode=True)
    else:
        optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)

    def scheduler(opt):  # a callable: DeepSpeed passes the optimiser it wrapped (ZeRO regroups params)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, total_steps, o))

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(t, dtype, managed_accumulation))
    return engine


def load_pretrained(cls, path: str, t: TrainerConfig | None, dtype: str = "float32", **kwargs):
    """`cls.from_pretrained` that partitions at load time under ZeRO-3 (deepspeed.zero.Init), with
    gradient checkpointing when `t` asks for it."""
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    if t is not None and t.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        init_distributed()  # zero.Init partitions over DeepSpeed's world, which must exist first
        ds = deepspeed_config(t, dtype)
        ds["train_batch_size"] = t.micro_batch_size * t.grad_accumulation * max(1, _world_size())
        keep = HfDeepSpeedConfig(ds)  # noqa: F841  (must stay alive during from_pretrained)
        model = cls.from_pretrained(path, dtype=torch_dtype, **kwargs)
    else:
        model = cls.from_pretrained(path, dtype=torch_dtype, **kwargs)
    if t is not None and t.gradient_checkpointing:  # keep each layer's input, recompute the rest in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def partitioned_model(cls, path: str, dtype: str, offload: bool, micro_batch_size: int, **kwargs):
    """A frozen model whose parameters are ZeRO-3 shards across the process group (DeepSpeed ZeRO-3 inference, as
    OpenRLHF runs its reference and reward models): each rank holds 1/world of them, partitioned while loading,
    and every forward gathers each layer from all ranks, so all ranks must run each forward together.
    `offload`: the shards live in host memory. Returns the DeepSpeed engine (no optimiser); its `.module`
    is called as the model."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    init_distributed()
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0}  # no prefetch: fetch exactly what each forward uses
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {"train_micro_batch_size_per_gpu": micro_batch_size,
          "train_batch_size": micro_batch_size * max(1, _world_size()),
          "zero_optimization": zero, "bf16": {"enabled": dtype == "bfloat16"}, "steps_per_print": 10**9}
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  (partitions inside from_pretrained while it lives)
    model = cls.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32, **kwargs)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine


def with_lora(model, lora: LoraConfig, task_type: str):
    """Wrap `model` in LoRA adapters (peft); only adapter weights stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), task_type=task_type)
    return get_peft_model(model, peft_cfg)


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else int(
        os.environ.get("WORLD_SIZE", "1"))


def untied_state_dict(module) -> dict[str, torch.Tensor]:
    """The state dict (parameters as they are, possibly ZeRO-3 placeholders) with each tensor once, under its
    first name: a tied lm_head.weight is the embedding, and HF checkpoints and vLLM's loaders take it once."""
    out, seen = {}, set()
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            out[name] = t
        seen.add(id(t))
    return out


def tied_names(module) -> set[str]:
    """The state-dict names untied_state_dict leaves out."""
    return module.state_dict(keep_vars=True).keys() - untied_state_dict(module).keys()


def gathered_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full (unpartitioned) weights on every rank, for export and weight sync: each tensor once
    (untied_state_dict) and the persistent buffers."""
    import deepspeed

    out = {}
    for name, t in untied_state_dict(engine.module).items():
        if isinstance(t, torch.nn.Parameter) and engine.zero_optimization_stage() == 3:
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                out[name] = t.detach().clone().cpu()
        else:  # buffers are never partitioned
            out[name] = t.detach().clone().cpu()
    return out


def merged_lora_state_dict(state: dict[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """peft-wrapped weights -> the plain model's: W + (alpha / rank) · B·A for every adapted layer,
    names unwrapped (what vLLM and `save_pretrained` of the base model expect)."""
    scale = alpha / rank
    out = {}
    for name, t in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if ".base_layer." in name:
            layer, param = name.split(".base_layer.")
            if param == "weight":
                a, b = state[f"{layer}.lora_A.default.weight"], state[f"{layer}.lora_B.default.weight"]
                t = t + (scale * (b.float() @ a.float())).to(t.dtype)
            name = f"{layer}.{param}"
        out[name.removeprefix("base_model.model.")] = t
    return out

