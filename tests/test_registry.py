"""The checkpoint registry: both backends pass the same tests; Redis also survives a restart."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from rlhf_cluster.lib.registry import (
    Conflict,
    Entry,
    FileRegistry,
    NotFound,
    RedisRegistry,
    RegistryError,
    RegistryUnavailable,
    checkpoint_manifest,
    checkpoint_sha256,
    make_entry,
    manifest_sha256,
    open_registry,
)


@pytest.fixture(params=["file", "redis"])
def registry(request, tmp_path):
    if request.param == "file":
        return FileRegistry(tmp_path / "registry")
    url = request.getfixturevalue("redis_url")
    return RedisRegistry(url, prefix=f"test-{uuid.uuid4().hex[:8]}:")  # one namespace per test


@pytest.fixture
def ckpt(tmp_path):
    """A small checkpoint-like directory with a nested file."""
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 10)
    return d


def entry(ckpt, **kw) -> Entry:
    args = dict(run="run1", kind="reward", stage="reward", step=10, metrics={"acc": 0.7})
    args.update(kw)
    return make_entry(ckpt, **args)


def test_manifest_hashes_every_file_and_detects_changes(ckpt):
    m = checkpoint_manifest(ckpt)
    assert set(m) == {"config.json", "sub/weights.bin"}
    assert m["sub/weights.bin"]["size"] == 2560
    before = checkpoint_sha256(ckpt)
    assert before == manifest_sha256(m)
    (ckpt / "sub" / "weights.bin").write_bytes(b"x")
    assert checkpoint_sha256(ckpt) != before
    with pytest.raises(RegistryError, match="does not exist"):
        checkpoint_manifest(ckpt / "missing")


def test_register_get_list_filters(registry, ckpt):
    a = registry.register(entry(ckpt, id="a", run="r1", kind="reward", stage="reward"))
    registry.register(entry(ckpt, id="b", run="r1", kind="policy", stage="sft"))
    registry.register(entry(ckpt, id="c", run="r2", kind="policy", stage="ppo", step=5))
    got = registry.get("a")
    assert got == a and got.sha256 == checkpoint_sha256(ckpt) and got.metrics == {"acc": 0.7}
    assert [e.id for e in registry.list()] == ["a", "b", "c"]
    assert [e.id for e in registry.list(run="r1")] == ["a", "b"]
    assert [e.id for e in registry.list(kind="policy")] == ["b", "c"]
    assert [e.id for e in registry.list(run="r2", stage="ppo")] == ["c"]
    assert registry.list(kind="critic") == []
    with pytest.raises(NotFound, match="no checkpoint with id 'zzz'"):
        registry.get("zzz")


def test_register_is_idempotent_and_rejects_conflicts(registry, ckpt):
    first = registry.register(entry(ckpt, id="x"))
    time.sleep(0.01)
    again = registry.register(entry(ckpt, id="x"))  # same content, later `created`
    assert again.created == first.created
    assert len(registry.list()) == 1
    with pytest.raises(Conflict, match="different content"):
        registry.register(entry(ckpt, id="x", step=11))


def test_concurrent_registration_of_one_id_stores_it_once(registry, ckpt):
    e = entry(ckpt, id="same")
    errors = []

    def worker():
        try:
            registry.register(e)
        except Exception as ex:  # noqa: BLE001 - collected and asserted below
            errors.append(ex)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and [x.id for x in registry.list()] == ["same"]


def test_promote_serving_and_delete(registry, ckpt):
    registry.register(entry(ckpt, id="rm1"))
    registry.register(entry(ckpt, id="rm2", step=20))
    registry.register(entry(ckpt, id="pol", kind="policy", stage="ppo"))
    assert registry.serving("reward") is None
    assert registry.promote("rm1").id == "rm1"
    registry.promote("pol")
    assert registry.serving("reward").id == "rm1" and registry.serving("policy").id == "pol"
    registry.promote("rm2")  # a pointer per kind: promoting rm2 replaces rm1
    assert registry.serving("reward").id == "rm2" and registry.serving("policy").id == "pol"
    with pytest.raises(Conflict, match="being served"):
        registry.delete("rm2")
    registry.delete("rm1")
    assert [e.id for e in registry.list(kind="reward")] == ["rm2"]
    with pytest.raises(NotFound):
        registry.delete("rm1")
    with pytest.raises(NotFound):
        registry.promote("rm1")
    with pytest.raises(RegistryError, match="kind must be one of"):
        registry.serving("value")


def test_entries_are_validated(ckpt):
    e = entry(ckpt, id="ok")
    bad = [dict(id="../etc"), dict(kind="value"), dict(sha256="abc"), dict(path="relative/dir"), dict(step=-1),
           dict(metrics={"loss": float("nan")})]
    for change in bad:
        with pytest.raises(ValueError):
            Entry.model_validate({**e.model_dump(), **change})


def test_open_registry_picks_the_backend(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("RLHF_REGISTRY_DIR", str(tmp_path / "r"))
    assert isinstance(open_registry(), FileRegistry)
    assert isinstance(open_registry("redis://127.0.0.1:1/0"), RedisRegistry)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert isinstance(open_registry(), RedisRegistry)
    with pytest.raises(RegistryError, match="redis://host:port/db or a directory"):
        open_registry("http://example.com/")


def test_file_registry_writes_atomically(tmp_path, ckpt):
    """No temp files are left behind and the file is always complete JSON."""
    reg = FileRegistry(tmp_path / "reg")
    for i in range(5):
        reg.register(entry(ckpt, id=f"e{i}"))
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["registry.json", "registry.lock"]
    assert len(FileRegistry(tmp_path / "reg").list()) == 5  # a second instance reads the same state


def test_redis_reconnects_with_backoff_and_keeps_entries_across_restart(tmp_path, ckpt):
    """`kill -9` of redis-server (AOF on, fsync every second) and a restart lose no committed entry,
    and a call made while it is down succeeds once it is back; with no server at all the error says so."""
    from rlhf_cluster.actors.group import free_port
    from tests.helpers import start_redis

    port = free_port()
    proc = start_redis(port, tmp_path)
    procs = [proc]
    reg = RedisRegistry(f"redis://127.0.0.1:{port}/0", retries=10, backoff_s=0.05, max_backoff_s=0.5)
    try:
        reg.register(entry(ckpt, id="durable"))
        reg.promote("durable")
        proc.kill()  # SIGKILL: no shutdown, no final flush
        proc.wait(10)
        restarter = threading.Timer(0.5, lambda: procs.append(start_redis(port, tmp_path)))
        restarter.start()
        assert reg.get("durable").id == "durable"  # retried until the server came back
        assert reg.serving("reward").id == "durable"
        restarter.join()
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    dead = RedisRegistry(f"redis://127.0.0.1:{free_port()}/0", retries=2, backoff_s=0.01)
    with pytest.raises(RegistryUnavailable, match="unreachable after 3 attempts"):
        dead.get("x")


def test_a_registration_made_while_redis_is_down_waits_then_lands(tmp_path, ckpt):
    """The documented promise (docs/reliability.md): a registry write while redis-server is down waits (retries with
    backoff) instead of failing, and lands, whole, once the server is back. Timed: the write is started with the
    server killed, is still waiting 2 s later, and returns only after the restart; the stored entry equals the one
    sent, and the serving pointer set after it is there too."""
    from rlhf_cluster.actors.group import free_port
    from tests.helpers import start_redis

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = start_redis(port, tmp_path)
    procs = [proc]
    reg = RedisRegistry(url, retries=40, backoff_s=0.05, max_backoff_s=0.25)  # waits up to ~10 s
    late = entry(ckpt, id="late", step=11)
    done: dict = {}

    def register():
        done["entry"] = reg.register(late)
        reg.promote("late")
        done["at"] = time.monotonic()

    try:
        reg.register(entry(ckpt, id="before"))
        proc.kill()  # SIGKILL
        proc.wait(10)
        writer = threading.Thread(target=register)
        writer.start()
        time.sleep(2.0)
        assert writer.is_alive() and not done, "the write returned while redis-server was down"
        restarted_at = time.monotonic()
        procs.append(start_redis(port, tmp_path))
        writer.join(30)
        assert not writer.is_alive() and done["at"] >= restarted_at, done
        fresh = RedisRegistry(url)  # another client: what the server holds
        assert fresh.get("late") == late and done["entry"] == late
        assert fresh.get("before").id == "before"  # AOF: the entry from before the kill survived it
        assert fresh.serving("reward").id == "late"
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)

