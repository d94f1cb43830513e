"""What a job needs before it starts: the built-in SFT policy and reward model (trained once, cached next to the
built-in assets) and the models a PPO or rejection-sampling run starts from.

Jobs never run each other; the ones that start from a trained model import this module, and this module alone
runs the SFT and reward stages for them (orchestrators — pipeline, feedback round, results — compose jobs
themselves).
"""

from __future__ import annotations

from pathlib import Path

from rlhf_cluster.lib.builtin import builtin_model_dir, cache_root, locked
from rlhf_cluster.lib.config import CONFIG_DIR, BuiltinConfig, PPOConfig, RewardConfig, SFTConfig, load_config
from rlhf_cluster.reward import run_reward
from rlhf_cluster.sft import run_sft


def ensure_builtin_sft(builtin_cfg: BuiltinConfig | None = None) -> Path:
    """The built-in SFT policy, trained once with the sft-tiny preset (sft-arithmetic for the arithmetic task)
    and cached next to the built-in assets (a second call, from any process, trains nothing)."""
    builtin_cfg = builtin_cfg or BuiltinConfig()
    model = builtin_model_dir(builtin_cfg, "sft")
    with locked(cache_root(builtin_cfg) / "sft.lock"):
        if not (model / "config.json").exists():
            preset = "sft-arithmetic.yaml" if builtin_cfg.task == "arithmetic" else "sft-tiny.yaml"
            # gold_eval off: a PPO job that needs this model needs no vLLM start here
            cfg = load_config(SFTConfig, CONFIG_DIR / preset, [f"output_dir={model.parent}", "gold_eval=false"])
            cfg.builtin = builtin_cfg
            run_sft(cfg)
    return model


def ensure_builtin_rm(builtin_cfg: BuiltinConfig | None = None) -> Path:
    """The built-in reward model of `builtin_cfg.size`, trained once with the reward-tiny preset from that size's
    reward_base (it needs no SFT policy) and cached; the results harness compares sizes."""
    builtin_cfg = builtin_cfg or BuiltinConfig()
    model = builtin_model_dir(builtin_cfg, "reward")
    with locked(cache_root(builtin_cfg) / "reward.lock"):
        if not (model / "config.json").exists():
            cfg = load_config(RewardConfig, CONFIG_DIR / "reward-tiny.yaml", [f"output_dir={model.parent}"])
            cfg.builtin = builtin_cfg
            run_reward(cfg)
    return model


def ensure_builtin_sft_and_rm(builtin_cfg: BuiltinConfig | None = None) -> tuple[Path, Path]:
    """(sft_dir, rm_dir): the built-in SFT policy and reward model, what PPO starts from."""
    builtin_cfg = builtin_cfg or BuiltinConfig()
    return ensure_builtin_sft(builtin_cfg), ensure_builtin_rm(builtin_cfg)


def resolve_models(cfg: PPOConfig, log=print) -> tuple[str, str | None]:
    """The policy to start from and the reward model; the built-in ones are trained first if missing.
    With a reward service or reward sources and no reward.path, there is no local reward model (None)."""
    if cfg.policy.path and (cfg.reward.path or cfg.reward_service or cfg.rewards):
        return cfg.policy.path, cfg.reward.path
    if cfg.rewards:  # the reward comes from its sources: only the policy may be built in
        log(f"using the built-in {cfg.builtin.task} SFT policy (trained first if missing)")
        return cfg.policy.path or str(ensure_builtin_sft(cfg.builtin)), cfg.reward.path
    log("using the built-in SFT policy and reward model (trained first if missing)")
    sft, rm = ensure_builtin_sft_and_rm(cfg.builtin)
    return cfg.policy.path or str(sft), cfg.reward.path or str(rm)
