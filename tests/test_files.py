"""The one way files and directories are written in place (rlhf_cluster/lib/files.py): whole or not at all."""

from __future__ import annotations

import json

import pytest

from rlhf_cluster.lib.files import replaced_dir, replaced_file, write_atomic, write_json


def test_a_file_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    target = tmp_path / "deep" / "summary.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2}, durable=True)
    assert json.loads(target.read_text()) == {"a": 2}
    write_atomic(target, b"bytes")
    assert target.read_bytes() == b"bytes"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        write_json(target, {"not json": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    with pytest.raises(RuntimeError), replaced_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert json.loads(target.read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_directory_is_replaced_only_when_its_writer_succeeds(tmp_path):
    model = tmp_path / "model"
    with replaced_dir(model) as tmp:
        (tmp / "config.json").write_text("{}")
    with pytest.raises(RuntimeError), replaced_dir(model) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("the export failed")
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]
    with replaced_dir(model) as tmp:
        (tmp / "weights").write_text("whole")
    assert sorted(p.name for p in model.iterdir()) == ["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
