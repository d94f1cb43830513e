"""The checkpoints app on a real local Ray Serve, called over HTTP: the token, registering, listing and
downloading checkpoints (sha256 checked), unsafe paths, and promotion to the reward app (under load, refused
for changed files or a model that cannot score, followed through the registry's pointer).

The module shares one service, so each test that reads or changes the registry or what the reward app serves
starts from `as_started` (an empty registry, the built-in reward model served) and registers and promotes the
checkpoints it asserts on itself.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time

import httpx
import pytest
import torch

from rlhf_cluster.lib.registry import make_entry, manifest_sha256
from tests import serve_fixtures
from tests.helpers import NAMED, PAIRS, TOKEN, Direct, auth, items, serve_log_text

pytestmark = pytest.mark.ray

service, second_rm, nan_rm = serve_fixtures.service, serve_fixtures.second_rm, serve_fixtures.nan_rm  # fixtures


@pytest.fixture
def as_started(service, builtin_assets):
    """The module's service put back as it started: an empty registry (no entries, no serving pointer; a
    registry directory without registry.json is an empty one), and the reward app serving the built-in reward
    model in slot "rm" from its path, whatever earlier tests registered and promoted."""
    from ray import serve

    service["registry"].file.unlink(missing_ok=True)
    handle = serve.get_deployment_handle("RewardModel", app_name="reward")
    loaded = handle.load_checkpoint.remote({"path": str(builtin_assets.reward_base)}).result()
    assert loaded["ok"] and loaded["model"]["checkpoint_id"] is None, loaded


def register(client: httpx.Client, id: str, path) -> None:
    """Register a reward checkpoint directory through the API (a new entry: 201)."""
    r = client.post("/v1/checkpoints", json={"id": id, "run": "exp", "kind": "reward", "stage": "reward",
                                             "path": str(path)}, headers=auth())
    assert r.status_code == 201, r.text


def test_checkpoints_need_the_token(service):
    c = service["client"]
    for method, path in [("GET", "/v1/checkpoints"), ("GET", "/v1/checkpoints/x"), ("POST", "/v1/checkpoints"),
                         ("GET", "/v1/checkpoints/x/files/config.json"), ("POST", "/v1/checkpoints/x/promote"),
                         ("DELETE", "/v1/checkpoints/x")]:
        assert c.request(method, path).status_code == 401, path
        assert c.request(method, path, headers=auth("not-the-token-at-all")).status_code == 403, path
    assert c.get("/v1/checkpoints/healthz").status_code == 200


def test_reads_need_read_and_writes_promote(service):
    """Each named token (tests/helpers.py NAMED) on every route: reads (list, entry, manifest, download) need
    "read", writes "promote"; a token without it gets 403 naming the scope, one with it gets past auth (here to 404 for
    an unknown id). The shared TOKEN is admin in this service: every route. No log line holds a token."""
    c = service["client"]
    reads = [("GET", "/v1/checkpoints"), ("GET", "/v1/checkpoints/no-such"), ("GET", "/v1/checkpoints/no-such/files"),
             ("GET", "/v1/checkpoints/no-such/files/config.json")]
    writes = [("POST", "/v1/checkpoints/no-such/promote"), ("DELETE", "/v1/checkpoints/no-such")]
    allowed = {"trainer": set(), "app": set(), "annotator": set(), "reader": {"read"}, "ops": {"read", "promote"}}
    for name, scopes in allowed.items():
        for scope, routes in (("read", reads), ("promote", writes)):
            for method, path in routes:
                r = c.request(method, path, headers=auth(name))
                if scope in scopes:
                    assert r.status_code in (200, 404), (name, path, r.status_code, r.text)
                else:
                    assert r.status_code == 403 and r.json()["error"] == f"this token lacks the {scope!r} scope", \
                        (name, path, r.text)
    assert c.get("/v1/checkpoints", headers=auth("reader")).status_code == 200
    assert c.post("/v1/checkpoints/no-such/promote", headers=auth()).status_code == 404
    line = ("rlhf-cluster checkpoints: principals annotator [feedback]; app [generate]; ops [promote, read]; "
            "reader [read]; trainer [score]; shared [admin] (the shared token's scopes: the app's token_scopes)")
    log = serve_log_text(line)
    assert line in log
    assert not [name for name, (token, _) in NAMED.items() if token in log] and TOKEN not in log


@pytest.mark.usefixtures("as_started")
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


@pytest.mark.usefixtures("as_started")
def test_unsafe_paths_and_bad_registrations_are_4xx(service, second_rm, tmp_path):
    c = service["client"]
    register(c, "rm-v2", second_rm)
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


@pytest.mark.usefixtures("as_started")
def test_promotion_swaps_the_model_under_load(service, builtin_assets, second_rm):
    """A client keeps scoring while rm-v2 is promoted: no request fails, each response is wholly one
    model's, and once promotion returns the scores are rm-v2's."""
    c, reg = service["client"], service["registry"]
    register(c, "rm-v2", second_rm)
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


@pytest.mark.usefixtures("as_started")
def test_a_changed_checkpoint_is_not_promoted(service, second_rm):
    """Files changed after registration: the reward app refuses it and the pointer stays put."""
    c, reg = service["client"], service["registry"]
    register(c, "rm-v2", second_rm)
    assert c.post("/v1/checkpoints/rm-v2/promote", headers=auth()).status_code == 200  # the pointer names rm-v2
    v3 = second_rm.parent / "rm_v3"
    shutil.copytree(second_rm, v3, dirs_exist_ok=True)
    register(c, "rm-v3", v3)
    (v3 / "config.json").write_text((v3 / "config.json").read_text() + " ")
    r = c.post("/v1/checkpoints/rm-v3/promote", headers=auth())
    assert r.status_code == 409 and "sha256" in r.json()["error"]
    assert reg.serving("reward").id == "rm-v2"
    assert c.get("/v1/checkpoints/rm-v3/files", headers=auth()).json()["matches_registered"] is False
    assert c.delete("/v1/checkpoints/rm-v3", headers=auth()).status_code == 204
    assert c.get("/v1/checkpoints/rm-v3", headers=auth()).status_code == 404


@pytest.mark.usefixtures("as_started")
def test_replicas_follow_the_registry_pointer(service, builtin_assets):
    """A pointer moved in the registry alone (another replica was told, or a trainer promoted) is picked up
    by the replica's periodic health check."""
    c, reg = service["client"], service["registry"]
    reg.register(make_entry(builtin_assets.reward_base, run="base", kind="reward", stage="reward", id="rm-v1"))
    assert c.get("/healthz").json()["models"]["rm"]["checkpoint_id"] is None  # served from its path
    reg.promote("rm-v1")
    deadline = time.monotonic() + 30
    while c.get("/healthz").json()["models"]["rm"]["checkpoint_id"] != "rm-v1":
        assert time.monotonic() < deadline, "the replica did not load the promoted checkpoint"
        time.sleep(0.5)


@pytest.mark.usefixtures("as_started")
def test_a_model_that_cannot_score_is_never_swapped_in(service, nan_rm):
    """Every load probes the model: a NaN checkpoint is refused on promotion (409) and by reconfigure, and the
    replica goes on serving, healthy, what it served."""
    from ray import serve

    c, reg = service["client"], service["registry"]
    before = c.get("/healthz").json()
    assert before["status"] == "ok"
    register(c, "rm-nan", nan_rm)
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

