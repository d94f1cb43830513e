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

from rlhf_cluster.lib.data import encode_conversation
from rlhf_cluster.lib.registry import FileRegistry, make_entry, manifest_sha256
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
    "starts with assistant": json.dumps({"items": [{"messages": [{"role": "assistant", "content": "x"},
                                                                 {"role": "assistant", "content": "y"}]}]}).encode(),
    "messages and an empty prompt": json.dumps({"items": [{"prompt": "", "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]}).encode(),
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


# --------------------------------------------------------------------------- health, timeouts, shutdown, soak
def serve_details() -> dict:
    """The controller's ServeInstanceDetails (what the dashboard's /api/serve/applications/ shows)."""
    import ray

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    return ray.get(controller.get_serve_instance_details.remote(), timeout=60)


def test_configured_timeouts_reach_serve(service):
    """configs/serve.yaml's request timeout is the proxy's; the graceful shutdown settings are the deployments'."""
    details = serve_details()
    assert details["http_options"]["request_timeout_s"] == 300
    for app, dep in [("reward", "RewardModel"), ("checkpoints", "Checkpoints")]:
        cfg = details["applications"][app]["deployments"][dep]["deployment_config"]
        assert (cfg["graceful_shutdown_timeout_s"], cfg["graceful_shutdown_wait_loop_s"]) == (300, 2), (app, cfg)
    assert details["applications"]["reward"]["deployments"]["RewardModel"]["deployment_config"][
        "health_check_period_s"] == 5


def test_a_timed_out_request_is_a_408_and_the_replica_goes_on(service):
    """Past its timeout (here Serve's per-request x-request-timeout-seconds, as a front proxy may set it; else
    request_timeout_s) a request is answered 408 by the proxy and cancelled in the replica, which keeps serving."""
    c = service["client"]
    r = c.post("/v1/score", json=items(PAIRS * 40), headers={"x-request-timeout-seconds": "0.001"})
    assert r.status_code == 408, (r.status_code, r.text[:300])
    assert "timed out" in r.text and "Traceback" not in r.text
    assert c.post("/v1/score", json=items(PAIRS)).status_code == 200
    assert c.get("/healthz").json()["status"] == "ok"


@pytest.fixture(scope="module")
def nan_rm(second_rm):
    """A reward checkpoint whose score head is NaN: loads fine, and every score it gives is NaN (a diverged run)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = second_rm.parent / "rm_nan"
    model = AutoModelForSequenceClassification.from_pretrained(second_rm)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(second_rm).save_pretrained(path)
    return path


def test_a_model_that_cannot_score_is_never_swapped_in(service, nan_rm):
    """Every load probes the model: a NaN checkpoint is refused on promotion (409) and by reconfigure, and the
    replica goes on serving, healthy, what it served."""
    from ray import serve

    c, reg = service["client"], service["registry"]
    before = c.get("/healthz").json()
    assert before["status"] == "ok"
    r = c.post("/v1/checkpoints", json={"id": "rm-nan", "run": "exp", "kind": "reward", "stage": "reward",
                                        "path": str(nan_rm)}, headers=auth())
    assert r.status_code == 201, r.text
    r = c.post("/v1/checkpoints/rm-nan/promote", headers=auth())
    assert r.status_code == 409 and "non-finite score" in r.json()["error"], r.text
    assert getattr(reg.serving("reward"), "id", None) != "rm-nan"
    handle = serve.get_deployment_handle("RewardModel", app_name="reward")
    with pytest.raises(Exception, match="non-finite score"):
        handle.reconfigure.remote({"models": {"nan": str(nan_rm)}}).result()
    handle.check_health.remote().result()  # what Serve calls: passes
    after = c.get("/healthz").json()
    assert after["status"] == "ok" and after["models"] == before["models"]
    assert c.delete("/v1/checkpoints/rm-nan", headers=auth()).status_code == 204


def test_health_check_fails_when_a_served_model_stops_scoring(builtin_assets, nan_rm):
    """check_health (Serve's liveness/readiness hook) probes every served model: one that has gone bad at run time
    (here its weights replaced in place) makes it raise, so Serve replaces the replica, and /healthz a 503
    naming the model. In this process, on the deployment's own class."""
    import asyncio
    import dataclasses

    from serve.reward_app import RewardDeployment, load_reward_model

    cls = RewardDeployment.func_or_class.__mro__[1]  # the class under @serve.ingress's wrapper
    replica = cls({"models": {"rm": str(builtin_assets.reward_base)}, "follow_registry": False})

    async def run():
        await replica.check_health()
        assert replica.unready is None
        good = replica.models["rm"]
        bad = load_reward_model("rm", str(builtin_assets.reward_base))
        with torch.no_grad():
            bad.model.score.weight.fill_(float("nan"))
        replica.models = {"rm": dataclasses.replace(good, model=bad.model)}
        with pytest.raises(RuntimeError, match="reward model 'rm' .* non-finite score"):
            await replica.check_health()
        r = await replica.healthz()
        assert r.status_code == 503 and "non-finite score" in json.loads(r.body)["error"]
        replica.models = {}
        with pytest.raises(RuntimeError, match="no reward model is loaded"):
            await replica.check_health()
        replica.models = {"rm": good}
        await replica.check_health()
        assert replica.unready is None

    asyncio.run(run())


def test_a_reward_app_whose_model_cannot_load_fails_clearly(service):
    """A model path that does not exist: the replica never starts (its constructor fails), the launcher says why,
    and requests to the app get a 503 from the proxy, never a 500 or a traceback; the other apps go on."""
    from ray import serve

    from serve.launch import run_application
    from serve.reward_app import RewardDeployment

    c = service["client"]
    args = {**service["common"], "models": {"rm": "/nonexistent/reward-model"}, "follow_registry": False}
    app = RewardDeployment.options(max_constructor_retry_count=1,  # Serve's default, 3 tries, only takes longer
                                   ray_actor_options={"num_cpus": 0.25}).bind(args)
    try:
        with pytest.raises(RuntimeError, match="reward model 'rm': /nonexistent/reward-model is not a directory"):
            run_application(app, "broken", "/broken")
        for method, path in [("GET", "/broken/healthz"), ("POST", "/broken/v1/score")]:
            r = c.request(method, path, json=items(PAIRS[:1]))
            assert r.status_code == 503 and "failed to deploy" in r.text and "Traceback" not in r.text, r.text
    finally:
        serve.delete("broken")
    assert c.get("/healthz").json()["status"] == "ok"


def test_requests_in_flight_survive_a_redeploy(service, builtin_assets):
    """Graceful shutdown: clients keep scoring while the app is redeployed with new args (Serve replaces the
    replica; the old one first finishes what it has, and requests arriving meanwhile wait, up to ~10 s here):
    no request fails, and the replica changed. With graceful_shutdown_timeout_s=0 the same redeploy cuts the
    requests in flight off: 4 of 29 were 500s when tried."""
    from ray import serve

    from serve.launch import build_application, run_application

    args = {**service["common"], "models": {"rm": str(builtin_assets.reward_base)}, "follow_registry": False,
            "num_cpus": 0.25}
    run_application(build_application("serve.reward_app:app_builder", args), "drain", "/drain")
    c = service["client"]
    first = c.get("/drain/healthz").json()["replica"]
    results, stop = [], threading.Event()

    def client_loop():
        with httpx.Client(base_url=c.base_url, timeout=120) as cc:
            while not stop.is_set():
                try:
                    r = cc.post("/drain/v1/score", json=items(PAIRS * 8))
                    results.append((r.status_code, len(r.json().get("scores", []))))
                except Exception as e:  # a dropped connection is a failure too
                    results.append((repr(e), 0))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while len(results) < 8:
            time.sleep(0.05)
        run_application(build_application("serve.reward_app:app_builder", {**args, "max_body_bytes": 1 << 19}),
                        "drain", "/drain")
        during = len(results)
        deadline = time.monotonic() + 60
        while c.get("/drain/healthz").json()["replica"] == first or len(results) < during + 8:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
        serve.delete("drain")
    assert len(results) > during and all(r == (200, len(PAIRS) * 8) for r in results), \
        [r for r in results if r != (200, len(PAIRS) * 8)][:5]


SOAK_REQUESTS = 10_000
SOAK_CLIENTS = 24
# The summed RSS growth of the reward and checkpoints replicas and the proxy over the 10,000 requests (after
# 500 warm-up ones). Measured on a 2-core machine: 32-63 MiB for a first soak, then 12 and 6 MiB for the
# next 10,000 each (allocator and cache warm-up that levels off, not a leak); a bound of 1.5x the worst.
SOAK_RSS_BOUND = 96 << 20


def serve_pids() -> dict[str, int]:
    """pid of each running replica of the reward and checkpoints apps, and of each proxy."""
    import os

    import ray

    details, pids = serve_details(), {}
    for app in ("reward", "checkpoints"):
        for dep in details["applications"][app]["deployments"].values():
            pids.update({r["actor_name"]: r["pid"] for r in dep["replicas"] if r["state"] == "RUNNING"})
    for proxy in details["proxies"].values():
        actor = ray.get_actor(proxy["actor_name"], namespace="serve")
        pids[proxy["actor_name"]] = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    return pids


def rss(pids: dict[str, int]) -> dict[str, int]:
    import psutil

    return {name: psutil.Process(pid).memory_info().rss for name, pid in pids.items()}


def cpu_s(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    return {name: sum(psutil.Process(pid).cpu_times()[:2]) for name, pid in pids.items()}


def test_soak_mixed_traffic_no_5xx_bounded_memory(service, builtin_assets):
    """10,000 requests over loopback from 24 concurrent clients: valid scoring (both protocols), health checks,
    checkpoint reads and downloads, and hostile input (malformed JSON, wrong types, oversized and chunked
    bodies, missing/wrong tokens, path traversal). No 5xx, no client-side error, each answer the expected one,
    and the replicas' and proxy's RSS grows by less than SOAK_RSS_BOUND."""
    import asyncio
    import os
    import random

    c, reg = service["client"], service["registry"]
    reg.register(make_entry(builtin_assets.reward_base, run="soak", kind="reward", stage="reward", id="soak-rm"))
    config_bytes = (builtin_assets.reward_base / "config.json").read_bytes()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_assets.reward_base)
    queries = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                       tokenize=False) for p, r in PAIRS]
    # reference answers for the valid requests, from the service itself before the soak
    ref_score = {k: c.post("/v1/score", json=items(PAIRS[k:k + 1 + k % 3])).json() for k in range(4)}
    ref_reward = {k: c.post("/get_reward", json={"query": queries[k:k + 2]}).json() for k in range(5)}
    assert all("scores" in v for v in ref_score.values()) and all("rewards" in v for v in ref_reward.values())

    def close(a, b):
        return len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b))

    async def chunks(n):  # a body without Content-Length, streamed in 64 KiB chunks
        for _ in range(n):
            yield b"x" * (64 << 10)

    big = b'{"items": [{"prompt": "' + b"a" * (1 << 20) + b'", "response": "b"}]}'
    json_hdr = {"Content-Type": "application/json"}
    # (weight, name, request kwargs or a callable giving them, check(response) -> bool)
    cases = [
        (10, "score", lambda rnd: (k := rnd.randrange(4), {"method": "POST", "url": "/v1/score",
                                                            "json": items(PAIRS[k:k + 1 + k % 3])})),
        (6, "get_reward", lambda rnd: (k := rnd.randrange(5), {"method": "POST", "url": "/get_reward",
                                                                "json": {"query": queries[k:k + 2]}})),
        (3, "healthz", {"method": "GET", "url": "/healthz"}),
        (2, "checkpoint entry", {"method": "GET", "url": "/v1/checkpoints/soak-rm", "headers": auth()}),
        (2, "download", {"method": "GET", "url": "/v1/checkpoints/soak-rm/files/config.json", "headers": auth()}),
        *[(1, f"bad body: {name}", {"method": "POST", "url": "/v1/score", "content": body, "headers": json_hdr})
          for name, body in BAD_SCORE_BODIES.items()],
        (1, "get_reward wrong types", {"method": "POST", "url": "/get_reward", "json": {"query": [1, {"a": 2}]}}),
        (1, "get_reward not a list", {"method": "POST", "url": "/get_reward", "json": {"query": "text"}}),
        (1, "oversized", {"method": "POST", "url": "/v1/score", "content": big, "headers": json_hdr}),
        (1, "oversized chunked", lambda rnd: (0, {"method": "POST", "url": "/v1/score", "content": chunks(20),
                                                  "headers": json_hdr})),
        (1, "oversized registration", {"method": "POST", "url": "/v1/checkpoints", "headers": {**auth(), **json_hdr},
                                       "content": b'{"run": "' + b"r" * (100 << 10) + b'"}'}),
        (2, "no token", {"method": "GET", "url": "/v1/checkpoints"}),
        (2, "wrong token", {"method": "GET", "url": "/v1/checkpoints", "headers": auth("not-the-token-at-all")}),
        (1, "basic auth", {"method": "GET", "url": "/v1/checkpoints/soak-rm",
                           "headers": {"Authorization": "Basic eDp5"}}),
        (1, "empty bearer", {"method": "DELETE", "url": "/v1/checkpoints/soak-rm",
                             "headers": {"Authorization": "Bearer"}}),
        (1, "wrong token write", {"method": "POST", "url": "/v1/checkpoints/soak-rm/promote",
                                  "headers": auth("x" * 40)}),
        *[(1, f"traversal {p}", {"method": "GET", "url": f"/v1/checkpoints/soak-rm/files/{p}", "headers": auth()})
          for p in ["%2E%2E/%2E%2E/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "a%5C..%5Cb",
                    "config.json%00", "sub/%2E%2E/%2E%2E/x"]],
        (1, "traversal in id", {"method": "GET", "url": "/v1/checkpoints/..%2F..%2Fetc/files/passwd",
                                "headers": auth()}),
        (1, "unknown route", {"method": "GET", "url": "/admin"}),
        (1, "wrong method", {"method": "DELETE", "url": "/v1/score"}),
    ]

    def expect(name, r, k):
        if r.status_code >= 500:
            return False
        if name == "score":
            return r.status_code == 200 and close(r.json()["scores"], ref_score[k]["scores"])
        if name == "get_reward":
            body = r.json()
            return r.status_code == 200 and close(body["rewards"], ref_reward[k]["rewards"]) and \
                close(body["scores"], ref_reward[k]["scores"])
        if name == "healthz":
            return r.status_code == 200 and r.json()["status"] == "ok"
        if name == "checkpoint entry":
            return r.status_code == 200 and r.json()["id"] == "soak-rm"
        if name == "download":
            return r.status_code == 200 and r.content == config_bytes
        if name.startswith("traversal"):
            return 400 <= r.status_code < 500 and "root:" not in r.text
        if name.startswith("oversized"):
            return r.status_code == 413
        if name in ("no token", "basic auth", "empty bearer"):
            return r.status_code == 401
        if name.startswith("wrong token"):
            return r.status_code == 403
        if name == "unknown route":
            return r.status_code == 404
        if name == "wrong method":
            return r.status_code == 405
        return r.status_code in (400, 422) and "error" in r.json() and "Traceback" not in r.text

    weights = [w for w, *_ in cases]
    rnd = random.Random(0)
    plan = rnd.choices(range(len(cases)), weights, k=SOAK_REQUESTS)
    warmup = plan[:500]

    async def run(indices):
        queue = list(enumerate(indices))
        outcomes: dict[str, int] = {}
        failures: list = []
        statuses: dict[int, int] = {}

        async def client(seed):
            r_local = random.Random(seed)
            async with httpx.AsyncClient(base_url=str(c.base_url), timeout=120) as ac:
                while queue:
                    _, i = queue.pop()
                    _, name, spec, *_ = cases[i]
                    k, kw = spec(r_local) if callable(spec) else (None, spec)
                    try:
                        r = await ac.request(**kw)
                    except Exception as e:
                        failures.append((name, repr(e)))
                        continue
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    ok = expect(name, r, k)
                    outcomes[name] = outcomes.get(name, 0) + 1
                    if not ok:
                        failures.append((name, r.status_code, r.text[:200]))

        await asyncio.gather(*[client(s) for s in range(SOAK_CLIENTS)])
        return outcomes, failures, statuses

    asyncio.run(run(warmup))  # let allocators and caches settle before the baseline
    pids = serve_pids()
    pids_and_me = {**pids, "test client": os.getpid()}
    before, cpu_before = rss(pids), cpu_s(pids_and_me)
    t0 = time.monotonic()
    outcomes, failures, statuses = asyncio.run(run(plan))
    elapsed = time.monotonic() - t0
    after, cpu_after = rss(pids), cpu_s(pids_and_me)
    assert serve_pids() == pids  # no replica or proxy was restarted meanwhile
    growth = {name: after[name] - before[name] for name in pids}
    report = {"seconds": round(elapsed, 1), "requests/s": round(SOAK_REQUESTS / elapsed), "statuses": statuses,
              "cpu_s": {n: round(cpu_after[n] - cpu_before[n], 1) for n in pids_and_me},
              "rss_before_MiB": {n: round(v / 2**20, 1) for n, v in before.items()},
              "rss_growth_MiB": {n: round(v / 2**20, 1) for n, v in growth.items()}}
    print("soak:", json.dumps(report, indent=1))
    assert sum(outcomes.values()) + len([f for f in failures if len(f) == 2]) == SOAK_REQUESTS
    assert not failures, (len(failures), failures[:10])
    assert not [s for s in statuses if s >= 500], statuses
    assert len(outcomes) == len(cases)  # every kind of request was sent
    assert sum(growth.values()) < SOAK_RSS_BOUND, report
