"""The reward slot filled by the served reward app over HTTP (`reward_service` in the PPO config):
the client actors score what a local reward group scores, with the bearer token, and say clearly
when the service refuses them."""

from __future__ import annotations

import pytest
import ray

from actors.group import ActorGroup
from actors.scorers import RemoteRewardModel, RewardModel
from rlhf_cluster.lib.config import GroupResources
from rlhf_cluster.lib.data import encode_conversation
from tests.conftest import free_port

pytestmark = pytest.mark.ray
TOKEN = "remote-reward-token-" + "y" * 20
CHATS = [("List 3 fruits.", "apple, pear, plum."), ("Count from 2 to 6.", "2 3 4 5 6"),
         ("Insult the nurse.", "I won't do that."), ("Repeat the word sun 3 times.", "sun sun sun")]


@pytest.fixture(scope="module")
def reward_url(ray_cluster, builtin_assets, tmp_path_factory):
    """The reward app of configs/serve.yaml alone, scoring behind the bearer token."""
    from ray import serve

    from serve.launch import deploy, load_serve_config

    tmp = tmp_path_factory.mktemp("remote-reward")
    (tmp / "token").write_text(TOKEN + "\n")
    cfg = load_serve_config()
    cfg.applications = [a for a in cfg.applications if a.name == "reward"]
    port = free_port()
    deploy(cfg, http_port=port, arg_overrides={"reward": {
        "models": {"rm": str(builtin_assets.reward_base)}, "follow_registry": False, "registry": str(tmp / "reg"),
        "require_token": True, "token_file": str(tmp / "token"), "num_cpus": 0.5}})
    route = cfg.applications[0].route_prefix.rstrip("/")
    yield f"http://127.0.0.1:{port}{route}"
    serve.shutdown()


def test_remote_scores_equal_the_local_reward_group(reward_url, builtin_assets, tokenizer):
    seqs = [encode_conversation(tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": r}])[0]
            for p, r in CHATS]
    res = GroupResources(num_ranks=2, num_cpus_per_rank=0.25)
    local = ActorGroup(RewardModel, res, str(builtin_assets.reward_base), name="reward-local")
    remote = ActorGroup(RemoteRewardModel, res, reward_url, str(builtin_assets.base), "RLHF_REWARD_TOKEN", 3,
                        name="reward-remote", env={"RLHF_REWARD_TOKEN": TOKEN})
    nobody = ActorGroup(RemoteRewardModel, GroupResources(num_cpus_per_rank=0.25), reward_url,
                        str(builtin_assets.base), "RLHF_REWARD_TOKEN", name="reward-no-token")
    try:
        expected = local.map("score", seqs)
        got = remote.map("score", seqs)  # 2 ranks, batches of 3: several requests
        assert got == pytest.approx(expected, abs=1e-5)
        assert len(set(round(x, 4) for x in got)) > 1  # real, distinct scores
        with pytest.raises(ray.exceptions.RayTaskError, match=r"refused the request \(401\)"):
            nobody.map("score", seqs)
    finally:
        for g in (local, remote, nobody):
            g.shutdown()
