"""The node's replication position on disk: `generation` and `checkpoint_seq`,
and (format 2) whether what this node holds may be promoted: `consistent`
(false while a replicated disk is mid full sync) and `outdated` (its peer went
on without it). Format-1 files still load (as consistent, not outdated).

Promotion compares these between nodes (DESIGN.md section 7: a node with an
older generation is never promoted ahead of the newest), so the file must
never be half-written: write a temporary file, fsync it, rename it over the
old one, fsync the directory. A file that is unreadable or fails its
checksum is an error, never silently "generation 0".
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

FILENAME = "replication-state.json"
FORMAT = 2
FORMATS = (1, 2)      # readable


class StateFileCorrupt(Exception):
    """The state file exists but cannot be trusted; an operator must look at it."""


@dataclass(frozen=True)
class NodeState:
    generation: int = 0
    checkpoint_seq: int = 0
    consistent: bool = True
    outdated: bool = False

    def _crc(self, fmt: int = FORMAT) -> int:
        text = f"{fmt}:{self.generation}:{self.checkpoint_seq}"
        if fmt >= 2:
            text += f":{int(self.consistent)}:{int(self.outdated)}"
        return zlib.crc32(text.encode())


class StateStore:
    """Load and atomically replace the state file in one state directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILENAME

    def load(self) -> NodeState:
        """The saved state, or NodeState() for a node that never saved one."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return NodeState()
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateFileCorrupt(f"{self.path}: not valid JSON ({exc})") from None
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if fmt not in FORMATS:
            raise StateFileCorrupt(f"{self.path}: not a Kemari state file of format "
                                   f"{' or '.join(map(str, FORMATS))}")
        values = []
        for key in ("generation", "checkpoint_seq", "crc32"):
            value = doc.get(key)
            if type(value) is not int or not 0 <= value < 1 << 64:
                raise StateFileCorrupt(f"{self.path}: {key} missing or not an unsigned integer")
            values.append(value)
        flags = {}
        for key in ("consistent", "outdated") if fmt >= 2 else ():
            if type(doc.get(key)) is not bool:
                raise StateFileCorrupt(f"{self.path}: {key} missing or not true/false")
            flags[key] = doc[key]
        state = NodeState(values[0], values[1], **flags)
        if state._crc(fmt) != values[2]:
            raise StateFileCorrupt(f"{self.path}: checksum mismatch (file damaged or edited)")
        return state

    def save(self, state: NodeState, *, durable: bool = True) -> None:
        """Replace the state file atomically. durable=False skips the fsyncs
        (still atomic against a crash of this process, not against power loss)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        doc = {"format": FORMAT, "generation": state.generation,
               "checkpoint_seq": state.checkpoint_seq, "consistent": state.consistent,
               "outdated": state.outdated, "crc32": state._crc()}
        data = (json.dumps(doc, indent=1) + "\n").encode()
        tmp = self.directory / f".{FILENAME}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        for stale in self.directory.glob(f".{FILENAME}.*.tmp"):  # left by a crashed writer
            stale.unlink(missing_ok=True)
        if durable:
            dirfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
