"""Where and how a session's kernel runs: one typed record, kept with the session.

Written when a kernel is attached to its session (and again when it is replaced or restarted),
read when the gateway adopts the kernel after a crash: the adopted kernel then has the same uid,
runtime and exchange directories, workspace owner and limits as before, so every operation
(uploads, pause, fork, restart) behaves as it did. The kernel's limits are the session's
``isolation``, kept beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Placement:
    """One kernel's placement. ``launch_id`` names its cgroups and runtime directory."""

    launch_id: str
    profile: str
    connection_file: str
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    runtime_dir: str | None = None
    log_file: str | None = None

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
        try:
            return cls(launch_id=str(data["launch_id"]), profile=str(data["profile"]),
                       connection_file=str(data["connection_file"]),
                       pid=int(data["pid"]) if data.get("pid") is not None else None,
                       uid=int(data["uid"]) if data.get("uid") is not None else None,
                       gid=int(data["gid"]) if data.get("gid") is not None else None,
                       runtime_dir=str(data["runtime_dir"]) if data.get("runtime_dir") else None,
                       log_file=str(data["log_file"]) if data.get("log_file") else None)
        except (KeyError, TypeError, ValueError):
            return None
