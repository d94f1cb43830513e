"""Writes that a reader never sees half of: a file or a directory is written beside its final name and renamed into
place (a rename within one directory is atomic). `durable=True` also fsyncs the file before the rename, for state
that was acknowledged to someone (the registry, a feedback round's cursor)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _beside(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}-{uuid.uuid4().hex[:8]}")


def write_atomic(path: str | Path, data: str | bytes, durable: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path, "tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj, indent: int | None = 2, durable: bool = False, **dumps) -> None:
    write_atomic(path, json.dumps(obj, indent=indent, **dumps) + "\n", durable)


@contextlib.contextmanager
def replaced_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (a figure, a model file); on success it
    replaces `path`. The temporary name keeps the suffix, so writers that go by it (matplotlib) still do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path, "tmp").with_suffix(path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_dir(path: str | Path) -> Iterator[Path]:
    """An empty temporary directory beside `path`; on success it replaces `path` (whatever `path` held before is
    removed after the rename), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _beside(path, "old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
