"""Session lifecycle: pause, resume, fork, idle pausing, retention, and capacity.

Owned by the session manager (``manager.lifecycle``); handlers reach it through the manager.
A paused session has no kernel: its namespace, imports, execution count and history are in
``sessions/<id>/snapshot/`` and its files in its workspace. Resuming starts a kernel (from
the warm pool when one is ready) and restores them, by snapshot or by replaying the steps.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import access, executor, host, snapshots, states
from gateway.reattach import recorded_placement, remove_unclaimed_containers, stop_unclaimed
from gateway.auth import Principal
from gateway.clock import iso, now_iso, utcnow
from gateway.errors import Conflict, Unavailable
from gateway.outcomes import RERUN_STATUSES, lost_outcome
from gateway.recorder import Trajectory, recorded_replies
from gateway.records import SessionRecord
from gateway.workspace import Workspace


class StateNotSaved(Conflict):
    """A pause could not save the session's state, so it did not pause it (409 ``state_not_saved``)."""

    def __init__(self, session_id: str, why: str):
        super().__init__(f"Session '{session_id}' was not paused: its state could not be saved ({why}). It stays "
                         "live with its variables. Fix what stops the save, or run the gateway with "
                         "--snapshot-fallback-replay to pause it anyway and re-run its steps at resume.",
                         code="state_not_saved", details={"session_id": session_id})


if TYPE_CHECKING:
    from gateway.sessions import LiveSession, SessionManager

log = logging.getLogger(__name__)


