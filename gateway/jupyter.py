"""The Jupyter face's service: sessions seen as Jupyter kernels, kernel specs, and hubs.

Handlers of ``/api/...`` call this; it speaks Jupyter Server's shapes (kernel models, kernel
spec listings) and maps them onto the session manager, so a kernel started here is a session
under ``/v1/sessions`` and an agent's session is a kernel here.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from gateway import access
from gateway.auth import Principal
from gateway.errors import Forbidden, NotFound, Unavailable
from gateway.hub import KernelHub
from gateway.sessions import LiveSession, SessionManager

log = logging.getLogger(__name__)

RESOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PASSED_KERNEL_ENV = re.compile(r"^KERNEL_[A-Z0-9_]{1,120}$")
IGNORED_KERNEL_ENV = ("KERNEL_WORKING_DIR",)


class JupyterKernels:
    """Kernels, kernel specs and websocket hubs for the Jupyter face. One per server."""

    def __init__(self, sessions: SessionManager, replay_seconds: float):
        self.sessions = sessions
        self.replay_seconds = replay_seconds

    # kernel specs -----------------------------------------------------------------------

    def spec_model(self, name: str) -> dict[str, Any]:
        spec = self.sessions.launcher.get_spec(name)
        resources = {path.stem: f"/kernelspecs/{name}/{path.name}" for path in self._resource_files(name)}
        return {
            "name": name,
            "spec": {
                "argv": list(spec.argv), "display_name": spec.display_name, "language": spec.language,
                "interrupt_mode": spec.interrupt_mode, "env": {},
                "metadata": {**dict(spec.metadata or {}), **self._environment_metadata(name)},
            },
            "resources": resources,
        }

    def _environment_metadata(self, name: str) -> dict[str, Any]:
        """``environment``: the identity of the environment the spec's kernels run in (with its
        packages), or ``{"name", "built": false}``; nothing for a spec that defines none."""
        launcher = self.sessions.launcher
        try:
            environment = launcher.environment_of(name)
        except Unavailable as exc:
            if exc.code != "environment_not_built":
                return {}
            return {"environment": {"name": name, "built": False, "build": f"agent-gateway env build {name}"}}
        return {"environment": {**environment.identity(), "built": True}} if environment else {}

    def specs(self) -> dict[str, Any]:
        names = self.sessions.launcher.spec_names()
        default = "python3" if "python3" in names else (names[0] if names else "")
        return {"default": default, "kernelspecs": {name: self.spec_model(name) for name in names}}

    def _resource_files(self, name: str) -> list[Path]:
        directory = Path(self.sessions.launcher.get_spec(name).resource_dir)
        return sorted(p for p in directory.iterdir() if p.is_file() and p.name != "kernel.json"
                      and RESOURCE_NAME.match(p.name))

    def spec_resource(self, name: str, filename: str) -> Path:
        """A file of a kernel spec's directory (a logo); 404 when there is none by that name."""
        for path in self._resource_files(name) if RESOURCE_NAME.match(filename) else []:
            if path.name == filename:
                return path
        raise NotFound(f"Kernel spec '{name}' has no resource '{filename}'.", code="resource_not_found",
                       details={"kernel": name, "resource": filename})

    # kernels ----------------------------------------------------------------------------

    def model(self, live: LiveSession) -> dict[str, Any]:
        hub = live.hub
        return {
            "id": live.record.kernel_id, "name": live.record.kernel,
            "last_activity": live.active_at,
            "execution_state": live.execution_state,
            "connections": hub.connections if hub is not None else 0,
        }

    def _live(self, principal: Principal, kernel_id: str) -> LiveSession:
        session_id = self.sessions.session_id_for_kernel(kernel_id)
        live = self.sessions.live.get(session_id) if session_id else None
        if live is None or not access.may_see(principal, live.record.owner):
            raise NotFound(f"There is no running kernel '{kernel_id}'.", code="kernel_not_found",
                           details={"kernel_id": kernel_id})
        return live

    def _writable(self, principal: Principal, kernel_id: str) -> LiveSession:
        live = self._live(principal, kernel_id)
        self.sessions.writable(principal, live.id)
        return live

    def list(self, principal: Principal) -> list[dict[str, Any]]:
        return [self.model(live) for live in self.sessions.live.values()
                if access.may_see(principal, live.record.owner)]

    def get(self, principal: Principal, kernel_id: str) -> dict[str, Any]:
        return self.model(self._live(principal, kernel_id))

    async def start(self, principal: Principal, name: str | None, env: dict[str, Any] | None) -> dict[str, Any]:
        """``POST /api/kernels``: a new session owned by the caller, created through this face."""
        passed = {k: v for k, v in (env or {}).items()
                  if isinstance(k, str) and PASSED_KERNEL_ENV.match(k) and k not in IGNORED_KERNEL_ENV
                  and isinstance(v, str)}
        dropped = sorted(set(env or {}) - set(passed))
        if dropped:
            log.debug("POST /api/kernels: ignored environment variables %s", dropped)
        session = await self.sessions.create(principal, kernel=name or "python3", env=passed, origin="jupyter")
        return self.model(self.sessions.live[session["id"]])

    async def delete(self, principal: Principal, kernel_id: str, *, terminate: bool) -> str:
        """``DELETE /api/kernels/{id}``: ends a session created here; lets go of an agent's.

        An agent's session ends through this face only when an admin asks with ``?terminate=true``.
        Returns "terminated" or "released".
        """
        live = self._writable(principal, kernel_id)
        if live.record.origin == "jupyter" or terminate:
            if not access.may_end_from_jupyter(principal, live.record):
                raise Forbidden("Only an admin may terminate an agent's session through the Jupyter API; "
                                "the owner ends it with DELETE /v1/sessions/{id}.")
            await self.sessions.terminate(principal, live.id)
            return "terminated"
        self.sessions.recorder.record_event(live.trajectory, "jupyter_released", principal.name,
                                            {"kernel_id": kernel_id})
        return "released"

    async def interrupt(self, principal: Principal, kernel_id: str) -> None:
        live = self._writable(principal, kernel_id)
        if live.current is None and live.kernel is not None:
            # Nothing of the agent's is running: interrupt whatever a websocket client runs.
            self.sessions.recorder.record_event(live.trajectory, "interrupt", principal.name, {"face": "jupyter"})
            await live.kernel.interrupt()
            return
        await self.sessions.interrupt(principal, live.id)

    async def restart(self, principal: Principal, kernel_id: str) -> dict[str, Any]:
        live = self._writable(principal, kernel_id)
        await self.sessions.restart(principal, live.id)
        return self.model(live)

    def hub(self, principal: Principal, kernel_id: str) -> KernelHub:
        """The hub a websocket client attaches to: the session's owner and admins run code;
        reviewers attach read-only (they see every message and may run nothing)."""
        live = self._live(principal, kernel_id)
        if access.may_change(principal, live.record.owner):
            self.sessions.writable(principal, live.id)  # runs code: live, not paused, not ended
        if live.hub is None:
            live.hub = KernelHub(self.sessions, live, self.replay_seconds)
        return live.hub
