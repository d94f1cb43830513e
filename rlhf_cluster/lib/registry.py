"""Checkpoint registry: which checkpoints exist, what they hold (sha256), and which one is served.

One interface, two backends:
    Redis      open_registry("redis://host:6379/0")  (or env REDIS_URL): shared by a cluster;
               run redis-server with `appendonly yes` so committed entries survive restarts.
    embedded   open_registry("/some/dir")             (the default, no server): one JSON file
               written atomically (temp file + os.replace) under an fcntl lock.

An entry is {id, run, kind, stage, path, step, metrics, sha256, created}; sha256 is the hash of
the checkpoint's manifest (relative path -> sha256, size of every file), so a checkpoint that
changed on disk after registration is detected. Registering the same id again with the same
content is a no-op; with different content it is a conflict. Each kind (policy, critic, reward)
has one "serving" pointer: the checkpoint the reward service loads.

    python -m rlhf_cluster.lib.registry register DIR --run r1 --kind reward --stage reward --step 100
    python -m rlhf_cluster.lib.registry list [--kind reward]
    python -m rlhf_cluster.lib.registry promote ID
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlhf_cluster.lib.files import write_json

KINDS = ("policy", "critic", "reward")
Kind = Literal["policy", "critic", "reward"]
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # safe in URLs, file names and Redis keys


class RegistryError(ValueError):
    """A registry request that cannot be done (unknown id, conflicting content, ...)."""


class NotFound(RegistryError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Conflict(RegistryError):
    pass


class RegistryUnavailable(RuntimeError):
    """The backend could not be reached, even after retrying with backoff."""


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ID_PATTERN)
    run: str = Field(min_length=1, max_length=256)
    kind: Kind
    stage: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")  # sft, reward, dpo, ppo, rejection_sampling, ...
    path: str = Field(min_length=1, max_length=4096)
    step: int = Field(0, ge=0)
    metrics: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = {}  # NaN is not JSON
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: float = Field(default_factory=time.time)

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not os.path.isabs(v):
            raise ValueError(f"path must be absolute, got {v!r}")
        return v

    def same_content(self, other: Entry) -> bool:
        """Equal up to the registration time: re-registering this is a no-op."""
        return self.model_dump(exclude={"created"}) == other.model_dump(exclude={"created"})


# --------------------------------------------------------------------------- checkpoint hashing
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_manifest(path: str | Path) -> dict[str, dict]:
    """{relative posix path: {"sha256", "size"}} for every regular file under a checkpoint directory.

    Symlinks are skipped: a checkpoint is the files it holds, not what links point at.
    """
    root = Path(path)
    if not root.is_dir():
        raise RegistryError(f"checkpoint directory {root} does not exist or is not a directory")
    manifest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            f = Path(dirpath) / name
            if f.is_symlink() or not f.is_file():
                continue
            manifest[f.relative_to(root).as_posix()] = {"sha256": file_sha256(f), "size": f.stat().st_size}
    if not manifest:
        raise RegistryError(f"checkpoint directory {root} holds no files")
    return manifest


def manifest_sha256(manifest: dict[str, dict]) -> str:
    """One hash for a whole checkpoint: sha256 of its manifest as canonical JSON."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    return manifest_sha256(checkpoint_manifest(path))


def make_entry(path: str | Path, *, run: str, kind: str, stage: str, step: int = 0,
               metrics: dict[str, float] | None = None, id: str | None = None) -> Entry:
    """An entry for a checkpoint directory, hashing its files; id defaults to run-stage-kind-stepN."""
    path = Path(path).resolve()
    if id is None:
        id = re.sub(r"[^A-Za-z0-9._-]", "_", f"{run}-{stage}-{kind}-step{step}")[:128]
    return Entry(id=id, run=run, kind=kind, stage=stage, path=str(path), step=step,
                 metrics=metrics or {}, sha256=checkpoint_sha256(path))


