"""Checkpoints API over the registry: list, inspect, download, register and promote checkpoints.

    GET    /v1/checkpoints?run=&kind=&stage=         entries
    GET    /v1/checkpoints/{id}                      one entry
    GET    /v1/checkpoints/{id}/files                its manifest (path -> sha256, size), re-hashed now
    GET    /v1/checkpoints/{id}/files/{path}         one file, streamed
    POST   /v1/checkpoints                           register a directory (the server hashes it)
    POST   /v1/checkpoints/{id}/promote              make it the served checkpoint of its kind
    DELETE /v1/checkpoints/{id}                      forget it (files stay)

The app is mounted at route_prefix /v1/checkpoints (configs/serve.yaml), so its routes are
written relative to it. Every route but /healthz needs a token: reads (list, get, files, downloads) the "read" scope,
since entries name server paths and downloads are weights; writes (register, promote, delete) the "promote" scope.
Registered paths must lie under `checkpoint_roots`, so the token cannot be used to
publish arbitrary server directories; file paths must resolve inside the checkpoint directory.
Promoting a reward or policy checkpoint first has the reward or policy app load it (the swap is atomic there), and
only then moves the registry's serving pointer, so the pointer always names a loadable model.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from rlhf_cluster.lib.registry import (
    ID_PATTERN,
    Conflict,
    Entry,
    Kind,
    NotFound,
    RegistryUnavailable,
    checkpoint_manifest,
    default_registry_dir,
    make_entry,
    manifest_sha256,
    open_registry,
)
from rlhf_cluster.serve.common import (
    GRACEFUL_SHUTDOWN_TIMEOUT_S,
    AppArgs,
    guard_replica,
    guarded_app,
    require_scope,
)

logger = logging.getLogger("ray.serve")

CheckpointId = Annotated[str, PathParam(pattern=ID_PATTERN)]


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, pattern=ID_PATTERN)   # default: run-stage-kind-stepN
    run: str = Field(min_length=1, max_length=256)
    kind: Kind
    stage: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    path: str = Field(min_length=1, max_length=4096)
    step: int = Field(0, ge=0)
    metrics: Annotated[dict[Annotated[str, Field(max_length=128)], Annotated[float, Field(allow_inf_nan=False)]],
                       Field(max_length=256)] = {}
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # when given, must match the files


class CheckpointsAppArgs(AppArgs):
    """Arguments of `app_builder`; the tokens are common.py's."""

    registry: str | None = None                     # redis://... or a directory; null: $REDIS_URL / default
    checkpoint_roots: list[str] | None = None       # null: ./runs and the default cache directory
    reward_app: str = "reward"                      # application and deployment told to load promoted RMs
    reward_deployment: str = "RewardModel"
    policy_app: str = "policy"                      # application and deployment told to load promoted policies
    policy_deployment: str = "Policy"
    max_body_bytes: int = Field(64 << 10, ge=1024)
    num_cpus: float = Field(0.1, gt=0.0)
    graceful_shutdown_timeout_s: float = Field(GRACEFUL_SHUTDOWN_TIMEOUT_S, ge=0.0)


def _error(e: Exception) -> HTTPException:
    if isinstance(e, NotFound):
        return HTTPException(404, str(e))
    if isinstance(e, Conflict):
        return HTTPException(409, str(e))
    if isinstance(e, RegistryUnavailable):
        return HTTPException(503, str(e))
    return HTTPException(422, str(e))


def safe_relative(path: str) -> str:
    """A file path inside a checkpoint: relative, no '..', no backslashes or NULs (else 400)."""
    parts = path.split("/")
    if (not path or path.startswith("/") or "\\" in path or "\x00" in path or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)):
        raise HTTPException(400, f"file path {path!r} is not a plain relative path inside the checkpoint")
    return path


app, _limits = guarded_app("rlhf-cluster checkpoints",
                           "Checkpoint registry: list, download, register and promote checkpoints.", CheckpointsAppArgs)
reader = [Depends(require_scope("read"))]       # list, get, files, downloads
operator = [Depends(require_scope("promote"))]  # writes: register, promote, delete


@serve.deployment(name="Checkpoints", max_ongoing_requests=32, graceful_shutdown_wait_loop_s=2,
                  graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S)
