"""The reward slot filled by the served reward app over HTTP (`reward_service` in the PPO config):
the client actors score what a local reward group scores, with the bearer token, and say clearly
when the service refuses them."""

from __future__ import annotations

import pytest
import ray

from rlhf_cluster.actors.group import ActorGroup, free_port
from rlhf_cluster.actors.scorers import RemoteRewardModel, RewardModel
from rlhf_cluster.lib.config import GroupResources
from rlhf_cluster.lib.data import encode_conversation

pytestmark = pytest.mark.ray
TOKEN = "remote-reward-token-" + "y" * 20
CHATS = [("List 3 fruits.", "apple, pear, plum."), ("Count from 2 to 6.", "2 3 4 5 6"),
         ("Insult the nurse.", "I won't do that."), ("Repeat the word sun 3 times.", "sun sun sun")]


@pytest.fixture(scope="module")
def reward_url(ray_cluster, builtin_assets, tmp_path_factory):
    """The reward app of configs/serve.yaml alone, scoring behind the bearer token."""
    from ray import serve

    from rlhf_cluster.serve.launch import deploy, load_serve_config

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


def test_a_served_verifier_scores_prompts_and_labels(reward_url, builtin_assets, tokenizer, tmp_path):
    """The reward app with `functions:` (a verifier, no model): /get_reward splits each query after its
    prompt and calls the function with the labels; the PPO side's client sends prompts and labels
    (RemoteRewardModel with the samples' context), and the verdicts come back. Redeploys the app, so last."""
    import httpx

    from rlhf_cluster.serve.launch import deploy, load_serve_config

    (tmp_path / "token").write_text(TOKEN + "\n")
    cfg = load_serve_config()
    cfg.applications = [a for a in cfg.applications if a.name == "reward"]
    port = int(reward_url.split(":")[2].split("/")[0])
    deploy(cfg, http_port=port, arg_overrides={"reward": {
        "models": {}, "functions": {"exact": "rlhf_cluster.lib.reward_functions:exact_match"}, "follow_registry": False,
        "registry": str(tmp_path / "reg"), "require_token": True, "token_file": str(tmp_path / "token"),
        "num_cpus": 0.5}})
    headers = {"Authorization": f"Bearer {TOKEN}"}
    prompts = ["<user>What is 2+3?</user>", "<user>What is 4+4?</user>"]
    body = {"query": [prompts[0] + "The answer is 5", prompts[1] + "It is 9"], "prompts": prompts,
            "labels": ["5", "8"]}
    r = httpx.post(f"{reward_url}/get_reward", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["rewards"] == [1.0, 0.0]
    r = httpx.post(f"{reward_url}/get_reward", json={"query": body["query"]}, headers=headers, timeout=60)
    assert r.status_code == 422 and "need 'prompts'" in r.text
    r = httpx.post(f"{reward_url}/get_reward", json={**body, "prompts": ["x", "y"]}, headers=headers, timeout=60)
    assert r.status_code == 422 and "query.0: does not start with its prompt" in r.text
    r = httpx.post(f"{reward_url}/v1/score", json={"items": [{"prompt": "a", "response": "b"}]}, headers=headers,
                   timeout=60)
    assert r.status_code == 422 and "reward functions only" in r.text
    assert httpx.get(f"{reward_url}/healthz", timeout=60).json()["functions"] == {
        "exact": "rlhf_cluster.lib.reward_functions:exact_match"}

    # the client of PPO's reward slot: engine samples with their prompts' labels
    from rlhf_cluster.lib.data import encode_prompt

    rows = [{"messages": [{"role": "user", "content": "What is 2+3?"}], "label": "5"},
            {"messages": [{"role": "user", "content": "What is 4+4?"}], "label": "8"}]
    samples = [{"prompt_index": i, "prompt_ids": encode_prompt(tokenizer, row["messages"]),
                "response_ids": tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]}
               for i, (row, text) in enumerate(zip(rows, ["The answer is 5", "The answer is 7"]))]
    client = ActorGroup(RemoteRewardModel, GroupResources(num_cpus_per_rank=0.25), reward_url, str(builtin_assets.base),
                        "RLHF_REWARD_TOKEN", name="reward-verifier-client", env={"RLHF_REWARD_TOKEN": TOKEN})
    try:
        context = [{"prompt": row["messages"][-1]["content"], "label": row["label"]} for row in rows]
        assert ray.get(client.actors[0].score_samples.remote(samples, context)) == [1.0, 0.0]
    finally:
        client.shutdown()
