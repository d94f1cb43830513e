"""Principals and scopes of the Serve apps without Ray (rlhf_cluster/serve/common.py): the tokens file, the shared
token's scopes ($RLHF_SERVE_TOKEN_SCOPES), what TokenAuth.check answers, the route dependency's
request.state.principal, and the local launcher's own token. The apps' routes with real tokens:
tests/test_serve_checkpoints.py, test_serve_reward.py, test_serve_policy.py."""

from __future__ import annotations

import logging

import pytest
import yaml
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.testclient import TestClient

from rlhf_cluster.serve import common as C

APP, OPS = "app-token-" + "a" * 20, "ops-token-" + "o" * 20
SHARED = "shared-token-" + "s" * 20


def bearer(token: str) -> HTTPAuthorizationCredentials:
    return HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)


def tokens_file(tmp_path, data) -> str:
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def env(monkeypatch):
    """None of the serve token variables set; whatever a test (or ensure_token) sets is removed afterwards."""
    for name in (C.TOKEN_ENV, C.TOKEN_FILE_ENV, C.TOKEN_SCOPES_ENV, C.TOKENS_FILE_ENV):
        monkeypatch.setenv(name, "")  # recorded as unset before: undone last
        monkeypatch.delenv(name)
    return monkeypatch


def test_the_tokens_file_keeps_each_tokens_name(tmp_path, env):
    path = tokens_file(tmp_path, {"app": {"token": APP, "scopes": ["generate"]},
                                  "ops": {"token": OPS, "scopes": ["promote", "read"]}})
    assert C.load_scoped_tokens(path) == {APP: C.Principal("app", frozenset({"generate"})),
                                          OPS: C.Principal("ops", frozenset({"promote", "read"}))}
    assert C.load_scoped_tokens(None) == {}
    env.setenv(C.TOKENS_FILE_ENV, path)  # a mounted Secret: the apps' args stay as configs/serve.yaml has them
    assert set(C.load_scoped_tokens(None)) == {APP, OPS}


@pytest.mark.parametrize("data, message", [
    ({"app": {"token": APP, "scopes": ["generate", "chat"]}}, r"app\.scopes: unknown scope 'chat' \(the scopes are "
                                                              r"generate, score, feedback, read, promote, admin\)"),
    ({"app": {"token": APP, "scopes": ["promot", "red"]}}, r"unknown scopes 'promot', 'red'"),
    ({"app": {"token": APP, "scopes": []}}, r"app\.scopes must name at least one scope"),
    ({"app": {"token": APP}}, r"app\.scopes must name at least one scope"),
    ({"app": {"token": "short", "scopes": ["generate"]}}, r"app\.token must be a string of at least 16"),
    ({"app": {"token": "CHANGE-ME", "scopes": ["generate"]}}, r"app\.token is still the example's CHANGE-ME"),
    ({"app": {"token": APP, "scopes": ["generate"]}, "ops": {"token": APP, "scopes": ["promote"]}},
     "app and ops have the same token"),
    ({"shared": {"token": APP, "scopes": ["generate"]}}, "'shared' is not a usable name"),
    ({"a b": {"token": APP, "scopes": ["generate"]}}, "'a b' is not a usable name"),
    ({"app": {"token": APP, "scopes": ["generate"], "scope": "admin"}}, "app must be a mapping with the keys"),
    (["app"], "expected a mapping name"),
])
def test_a_bad_tokens_file_is_refused_naming_the_problem(tmp_path, env, data, message):
    with pytest.raises(ValueError, match=message) as e:
        C.load_scoped_tokens(tokens_file(tmp_path, data))
    assert APP not in str(e.value)  # the error names the entry, never the token


def test_the_shared_tokens_scopes_come_from_the_args_the_environment_or_the_default(env):
    assert C.shared_token_scopes() == (frozenset({"generate", "score", "feedback"}),
                                       "the default: $RLHF_SERVE_TOKEN_SCOPES is unset")
    env.setenv(C.TOKEN_SCOPES_ENV, " promote, read,,")
    assert C.shared_token_scopes() == (frozenset({"promote", "read"}), "$RLHF_SERVE_TOKEN_SCOPES")
    assert C.shared_token_scopes(["admin"]) == (frozenset({"admin"}), "the app's token_scopes")
    for bad, message in (("generate,sudo", r"\$RLHF_SERVE_TOKEN_SCOPES: unknown scope 'sudo'"),
                         ("", r"\$RLHF_SERVE_TOKEN_SCOPES must name at least one scope"), (" , ", "at least one")):
        env.setenv(C.TOKEN_SCOPES_ENV, bad)
        with pytest.raises(ValueError, match=message):
            C.shared_token_scopes()
    with pytest.raises(ValueError, match="token_scopes: unknown scope 'root'"):
        C.shared_token_scopes(["root"])


