"""The persisted (generation, checkpoint_seq, consistent, outdated): atomic
replacement, loud corruption, old files still readable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kemari_agent.replication.state_store import (
    FILENAME,
    NodeState,
    StateFileCorrupt,
    StateStore,
)

pytestmark = pytest.mark.unit


def test_missing_file_is_a_fresh_node(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "kv1").load() == NodeState(0, 0)


def test_save_then_load_round_trips_and_creates_the_directory(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "a" / "kv1")
    store.save(NodeState(3, 12345))
    assert store.load() == NodeState(3, 12345)
    store.save(NodeState(4, 1), durable=False)
    assert StateStore(tmp_path / "a" / "kv1").load() == NodeState(4, 1)
    assert os.stat(store.directory).st_mode & 0o777 == 0o700
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(store.directory)) == [FILENAME]  # no temp files left


@pytest.mark.parametrize(("content", "match"), [
    (b"", "not valid JSON"),
    (b"\xff\xfe garbage", "not valid JSON"),
    (b'{"format": 1, "generation": 3', "not valid JSON"),
    (b"[1, 2]", "format 1 or 2"),
    (b'{"format": 3, "generation": 1, "checkpoint_seq": 1, "crc32": 1}', "format 1 or 2"),
    (b'{"format": 2, "generation": 1, "checkpoint_seq": 1, "crc32": 1}', "consistent"),
    (b'{"format": 2, "generation": 1, "checkpoint_seq": 1, "consistent": 1, "outdated": false,'
     b' "crc32": 1}', "consistent"),
    (b'{"format": 1, "generation": "3", "checkpoint_seq": 1, "crc32": 1}', "generation"),
    (b'{"format": 1, "generation": -1, "checkpoint_seq": 1, "crc32": 1}', "generation"),
    (b'{"format": 1, "generation": 1, "crc32": 1}', "checkpoint_seq"),
    (b'{"format": 1, "generation": true, "checkpoint_seq": 1, "crc32": 1}', "generation"),
])
def test_corrupt_files_are_errors_never_generation_zero(
        tmp_path: Path, content: bytes, match: str) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(content)
    with pytest.raises(StateFileCorrupt, match=match):
        store.load()


def test_edited_or_bit_rotted_values_fail_the_checksum(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(NodeState(5, 99))
    doc = json.loads(store.path.read_text())
    doc["generation"] = 6  # e.g. someone "fixing" a node by hand
    store.path.write_text(json.dumps(doc))
    with pytest.raises(StateFileCorrupt, match="checksum"):
        store.load()


def test_a_crash_mid_save_leaves_the_old_state(tmp_path: Path) -> None:
    """Kill a writer between writing the temp file and the rename: the old file stays."""
    store = StateStore(tmp_path)
    store.save(NodeState(1, 10))
    child = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from kemari_agent.replication import state_store
def die(*a, **k):
    os._exit(9)
state_store.os.replace = die
state_store.StateStore({str(tmp_path)!r}).save(state_store.NodeState(2, 20))
"""
    proc = subprocess.run([sys.executable, "-c", child], check=False)
    assert proc.returncode == 9
    assert store.load() == NodeState(1, 10)
    leftovers = [n for n in os.listdir(tmp_path) if n != FILENAME]
    assert leftovers  # the dead writer's temp file: ignored by load, removed by next save
    store.save(NodeState(3, 30))
    assert store.load() == NodeState(3, 30)
    assert os.listdir(tmp_path) == [FILENAME]


def test_many_saves_never_expose_a_partial_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(NodeState(0, 0))
    reader = subprocess.Popen(
        [sys.executable, "-c", f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from kemari_agent.replication.state_store import StateStore
s = StateStore({str(tmp_path)!r})
n = 0
while True:
    st = s.load()
    assert st.generation == st.checkpoint_seq, st
    n += 1
    if st.generation >= 299:
        print(n)
        break
"""], stdout=subprocess.PIPE)
    for i in range(1, 300):
        store.save(NodeState(i, i), durable=False)
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0 and int(out) > 0


def test_promotability_survives_a_restart(tmp_path: Path) -> None:
    """A replicated disk left mid full sync, or a node its peer went on without,
    must still say so after the daemon restarts."""
    store = StateStore(tmp_path)
    store.save(NodeState(2, 40, consistent=False, outdated=True))
    assert StateStore(tmp_path).load() == NodeState(2, 40, consistent=False, outdated=True)
    doc = json.loads(store.path.read_text())
    assert doc["format"] == 2 and doc["consistent"] is False and doc["outdated"] is True
    doc["outdated"] = False          # flipping a flag by hand is caught like any edit
    store.path.write_text(json.dumps(doc))
    with pytest.raises(StateFileCorrupt, match="checksum"):
        store.load()


def test_a_format_1_file_still_loads_as_consistent_and_current(tmp_path: Path) -> None:
    import zlib
    store = StateStore(tmp_path)
    crc = zlib.crc32(b"1:3:77")
    store.path.write_text(json.dumps({"format": 1, "generation": 3, "checkpoint_seq": 77,
                                      "crc32": crc}))
    assert store.load() == NodeState(3, 77, consistent=True, outdated=False)
