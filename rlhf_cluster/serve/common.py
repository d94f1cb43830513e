"""What the apps share: bearer-token auth (principals and scopes), a request-size limit, JSON errors without
tracebacks, and the start-up every app goes through (its args' common fields, its guarded FastAPI app, following
the registry's promoted checkpoint).

Bad input must always be a 4xx with a JSON body naming the problem; anything unexpected is a
500 {"error": "internal error"} (the traceback goes to the replica's log, never to the client).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")

TOKEN_ENV = "RLHF_SERVE_TOKEN"
TOKEN_FILE_ENV = "RLHF_SERVE_TOKEN_FILE"
TOKEN_SCOPES_ENV = "RLHF_SERVE_TOKEN_SCOPES"  # the shared token's scopes, comma-separated
TOKENS_FILE_ENV = "RLHF_SERVE_TOKENS_FILE"    # named tokens with their scopes, when the app's tokens_file is null
MIN_TOKEN_CHARS = 16
_bearer = HTTPBearer(auto_error=False)
# A replica being stopped (redeploy, scale-down, shutdown) takes no new requests and waits up to this long for the
# ones it has (downloads included): as long as the HTTP request_timeout_s (configs/serve.yaml), so no request the
# proxy still waits for is cut off. It exits as soon as it is idle (checked every graceful_shutdown_wait_loop_s).
GRACEFUL_SHUTDOWN_TIMEOUT_S = 300.0


def load_token(token_file: str | None = None) -> str | None:
    """The bearer token: $RLHF_SERVE_TOKEN, else the file `token_file` (or $RLHF_SERVE_TOKEN_FILE); None if unset."""
    token = os.environ.get(TOKEN_ENV)
    source = f"${TOKEN_ENV}"
    if not token:
        token_file = token_file or os.environ.get(TOKEN_FILE_ENV)
        if not token_file:
            return None
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise ValueError(f"token file {path} does not exist")
        token, source = path.read_text().strip(), f"token file {path}"
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the bearer token from {source} is shorter than {MIN_TOKEN_CHARS} characters")
    return token


SCOPES = ("generate", "score", "feedback", "read", "promote", "admin")
"""generate: chat/completions; score: reward scoring; feedback: send feedback; read: list, inspect and download
checkpoints; promote: register, promote and delete checkpoints, start and stop feedback rounds; admin: export
feedback, and every other scope."""

SHARED_DEFAULT_SCOPES = ("generate", "score", "feedback")
"""The shared token's scopes unless the app's `token_scopes` or $RLHF_SERVE_TOKEN_SCOPES name others: what a client
does, and nothing that reads weights, reads other users' data or changes what is served. One token handed to every
client must not also be the operator's; operators get a named token or set the scopes explicitly."""

SHARED, ANONYMOUS_NAME = "shared", "anonymous"  # principal names of the shared token and of an app without auth
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")  # principal names go into logs and records
PLACEHOLDER = "CHANGE-ME"  # the token value of deploy/base/secret.example.yaml


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a token's name and scopes, never the token. Routes find it on request.state.principal."""
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Principal(ANONYMOUS_NAME, frozenset())  # every caller of an app with require_token: false


def parse_scopes(scopes, source: str) -> frozenset[str]:
    """A list of scopes or a comma-separated string of them; ValueError naming `source` and any unknown scope."""
    if isinstance(scopes, str):
        scopes = [s.strip() for s in scopes.split(",") if s.strip()]
    if not isinstance(scopes, list | tuple) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise ValueError(f"{source} must name at least one scope of {', '.join(SCOPES)}")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"{source}: unknown scope{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} "
                         f"(the scopes are {', '.join(SCOPES)})")
    return frozenset(scopes)


def shared_token_scopes(token_scopes: list[str] | None = None) -> tuple[frozenset[str], str]:
    """The shared token's scopes and where they come from: the app's `token_scopes`, else $RLHF_SERVE_TOKEN_SCOPES
    (comma-separated), else SHARED_DEFAULT_SCOPES."""
    if token_scopes is not None:
        return parse_scopes(token_scopes, "token_scopes"), "the app's token_scopes"
    env = os.environ.get(TOKEN_SCOPES_ENV)
    if env is not None:
        return parse_scopes(env, f"${TOKEN_SCOPES_ENV}"), f"${TOKEN_SCOPES_ENV}"
    return frozenset(SHARED_DEFAULT_SCOPES), f"the default: ${TOKEN_SCOPES_ENV} is unset"


