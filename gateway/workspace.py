"""A session's workspace directory: the kernel's working directory and the files API's root.

Every path a client names is relative to the workspace and must stay inside it: absolute
paths, ``..`` components and symlinks that lead out are refused with ``invalid_path``.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from gateway.clock import iso
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.sandbox import hand_over_tree


class Workspace:
    """File operations confined to one directory. Used by the session manager."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.owner: tuple[int, int] | None = None  # the isolated kernel's (uid, gid), given what the gateway writes

    def resolve(self, relative: str) -> Path:
        """The absolute path of ``relative`` inside the workspace, or ``InvalidRequest``."""
        if not isinstance(relative, str) or not relative.strip("/") or "\x00" in relative:
            raise _bad_path(relative, "a file path inside the workspace is required")
        pure = PurePosixPath(relative)
        if pure.is_absolute():
            raise _bad_path(relative, "absolute paths are not allowed; name a path relative to the workspace")
        if any(part == ".." for part in pure.parts):
            raise _bad_path(relative, "'..' is not allowed in workspace paths")
        candidate = self.root.joinpath(*pure.parts)
        resolved = candidate.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise _bad_path(relative, "the path leads outside the workspace (through a symbolic link)")
        return candidate

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def list(self, directory: str | None = None) -> list[dict[str, Any]]:
        """Every regular file under ``directory`` (default: the whole workspace), sorted by path."""
        base = self.resolve(directory) if directory else self.root
        if not base.exists():
            raise NotFound(f"There is no directory '{directory}' in the workspace.", code="file_not_found",
                           details={"path": directory})
        if not base.is_dir():
            raise InvalidRequest(f"'{directory}' is a file, not a directory; download it instead.",
                                 code="invalid_path", details={"path": directory})
        files = []
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                try:
                    if path.is_symlink() and self.root not in path.resolve().parents:
                        continue
                    stat = path.stat()
                except OSError:
                    continue
                files.append({
                    "path": self.relative(path),
                    "size": stat.st_size,
                    "modified": iso(datetime.fromtimestamp(stat.st_mtime, timezone.utc)),
                })
        return sorted(files, key=lambda entry: entry["path"])

    def existing_file(self, relative: str) -> Path:
        """The path of an existing regular file, for download."""
        path = self.resolve(relative)
        if path.is_dir():
            raise Conflict(f"'{relative}' is a directory; list it with GET .../files?path={relative}.",
                           code="is_a_directory", details={"path": relative})
        if not path.is_file():
            raise NotFound(f"There is no file '{relative}' in the workspace.", code="file_not_found",
                           details={"path": relative})
        return path

    def install(self, relative: str, source: Path) -> Path:
        """Move a fully received upload into place atomically, creating parent directories."""
        path = self.resolve(relative)
        if path.is_dir():
            raise Conflict(f"'{relative}' is a directory; choose a file path.", code="is_a_directory",
                           details={"path": relative})
        path.parent.mkdir(parents=True, exist_ok=True)
        # Re-check after creating parents: a component may be a symlink created meanwhile.
        self.resolve(relative)
        if self.owner is not None:
            os.chown(source, *self.owner)  # in the uploads directory, out of the kernel's reach
            self._give_parents(path.relative_to(self.root).parts[:-1])
        os.replace(source, path)
        return path

    def _give_parents(self, parts: tuple[str, ...]) -> None:
        """Hand the directories leading to an upload to the kernel's uid, never following a
        symbolic link (the running kernel may swap a directory for one at any moment)."""
        assert self.owner is not None
        descriptor = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=descriptor)
                os.close(descriptor)
                descriptor = inner
                os.fchown(descriptor, *self.owner)
        finally:
            os.close(descriptor)

    def give_to_owner(self) -> None:
        """Hand everything in the workspace to the isolated kernel's uid (after the gateway wrote it)."""
        if self.owner is not None:
            hand_over_tree(self.root, *self.owner)

    def size(self) -> int:
        """Bytes held by the workspace's files (symbolic links not followed)."""
        total = 0
        for dirpath, _dirnames, filenames in os.walk(self.root, followlinks=False):
            for name in filenames:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
        return total

    def delete(self, relative: str) -> str:
        """Delete a file, a symbolic link (not its target) or a whole directory; returns what it was."""
        pure = PurePosixPath(relative) if isinstance(relative, str) else None
        if pure is not None and len(pure.parts) >= 1 and self._is_link_inside(pure):
            self.root.joinpath(*pure.parts).unlink()
            return "file"
        path = self.resolve(relative)
        if path.is_file():
            path.unlink()
            return "file"
        if path.is_dir():
            shutil.rmtree(path)
            return "directory"
        raise NotFound(f"There is no file '{relative}' in the workspace.", code="file_not_found",
                       details={"path": relative})


    def _is_link_inside(self, pure: PurePosixPath) -> bool:
        """Whether ``pure`` names a symbolic link whose own location is inside the workspace."""
        if pure.is_absolute() or any(part == ".." for part in pure.parts):
            return False
        parent = self.root.joinpath(*pure.parts[:-1]).resolve()
        if parent != self.root and self.root not in parent.parents:
            return False
        return (parent / pure.parts[-1]).is_symlink()


def _bad_path(path: Any, why: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid path {path!r}: {why}.", code="invalid_path", details={"path": path})
