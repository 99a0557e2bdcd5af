"""The SQLite store, the source of truth for sessions, steps, events and tokens.

One writer (the server's event loop), WAL mode, bound parameters, UTC ISO timestamps.
Schema changes go through ``sqlite_utils.Migrations`` only. Tables are named to read
well in ``sqlite-utils`` or datasette: ``sessions``, ``steps``, ``events``, ``tokens``.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils
from sqlite_utils.migrations import Migrations

from gateway.audit import GENESIS, event_hash
from gateway.errors import InvalidRequest
from gateway.records import SessionRecord

migrations = Migrations("agent_gateway")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    """Sessions, steps, events and tokens."""
    db.table("sessions").create(
        {
            "id": str, "kernel_id": str, "kernel": str, "state": str, "owner": str,
            "labels": str, "created_at": str, "last_activity": str, "steps": int,
            "parent_session_id": str, "parent_step": int, "reason": str, "ended_at": str,
            "language_info": str,
        },
        pk="id",
        not_null={"kernel_id", "kernel", "state", "owner", "created_at", "last_activity", "steps"},
        defaults={"labels": "{}", "steps": 0},
    )
    db.table("sessions").create_index(["kernel_id"], unique=True)
    db.table("sessions").create_index(["created_at", "id"])
    db.table("sessions").create_index(["owner", "created_at"])
    db.table("steps").create(
        {
            "session_id": str, "step": int, "seq": int, "execution_count": int, "code": str,
            "status": str, "stdout": str, "stderr": str, "result": str, "error": str,
            "outputs": str, "started_at": str, "finished_at": str, "duration_ms": float,
            "truncated": int, "source": str, "principal": str,
        },
        pk=("session_id", "step"),
        not_null={"session_id", "step", "seq", "code", "status", "outputs", "source"},
        foreign_keys=[("session_id", "sessions", "id")],
    )
    db.table("steps").create_index(["session_id", "seq"], unique=True)
    db.table("events").create(
        {
            "id": int, "session_id": str, "seq": int, "at": str, "principal": str,
            "action": str, "details": str,
        },
        pk="id",
        not_null={"at", "action"},
    )
    db.table("events").create_index(["session_id", "seq"])
    db.table("tokens").create(
        {"id": int, "name": str, "role": str, "token_hash": str, "created_at": str, "revoked_at": str},
        pk="id",
        not_null={"name", "role", "token_hash", "created_at"},
    )
    db.table("tokens").create_index(["token_hash"], unique=True)


@migrations()
def m002_session_origin(db: sqlite_utils.Database) -> None:
    """Which face created a session: "agent" (the HTTP API) or "jupyter" (POST /api/kernels)."""
    db.table("sessions").add_column("origin", str, not_null_default="agent")


@migrations()
def m003_session_env_and_snapshot(db: sqlite_utils.Database) -> None:
    """The session's kernel environment (to start its kernel again on resume; never shown) and
    what its last snapshot saved and could not save."""
    db.table("sessions").add_column("env", str)
    db.table("sessions").add_column("snapshot", str)
    db.table("sessions").create_index(["state", "last_activity"])


@migrations()
def m004_session_kernel_process(db: sqlite_utils.Database) -> None:
    """Where a live session's kernel runs, so a restarted gateway can reattach it."""
    db.table("sessions").add_column("kernel_pid", int)
    db.table("sessions").add_column("connection_file", str)


@migrations()
def m005_event_hash_chain(db: sqlite_utils.Database) -> None:
    """Each event carries the hash of the previous one (the audit log's tamper evidence)."""
    events = db.table("events")
    events.add_column("prev_hash", str)
    events.add_column("hash", str)
    previous = GENESIS
    for row in list(db.query("SELECT * FROM events ORDER BY id")):
        digest = event_hash(previous, row)
        db.execute("UPDATE events SET prev_hash = ?, hash = ? WHERE id = ?", [previous, digest, row["id"]])
        previous = digest


@migrations()
def m006_session_isolation(db: sqlite_utils.Database) -> None:
    """The sandbox profile and resource limits a session's kernels run under."""
    db.table("sessions").add_column("isolation", str)


