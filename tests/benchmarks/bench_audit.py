"""What the audit log costs a step: recording a step (written ahead as ``running``, then
completed with its hash-chained audit event), against the same two commits without the event,
interleaved in blocks on one SQLite file (WAL, as the server uses).

    python tests/benchmarks/bench_audit.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.records import SessionRecord
from gateway.store import Store

OUTPUTS = json.dumps([{"output_type": "execute_result", "data": {"text/plain": "2"}, "metadata": {},
                       "execution_count": 1}])


def running_row(step: int) -> dict[str, Any]:
    return {"session_id": "s_bench", "step": step, "seq": step, "code": "1+1", "status": "running", "stdout": "",
            "stderr": "", "outputs": "[]", "truncated": 0, "started_at": "2026-01-01T00:00:00.000000Z",
            "source": "agent", "principal": "bench", "user_expressions": None}


FINISHED = {"execution_count": 1, "status": "ok", "stdout": "", "stderr": "", "result": "2", "error": None,
            "outputs": OUTPUTS, "started_at": "2026-01-01T00:00:00.000000Z",
            "finished_at": "2026-01-01T00:00:00.001000Z", "duration_ms": 1.0, "truncated": 0}


def record_with_audit(store: Store, step: int) -> None:
    store.open_step(running_row(step))
    store.finish_step("s_bench", step, FINISHED, code="1+1", source="agent", principal="bench",
                      at=FINISHED["finished_at"], last_activity=FINISHED["finished_at"])


def record_without_audit(store: Store, step: int) -> None:
    row = running_row(step)
    columns, marks = ", ".join(row), ", ".join("?" for _ in row)
    assignments = ", ".join(f"{name} = ?" for name in FINISHED)
    with store.conn:
        store.conn.execute(f"INSERT INTO steps ({columns}) VALUES ({marks})", list(row.values()))
    with store.conn:
        store.conn.execute(f"UPDATE steps SET {assignments} WHERE session_id = ? AND step = ?",
                           [*FINISHED.values(), "s_bench", step])
        store.conn.execute("UPDATE sessions SET steps = steps + 1, last_activity = ? WHERE id = ?",
                           [FINISHED["finished_at"], "s_bench"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000, help="steps timed on each side")
    args = parser.parse_args()
    store = Store(Path(tempfile.mkdtemp()) / "gateway.db")
    store.insert_session(SessionRecord("s_bench", "k", "python3", "idle", "bench", "2026", "2026"))
    with_audit: list[float] = []
    without: list[float] = []
    step = 0
    for _ in range(max(args.steps // 100, 1)):
        for _ in range(100):
            step += 1
            started = time.perf_counter()
            record_with_audit(store, step)
            with_audit.append(time.perf_counter() - started)
        for _ in range(100):
            step += 1
            started = time.perf_counter()
            record_without_audit(store, step)
            without.append(time.perf_counter() - started)
    store.close()
    a, b = statistics.median(with_audit) * 1000, statistics.median(without) * 1000
    print(f"step record (written ahead, then completed) with its audit event: p50 {a:.3f} ms; without: p50 {b:.3f} ms; "
          f"the audit log adds {a - b:.3f} ms per step (n={len(with_audit)} each, interleaved in blocks of 100)")


if __name__ == "__main__":
    main()
