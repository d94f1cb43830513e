"""Checkpoint storage as a URI (rlhf_cluster/lib/storage.py), on pyarrow's local filesystem through file:// URIs:
what a rank uploads comes back byte for byte and is checked against the manifest, a checkpoint whose stored files
differ from its manifest is skipped, and a storage that cannot be used fails before any actor starts. The
multi-node PPO test (tests/test_multinode.py) runs the whole save and resume through it."""

from __future__ import annotations

import json

import pytest

from rlhf_cluster.lib import storage
from rlhf_cluster.lib.config import ConfigError, PPOConfig, load_config
from rlhf_cluster.rl.checkpoints import latest_stored_checkpoint


def test_staged_files_upload_and_come_back_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_STAGING_DIR", str(tmp_path / "node-disk"))
    uri = f"file://{tmp_path / 'bucket'}/run/iter_000001/policy"
    with storage.staged(uri) as (local, manifest):
        (local / "state").mkdir()
        (local / "state" / "zero_pp_rank_0.pt").write_bytes(b"rank 0 shard")
        (local / "state" / "zero_pp_rank_1.pt").write_bytes(b"rank 1 shard")
        (local / "latest").write_text("state")
    assert set(manifest) == {"state/zero_pp_rank_0.pt", "state/zero_pp_rank_1.pt", "latest"}
    assert manifest["latest"]["size"] == 5
    assert list((tmp_path / "node-disk").iterdir()) == []  # the staging directory is gone
    assert (tmp_path / "bucket" / "run" / "iter_000001" / "policy" / "state" / "zero_pp_rank_1.pt").read_bytes() \
        == b"rank 1 shard"
    # a rank downloads what it selects, into its own node's scratch space, removed afterwards
    with storage.fetched(uri, manifest, lambda rel: "rank_1" not in rel) as local:
        assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == \
            ["latest", "state/zero_pp_rank_0.pt"]
        assert (local / "state" / "zero_pp_rank_0.pt").read_bytes() == b"rank 0 shard"
    assert list((tmp_path / "node-disk").iterdir()) == []
    # a stored file changed after the manifest was written: the download says which
    (tmp_path / "bucket" / "run" / "iter_000001" / "policy" / "latest").write_text("other")
    with pytest.raises(storage.StorageError, match=r"policy/latest differs from its manifest"):
        with storage.fetched(uri, manifest):
            pass


def test_the_latest_complete_checkpoint_in_storage_is_found_and_partial_ones_skipped(tmp_path, capsys):
    root = f"file://{tmp_path / 'store'}"

    def checkpoint(name: str, files: dict[str, bytes], manifest: bool = True) -> None:
        listed = {}
        for rel, data in files.items():
            storage.write_bytes(storage.join(root, name, rel), data)
            listed[rel] = {"sha256": "-", "size": len(data)}
        if manifest:
            storage.write_bytes(storage.join(root, name, "manifest.json"), json.dumps(listed).encode())

    assert latest_stored_checkpoint(root) is None  # nothing stored yet
    checkpoint("iter_000001", {"coordinator.json": b"{}", "policy/a.pt": b"1234"})
    checkpoint("iter_000002", {"coordinator.json": b"{}", "policy/a.pt": b"1234"})
    storage.write_bytes(storage.join(root, "iter_000002", "policy", "a.pt"), b"12")  # cut short
    checkpoint("iter_000003", {"coordinator.json": b"{}"}, manifest=False)  # its writer died before the manifest
    assert latest_stored_checkpoint(root) == storage.join(root, "iter_000001")
    err = capsys.readouterr().err
    assert "iter_000002: files differ from its manifest" in err and "iter_000003" in err
    assert storage.list_dirs(root) == ["iter_000001", "iter_000002", "iter_000003"]
    storage.delete_dir(storage.join(root, "iter_000002"))
    assert storage.list_dirs(root) == ["iter_000001", "iter_000003"]


def test_a_storage_that_cannot_be_used_is_named_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint_storage 'ftp://host/x': the scheme must be one of"):
        load_config(PPOConfig, None, ["checkpoint_storage=ftp://host/x"])
    blocked = tmp_path / "file"
    blocked.write_text("a file, not a directory")
    with pytest.raises(storage.StorageError, match=r"not writable"):
        storage.check_writable(f"file://{blocked}/checkpoints")
    storage.check_writable(f"file://{tmp_path / 'fine'}")
    assert list((tmp_path / "fine").iterdir()) == []  # the probe is removed
