"""The reward and checkpoints apps on a real local Ray Serve, called over HTTP.

configs/serve.yaml is deployed through serve.launch (the same code as `python -m serve`) with a
temporary registry, token and checkpoint roots; scores are compared with the reward model run
directly in this process.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import httpx
import pytest
import torch

from rlhf_cluster.data import encode_conversation
from rlhf_cluster.registry import FileRegistry, make_entry, manifest_sha256
from tests.conftest import free_port

pytestmark = pytest.mark.ray

TOKEN = "test-token-" + "x" * 24
PAIRS = [("List 3 fruits.", "apple, pear, plum."), ("Count from 2 to 6.", "2 3 4 5 6"),
         ("Insult the nurse.", "I won't do that."), ("Repeat the word sun 3 times.", "sun sun"),
         ("List 2 fruits.", ""), ("Count from 1 to 3.", "1 2 3 4 5 6 7 8 9 10 11 12")]


class Direct:
    """A reward model run in the test process: the reference the service must reproduce."""

    def __init__(self, path):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    @torch.inference_mode()
    def __call__(self, pairs) -> torch.Tensor:
        out = []
        for p, r in pairs:
            chat = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            ids, _ = encode_conversation(self.tok, chat)
            out.append(self.model(torch.tensor([ids])).logits[0, 0])
        return torch.stack(out)


def items(pairs):
    return {"items": [{"prompt": p, "response": r} for p, r in pairs]}


@pytest.fixture(scope="module")
def second_rm(builtin_assets, tmp_path_factory):
    """A second reward checkpoint: the built-in one with a perturbed score head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("ckpts")
    model = AutoModelForSequenceClassification.from_pretrained(builtin_assets.reward_base)
    torch.manual_seed(1)
    with torch.no_grad():
        model.score.weight.add_(torch.randn_like(model.score.weight))
    model.save_pretrained(root / "rm_v2")
    AutoTokenizer.from_pretrained(builtin_assets.reward_base).save_pretrained(root / "rm_v2")
    return root / "rm_v2"


@pytest.fixture(scope="module")
def service(ray_cluster, builtin_assets, second_rm, tmp_path_factory):
    from ray import serve

    from serve.launch import deploy, load_serve_config

    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "token").write_text(TOKEN + "\n")
    roots = [str(second_rm.parent), str(builtin_assets.root)]
    common = {"registry": str(tmp / "registry"), "token_file": str(tmp / "token")}
    port = free_port()
    deploy(load_serve_config(), http_port=port, arg_overrides={
        "reward": {**common, "models": {"rm": str(builtin_assets.reward_base)}, "num_cpus": 1},
        "checkpoints": {**common, "checkpoint_roots": roots},
    })
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield {"client": client, "registry": FileRegistry(tmp / "registry"), "common": common, "tmp": tmp}
    serve.shutdown()


def auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def test_scores_equal_the_model_called_directly(service, builtin_assets):
    c = service["client"]
    assert c.get("/healthz").json()["models"]["rm"]["path"] == str(builtin_assets.reward_base)
    r = c.post("/v1/score", json=items(PAIRS))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"scores"}  # one model: no per_model
    torch.testing.assert_close(torch.tensor(body["scores"]), Direct(builtin_assets.reward_base)(PAIRS))
    # the messages form is the same conversation
    msgs = {"items": [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
                      for p, r in PAIRS]}
    assert c.post("/v1/score", json=msgs).json()["scores"] == body["scores"]