# --------------------------------------------------------------------------- the interface
class Registry:
    """What both backends do; subclasses implement the _storage methods."""

    def register(self, entry: Entry) -> Entry:
        """Add an entry; returns the stored one (the existing one when this is a repeat)."""
        raise NotImplementedError

    def get(self, id: str) -> Entry:
        raise NotImplementedError

    def list(self, run: str | None = None, kind: str | None = None, stage: str | None = None) -> list[Entry]:
        raise NotImplementedError

    def promote(self, id: str) -> Entry:
        """Make `id` the serving checkpoint of its kind; returns its entry."""
        raise NotImplementedError

    def serving(self, kind: str) -> Entry | None:
        raise NotImplementedError

    def delete(self, id: str) -> None:
        """Remove an entry (not its files). A serving checkpoint cannot be deleted: promote another first."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _filter(entries, run, kind, stage) -> list[Entry]:
    out = [e for e in entries if (run is None or e.run == run) and (kind is None or e.kind == kind)
           and (stage is None or e.stage == stage)]
    return sorted(out, key=lambda e: (e.created, e.id))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise RegistryError(f"kind must be one of {list(KINDS)}, got {kind!r}")


# --------------------------------------------------------------------------- embedded JSON file
class FileRegistry(Registry):
    """registry.json in a directory; every change is read-modify-write under an exclusive flock."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / "registry.json"
        self.lockfile = self.dir / "registry.lock"

    def describe(self) -> str:
        return f"file:{self.file}"

    @contextmanager
    def _locked(self, exclusive: bool):
        with open(self.lockfile, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> dict:
        if not self.file.exists():
            return {"checkpoints": {}, "serving": {}}
        try:
            return json.loads(self.file.read_text())
        except json.JSONDecodeError as e:
            raise RegistryError(f"registry file {self.file} is corrupt: {e}") from None

    def _write(self, state: dict) -> None:
        write_json(self.file, state, indent=1, durable=True, sort_keys=True)

    def register(self, entry: Entry) -> Entry:
        with self._locked(True):
            state = self._read()
            old = state["checkpoints"].get(entry.id)
            if old is not None:
                old = Entry.model_validate(old)
                if old.same_content(entry):
                    return old
                raise Conflict(f"checkpoint {entry.id!r} is already registered with different content")
            state["checkpoints"][entry.id] = entry.model_dump()
            self._write(state)
            return entry

    def get(self, id: str) -> Entry:
        with self._locked(False):
            raw = self._read()["checkpoints"].get(id)
        if raw is None:
            raise NotFound(f"no checkpoint with id {id!r}")
        return Entry.model_validate(raw)

    def list(self, run=None, kind=None, stage=None) -> list[Entry]:
        with self._locked(False):
            raw = self._read()["checkpoints"].values()
        return _filter((Entry.model_validate(r) for r in raw), run, kind, stage)

    def promote(self, id: str) -> Entry:
        with self._locked(True):
            state = self._read()
            if id not in state["checkpoints"]:
                raise NotFound(f"no checkpoint with id {id!r}")
            entry = Entry.model_validate(state["checkpoints"][id])
            state["serving"][entry.kind] = id
            self._write(state)
            return entry

    def serving(self, kind: str) -> Entry | None:
        _check_kind(kind)
        with self._locked(False):
            state = self._read()
        id = state["serving"].get(kind)
        return Entry.model_validate(state["checkpoints"][id]) if id in state["checkpoints"] else None

    def delete(self, id: str) -> None:
        with self._locked(True):
            state = self._read()
            if id not in state["checkpoints"]:
                raise NotFound(f"no checkpoint with id {id!r}")
            if id in state["serving"].values():
                raise Conflict(f"checkpoint {id!r} is being served; promote another one before deleting it")
            del state["checkpoints"][id]
            self._write(state)


# --------------------------------------------------------------------------- Redis
def retry_redis(fn, where: str, retries: int, backoff_s: float, max_backoff_s: float, unavailable: type[Exception]):
    """fn(), retried on Redis connection errors and timeouts with exponential backoff (redis-py reconnects on the
    next command); after `retries` retries raises `unavailable` naming the server."""
    import redis

    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if attempt == retries:
                raise unavailable(f"redis at {where} unreachable after {retries + 1} attempts: {e}") from None
            time.sleep(delay)
            delay = min(delay * 2, max_backoff_s)


class RedisRegistry(Registry):
    """Entries as JSON strings under {prefix}ckpt:{id}, ids in the set {prefix}ids, pointers in the hash
    {prefix}serving. Multi-key changes are WATCH/MULTI transactions; connection errors are retried with
    exponential backoff (redis-py reconnects on the next command)."""

    def __init__(self, url: str, prefix: str = "rlhf:", retries: int = 8, backoff_s: float = 0.05,
                 max_backoff_s: float = 2.0):
        import redis

        self._redis = redis
        self.url, self.prefix = url, prefix
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                           decode_responses=True)

    def describe(self) -> str:
        return f"redis:{self.url.split('@')[-1]}"  # never echo a password

    def _key(self, id: str) -> str:
        return f"{self.prefix}ckpt:{id}"

    def _retry(self, fn):
        return retry_redis(fn, self.describe(), self.retries, self.backoff_s, self.max_backoff_s, RegistryUnavailable)

    def register(self, entry: Entry) -> Entry:
        def attempt():
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._key(entry.id), entry.model_dump_json(), nx=True)
            pipe.sadd(f"{self.prefix}ids", entry.id)
            created, _ = pipe.execute()
            if created:
                return entry
            old = Entry.model_validate_json(self.client.get(self._key(entry.id)))
            if old.same_content(entry):
                return old
            raise Conflict(f"checkpoint {entry.id!r} is already registered with different content")

        return self._retry(attempt)

    def get(self, id: str) -> Entry:
        raw = self._retry(lambda: self.client.get(self._key(id)))
        if raw is None:
            raise NotFound(f"no checkpoint with id {id!r}")
        return Entry.model_validate_json(raw)

    def list(self, run=None, kind=None, stage=None) -> list[Entry]:
        def attempt():
            ids = sorted(self.client.smembers(f"{self.prefix}ids"))
            return self.client.mget([self._key(i) for i in ids]) if ids else []

        return _filter((Entry.model_validate_json(r) for r in self._retry(attempt) if r), run, kind, stage)

    def promote(self, id: str) -> Entry:
        def txn(pipe):
            raw = pipe.get(self._key(id))
            if raw is None:
                raise NotFound(f"no checkpoint with id {id!r}")
            entry = Entry.model_validate_json(raw)
            pipe.multi()
            pipe.hset(f"{self.prefix}serving", entry.kind, id)
            return entry

        return self._retry(lambda: self.client.transaction(txn, self._key(id), value_from_callable=True))

    def serving(self, kind: str) -> Entry | None:
        _check_kind(kind)
        id = self._retry(lambda: self.client.hget(f"{self.prefix}serving", kind))
        if id is None:
            return None
        try:
            return self.get(id)
        except NotFound:
            return None

    def delete(self, id: str) -> None:
        def txn(pipe):
            if not pipe.exists(self._key(id)):
                raise NotFound(f"no checkpoint with id {id!r}")
            if id in pipe.hvals(f"{self.prefix}serving"):
                raise Conflict(f"checkpoint {id!r} is being served; promote another one before deleting it")
            pipe.multi()
            pipe.delete(self._key(id))
            pipe.srem(f"{self.prefix}ids", id)

        self._retry(lambda: self.client.transaction(txn, self._key(id), f"{self.prefix}serving"))


