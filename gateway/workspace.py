"""A session's workspace directory: the kernel's working directory and the files API's root.

Every path a client names is relative to the workspace and must stay inside it: absolute
paths, ``..`` components, symbolic links anywhere on the way, names longer than the file
system allows and paths deeper than ``MAX_PATH_DEPTH`` are refused with ``invalid_path``. The
kernel can change the tree at any moment, so every operation goes through ``gateway.safefs``
(descriptors, no link followed) in the privileged helper, the only process that can reach a
kernel's tree; walks of the whole tree run there too, so a workspace of any size never holds up
the server's event loop.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gateway import host, safefs, volumes
from gateway.errors import Conflict, InvalidRequest, NotFound

MAX_PATH_BYTES = 1024
MAX_PATH_DEPTH = 32
MAX_NAME_BYTES = 255
DEFAULT_PAGE = 1000
MAX_PAGE = 10_000


@dataclass(frozen=True)
class FilePage:
    """One page of a workspace listing: ``files_json`` is the JSON array of ``{"path", "size",
    "modified"}`` objects, ``next`` the cursor of the following page (None on the last)."""

    files_json: bytes
    next: str | None

    @property
    def files(self) -> list[dict[str, Any]]:
        return list(json.loads(self.files_json))

    def to_json(self) -> bytes:
        """The API's listing object, ``{"files": [...], "next": cursor or null}``."""
        return b'{"files": ' + self.files_json + b', "next": ' + json.dumps(self.next).encode() + b"}"


class Workspace:
    """File operations confined to one directory, carried out by the privileged helper
    (``gateway.host``): the server cannot reach a kernel's tree itself. Used by the session
    manager."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.owner: tuple[int, int] | None = None  # the isolated kernel's (uid, gid), given what the gateway writes
        self._volume = False

    async def open_file(self, relative: str) -> tuple[int, os.stat_result]:
        """A read descriptor of an existing regular file and its ``fstat``, for a download."""
        parts = workspace_parts(relative)
        try:
            reply = await host.current().call_fds("file.open", root=str(self.root), parts=list(parts))
        except IsADirectoryError:
            raise Conflict(f"'{relative}' is a directory; list it with GET .../files?path={relative}.",
                           code="is_a_directory", details={"path": relative}) from None
        except OSError as exc:
            raise _file_error(exc, relative) from None
        fd = reply.fds[0]
        for extra in reply.fds[1:]:
            os.close(extra)
        return fd, os.fstat(fd)

    async def install(self, relative: str, source: Path) -> str:
        """Put a fully received upload (the server's file, outside the workspace) in place
        atomically, creating parent directories; returns the normalised relative path. The
        source is removed."""
        parts = workspace_parts(relative)
        try:
            with safefs.opened(os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as fd:
                await host.current().call("file.install", (fd,), root=str(self.root), parts=list(parts),
                                          owner=list(self.owner) if self.owner else None)
        except IsADirectoryError:
            raise Conflict(f"'{relative}' is a directory; choose a file path.", code="is_a_directory",
                           details={"path": relative}) from None
        except OSError as exc:
            raise _file_error(exc, relative) from None
        finally:
            source.unlink(missing_ok=True)
        return "/".join(parts)

    async def copy_from(self, source: Path) -> int:
        """Copy another tree (a parent's workspace, a fork's staging copy) into this workspace,
        giving what is made to its kernel's uid; links are copied as links. Bytes copied."""
        return int(await host.current().call("tree.copy", source=str(source), target=str(self.root),
                                              owner=list(self.owner) if self.owner else None))

    async def list(self, directory: str | None = None, *, cursor: str | None = None,
                   limit: int = DEFAULT_PAGE) -> FilePage:
        """One page of the regular files under ``directory`` (default: all), in path order. The
        page is built and serialised by the helper: the event loop only passes it on."""
        parts = workspace_parts(directory) if directory else ()
        after = decode_file_cursor(cursor) if cursor else None
        try:
            page = await host.current().call("tree.list", root=str(self.root), parts=list(parts),
                                             after=list(after) if after is not None else None, limit=limit,
                                             max_depth=MAX_PATH_DEPTH)
        except NotADirectoryError:
            raise InvalidRequest(f"'{directory}' is a file, not a directory; download it instead.",
                                 code="invalid_path", details={"path": directory}) from None
        except FileNotFoundError:
            raise NotFound(f"There is no directory '{directory}' in the workspace.", code="file_not_found",
                           details={"path": directory}) from None
        except OSError as exc:
            raise _file_error(exc, directory or "") from None
        return FilePage(page["files_json"].encode(), page["next"])

    @property
    def is_volume(self) -> bool:
        """Whether the workspace is a volume of its own (``gateway.volumes``): its file system
        then holds the workspace limit by itself. Once seen mounted, it stays so for the life of
        this object (a session's volume is unmounted only after its kernel is gone)."""
        if not self._volume:
            self._volume = volumes.is_mounted(self.root)
        return self._volume

    async def size(self) -> int:
        """Bytes the workspace holds: a volume's used blocks (at once), otherwise the sum of its
        regular files' sizes (links not followed), walked by the helper."""
        if self.is_volume:
            return volumes.used_bytes(self.root)
        return int(await host.current().call("tree.size", root=str(self.root)))

    async def delete(self, relative: str) -> str:
        """Delete a file, a symbolic link (not its target) or a whole directory; returns which."""
        parts = workspace_parts(relative)
        try:
            return str(await host.current().call("tree.remove_entry", root=str(self.root), parts=list(parts)))
        except OSError as exc:
            raise _file_error(exc, relative) from None


def workspace_parts(relative: Any) -> safefs.Parts:
    """The components of a path inside the workspace, or ``InvalidRequest`` (``invalid_path``)."""
    if not isinstance(relative, str) or not relative.strip("/"):
        raise _bad_path(relative, "a file path inside the workspace is required")
    if "\x00" in relative:
        raise _bad_path(relative, "paths cannot contain NUL characters")
    try:
        size = len(relative.encode("utf-8"))
    except UnicodeEncodeError:
        raise _bad_path(relative, "the path is not valid Unicode (it holds a lone surrogate)") from None
    if size > MAX_PATH_BYTES:
        raise _bad_path(relative, f"paths are at most {MAX_PATH_BYTES} bytes long")
    pure = PurePosixPath(relative)
    if pure.is_absolute():
        raise _bad_path(relative, "absolute paths are not allowed; name a path relative to the workspace")
    if any(part == ".." for part in pure.parts):
        raise _bad_path(relative, "'..' is not allowed in workspace paths")
    parts = tuple(part for part in pure.parts if part != ".")
    if not parts:
        raise _bad_path(relative, "a file path inside the workspace is required")
    if len(parts) > MAX_PATH_DEPTH:
        raise _bad_path(relative, f"paths are at most {MAX_PATH_DEPTH} directories deep")
    if any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in parts):
        raise _bad_path(relative, f"each name in a path is at most {MAX_NAME_BYTES} bytes long")
    return parts