def test_get_reward_speaks_openrlhf(service, builtin_assets):
    """query = the full rendered prompt+response text, as OpenRLHF's remote RM client sends it."""
    c, direct = service["client"], Direct(builtin_assets.reward_base)
    queries = [direct.tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                              tokenize=False) for p, r in PAIRS]
    prompts = [direct.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p, _ in PAIRS]
    r = c.post("/get_reward", json={"query": queries, "prompts": prompts, "labels": [""] * len(PAIRS)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"rewards", "scores", "extra_logs"}
    expected = direct(PAIRS)
    torch.testing.assert_close(torch.tensor(body["rewards"]), expected)
    torch.testing.assert_close(torch.tensor(body["scores"]), torch.sigmoid(expected))
    # a query cut before its end token (a truncated generation) is closed with one, as OpenRLHF does
    cut = c.post("/get_reward", json={"query": [q.removesuffix("</s>") for q in queries]}).json()
    torch.testing.assert_close(torch.tensor(cut["rewards"]), expected)


def test_batching_follows_reconfigure_without_restart(service):
    """reconfigure(user_config) (what Serve calls when only user_config changes) resizes batches in place."""
    from ray import serve

    c = service["client"]
    handle = serve.get_deployment_handle("RewardModel", app_name="reward")
    before = c.get("/healthz").json()
    assert before["batching"]["max_batch_size"] == 16  # from configs/serve.yaml
    try:
        handle.reconfigure.remote({"max_batch_size": 4, "batch_wait_timeout_s": 0.01}).result()
        health = c.get("/healthz").json()
        assert health["replica"] == before["replica"] and health["models"] == before["models"]
        assert health["batching"]["max_batch_size"] == 4 and health["batching"]["largest_batch"] == 0
        assert c.post("/v1/score", json=items(PAIRS * 2)).status_code == 200
        assert c.get("/healthz").json()["batching"]["largest_batch"] == 4
    finally:
        handle.reconfigure.remote({"max_batch_size": 16, "batch_wait_timeout_s": 0.01}).result()
    assert c.post("/v1/score", json=items(PAIRS * 2)).status_code == 200
    assert c.get("/healthz").json()["batching"]["largest_batch"] == 12  # one request's items share a batch
    with pytest.raises(Exception, match="max_batch_size"):
        handle.reconfigure.remote({"max_batch_size": 0}).result()


BAD_SCORE_BODIES = {
    "malformed json": b'{"items": [',
    "not json": b"prompt=hi",
    "top-level list": b"[]",
    "null": b"null",
    "items not a list": json.dumps({"items": "abc"}).encode(),
    "number as prompt": json.dumps({"items": [{"prompt": 1, "response": "x"}]}).encode(),
    "response missing": json.dumps({"items": [{"prompt": "a"}]}).encode(),
    "both forms": json.dumps({"items": [{"prompt": "a", "response": "b", "messages": []}]}).encode(),
    "unknown role": json.dumps({"items": [{"messages": [{"role": "root", "content": "x"},
                                                        {"role": "assistant", "content": "y"}]}]}).encode(),
    "ends with user": json.dumps({"items": [{"messages": [{"role": "assistant", "content": "x"},
                                                          {"role": "user", "content": "y"}]}]}).encode(),
    "extra field": json.dumps({"items": [{"prompt": "a", "response": "b"}], "debug": True}).encode(),
    "empty list": json.dumps({"items": []}).encode(),
    "huge string": json.dumps({"items": [{"prompt": "a" * 20_000, "response": "b"}]}).encode(),
    "10k items": json.dumps({"items": [{"prompt": "a", "response": "b"}] * 10_000}).encode(),
    "too many tokens": json.dumps({"items": [{"prompt": "a", "response": "apple, " * 2000}]}).encode(),
    "lone surrogate": b'{"items": [{"prompt": "\\ud800", "response": "x"}]}',
    "invalid utf-8": b'{"items": [{"prompt": "\xff\xfe", "response": "x"}]}',
}


@pytest.mark.parametrize("name", list(BAD_SCORE_BODIES))
def test_bad_score_input_is_a_json_4xx(service, name):
    r = service["client"].post("/v1/score", content=BAD_SCORE_BODIES[name],
                               headers={"Content-Type": "application/json"})
    expected = 400 if name == "invalid utf-8" else 422  # FastAPI: undecodable body is 400, unusable JSON 422
    assert r.status_code == expected, (name, r.status_code, r.text[:300])
    assert "error" in r.json() and "Traceback" not in r.text and len(r.text) < 10_000


def test_other_bad_requests_are_4xx(service):
    c = service["client"]
    assert c.post("/v1/score", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"}
                  ).status_code == 413
    assert c.post("/get_reward", json={"query": []}).status_code == 422
    assert c.post("/get_reward", json={"query": ["a", "b"], "prompts": ["a"]}).status_code == 422
    assert c.post("/get_reward", json={"query": ["a" * 40_000]}).status_code == 422
    assert c.get("/v1/score").status_code == 405
    assert c.get("/nope").status_code == 404
    spec = c.get("/openapi.json").json()
    assert {"/v1/score", "/get_reward", "/healthz"} <= set(spec["paths"])
    assert "/" in c.get("/v1/checkpoints/openapi.json").json()["paths"]


def test_scoring_can_require_the_token(service, builtin_assets):
    from ray import serve

    from serve.launch import build_application

    args = {**service["common"], "models": {"a": str(builtin_assets.reward_base), "b": str(builtin_assets.reward_base)},
            "require_token": True, "follow_registry": False, "num_cpus": 0.5, "max_batch_size": 3}
    serve.run(build_application("serve.reward_app:app_builder", args), name="secure", route_prefix="/secure")
    try:
        c = service["client"]
        assert c.get("/secure/healthz").json()["batching"]["max_batch_size"] == 3  # args -> user_config
        assert c.post("/secure/v1/score", json=items(PAIRS[:2])).status_code == 401
        assert c.post("/secure/v1/score", json=items(PAIRS[:2]), headers=auth("wrong" * 5)).status_code == 403
        assert c.post("/secure/get_reward", json={"query": ["x"]}, headers={"Authorization": TOKEN}).status_code == 401
        r = c.post("/secure/v1/score", json=items(PAIRS[:2]), headers=auth())
        assert r.status_code == 200
        body = r.json()  # two models: their mean, and each one's scores
        assert body["per_model"]["a"] == body["per_model"]["b"]
        torch.testing.assert_close(body["scores"], body["per_model"]["a"])
    finally:
        serve.delete("secure")


# --------------------------------------------------------------------------- checkpoints
def test_checkpoints_need_the_token(service):
    c = service["client"]
    for method, path in [("GET", "/v1/checkpoints"), ("GET", "/v1/checkpoints/x"), ("POST", "/v1/checkpoints"),
                         ("GET", "/v1/checkpoints/x/files/config.json"), ("POST", "/v1/checkpoints/x/promote"),
                         ("DELETE", "/v1/checkpoints/x")]:
        assert c.request(method, path).status_code == 401, path
        assert c.request(method, path, headers=auth("not-the-token-at-all")).status_code == 403, path
    assert c.get("/v1/checkpoints/healthz").status_code == 200


def test_register_list_and_download_match_sha256(service, builtin_assets, second_rm):
    c, reg = service["client"], service["registry"]
    reg.register(make_entry(builtin_assets.reward_base, run="base", kind="reward", stage="reward", id="rm-v1"))
    body = {"id": "rm-v2", "run": "exp", "kind": "reward", "stage": "reward", "path": str(second_rm), "step": 7,
            "metrics": {"acc": 0.6}}
    r = c.post("/v1/checkpoints", json=body, headers=auth())
    assert r.status_code == 201, r.text
    assert c.post("/v1/checkpoints", json=body, headers=auth()).status_code == 200  # idempotent
    assert c.post("/v1/checkpoints", json={**body, "step": 8}, headers=auth()).status_code == 409
    sha = r.json()["sha256"]
    assert reg.get("rm-v2").sha256 == sha
    listed = c.get("/v1/checkpoints", headers=auth()).json()
    assert [e["id"] for e in listed] == ["rm-v1", "rm-v2"]
    assert [e["id"] for e in c.get("/v1/checkpoints", params={"run": "exp"}, headers=auth()).json()] == ["rm-v2"]
    assert c.get("/v1/checkpoints", params={"kind": "policy"}, headers=auth()).json() == []
    assert c.get("/v1/checkpoints", params={"kind": "bogus"}, headers=auth()).status_code == 422
    assert c.get("/v1/checkpoints/rm-v2", headers=auth()).json()["metrics"] == {"acc": 0.6}
    manifest = c.get("/v1/checkpoints/rm-v2/files", headers=auth()).json()
    assert manifest["matches_registered"] and "model.safetensors" in manifest["files"]
    downloaded = {}
    for rel in manifest["files"]:
        data = c.get(f"/v1/checkpoints/rm-v2/files/{rel}", headers=auth()).content
        downloaded[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert manifest_sha256(downloaded) == sha


def test_unsafe_paths_and_bad_registrations_are_4xx(service, second_rm, tmp_path):
    c = service["client"]
    (second_rm / "escape").symlink_to("/etc/passwd")
    try:
        for path in ["%2E%2E/%2E%2E/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "sub/%2E%2E/x",
                     "a%5C..%5Cb", "config.json%00", "escape", "missing.bin"]:
            r = c.get(f"/v1/checkpoints/rm-v2/files/{path}", headers=auth())
            assert 400 <= r.status_code < 500 and "root:" not in r.text, (path, r.status_code)
        raw = httpx.get(str(c.base_url) + "/v1/checkpoints/rm-v2/files/../../../../etc/passwd", headers=auth())
        assert 400 <= raw.status_code < 500 and "root:" not in raw.text
    finally:
        (second_rm / "escape").unlink()
    base = {"run": "x", "kind": "reward", "stage": "reward"}
    assert c.post("/v1/checkpoints", json={**base, "path": "/etc"}, headers=auth()).status_code == 403
    assert c.post("/v1/checkpoints", json={**base, "path": str(tmp_path)}, headers=auth()).status_code == 403
    assert c.post("/v1/checkpoints", json={**base, "path": "relative"}, headers=auth()).status_code == 422
    assert c.post("/v1/checkpoints", json={**base, "path": str(second_rm / "nope")}, headers=auth()).status_code == 422
    assert c.post("/v1/checkpoints", json={**base, "path": str(second_rm), "sha256": "0" * 64},
                  headers=auth()).status_code == 409
    assert c.post("/v1/checkpoints", json={**base, "path": str(second_rm), "id": "../x"},
                  headers=auth()).status_code == 422
    nan = b'{"run": "x", "kind": "reward", "stage": "reward", "path": "/tmp", "metrics": {"loss": NaN}}'
    assert c.post("/v1/checkpoints", content=nan, headers={**auth(), "Content-Type": "application/json"}
                  ).status_code == 422
    assert c.get("/v1/checkpoints/no-such-id", headers=auth()).status_code == 404
    assert c.post("/v1/checkpoints/no-such-id/promote", headers=auth()).status_code == 404
    assert c.post("/v1/checkpoints", content=b"{", headers={**auth(), "Content-Type": "application/json"}
                  ).status_code == 422


def test_promotion_swaps_the_model_under_load(service, builtin_assets, second_rm):
    """A client keeps scoring while rm-v2 is promoted: no request fails, each response is wholly one
    model's, and once promotion returns the scores are rm-v2's."""
    c, reg = service["client"], service["registry"]
    old, new = Direct(builtin_assets.reward_base)(PAIRS), Direct(second_rm)(PAIRS)
    assert not torch.allclose(old, new)
    results, stop = [], threading.Event()

    def client_loop():
        with httpx.Client(base_url=c.base_url, timeout=60) as cc:
            while not stop.is_set():
                r = cc.post("/v1/score", json=items(PAIRS))
                results.append((time.monotonic(), r.status_code, r.json().get("scores")))

    thread = threading.Thread(target=client_loop)
    thread.start()
    try:
        while len(results) < 3:
            time.sleep(0.05)
        r = c.post("/v1/checkpoints/rm-v2/promote", headers=auth())
        promoted_at = time.monotonic()
        assert r.status_code == 200, r.text
        assert r.json()["reward_app"]["ok"] and r.json()["serving"]["id"] == "rm-v2"
        while sum(t > promoted_at for t, _, _ in results) < 3:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(60)
    assert all(status == 200 for _, status, _ in results), [s for _, s, _ in results]
    which = []
    for _, _, scores in results:
        s = torch.tensor(scores)
        which.append("old" if torch.allclose(s, old, atol=1e-5) else "new" if torch.allclose(s, new, atol=1e-5)
                     else "mixed")
    assert which[0] == "old" and which[-1] == "new" and "mixed" not in which
    assert all(w == "new" for (t, _, _), w in zip(results, which) if t > promoted_at + 1.0)
    assert reg.serving("reward").id == "rm-v2"
    assert c.get("/healthz").json()["models"]["rm"]["checkpoint_id"] == "rm-v2"
    assert c.delete("/v1/checkpoints/rm-v2", headers=auth()).status_code == 409  # served: cannot delete


def test_a_changed_checkpoint_is_not_promoted(service, second_rm):
    """Files changed after registration: the reward app refuses it and the pointer stays put."""
    import shutil

    c, reg = service["client"], service["registry"]
    v3 = second_rm.parent / "rm_v3"
    shutil.copytree(second_rm, v3)
    assert c.post("/v1/checkpoints", json={"id": "rm-v3", "run": "exp", "kind": "reward", "stage": "reward",
                                           "path": str(v3)}, headers=auth()).status_code == 201
    (v3 / "config.json").write_text((v3 / "config.json").read_text() + " ")
    r = c.post("/v1/checkpoints/rm-v3/promote", headers=auth())
    assert r.status_code == 409 and "sha256" in r.json()["error"]
    assert reg.serving("reward").id == "rm-v2"
    assert c.get("/v1/checkpoints/rm-v3/files", headers=auth()).json()["matches_registered"] is False
    assert c.delete("/v1/checkpoints/rm-v3", headers=auth()).status_code == 204
    assert c.get("/v1/checkpoints/rm-v3", headers=auth()).status_code == 404


def test_replicas_follow_the_registry_pointer(service):
    """A pointer moved in the registry alone (another replica was told, or a trainer promoted) is picked up
    by the replica's periodic health check."""
    c, reg = service["client"], service["registry"]
    reg.promote("rm-v1")
    deadline = time.monotonic() + 30
    while c.get("/healthz").json()["models"]["rm"]["checkpoint_id"] != "rm-v1":
        assert time.monotonic() < deadline, "the replica did not load the promoted checkpoint"
        time.sleep(0.5)


def test_reconfigure_can_load_other_models(service, second_rm, builtin_assets):
    """user_config.models swaps a slot in place; a path that is not a model fails the update and changes nothing."""
    from ray import serve

    c = service["client"]
    handle = serve.get_deployment_handle("RewardModel", app_name="reward")
    with pytest.raises(Exception, match="user_config models.rm"):
        handle.reconfigure.remote({"models": {"rm": str(second_rm.parent / "nope")}}).result()
    assert c.get("/healthz").json()["models"]["rm"]["checkpoint_id"] == "rm-v1"
    handle.reconfigure.remote({"models": {"extra": str(second_rm)}}).result()
    body = c.post("/v1/score", json=items(PAIRS)).json()
    torch.testing.assert_close(torch.tensor(body["per_model"]["extra"]), Direct(second_rm)(PAIRS))
    torch.testing.assert_close(torch.tensor(body["per_model"]["rm"]), Direct(builtin_assets.reward_base)(PAIRS))


@pytest.mark.ray
@pytest.mark.parametrize("app,prefix", [("reward", ""), ("checkpoints", "/v1/checkpoints")])
def test_schemathesis_finds_no_server_error(service, app, prefix):
    """Property-based requests generated from each app's own OpenAPI spec, valid and invalid
    (schemathesis positive and negative modes), with the token: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    base = str(service["client"].base_url).rstrip("/") + prefix
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    errors, reached = [], {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                label = case.operation.label
                response = case.call(base_url=base, headers=auth(), timeout=60)
                reached[label] = reached.get(label, False) or response.status_code != 404
                if response.status_code >= 500:
                    errors.append((label, response.status_code, case.body, response.text[:200]))

            try:
                check()
            except Unsatisfiable:  # no invalid input exists for an operation without parameters
                assert mode is GenerationMode.NEGATIVE, op.label
    assert not errors, errors[:5]
    assert reached and sum(reached.values()) >= len(reached) // 2, reached  # the calls reach the routes