def default_registry_dir() -> Path:
    cache = os.environ.get("RLHF_CLUSTER_CACHE") or Path.home() / ".cache" / "rlhf-cluster"
    return Path(cache) / "registry"


def open_registry(location: str | Path | None = None) -> Registry:
    """redis://... or rediss://... -> Redis; a directory -> embedded JSON file.

    None: $REDIS_URL if set, else $RLHF_REGISTRY_DIR, else ~/.cache/rlhf-cluster/registry.
    """
    if location is None:
        location = os.environ.get("REDIS_URL") or os.environ.get("RLHF_REGISTRY_DIR") or default_registry_dir()
    location = str(location)
    if re.match(r"^(redis|rediss|unix)://", location):
        return RedisRegistry(location)
    if "://" in location:
        raise RegistryError(f"registry location {location!r}: use redis://host:port/db or a directory path")
    return FileRegistry(location)


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rlhf_cluster.lib.registry")
    ap.add_argument("--registry", default=None, help="redis://host:port/db or a directory (default: see docs)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("register")
    r.add_argument("path", type=Path)
    r.add_argument("--run", required=True)
    r.add_argument("--kind", required=True, choices=KINDS)
    r.add_argument("--stage", required=True)
    r.add_argument("--step", type=int, default=0)
    r.add_argument("--id", default=None)
    ls = sub.add_parser("list")
    for f in ("run", "kind", "stage"):
        ls.add_argument(f"--{f}", default=None)
    sub.add_parser("promote").add_argument("id")
    sub.add_parser("delete").add_argument("id")
    args = ap.parse_args(argv)
    reg = open_registry(args.registry)
    if args.cmd == "register":
        e = reg.register(make_entry(args.path, run=args.run, kind=args.kind, stage=args.stage, step=args.step,
                                    id=args.id))
        print(e.model_dump_json(indent=1))
    elif args.cmd == "list":
        for e in reg.list(args.run, args.kind, args.stage):
            print(f"{e.id}\t{e.kind}\t{e.stage}\tstep {e.step}\t{e.path}")
    elif args.cmd == "promote":
        print(f"serving {reg.promote(args.id).id}")
    elif args.cmd == "delete":
        reg.delete(args.id)


if __name__ == "__main__":
    main()
