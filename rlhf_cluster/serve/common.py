"""What both apps share: bearer-token auth, a request-size limit, and JSON errors without tracebacks.

Bad input must always be a 4xx with a JSON body naming the problem; anything unexpected is a
500 {"error": "internal error"} (the traceback goes to the replica's log, never to the client).
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")

TOKEN_ENV = "RLHF_SERVE_TOKEN"
TOKEN_FILE_ENV = "RLHF_SERVE_TOKEN_FILE"
MIN_TOKEN_CHARS = 16
_bearer = HTTPBearer(auto_error=False)


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


SCOPES = ("generate", "feedback", "promote")
"""generate: chat/completions (and scoring when it needs a token); feedback: send feedback; promote: the operator's
register / promote / delete checkpoints and export feedback. The shared token has every scope."""


def load_scoped_tokens(tokens_file: str | None) -> dict[str, set[str]]:
    """A YAML/JSON file of named tokens with their scopes: {name: {token: "...", scopes: [generate, ...]}}."""
    if not tokens_file:
        return {}
    import yaml

    path = Path(tokens_file).expanduser()
    if not path.is_file():
        raise ValueError(f"tokens file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"tokens file {path}: expected a mapping name -> {{token, scopes}}")
    out = {}
    for name, spec in data.items():
        token, scopes = (spec or {}).get("token"), (spec or {}).get("scopes")
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"tokens file {path}: {name}.token must be a string of at least {MIN_TOKEN_CHARS} "
                             "characters")
        if not isinstance(scopes, list) or not scopes or set(scopes) - set(SCOPES):
            raise ValueError(f"tokens file {path}: {name}.scopes must be a non-empty list of {list(SCOPES)}")
        out[token] = set(scopes)
    return out


class TokenAuth:
    """`Authorization: Bearer <token>`, compared in constant time; set per replica as app.state.auth.
    The shared token has every scope; named tokens (load_scoped_tokens) only theirs."""

    def __init__(self, token: str | None, enabled: bool = True, scoped: dict[str, set[str]] | None = None):
        if enabled and token is None and not scoped:
            raise ValueError(f"authentication is on but no token is configured: set ${TOKEN_ENV}, "
                             f"${TOKEN_FILE_ENV} or the app's token_file")
        self.tokens = [(t.encode(), set(s)) for t, s in (scoped or {}).items()]
        if token:
            self.tokens.append((token.encode(), set(SCOPES)))
        self.enabled = enabled

    def check(self, creds: HTTPAuthorizationCredentials | None, scope: str | None = None) -> None:
        if not self.enabled:
            return
        if creds is None or not creds.credentials:
            raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        given = creds.credentials.encode()
        scopes = None
        for token, token_scopes in self.tokens:  # every comparison runs: no early exit on a match
            if hmac.compare_digest(given, token):
                scopes = token_scopes
        if scopes is None:
            raise HTTPException(403, "invalid bearer token")
        if scope is not None and scope not in scopes:
            raise HTTPException(403, f"this token lacks the {scope!r} scope")


def require_scope(scope: str | None):
    """Route dependency: a valid token (with `scope`, when given); appears in the OpenAPI spec as HTTP bearer.
    Async on purpose: a few constant-time compares belong on the event loop; a plain `def` dependency would cost
    every request a hop through FastAPI's thread pool (about half the replica's FastAPI time, profiled)."""
    async def dependency(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        auth = getattr(request.app.state, "auth", None)
        if auth is None:  # not configured yet: refuse rather than serve unauthenticated
            raise HTTPException(503, "the service is not configured yet")
        auth.check(creds, scope)
    return dependency


require_token = require_scope(None)


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


def guard_replica(app: FastAPI, limits: dict, args, token_required: bool = True) -> None:
    """A replica's request guards from its app's args: the body limit (`install_guards`' middleware reads `limits`)
    and the bearer tokens, the shared one and the named ones with their scopes."""
    limits["max_body_bytes"] = args.max_body_bytes
    app.state.auth = TokenAuth(load_token(args.token_file), enabled=token_required,
                               scoped=load_scoped_tokens(args.tokens_file))


def unprocessable(msg: str, loc: list | None = None) -> HTTPException:
    """A 422 for input that is well-formed JSON but cannot be used (e.g. too many tokens)."""
    return HTTPException(422, msg if loc is None else f"{'.'.join(map(str, loc))}: {msg}")

