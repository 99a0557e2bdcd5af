"""Where and how a session's kernel runs: one typed record, kept with the session.

Written when a kernel is attached to its session (and again when it is replaced or restarted),
read when the gateway adopts the kernel after a crash (``KernelLauncher.adopt``): the adopted
kernel then has the same uid, cgroup, runtime and exchange directories, workspace and log as
before, so every operation (uploads, pause, fork, restart) behaves as it did. ``provisioner`` is
what the kernel's jupyter_client provisioner gave of itself (``get_provisioner_info``), handed
back to a new one (``load_provisioner_info``). The kernel's limits are the session's
``isolation``, kept beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Placement:
    """One kernel's placement. ``launch_id`` names its cgroups and runtime directory."""

    launch_id: str
    profile: str
    connection_file: str
    pid: int | None = None  # the kernel's own process (inside a sandbox: not its launcher)
    uid: int | None = None
    gid: int | None = None
    runtime_dir: str | None = None
    log_file: str | None = None
    cgroup: str | None = None
    workspace: str | None = None  # the directory an isolated kernel's sandbox was started on
    provisioner: dict[str, Any] = field(default_factory=dict)
    environment: str | None = None  # the directory name of the environment it runs in

    @property
    def owner(self) -> tuple[int, int] | None:
        return (self.uid, self.gid) if self.uid is not None and self.gid is not None else None

    @property
    def runtime_path(self) -> Path | None:
        return Path(self.runtime_dir) if self.runtime_dir else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Placement | None":
        """The record as stored; None for a session stored before placements were (or a damaged one)."""
        if not isinstance(data, dict):
            return None

        def optional(name: str, kind: type) -> Any:
            value = data.get(name)
            return kind(value) if value not in (None, "") else None

        try:
            provisioner = data.get("provisioner") or {}
            if not isinstance(provisioner, dict):
                return None
            return cls(launch_id=str(data["launch_id"]), profile=str(data["profile"]),
                       connection_file=str(data["connection_file"]), pid=optional("pid", int),
                       uid=optional("uid", int), gid=optional("gid", int),
                       runtime_dir=optional("runtime_dir", str), log_file=optional("log_file", str),
                       cgroup=optional("cgroup", str), workspace=optional("workspace", str),
                       provisioner=dict(provisioner), environment=optional("environment", str))
        except (KeyError, TypeError, ValueError):
            return None