def load_scoped_tokens(tokens_file: str | None = None) -> dict[str, Principal]:
    """Named tokens, token -> Principal, from a YAML/JSON file {name: {token: "...", scopes: [generate, ...]}}:
    `tokens_file`, else $RLHF_SERVE_TOKENS_FILE (so a deployment can mount one from a Secret without touching the
    apps' args, which the RayService copies verbatim from configs/serve.yaml)."""
    tokens_file = tokens_file or os.environ.get(TOKENS_FILE_ENV)
    if not tokens_file:
        return {}
    import yaml

    path = Path(tokens_file).expanduser()
    if not path.is_file():
        raise ValueError(f"tokens file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"tokens file {path}: expected a mapping name -> {{token, scopes}}")
    out: dict[str, Principal] = {}
    for name, spec in data.items():
        where = f"tokens file {path}: {name}"
        if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in (SHARED, ANONYMOUS_NAME):
            raise ValueError(f"tokens file {path}: {name!r} is not a usable name (letters, digits, '._@-', at most "
                             f"64 characters; {SHARED!r} and {ANONYMOUS_NAME!r} are taken)")
        if not isinstance(spec, dict) or set(spec) - {"token", "scopes"}:
            raise ValueError(f"{where} must be a mapping with the keys token and scopes")
        token = spec.get("token")
        if isinstance(token, str) and PLACEHOLDER in token:
            raise ValueError(f"{where}.token is still the example's {PLACEHOLDER}: generate one (deploy/README.md)")
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{where}.token must be a string of at least {MIN_TOKEN_CHARS} characters")
        if token in out:  # one token, two names: which principal sent a request could not be told
            raise ValueError(f"tokens file {path}: {out[token].name} and {name} have the same token")
        out[token] = Principal(name, parse_scopes(spec.get("scopes"), f"{where}.scopes"))
    return out


class TokenAuth:
    """`Authorization: Bearer <token>`, compared in constant time; set per replica as app.state.auth. `check`
    answers with the caller's Principal: the shared token's (named "shared", with `shared_scopes`) or a named
    token's (load_scoped_tokens)."""

    def __init__(self, token: str | None, enabled: bool = True, scoped: dict[str, Principal] | None = None,
                 shared_scopes=SHARED_DEFAULT_SCOPES):
        if enabled and token is None and not scoped:
            raise ValueError(f"authentication is on but no token is configured: set ${TOKEN_ENV}, "
                             f"${TOKEN_FILE_ENV}, ${TOKENS_FILE_ENV} or the app's token_file / tokens_file")
        scoped = dict(scoped or {})
        if token and token in scoped:
            raise ValueError(f"the shared token is also {scoped[token].name!r}'s in the tokens file")
        self.principals = [(t.encode(), p) for t, p in scoped.items()]
        if token:
            self.principals.append((token.encode(), Principal(SHARED, frozenset(shared_scopes))))
        self.enabled = enabled
        self._warned: set[tuple[str, str]] = set()

    def describe(self) -> str:
        """The principals and their scopes, for the replica's log (names only: never a token)."""
        return "; ".join(f"{p.name} [{', '.join(sorted(p.scopes))}]" for _, p in self.principals) or "none"

    def check(self, creds: HTTPAuthorizationCredentials | None, scope: str | None = None,
              deprecated: tuple[str, ...] = ()) -> Principal:
        """The caller's Principal if its token has `scope` (or a `deprecated` one that still grants the route, logged
        once per principal); 401 without a token, 403 for an unknown one or one without the scope."""
        if not self.enabled:
            return ANONYMOUS
        if creds is None or not creds.credentials:
            raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        given = creds.credentials.encode()
        found = None
        for token, principal in self.principals:  # every comparison runs: no early exit on a match
            if hmac.compare_digest(given, token):
                found = principal
        if found is None:
            raise HTTPException(403, "invalid bearer token")
        if scope is None or found.allows(scope):
            return found
        old = next((s for s in deprecated if found.allows(s)), None)
        if old is None:
            raise HTTPException(403, f"this token lacks the {scope!r} scope")
        if (found.name, old) not in self._warned:
            self._warned.add((found.name, old))
            logger.warning("principal %r used its %r scope on a route that needs %r: deprecated, give it %r",
                           found.name, old, scope, scope)
        return found


def require_scope(scope: str | None, *deprecated: str):
    """Route dependency: a valid token with `scope` (or a `deprecated` scope that still grants the route); the
    caller's Principal goes to request.state.principal, so what the route writes can name who asked. Appears in the
    OpenAPI spec as HTTP bearer. Async on purpose: a few constant-time compares belong on the event loop; a plain
    `def` dependency would cost every request a hop through FastAPI's thread pool (about half the replica's FastAPI
    time, profiled)."""
    async def dependency(request: Request,
                         creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
        auth = getattr(request.app.state, "auth", None)
        if auth is None:  # not configured yet: refuse rather than serve unauthenticated
            raise HTTPException(503, "the service is not configured yet")
        request.state.principal = auth.check(creds, scope, deprecated)
        return request.state.principal
    return dependency


class _TooLarge(HTTPException):
    pass


class GuardMiddleware:
    """ASGI middleware: bodies over `max_body_bytes` get 413 (by Content-Length, and while streaming
    for chunked bodies); an exception escaping the app becomes a JSON 500 without a traceback."""

    def __init__(self, app, limits: dict):
        self.app, self.limits = app, limits  # read per request: a replica sets them from its args

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.limits["max_body_bytes"]
        if scope.get("root_path") and scope["path"] == scope["root_path"]:
            # Serve keeps the route prefix in the path: "/v1/checkpoints" is this app's "/" route.
            scope = {**scope, "path": scope["path"] + "/", "raw_path": (scope["path"] + "/").encode()}
        started = False

        async def send_tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def reply(status: int, body: dict):
            if not started:
                await JSONResponse(body, status_code=status)(scope, receive, send_tracked)

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await reply(400, {"error": "invalid Content-Length header"})
            if int(length) > max_bytes:
                return await reply(413, {"error": f"request body is {int(length)} bytes, "
                                                  f"more than the limit of {max_bytes}"})
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise _TooLarge(413, f"request body is more than the limit of {max_bytes} bytes")
            return message

        try:
            await self.app(scope, limited_receive, send_tracked)
        except _TooLarge as e:
            await reply(413, {"error": e.detail})
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            await reply(500, {"error": "internal error"})


def _clean_errors(errors) -> list[dict]:
    """Pydantic errors without the offending input (it may be megabytes) or internals."""
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        out.append({"loc": loc, "msg": e.get("msg", ""), "type": e.get("type", "")})
    return out[:20]


def install_guards(app: FastAPI, limits: dict) -> None:
    """JSON error bodies for every 4xx/5xx, and the size/exception middleware."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": "invalid request", "detail": _clean_errors(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    app.add_middleware(GuardMiddleware, limits=limits)


class AppArgs(BaseModel):
    """The args `guard_replica` reads, which every app takes: its tokens and its body limit. Each app's args
    extend these (restating max_body_bytes where its limit differs)."""

    model_config = ConfigDict(extra="forbid")
    token_file: str | None = None
    token_scopes: list[str] | None = None  # the shared token's; null: $RLHF_SERVE_TOKEN_SCOPES / SHARED_DEFAULT_SCOPES
    tokens_file: str | None = None         # named tokens with scopes; null: $RLHF_SERVE_TOKENS_FILE
    max_body_bytes: int = Field(1 << 20, ge=1024)


class ReplicatedAppArgs(AppArgs):
    """The args of an app that scales out (reward, policy): how many replicas, and what each gets and takes."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0.0)
    max_ongoing_requests: int = Field(64, ge=1)
    graceful_shutdown_timeout_s: float = Field(GRACEFUL_SHUTDOWN_TIMEOUT_S, ge=0.0)

    def replica_options(self) -> dict:
        """These args as the deployment's .options()."""
        return {"num_replicas": self.num_replicas, "max_ongoing_requests": self.max_ongoing_requests,
                "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
                "ray_actor_options": {"num_cpus": self.num_cpus}}


def guarded_app(title: str, description: str, args_type: type[AppArgs]) -> tuple[FastAPI, dict]:
    """An app's FastAPI object with `install_guards` on it, and the limits its middleware reads (the args type's
    defaults until `guard_replica` sets them from the replica's args). Made at import: @serve.ingress takes it when
    the deployment class is defined."""
    app = FastAPI(title=title, version="1", description=description)
    limits = {"max_body_bytes": args_type.model_fields["max_body_bytes"].default}
    install_guards(app, limits)
    return app, limits


def guard_replica(app: FastAPI, limits: dict, args, token_required: bool = True, open_risk: str = "") -> None:
    """A replica's request guards from its app's args: the body limit (`install_guards`' middleware reads `limits`)
    and the bearer tokens, the shared one and the named ones with their scopes. The log says who may call and with
    which scopes (never a token); an app without auth says so as a warning, with `open_risk`."""
    limits["max_body_bytes"] = args.max_body_bytes
    scopes, source = shared_token_scopes(args.token_scopes)
    auth = TokenAuth(load_token(args.token_file), enabled=token_required, scoped=load_scoped_tokens(args.tokens_file),
                     shared_scopes=scopes)
    app.state.auth = auth
    if not token_required:
        logger.warning("%s: require_token is false: its routes answer anyone who can reach this port, without a "
                       "token%s; keep that to a private network", app.title, f" ({open_risk})" if open_risk else "")
    elif any(p.name == SHARED for _, p in auth.principals):
        logger.info("%s: principals %s (the shared token's scopes: %s)", app.title, auth.describe(), source)
    else:
        logger.info("%s: principals %s", app.title, auth.describe())


def unprocessable(msg: str, loc: list | None = None) -> HTTPException:
    """A 422 for input that is well-formed JSON but cannot be used (e.g. too many tokens)."""
    return HTTPException(422, msg if loc is None else f"{'.'.join(map(str, loc))}: {msg}")


async def promoted_change(registry, kind: str, serving_id: str | None, failed: set) -> dict | None:
    """The registry's promoted `kind` checkpoint (its entry as a dict) when a replica serving `serving_id` should load
    it: a new one that has not failed to load here before. None otherwise, also when the registry cannot be reached:
    an outage is logged, and must not mark the replica unhealthy (apps call this from their health checks)."""
    try:
        entry = await asyncio.to_thread(registry.serving, kind)
    except Exception as e:
        logger.warning("registry unavailable: %s", e)
        return None
    if entry is None or entry.id == serving_id or entry.id in failed:
        return None
    return entry.model_dump()