@migrations()
def m007_write_ahead_steps(db: sqlite_utils.Database) -> None:
    """Steps are recorded before the kernel receives them (status ``running``, found again by a
    small partial index after a crash), with the user_expressions and input() replies they had."""
    steps = db.table("steps")
    steps.add_column("user_expressions", str)
    steps.add_column("stdin", str)
    db.execute("CREATE INDEX idx_steps_running ON steps (session_id, seq) WHERE status = 'running'")


@migrations()
def m008_session_placement(db: sqlite_utils.Database) -> None:
    """Where a session's kernel runs (``gateway.placement``), to adopt it as it was after a crash."""
    db.table("sessions").add_column("placement", str)


@migrations()
def m009_session_environment(db: sqlite_utils.Database) -> None:
    """The environment a session's kernel runs in: name, hash, Python, packages (``gateway.environments``)."""
    db.table("sessions").add_column("environment", str)


SESSION_JSON_COLUMNS = ("labels", "language_info", "env", "snapshot", "isolation", "placement", "environment")


def encode_cursor(created_at: str, session_id: str) -> str:
    """An opaque paging cursor for the sessions list."""
    raw = json.dumps([created_at, session_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """Inverse of ``encode_cursor``; a malformed cursor is an ``InvalidRequest``."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_at, session_id = json.loads(base64.urlsafe_b64decode(padded))
        return str(created_at), str(session_id)
    except Exception:
        raise InvalidRequest("The cursor is not one this server issued; use the 'next' value of a previous page.",
                             code="invalid_query", details={"parameter": "cursor"}) from None


class Store:
    """Typed access to the gateway's SQLite database. Called by the session manager and auth."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite_utils.Database(str(path))
        conn = self.db.conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        migrations.apply(self.db)
        self.conn: sqlite3.Connection = conn
        self.conn.row_factory = sqlite3.Row
        last = self.conn.execute("SELECT id, hash FROM events ORDER BY id DESC LIMIT 1").fetchone()
        self._chain: tuple[int, str] = (last["id"], last["hash"]) if last else (0, GENESIS)

    def close(self) -> None:
        """Close the database; called once at server shutdown."""
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.conn.close()

    # sessions ---------------------------------------------------------------------------

    def insert_session(self, record: SessionRecord) -> None:
        row = _encode(record.row(), SESSION_JSON_COLUMNS)
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.conn:
            self.conn.execute(f"INSERT INTO sessions ({columns}) VALUES ({marks})", list(row.values()))

    def save_session(self, record: SessionRecord, **fields: Any) -> None:
        """Change fields of a session's record and of its row together."""
        for name, value in fields.items():
            if name not in SessionRecord.__dataclass_fields__:
                raise AttributeError(f"a session has no field {name!r}")
            setattr(record, name, value)
        self.update_session(record.id, **fields)

    def update_session(self, session_id: str, **fields: Any) -> None:
        fields = _encode(fields, SESSION_JSON_COLUMNS)
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self.conn:
            self.conn.execute(f"UPDATE sessions SET {assignments} WHERE id = ?", [*fields.values(), session_id])

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = self.conn.execute("SELECT * FROM sessions WHERE id = ?", [session_id]).fetchone()
        return _session(row) if row else None

    def get_session_by_kernel(self, kernel_id: str) -> SessionRecord | None:
        row = self.conn.execute("SELECT * FROM sessions WHERE kernel_id = ?", [kernel_id]).fetchone()
        return _session(row) if row else None

    def list_sessions(self, *, owner: str | None = None, state: str | None = None,
                      label: tuple[str, str] | None = None, limit: int = 50,
                      cursor: str | None = None) -> tuple[list[SessionRecord], str | None]:
        """Newest first, one page; returns the rows and the cursor of the next page."""
        where: list[str] = []
        params: list[Any] = []
        if owner is not None:
            where.append("owner = ?"); params.append(owner)
        if state is not None:
            where.append("state = ?"); params.append(state)
        if label is not None:
            where.append("json_extract(labels, ?) = ?"); params.extend(["$." + json.dumps(label[0]), label[1]])
        if cursor:
            created_at, session_id = decode_cursor(cursor)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend([created_at, created_at, session_id])
        sql = "SELECT * FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        params.append(limit + 1)
        rows = [_session(r) for r in self.conn.execute(sql, params)]
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id)
        return rows, next_cursor

    def sessions_in_states(self, states: tuple[str, ...]) -> list[SessionRecord]:
        marks = ", ".join("?" for _ in states)
        rows = self.conn.execute(f"SELECT * FROM sessions WHERE state IN ({marks})", list(states))
        return [_session(r) for r in rows]

    def sessions_ended_before(self, moment: str) -> list[SessionRecord]:
        rows = self.conn.execute("SELECT * FROM sessions WHERE state IN ('terminated', 'failed') AND ended_at < ?",
                                 [moment])
        return [_session(r) for r in rows]

    def next_positions(self, session_id: str) -> tuple[int, int]:
        """The next step number and the next sequence number of a session (for reattaching). A
        session without steps goes on at step 1: step 0 is only ever a setup's."""
        step = self.conn.execute("SELECT COALESCE(MAX(step), 0) FROM steps WHERE session_id = ?", [session_id]).fetchone()[0]
        seq_steps = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM steps WHERE session_id = ?", [session_id]).fetchone()[0]
        seq_events = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE session_id = ?", [session_id]).fetchone()[0]
        return step + 1, max(seq_steps, seq_events) + 1

    # steps ------------------------------------------------------------------------------

    def open_step(self, row: dict[str, Any]) -> None:
        """Commit a step that is about to run (status ``running``): one INSERT."""
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.conn:
            self.conn.execute(f"INSERT INTO steps ({columns}) VALUES ({marks})", list(row.values()))

    def update_step(self, session_id: str, step: int, **fields: Any) -> None:
        """Change columns of a recorded step (a running step's input exchanges)."""
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self.conn:
            self.conn.execute(f"UPDATE steps SET {assignments} WHERE session_id = ? AND step = ?",
                              [*fields.values(), session_id, step])

    def finish_step(self, session_id: str, step: int, fields: dict[str, Any], *, code: str, source: str,
                    principal: str | None, at: str, last_activity: str | None) -> None:
        """Complete a running step: its row updated with ``fields``, its audit event and the
        session's counters, in one transaction (``last_activity`` None leaves it as it is)."""
        assignments = ", ".join(f"{name} = ?" for name in fields)
        audit = {"step": step, "code": code, "status": fields["status"], "source": source}
        with self.conn:
            seq = self.conn.execute(f"UPDATE steps SET {assignments} WHERE session_id = ? AND step = ? RETURNING seq",
                                    [*fields.values(), session_id, step]).fetchone()[0]
            self.conn.execute("UPDATE sessions SET steps = steps + 1, last_activity = COALESCE(?, last_activity) "
                              "WHERE id = ?", [last_activity, session_id])
            chain = self._insert_event(session_id, seq, at, principal, "execute", audit)
        self._chain = chain

    def running_steps(self) -> list[dict[str, Any]]:
        """Steps still ``running`` (after a crash: the ones whose end was never recorded), in order."""
        rows = self.conn.execute("SELECT * FROM steps WHERE status = 'running' ORDER BY session_id, seq")
        return [dict(r) for r in rows]

    def list_steps(self, session_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM steps WHERE session_id = ? ORDER BY seq", [session_id])
        return [dict(r) for r in rows]

    def timeline(self, session_id: str, before_seq: int | None = None) -> Iterator[tuple[str, sqlite3.Row]]:
        """Steps and events of a session in recorded order: ("step", row) or ("event", row);
        with ``before_seq``, only what was recorded before that position (a fork point)."""
        end = before_seq if before_seq is not None else 1 << 62
        steps = self.conn.execute(
            "SELECT seq, step, execution_count, code, status, outputs, started_at, finished_at, "
            "duration_ms, truncated, source, principal, user_expressions, stdin FROM steps "
            "WHERE session_id = ? AND seq < ? ORDER BY seq",
            [session_id, end]).fetchall()
        events = self.conn.execute(
            "SELECT seq, at, principal, action, details FROM events WHERE session_id = ? AND seq < ? AND action IN "
            "('file_upload', 'file_delete', 'kernel_restarted', 'kernel_died') ORDER BY seq",
            [session_id, end]).fetchall()
        i = j = 0
        while i < len(steps) or j < len(events):
            if j >= len(events) or (i < len(steps) and steps[i]["seq"] < events[j]["seq"]):
                yield "step", steps[i]; i += 1
            else:
                yield "event", events[j]; j += 1

    # events -----------------------------------------------------------------------------

    def record_event(self, *, session_id: str | None, seq: int | None, at: str, principal: str | None,
                     action: str, details: dict[str, Any] | None = None) -> int:
        with self.conn:
            chain = self._insert_event(session_id, seq, at, principal, action, details or {})
        self._chain = chain
        return chain[0]

    def _insert_event(self, session_id: str | None, seq: int | None, at: str, principal: str | None, action: str,
                      details: dict[str, Any]) -> tuple[int, str]:
        """Append one event to the hash chain inside the caller's transaction; returns the new
        head (id, hash), which the caller keeps once the transaction has committed."""
        last_id, last_hash = self._chain
        event_id = last_id + 1
        event: dict[str, Any] = {"id": event_id, "session_id": session_id, "seq": seq, "at": at, "principal": principal,
                 "action": action, "details": json.dumps(details)}
        digest = event_hash(last_hash, event)
        self.conn.execute(
            "INSERT INTO events (id, session_id, seq, at, principal, action, details, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [*event.values(), last_hash, digest])
        return event_id, digest

    def fork_point(self, parent_id: str, child_id: str) -> int | None:
        """The position in the parent's trajectory where ``child_id`` was forked from it."""
        row = self.conn.execute(
            "SELECT seq FROM events WHERE session_id = ? AND action = 'session_forked' "
            "AND json_extract(details, '$.child') = ? LIMIT 1", [parent_id, child_id]).fetchone()
        return int(row[0]) if row else None

    def last_kernel_change(self, session_id: str) -> str | None:
        """When the session's kernel state last changed: its last step began, or its kernel was
        restarted or died (None if neither ever happened)."""
        step = self.conn.execute("SELECT MAX(started_at) FROM steps WHERE session_id = ?", [session_id]).fetchone()[0]
        event = self.conn.execute("SELECT MAX(at) FROM events WHERE session_id = ? AND action IN "
                                  "('kernel_restarted', 'kernel_died')", [session_id]).fetchone()[0]
        return max((moment for moment in (step, event) if moment), default=None)

    def has_event(self, session_id: str, action: str) -> bool:
        """Whether the session's trajectory holds an event of this kind."""
        return self.conn.execute("SELECT 1 FROM events WHERE session_id = ? AND action = ? LIMIT 1",
                                 [session_id, action]).fetchone() is not None

    def list_events(self, session_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM events WHERE session_id = ? ORDER BY seq, id", [session_id])
        return [_decode(dict(r), ("details",)) for r in rows]

    # tokens -----------------------------------------------------------------------------

    def add_token(self, *, name: str, role: str, token_hash: str, created_at: str) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT INTO tokens (name, role, token_hash, created_at) VALUES (?, ?, ?, ?)",
                [name, role, token_hash, created_at],
            )

    def last_token_id(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM tokens").fetchone()[0])

    def list_tokens(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT id, name, role, created_at, revoked_at FROM tokens ORDER BY id")
        return [dict(r) for r in rows]

    def revoke_tokens(self, *, name: str | None = None, token_id: int | None = None, at: str) -> int:
        with self.conn:
            cur = self.conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE revoked_at IS NULL AND (name = ? OR id = ?)",
                [at, name, token_id])
        return int(cur.rowcount)

    def active_tokens(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM tokens WHERE revoked_at IS NULL")]

    def count_sessions(self, state: str) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM sessions WHERE state = ?", [state]).fetchone()[0])


def _encode(row: dict[str, Any], json_columns: tuple[str, ...]) -> dict[str, Any]:
    return {k: (json.dumps(v) if k in json_columns and v is not None else v) for k, v in row.items()}


def _session(row: sqlite3.Row) -> SessionRecord:
    return SessionRecord.from_row(_decode(dict(row), SESSION_JSON_COLUMNS))


def _decode(row: dict[str, Any], json_columns: tuple[str, ...]) -> dict[str, Any]:
    for key in json_columns:
        if row.get(key) is not None:
            row[key] = json.loads(row[key])
    return row
