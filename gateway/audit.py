"""The audit log's hash chain: each event carries the hash of the one before it.

Every row of the ``events`` table stores ``prev_hash`` (the ``hash`` of the previous event, by
id) and its own ``hash``: SHA-256 over the previous hash and the event's fields. Editing an
event changes its hash; deleting or inserting one breaks the link of the event after it.
``verify`` walks the chain and names the first event that does not hold; ``export`` writes the
log as JSON lines.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Iterator, TextIO

GENESIS = "0" * 64
HASHED_FIELDS = ("id", "session_id", "seq", "at", "principal", "action", "details")


def event_hash(prev_hash: str, event: dict[str, Any]) -> str:
    """The hash of one event (``details`` as stored, a JSON string)."""
    payload = json.dumps([prev_hash, *(event[name] for name in HASHED_FIELDS)], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class Verdict:
    """What ``verify`` found: ``ok``, how many events it checked, and the first broken one."""

    ok: bool
    checked: int
    broken_id: int | None = None
    reason: str = ""


def _rows(conn: sqlite3.Connection) -> Iterator[dict[str, Any]]:
    cursor = conn.execute(f"SELECT {', '.join(HASHED_FIELDS)}, prev_hash, hash FROM events ORDER BY id")
    names = [d[0] for d in cursor.description]
    for row in cursor:
        yield dict(zip(names, row))


def verify(conn: sqlite3.Connection) -> Verdict:
    """Check the whole chain from the first event; stops at the first event that does not hold."""
    previous = GENESIS
    previous_id = 0
    checked = 0
    for event in _rows(conn):
        if event["prev_hash"] != previous:
            missing = f" (events {previous_id + 1}-{event['id'] - 1} are missing)" if event["id"] > previous_id + 1 else ""
            return Verdict(False, checked, event["id"],
                           f"event {event['id']} does not follow event {previous_id}: an event before it was "
                           f"deleted, inserted or changed{missing}")
        if event_hash(previous, event) != event["hash"]:
            return Verdict(False, checked, event["id"], f"event {event['id']} was changed after it was recorded")
        previous, previous_id = event["hash"], event["id"]
        checked += 1
    return Verdict(True, checked)


def export(conn: sqlite3.Connection, out: TextIO) -> int:
    """Write every event as one JSON object per line, oldest first; returns how many."""
    count = 0
    for event in _rows(conn):
        event["details"] = json.loads(event["details"] or "{}")
        out.write(json.dumps(event) + "\n")
        count += 1
    return count


class RateLimit:
    """At most ``per_second`` records a second; what is dropped is counted for the next one."""

    def __init__(self, per_second: int = 20):
        self.per_second = per_second
        self.window = 0
        self.used = 0
        self.dropped = 0

    def allow(self) -> int | None:
        """None when the record must be dropped; otherwise how many were dropped before it."""
        now = int(time.monotonic())
        if now != self.window:
            self.window, self.used = now, 0
        if self.used >= self.per_second:
            self.dropped += 1
            return None
        self.used += 1
        dropped, self.dropped = self.dropped, 0
        return dropped