def encode_file_cursor(parts: safefs.Parts) -> str:
    """An opaque paging cursor: the last path of a page."""
    return base64.urlsafe_b64encode("/".join(parts).encode("utf-8")).decode().rstrip("=")


def decode_file_cursor(cursor: str) -> safefs.Parts:
    """Inverse of ``encode_file_cursor``; anything else is ``invalid_query``."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
        return workspace_parts(text)
    except (binascii.Error, ValueError, InvalidRequest):
        raise InvalidRequest("The cursor is not one this server issued; use the 'next' value of a previous page.",
                             code="invalid_query", details={"parameter": "cursor"}) from None


def _file_error(exc: OSError, relative: str) -> Exception:
    if isinstance(exc, safefs.TooDeep):
        return _bad_path(relative, f"the directory nests deeper than {safefs.WALK_DEPTH_MAX} levels; remove it "
                                   "from the session's code (for example with shutil.rmtree)")
    if isinstance(exc, safefs.UnsafeEntry):
        if exc.errno == errno.ENOTDIR:
            return _bad_path(relative, "a component of the path is a file, not a directory")
        return _bad_path(relative, "a symbolic link, a special file or a foreign hard link stands on the "
                                   "path; the gateway never follows those")
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"There is no file '{relative}' in the workspace.", code="file_not_found",
                        details={"path": relative})
    if isinstance(exc, NotADirectoryError):
        return _bad_path(relative, "a component of the path is a file, not a directory")
    return exc


def _bad_path(path: Any, why: str) -> InvalidRequest:
    shown = path if not isinstance(path, str) or len(path) <= 200 else path[:200] + "…"
    return InvalidRequest(f"Invalid path {shown!r}: {why}.", code="invalid_path", details={"path": shown})