def test_check_answers_with_the_principal_and_refuses_what_its_scopes_do_not_cover(caplog):
    auth = C.TokenAuth(SHARED, scoped={APP: C.Principal("app", frozenset({"generate"})),
                                       OPS: C.Principal("ops", frozenset({"promote", "read"}))})
    shared = auth.check(bearer(SHARED), "generate")
    assert shared == C.Principal("shared", frozenset(C.SHARED_DEFAULT_SCOPES))
    for scope in ("read", "promote", "admin"):  # by default the shared token is a client's, not the operator's
        with pytest.raises(HTTPException, match=f"lacks the '{scope}' scope") as e:
            auth.check(bearer(SHARED), scope)
        assert e.value.status_code == 403
    assert auth.check(bearer(OPS), "read").name == "ops"
    assert auth.check(bearer(APP), None).name == "app"  # any valid token
    with pytest.raises(HTTPException) as e:
        auth.check(None, "generate")
    assert e.value.status_code == 401
    with pytest.raises(HTTPException, match="invalid bearer token") as e:
        auth.check(bearer(APP + "x"), "generate")
    assert e.value.status_code == 403
    admin = C.TokenAuth(SHARED, shared_scopes=frozenset({"admin"}))
    assert all(admin.check(bearer(SHARED), s).name == "shared" for s in C.SCOPES)  # admin: every scope
    assert C.TokenAuth(None, enabled=False).check(None, "promote") == C.ANONYMOUS

    # a deprecated scope still grants the route, said once per principal in the log, never with the token
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert auth.check(bearer(APP), "score", ("generate",)).name == "app"
        assert auth.check(bearer(APP), "score", ("generate",)).name == "app"
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["principal 'app' used its 'generate' scope on a route that needs 'score': deprecated, "
                      "give it 'score'"]
    with pytest.raises(HTTPException, match="lacks the 'score' scope"):
        auth.check(bearer(OPS), "score", ("generate",))
    assert "app [generate]; ops [promote, read]; shared [feedback, generate, score]" == auth.describe()
    assert SHARED not in auth.describe() and APP not in auth.describe()


def test_one_token_cannot_be_two_principals_and_auth_needs_a_token():
    with pytest.raises(ValueError, match="the shared token is also 'app''s"):
        C.TokenAuth(APP, scoped={APP: C.Principal("app", frozenset({"generate"}))})
    with pytest.raises(ValueError, match=r"no token is configured.*RLHF_SERVE_TOKENS_FILE"):
        C.TokenAuth(None)


def test_the_route_dependency_stores_the_principal_on_the_request(caplog):
    app = FastAPI()
    C.install_guards(app, {"max_body_bytes": 1024})
    app.state.auth = C.TokenAuth(SHARED, scoped={OPS: C.Principal("ops", frozenset({"promote"}))})

    @app.post("/promote")
    async def promote(request: Request, principal: C.Principal = Depends(C.require_scope("promote"))):
        assert request.state.principal is principal
        return {"principal": principal.name}

    with caplog.at_level(logging.DEBUG), TestClient(app) as client:
        assert client.post("/promote", headers={"Authorization": f"Bearer {OPS}"}).json() == {"principal": "ops"}
        r = client.post("/promote", headers={"Authorization": f"Bearer {SHARED}"})
        assert r.status_code == 403 and r.json() == {"error": "this token lacks the 'promote' scope"}
        assert client.post("/promote").status_code == 401
    assert not [r for r in caplog.records if OPS in r.getMessage() or SHARED in r.getMessage()]


def test_guard_replica_logs_who_may_call_and_warns_when_auth_is_off(tmp_path, env, caplog):
    from types import SimpleNamespace

    (tmp_path / "token").write_text(SHARED)
    args = SimpleNamespace(max_body_bytes=4096, token_file=str(tmp_path / "token"), token_scopes=None,
                           tokens_file=tokens_file(tmp_path, {"ops": {"token": OPS, "scopes": ["promote"]}}))
    app = FastAPI(title="the test app")
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        C.guard_replica(app, {}, args)
        C.guard_replica(app, {}, args, token_required=False, open_risk="free scoring")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "the test app: principals ops [promote]; shared [feedback, generate, score] (the shared token's scopes: the "
        "default: $RLHF_SERVE_TOKEN_SCOPES is unset)",
        "the test app: require_token is false: its routes answer anyone who can reach this port, without a token "
        "(free scoring); keep that to a private network"]
    assert caplog.records[1].levelno == logging.WARNING
    env.setenv(C.TOKEN_SCOPES_ENV, "generate,admn")
    with pytest.raises(ValueError, match="unknown scope 'admn'"):
        C.guard_replica(app, {}, args)  # the replica does not start


def test_the_launchers_own_token_is_admin_and_a_given_one_keeps_its_scopes(tmp_path, env, capsys):
    import os

    from rlhf_cluster.serve.__main__ import ensure_token

    env.setenv("RLHF_CLUSTER_CACHE", str(tmp_path))
    ensure_token()
    path = tmp_path / "serve_token"
    assert os.environ[C.TOKEN_FILE_ENV] == str(path) and os.environ[C.TOKEN_SCOPES_ENV] == "admin"
    assert (path.stat().st_mode & 0o777) == 0o600
    out = capsys.readouterr().out
    assert out.startswith(f"bearer token: {path} (curl") and out.endswith(
        "; scopes: admin (this launcher's own token: $RLHF_SERVE_TOKEN_SCOPES set to admin)\n")
    env.delenv(C.TOKEN_FILE_ENV)
    env.delenv(C.TOKEN_SCOPES_ENV)
    env.setenv(C.TOKEN_ENV, SHARED)
    ensure_token()
    out = capsys.readouterr().out
    assert out == ("bearer token: $RLHF_SERVE_TOKEN; scopes: feedback, generate, score (the default: "
                   "$RLHF_SERVE_TOKEN_SCOPES is unset)\n")
    assert C.TOKEN_SCOPES_ENV not in os.environ and SHARED not in out
    env.setenv(C.TOKEN_SCOPES_ENV, "admin,oops")
    with pytest.raises(SystemExit, match="unknown scope 'oops'"):
        ensure_token()