class Lifecycle:
    """Pauses, resumes and forks sessions, and keeps the number of live kernels in bounds."""

    def __init__(self, manager: "SessionManager"):
        self.manager = manager
        self.settings = manager.settings
        self.resuming: dict[str, asyncio.Future[None]] = {}
        self.pause_failed: dict[str, str] = {}  # session -> its activity time when an idle pause could not save

    def snapshot_dir(self, session_id: str) -> Path:
        return self.manager.sessions_dir / session_id / "snapshot"

    # pause ------------------------------------------------------------------------------

    async def pause(self, principal: Principal, session_id: str, reason: str = "requested") -> dict[str, Any]:
        """Save the session's state and stop its kernel; returns the Session (with ``snapshot``)."""
        manager = self.manager
        if session_id not in manager.live:
            row = manager.visible(principal, session_id)
            if row.state == "paused":
                return row.view()
        live = manager.writable(principal, session_id)
        await self._pause(live, principal.name, reason)
        return live.record.view()

    async def pause_for_shutdown(self, live: "LiveSession") -> None:
        """Pause at shutdown: a running step gets ``interrupt_grace`` seconds, then is aborted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.interrupt_grace
        while live.current is not None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if live.current is not None and not live.current.abort.done():
            live.current.abort.set_result("paused")
        try:
            await self._pause(live, None, "shutdown")
        except Exception:
            log.exception("session %s: could not be paused at shutdown; its kernel is stopped", live.id)
            await self.manager.end(live, None, "failed", "The gateway could not pause it at shutdown.")

    async def _pause(self, live: "LiveSession", principal: str | None, reason: str) -> None:
        manager = self.manager
        async with live.lock:
            if live.record.state in states.ENDED or manager.live.get(live.id) is not live:
                return
            directory = self.snapshot_dir(live.id)
            started = time.monotonic()
            info: dict[str, Any] = {"paused_at": now_iso(), "reason": reason}
            try:
                assert live.kernel is not None
                saved = await snapshots.save(live.kernel, directory, self.settings.snapshot_timeout)
                info.update(saved=saved["saved"] + sorted(saved["modules"]), bytes=saved["bytes"],
                            unsaved=[{"name": u["name"], "type": u["type"]} for u in saved["unsaved"]],
                            execution_count=saved["execution_count"])
            except Exception as exc:
                shutil.rmtree(directory, ignore_errors=True)
                if not self._replays_instead(reason):
                    # Nothing is stopped: the session stays live with its state, and says why.
                    info.update(error=str(exc), duration_ms=round((time.monotonic() - started) * 1000, 1))
                    manager.recorder.record_event(live.trajectory, "pause_failed", principal, info)
                    log.warning("session %s: not paused (%s): its state could not be saved: %s", live.id, reason, exc)
                    raise StateNotSaved(live.id, str(exc)) from None
                info.update(saved=[], bytes=0, unsaved=[], error=str(exc), fallback="replay",
                            note="The state could not be saved; resuming re-runs the session's recorded steps.")
                log.warning("session %s: state not saved at pause (%s): %s; it will be resumed by replay", live.id,
                            reason, exc)
            info["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
            if live.hub is not None:
                live.hub.close_all("the session was paused", "paused")
            if live.kernel is not None:
                await live.kernel.shutdown(now=False)
                live.kernel = None
            live.execution_state = "dead"
            manager.store.save_session(live.record, state="paused", snapshot=info, steps=live.record.steps,
                                   last_activity=live.record.last_activity)
            manager.live.pop(live.id, None)
            manager.by_kernel.pop(live.record.kernel_id, None)
            manager.recorder.record_event(live.trajectory, "session_paused", principal, info)
            manager.recorder.flush(live.id)
        log.info("session %s: paused (%s; %d names saved, %d not)", live.id, reason, len(info["saved"]),
                 len(info["unsaved"]))

    def _replays_instead(self, reason: str) -> bool:
        """Whether a pause whose state cannot be saved goes ahead, to be resumed by re-running the
        steps: when replay is configured (as the strategy or the fallback), and at shutdown (the
        kernel must stop). Otherwise the session stays live."""
        return (self.settings.resume_strategy == "replay" or self.settings.snapshot_fallback_replay
                or reason == "shutdown")

    # resume -----------------------------------------------------------------------------

    async def resume(self, principal: Principal, session_id: str, reason: str = "requested") -> dict[str, Any]:
        """Bring a paused session back with its state; a live session is returned as it is."""
        manager = self.manager
        row = manager.visible(principal, session_id)
        access.check_change(principal, session_id, row, "resume")
        if session_id in manager.live:
            return manager.live[session_id].record.view()
        if session_id in self.resuming:
            await asyncio.shield(self.resuming[session_id])
            return manager.get(principal, session_id)
        if row.state != "paused":
            raise states.ended_error(session_id, row.state, f"Session '{session_id}' is {row.state}: only a "
                                     "paused session can be resumed.")
        if manager.closing:
            raise Unavailable("The gateway is shutting down; retry against the next instance.", code="shutting_down")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.resuming[session_id] = waiter
        try:
            await self._resume(row, principal.name, reason)
            waiter.set_result(None)
        except BaseException as exc:
            waiter.set_exception(exc)
            waiter.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            self.resuming.pop(session_id, None)
        return manager.live[session_id].record.view()

    async def _resume(self, row: SessionRecord, principal: str, reason: str) -> None:
        manager = self.manager
        # Its environment (or, under container, its image) removed meanwhile: refused, and the
        # session stays paused until it is built.
        await manager.launcher.check_image(row.kernel, manager.isolation_of(row))
        await self.ensure_room(resuming=row.id)
        started = time.monotonic()
        row = manager.store.get_session(row.id) or row
        row.state = "starting"
        live = manager.register(row, manager.trajectory_of(row.id))
        await manager.start_kernel(live, principal)
        outcome = await self.restore(live, self.snapshot_dir(live.id), row.snapshot or {})
        outcome["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        outcome["reason"] = reason
        snapshot = {**(row.snapshot or {}), "resumed_at": now_iso(), "restored": outcome["restored"],
                    "not_restored": outcome["not_restored"]}
        manager.store.save_session(live.record, snapshot=snapshot)
        manager.recorder.record_event(live.trajectory, "session_resumed", principal, outcome)
        log.info("session %s: resumed by %s (%s, %.0f ms)", live.id, outcome["strategy"], reason,
                 outcome["duration_ms"])

    async def restore(self, live: "LiveSession", directory: Path, saved: dict[str, Any]) -> dict[str, Any]:
        """Restore state into a session's fresh kernel, by the configured strategy."""
        assert live.kernel is not None
        strategy = self.settings.resume_strategy
        replayed = 0
        has_snapshot = snapshots.exists(directory)
        lacking = bool(saved.get("unsaved")) or not has_snapshot
        if strategy == "replay" or saved.get("fallback") == "replay" or (lacking and self.settings.snapshot_fallback_replay):
            replayed = await self.replay_steps(live)
        restored: list[str] = []
        not_restored: list[dict[str, Any]] = []
        if strategy == "snapshot" and has_snapshot:
            try:
                result = await snapshots.load(live.kernel, directory, self.settings.snapshot_timeout)
                restored, not_restored = result["restored"], result["failed"]
            except snapshots.SnapshotError as exc:
                not_restored = [{"name": name, "type": "unknown", "error": str(exc)} for name in saved.get("saved", [])]
        elif strategy == "snapshot" and saved.get("error"):
            not_restored = [{"name": "*", "type": "namespace", "error": saved["error"]}]
        if replayed and strategy == "snapshot":
            # What the snapshot lacked was rebuilt by re-running the steps before it was loaded.
            not_restored = []
        return {"strategy": strategy if not replayed or strategy == "replay" else "snapshot+replay",
                "restored": restored, "replayed_steps": replayed,
                "not_restored": [{"name": e["name"], "type": e["type"]} for e in not_restored]}

    async def replay_steps(self, live: "LiveSession") -> int:
        """Re-run the session's recorded steps (those that ran to their end) silently in its new
        kernel; a step's input() calls are answered with what was typed the first time."""
        kernel = live.kernel
        assert kernel is not None and kernel.connection is not None
        steps = self.manager.store.list_steps(live.id)
        rerun = [step for step in steps if step["status"] in RERUN_STATUSES]
        for step in rerun:
            replies = recorded_replies(step)
            if replies is None:
                await snapshots.run_silently(kernel, step["code"], self.settings.default_timeout)
            else:
                await executor.execute(kernel.connection, step["code"], timeout=self.settings.default_timeout,
                                       output_limit=64 * 1024, is_alive=kernel.is_alive, interrupt=kernel.interrupt,
                                       interrupt_grace=self.settings.interrupt_grace, silent=True,
                                       store_history=False, input_replies=replies)
        last = max((step["execution_count"] or 0 for step in steps), default=0)
        await snapshots.run_silently(kernel, f"get_ipython().execution_count = {last + 1}", 10)
        return len(rerun)

    # fork -------------------------------------------------------------------------------

    async def fork(self, principal: Principal, session_id: str) -> dict[str, Any]:
        """A new session owned by the caller, with a copy of this one's files and state."""
        manager = self.manager
        row = manager.visible(principal, session_id)
        access.check_create(principal, "fork them")
        if row.state in states.ENDED:
            raise states.ended_error(session_id, row.state, f"Session '{session_id}' is {row.state}; fork a "
                                     "live or paused session.")
        staging = manager.sessions_dir / session_id / "forks" / uuid.uuid4().hex
        parent_step = manager.store.next_positions(session_id)[0] - 1
        saved: dict[str, Any] = {}
        try:
            live = manager.live.get(session_id)
            if live is not None:
                async with live.lock:
                    assert live.kernel is not None
                    try:
                        result = await snapshots.save(live.kernel, staging / "snapshot",
                                                      self.settings.snapshot_timeout)
                    except snapshots.SnapshotError as exc:
                        raise Conflict(f"Session '{session_id}' could not be forked: {exc}. Nothing was created.",
                                       code="state_not_saved", details={"session_id": session_id}) from None
                    saved = {"saved": result["saved"], "unsaved": result["unsaved"]}
                    parent_step = live.trajectory.next_step - 1
                    await Workspace(staging / "workspace").copy_from(live.workspace.root)
            else:
                if snapshots.exists(self.snapshot_dir(session_id)):
                    shutil.copytree(self.snapshot_dir(session_id), staging / "snapshot")
                await Workspace(staging / "workspace").copy_from(manager.sessions_dir / session_id / "workspace")
                saved = row.snapshot or {}
            child_view = await manager.create(principal, kernel=row.kernel, labels=row.labels,
                                              env=row.env, parent=(session_id, parent_step),
                                              isolation=manager.isolation_of(row))
            child = manager.live[child_view["id"]]
            await child.workspace.copy_from(staging / "workspace")
            async with child.lock:
                outcome = await self.restore(child, staging / "snapshot", saved)
            manager.recorder.record_event(child.trajectory, "state_restored", principal.name,
                                          {**outcome, "from": {"session_id": session_id, "step": parent_step}})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        parent_trajectory = (manager.live[session_id].trajectory if session_id in manager.live
                             else manager.trajectory_of(session_id))
        manager.recorder.record_event(parent_trajectory, "session_forked", principal.name,
                                      {"child": child_view["id"], "step": parent_step})
        view = child.record.view()
        view["restored"] = outcome["restored"]
        view["not_restored"] = outcome["not_restored"]
        return view

    async def recover(self) -> None:
        """At start, after a crash: bring back each session that was live (``_recover_session``).
        Steps left ``running`` are recorded as ``lost``, saying whether their kernel was reattached.
        Kernel processes that no session claims are stopped."""
        manager = self.manager
        running: dict[str, list[dict[str, Any]]] = {}
        for step in manager.store.running_steps():
            running.setdefault(step["session_id"], []).append(step)
        await self._clear_leftovers()
        for row in manager.store.sessions_in_states(states.LIVE):
            await self._recover_session(row, running.pop(row.id, []))
        for session_id, steps in running.items():  # sessions that were not live: no kernel to find
            self._record_lost(manager.trajectory_of(session_id), steps, False)
        claimed = {live.kernel.connection_file for live in manager.live.values() if live.kernel is not None}
        stopped = await stop_unclaimed(manager.launcher.runtime_dir, claimed)
        isolation = manager.launcher.isolation
        if isolation is not None and isolation.runtime_root != manager.launcher.runtime_dir:
            stopped += await stop_unclaimed(isolation.runtime_root, claimed)
        if isolation is not None and isolation.container_engine:
            removed = await remove_unclaimed_containers(claimed)
            if removed:
                log.warning("removed %d kernel containers that no session claims: %s", len(removed), removed)
        if stopped:
            log.warning("stopped %d kernel processes that no session claims: %s", len(stopped), stopped)
        manager.recorder.flush()

    async def _recover_session(self, row: SessionRecord, running: list[dict[str, Any]]) -> None:
        """One session that was live when the gateway stopped, brought back as one of: failed (a
        fork cut short), paused as it was (a resume cut short), live on its reattached kernel,
        or paused to go on with a new kernel (its kernel is gone)."""
        manager = self.manager
        trajectory = manager.trajectory_of(row.id)
        if row.parent_session_id and not manager.store.has_event(row.id, "state_restored"):
            # A fork the crash cut short: it never got its parent's state (its kernel, if it
            # still runs, is stopped afterwards as no session's).
            reason = (f"The gateway stopped while this session was being forked from "
                      f"'{row.parent_session_id}': it did not get that session's state. Fork it again.")
            manager.store.save_session(row, state="failed", reason=reason, ended_at=now_iso())
            manager.recorder.record_event(trajectory, "session_failed", None, {"reason": reason})
            row.steps += self._record_lost(trajectory, running, False)
            log.warning("session %s: failed; a crash cut its fork short", row.id)
            return
        if row.snapshot and "resumed_at" not in row.snapshot and snapshots.exists(self.snapshot_dir(row.id)):
            # A resume the crash cut short: its kernel may not hold the state yet. The session
            # is paused again as it was (its kernel is stopped as no session's); the next step
            # resumes it from the same snapshot.
            info = {**row.snapshot, "note": "A resume was cut short by a crash of the gateway; the next step or "
                                            "resume restores the same snapshot."}
            row.steps += self._record_lost(trajectory, running, False)
            manager.store.save_session(row, state="paused", snapshot=info)
            manager.recorder.record_event(trajectory, "session_paused", None, {**info, "reason": "crash"})
            log.warning("session %s: a crash cut its resume short; paused again", row.id)
            return
        placement = recorded_placement(row)
        kernel = None if placement is None else await manager.launcher.adopt(
            placement, spec_name=row.kernel, cwd=manager.sessions_dir / row.id / "workspace", env=row.env,
            isolation=manager.isolation_of(row), timeout=min(10.0, self.settings.kernel_start_timeout))
        row.steps += self._record_lost(trajectory, running, kernel is not None)
        if kernel is None and self._snapshot_is_current(row.id):
            # Taken after everything the kernel ran (a pause the crash cut after the kernel was
            # stopped): the session is paused on it.
            info = {**(row.snapshot or {}), "reason": "crash",
                    "note": "The kernel was lost in a crash of the gateway; resuming restores the snapshot "
                            "taken before it (files are kept)."}
            manager.store.save_session(row, state="paused", snapshot=info)
            manager.recorder.record_event(trajectory, "session_paused", None, info)
            return
        if kernel is None:
            self._pause_without_kernel(row, trajectory)
            return
        live = manager.register(row, trajectory)
        manager.attach_kernel(live, kernel)
        if kernel.exchange_dir is not None:  # a pause or fork the crash cut short left files there
            await snapshots.clear_exchange(kernel)
        manager.recorder.record_event(trajectory, "session_reattached", None,
                                      {"kernel_pid": kernel.pid, "reason": "the gateway restarted after a crash"})
        log.warning("session %s: reattached its kernel (pid %s) after a crash", row.id, kernel.pid)

    def _snapshot_is_current(self, session_id: str) -> bool:
        """Whether the session's snapshot was taken after its kernel last ran a step, restarted
        or died (one from an earlier pause, older than what the session ran since, is not)."""
        directory = self.snapshot_dir(session_id)
        if not snapshots.exists(directory):
            return False
        taken = iso(datetime.fromtimestamp((directory / "snapshot.json").stat().st_mtime, timezone.utc))
        changed = self.manager.store.last_kernel_change(session_id)
        return changed is None or taken >= changed

    def _pause_without_kernel(self, row: SessionRecord, trajectory: Trajectory) -> None:
        """A session whose kernel did not survive the crash goes on, as after a kernel's death,
        with a new kernel at its next step or resume: its files are kept, and its trajectory and
        snapshot say that its variables are gone (a snapshot of an earlier pause, older than what
        it ran since, is removed, not restored; with ``snapshot_fallback_replay`` the steps are
        re-run instead)."""
        message = ("The kernel was gone when the gateway restarted after a crash: the session goes on with a new "
                   "kernel at its next step; variables and imports are gone, files are kept.")
        self.manager.recorder.record_event(trajectory, "kernel_died", None, {"message": message})
        shutil.rmtree(self.snapshot_dir(row.id), ignore_errors=True)
        info: dict[str, Any] = {"paused_at": now_iso(), "reason": "crash", "saved": [], "bytes": 0, "unsaved": [],
                                "error": "the kernel was lost in a crash of the gateway", "note": message}
        if self.settings.snapshot_fallback_replay:
            info.update(fallback="replay", note="The kernel was lost in a crash of the gateway; resuming re-runs the "
                                                "session's recorded steps (files are kept).")
        self.manager.store.save_session(row, state="paused", snapshot=info)
        self.manager.recorder.record_event(trajectory, "session_paused", None, info)
        log.warning("session %s: its kernel did not survive the crash; paused, to go on with a new one", row.id)

    async def _clear_leftovers(self) -> None:
        """What a crash left half-made: fork staging copies and partial snapshot files."""
        helper = host.current()
        for staging in self.manager.sessions_dir.glob("*/forks/*"):
            await helper.call("tree.remove", path=str(staging))
        for partial in self.manager.sessions_dir.glob("*/snapshot/.*.partial"):
            partial.unlink(missing_ok=True)

    def _record_lost(self, trajectory: Trajectory, steps: list[dict[str, Any]], kernel_reattached: bool) -> int:
        """Give the steps a crash left ``running`` their final status; returns how many there were."""
        status, error = lost_outcome(kernel_reattached)
        for step in steps:
            self.manager.recorder.record_lost(trajectory, step, status, error)
            self.manager.metrics.observe_step(status, 0.0)
        if steps:
            log.warning("session %s: %d steps were running when the gateway stopped; recorded as %s",
                        trajectory.session_id, len(steps), status)
        return len(steps)

    # capacity, idle, retention ----------------------------------------------------------

    async def ensure_room(self, resuming: str | None = None) -> None:
        """Pause least recently used idle sessions until a kernel may start; 503 if all are busy.
        ``resuming`` is the session this room is for, when it is one being resumed."""
        manager = self.manager
        limit = self.settings.max_live_kernels
        unpausable: set[str] = set()  # idle sessions whose state could not be saved: they stay live
        while len(manager.live) + len(self.resuming) - (resuming in self.resuming) >= limit:
            idle = [live for live in manager.live.values()
                    if live.record.state == "idle" and not live.lock.locked() and live.kernel is not None
                    and not (live.hub is not None and live.hub.connections) and live.id not in unpausable]
            if not idle:
                raise Unavailable(
                    f"All {len(manager.live)} live sessions are busy (or cannot be paused) and the gateway runs at "
                    f"most {limit} kernels. Retry in a few seconds, or pause or terminate a session.",
                    code="at_capacity", details={"max_live_kernels": limit, "retry_after": 5})
            victim = min(idle, key=lambda live: live.active_at)
            try:
                await self._pause(victim, None, "capacity")
            except StateNotSaved:
                unpausable.add(victim.id)

    async def sweep(self) -> None:
        """Periodic: pause sessions idle past ``idle_pause_seconds``; remove expired workspaces."""
        manager = self.manager
        if self.settings.idle_pause_seconds > 0:
            threshold = iso(utcnow() - timedelta(seconds=self.settings.idle_pause_seconds))
            for live in list(manager.live.values()):
                active = live.active_at
                if (live.record.state == "idle" and not live.lock.locked() and active < threshold
                        and not (live.hub is not None and live.hub.connections)
                        and self.pause_failed.get(live.id) != active):
                    try:
                        await self._pause(live, None, "idle")
                    except StateNotSaved:
                        self.pause_failed[live.id] = active  # tried again once it has been used
        if self.settings.retention_days > 0:
            threshold = iso(utcnow() - timedelta(days=self.settings.retention_days))
            for row in manager.store.sessions_ended_before(threshold):
                directory = manager.sessions_dir / row.id
                removed = [name for name in ("workspace", "snapshot", "uploads") if (directory / name).exists()]
                if not removed:
                    continue
                helper = host.current()
                try:
                    if "workspace" in removed:
                        await helper.call("volume.release", path=str(directory / "workspace"), remove=True)
                    for name in removed:
                        await helper.call("tree.remove", path=str(directory / name))
                except OSError as exc:
                    log.warning("session %s: its files could not be removed by retention: %s", row.id, exc)
                    continue
                manager.recorder.record_event(manager.trajectory_of(row.id), "workspace_removed", None,
                                              {"removed": removed, "retention_days": self.settings.retention_days})