@serve.ingress(app)
class CheckpointsDeployment:
    def __init__(self, args: dict):
        args = CheckpointsAppArgs.model_validate(args)
        self.args = args
        guard_replica(app, _limits, args)
        self.registry = open_registry(args.registry)
        roots = args.checkpoint_roots
        if roots is None:
            roots = [str(Path("runs").resolve()), str(default_registry_dir().parent)]
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        logger.info("checkpoints app: registry %s, roots %s", self.registry.describe(), self.roots)

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (ValueError, RegistryUnavailable) as e:  # RegistryError and pydantic's errors are ValueErrors
            raise _error(e) from None

    def _checkpoint_dir(self, entry: Entry) -> Path:
        root = Path(entry.path).resolve()
        if not any(root.is_relative_to(r) for r in self.roots):
            raise HTTPException(403, f"checkpoint {entry.id!r} lies outside the served checkpoint roots")
        if not root.is_dir():
            raise HTTPException(410, f"checkpoint {entry.id!r}: its directory no longer exists")
        return root

    @app.get("/healthz")
    def healthz(self):
        return {"status": "ok"}

    @app.get("/", response_model=list[Entry], dependencies=reader)
    def list_checkpoints(self, run: Annotated[str | None, Query(max_length=256)] = None, kind: Kind | None = None,
                         stage: Annotated[str | None, Query(max_length=64)] = None):
        return self._call(self.registry.list, run=run, kind=kind, stage=stage)

    @app.get("/{id}", response_model=Entry, dependencies=reader)
    def get_checkpoint(self, id: CheckpointId):
        return self._call(self.registry.get, id)

    @app.get("/{id}/files", dependencies=reader)
    def manifest(self, id: CheckpointId):
        """The files as they are now, and whether they still hash to the registered sha256."""
        entry = self._call(self.registry.get, id)
        manifest = self._call(checkpoint_manifest, self._checkpoint_dir(entry))
        sha = manifest_sha256(manifest)
        return {"id": id, "sha256": sha, "matches_registered": sha == entry.sha256, "files": manifest}

    @app.get("/{id}/files/{path:path}", dependencies=reader, response_class=FileResponse)
    def download(self, id: CheckpointId, path: str):
        rel = safe_relative(path)
        root = self._checkpoint_dir(self._call(self.registry.get, id))
        target = (root / rel).resolve()
        if not target.is_relative_to(root):  # a symlink pointing out of the checkpoint
            raise HTTPException(403, f"file path {path!r} resolves outside the checkpoint")
        if not target.is_file():
            raise HTTPException(404, f"checkpoint {id!r} has no file {path!r}")
        return FileResponse(target, media_type="application/octet-stream", filename=target.name)

    # ------------------------------------------------------------------ writes
    @app.post("/", response_model=Entry, status_code=201, dependencies=operator)
    async def register(self, body: RegisterRequest, response: Response):
        """Hash the directory (in a thread: large checkpoints take a while) and add it; a repeat is a 200."""
        path = Path(body.path)
        if not path.is_absolute():
            raise HTTPException(422, f"path must be absolute, got {body.path!r}")
        path = path.resolve()
        if not any(path.is_relative_to(r) for r in self.roots):
            raise HTTPException(403, f"path {body.path!r} is outside the checkpoint roots the server accepts")
        entry = await asyncio.to_thread(self._call, make_entry, path, run=body.run, kind=body.kind,
                                        stage=body.stage, step=body.step, metrics=body.metrics, id=body.id)
        if body.sha256 is not None and body.sha256 != entry.sha256:
            raise HTTPException(409, f"the files at {body.path!r} have sha256 {entry.sha256}, not {body.sha256}")
        stored = await asyncio.to_thread(self._call, self.registry.register, entry)
        if stored.created != entry.created:
            response.status_code = 200  # already registered with this content
        return stored

    @app.post("/{id}/promote", dependencies=operator)
    async def promote(self, id: CheckpointId):
        """Reward and policy checkpoints: the serving app loads it first (a policy is probed and swapped in), then
        the pointer moves (409 if it cannot load). An app that is not running reads the pointer when it starts."""
        entry = await asyncio.to_thread(self._call, self.registry.get, id)
        loaded = None
        target = {"reward": (self.args.reward_app, self.args.reward_deployment),
                  "policy": (self.args.policy_app, self.args.policy_deployment)}.get(entry.kind)
        if target is not None:
            self._checkpoint_dir(entry)
            try:
                handle = serve.get_deployment_handle(target[1], app_name=target[0])
            except Exception:  # the app is not running: it reads the pointer when it starts
                handle = None
            if handle is not None:
                loaded = await handle.load_checkpoint.remote(entry.model_dump())
                if not loaded["ok"]:
                    raise HTTPException(409, f"the {entry.kind} app could not load {id!r}: {loaded['error']}")
        entry = await asyncio.to_thread(self._call, self.registry.promote, id)
        return {"serving": entry.model_dump(), f"{entry.kind}_app": loaded}

    @app.delete("/{id}", status_code=204, dependencies=operator)
    def delete(self, id: CheckpointId):
        self._call(self.registry.delete, id)
        return Response(status_code=204)


def app_builder(args: CheckpointsAppArgs) -> serve.Application:
    """import_path target: `rlhf_cluster.serve.checkpoints_app:app_builder` with the application's `args:`."""
    if isinstance(args, dict):
        args = CheckpointsAppArgs.model_validate(args)
    return CheckpointsDeployment.options(graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
                                         ray_actor_options={"num_cpus": args.num_cpus}).bind(args.model_dump())
