"""This node's replication position (generation, checkpoint_seq), kept on disk.

Promotion decisions compare nodes by it (DESIGN.md section 7). A new
generation is written durably at once; checkpoint numbers, which change at
every tapped event, are written at most once a second and without fsync
(atomic rename still), so the hot path never waits for a disk.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import KemariError
from ..replication.state_store import NodeState, StateFileCorrupt, StateStore

LAZY_INTERVAL_S = 1.0


class Node:
    def __init__(self, directory: Path) -> None:
        self.store = StateStore(directory)
        try:
            state = self.store.load()
        except StateFileCorrupt as exc:
            raise KemariError(str(exc)) from exc
        self.generation = state.generation
        self.checkpoint_seq = state.checkpoint_seq
        self.consistent = state.consistent
        self.outdated = state.outdated
        self._saved = state
        self._saved_at = 0.0

    def new_generation(self) -> int:
        """A promotion: every node that later syncs from us adopts this generation.
        checkpoint_seq keeps counting (docs/stream-format.md): numbers never repeat,
        so a checkpoint is named by its seq alone in logs, and the primary's first
        checkpoint is still above any seq a peer of the old generation holds."""
        self.generation += 1
        self.consistent, self.outdated = True, False    # this node is the truth now
        self.save(durable=True)
        return self.generation

    def mark(self, *, consistent: bool | None = None, outdated: bool | None = None) -> None:
        """Promotability that must survive a restart; written durably when it changes."""
        if consistent is not None:
            self.consistent = consistent
        if outdated is not None:
            self.outdated = outdated
        self.save(durable=True)

    def record(self, generation: int, seq: int) -> None:
        """A checkpoint applied (secondary) or acknowledged (primary)."""
        durable = generation != self.generation
        self.generation, self.checkpoint_seq = generation, seq
        if durable or time.monotonic() - self._saved_at >= LAZY_INTERVAL_S:
            self.save(durable=durable)

    def save(self, durable: bool = True) -> None:
        state = NodeState(self.generation, self.checkpoint_seq, self.consistent, self.outdated)
        if state != self._saved:
            self.store.save(state, durable=durable)
            self._saved = state
        self._saved_at = time.monotonic()
