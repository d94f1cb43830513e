"""Checkpoint storage given as a URI: a local path, or any filesystem pyarrow knows (s3://, gs://, hdfs://,
abfs://; file:// for a local one). On a cluster of several nodes every rank writes and reads the storage itself
(pyarrow.fs), so no code reads a path that only exists on another node's disk.

A rank writes into a directory on its own node (`staged`), then uploads its files; it reads by downloading the
files it needs into such a directory (`fetched`). Object stores have no atomic directory rename, so a checkpoint
is complete when its manifest ({path: {sha256, size}}, written last) lists exactly the files stored, and a rank
checks each file it downloads against the manifest's hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


class StorageError(RuntimeError):
    """A storage URI that cannot be used, or a file that differs from its manifest."""


def is_uri(location: str) -> bool:
    return "://" in location


def open_storage(uri: str):
    """(pyarrow filesystem, base path inside it) of a URI or an absolute local path."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri if is_uri(uri) else os.path.abspath(uri))
    except Exception as e:  # unknown scheme, missing credentials, bad bucket name: named, not a traceback
        raise StorageError(f"storage {uri!r} cannot be opened: {type(e).__name__}: {e}") from e


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts)


def scratch_dir() -> str:
    """A directory on this node's own disk (RLHF_STAGING_DIR, else the system's temporary directory)."""
    root = os.environ.get("RLHF_STAGING_DIR") or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix="rlhf-stage-", dir=root)


def upload(local: Path, uri: str) -> dict[str, dict]:
    """Copy every file under `local` to `uri` (same relative paths); returns their manifest."""
    from rlhf_cluster.lib.registry import checkpoint_manifest

    fs, base = open_storage(uri)
    manifest = checkpoint_manifest(local) if any(p.is_file() for p in local.rglob("*")) else {}
    for rel in manifest:
        dest = posixpath.join(base, rel)
        fs.create_dir(posixpath.dirname(dest), recursive=True)
        with open(local / rel, "rb") as src, fs.open_output_stream(dest) as out:
            shutil.copyfileobj(src, out, 1 << 22)
    return manifest


def download(uri: str, local: Path, manifest: dict[str, dict], keep: Callable[[str], bool] = lambda rel: True) -> None:
    """The files of `manifest` under `uri` that `keep` selects, into `local`, each checked against its hash."""
    from rlhf_cluster.lib.registry import file_sha256

    fs, base = open_storage(uri)
    for rel, meta in manifest.items():
        if not keep(rel):
            continue
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(posixpath.join(base, rel)) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
        if file_sha256(dest) != meta["sha256"]:
            raise StorageError(f"{join(uri, rel)} differs from its manifest (sha256)")


@contextlib.contextmanager
def staged(dest: str) -> Iterator[tuple[Path, dict]]:
    """A local directory to write into; on exit its files go to `dest` (a storage URI) and the yielded dict
    is filled with their manifest. A plain local `dest` is written in place (manifest left empty)."""
    if not is_uri(dest):
        os.makedirs(dest, exist_ok=True)
        yield Path(dest), {}
        return
    local, manifest = Path(scratch_dir()), {}
    try:
        yield local, manifest
        manifest.update(upload(local, dest))
    finally:
        shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def fetched(src: str, manifest: dict[str, dict] | None, keep: Callable[[str], bool] = lambda rel: True
            ) -> Iterator[Path]:
    """`src` as a local directory: a local path as it is; a storage URI downloaded (the files of `manifest`
    that `keep` selects) into this node's scratch space, removed on exit."""
    if not is_uri(src):
        yield Path(src)
        return
    local = Path(scratch_dir())
    try:
        download(src, local, manifest or {}, keep)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


# --------------------------------------------------------------------------- checkpoint directories in storage
def read_json(uri: str):
    fs, path = open_storage(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = open_storage(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_dirs(uri: str) -> list[str]:
    """Names of the directories directly under `uri` (none when it does not exist yet)."""
    import pyarrow.fs

    fs, base = open_storage(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory)


def stored_sizes(uri: str) -> dict[str, int]:
    """{relative path: size} of every file under `uri`."""
    import pyarrow.fs

    fs, base = open_storage(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
    return {posixpath.relpath(i.path, base): i.size for i in infos if i.type == pyarrow.fs.FileType.File}


def delete_dir(uri: str) -> None:
    fs, path = open_storage(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)


def check_writable(uri: str) -> None:
    """Before any actor starts: the storage opens, and a probe file can be written and removed there."""
    probe = join(uri, f".write-probe-{os.getpid()}")
    try:
        write_bytes(probe, b"ok")
        fs, path = open_storage(probe)
        fs.delete_file(path)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"storage {uri!r} is not writable: {type(e).__name__}: {e}") from e
