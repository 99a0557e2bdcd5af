"""The files routes of a session's workspace: list, download, upload, delete."""

from __future__ import annotations

import hashlib
import mimetypes
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from gateway.api_spec import CURSOR, NO_BODY, Operation, Param, limit_param
from gateway.handlers.base import BaseHandler
from gateway.handlers.sessions import SID
from gateway.notebook import INLINE_UPLOAD_LIMIT
from gateway.workspace import DEFAULT_PAGE, MAX_PAGE, Workspace, workspace_parts

CHUNK = 256 * 1024
FILE_LIMIT = limit_param(DEFAULT_PAGE, MAX_PAGE)


async def send_file(handler: BaseHandler, workspace: Workspace, relative: str) -> None:
    """Stream a workspace file's bytes as an attachment that no browser renders in the gateway's
    origin (``Content-Security-Policy: sandbox``, ``nosniff``). The file is opened once, without
    following links, and read from that descriptor; since the kernel may be writing it meanwhile,
    a small file is sent whole with its length, a larger one chunked, up to its size at opening."""
    fd, info = await workspace.open_file(relative)
    with os.fdopen(fd, "rb") as handle:
        name = PurePosixPath(relative).name
        kind, _ = mimetypes.guess_type(name)
        handler.set_header("Content-Type", kind or "application/octet-stream")
        handler.set_header("Content-Disposition", f"attachment; filename*=UTF-8''{quote(name)}")
        handler.set_header("Content-Security-Policy", "sandbox")
        handler.set_header("X-Content-Type-Options", "nosniff")
        remaining = info.st_size
        while remaining > 0 and (chunk := handle.read(min(CHUNK, remaining))):
            remaining -= len(chunk)
            handler.write(chunk)
            if remaining > 0:
                await handler.flush()
    handler.finish()


class FileListHandler(BaseHandler):
    """GET /v1/sessions/{id}/files[?path=dir&limit=N&cursor=C]: one page of the files."""

    operations = {"get": Operation("One page of the workspace's regular files, in path order", "FileList",
                                   query=(Param("path", "a directory of the workspace"), FILE_LIMIT, CURSOR))}

    async def get(self, session_id: str) -> None:
        assert self.principal is not None
        workspace = await self.gateway.sessions.workspace(self.principal, session_id)
        limit = self.int_query(FILE_LIMIT)
        page = await workspace.list(self.get_query_argument("path", None),
                                    cursor=self.get_query_argument("cursor", None), limit=limit)
        self.set_header("Content-Type", "application/json")
        self.finish(page.to_json())


class UploadSink:
    """Receives an upload into a temporary file outside the workspace, hashing as it goes."""

    def __init__(self, directory: Path, limit: int):
        self.limit = limit
        self.size = 0
        self.too_large = False
        self.digest = hashlib.sha256()
        self.head = bytearray()
        fd, name = tempfile.mkstemp(dir=directory, prefix="upload-")
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self.too_large = True
            return
        self.file.write(chunk)
        self.digest.update(chunk)
        if len(self.head) <= INLINE_UPLOAD_LIMIT:
            self.head.extend(chunk)

    def finish(self) -> None:
        self.file.close()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.path.unlink(missing_ok=True)


class FileHandler(BaseHandler):
    """GET downloads raw bytes; PUT uploads the raw body; DELETE removes a file or directory."""

    operations = {
        "get": Operation("Download a file's bytes", None, media_type="application/octet-stream"),
        "put": Operation("Upload the raw body to a file (replacing it)", "FileWritten", status=201, body=None),
        "delete": Operation("Delete a file or a directory", "FileDeleted", body=NO_BODY),
    }

    def body_limit(self) -> int:
        if self.request.method == "PUT":
            return self.gateway.settings.max_upload_bytes
        return super().body_limit()

    def open_body_sink(self, limit: int) -> Any:
        if self.request.method != "PUT":
            return super().open_body_sink(limit)
        assert self.principal is not None
        session_id = self.path_kwargs["session_id"]
        sessions = self.gateway.sessions
        directory = sessions.upload_dir(self.principal, session_id)
        workspace_parts(self.path_kwargs["path"])  # an invalid path is refused before the body comes
        return UploadSink(directory, limit)

    async def get(self, session_id: str, path: str) -> None:
        assert self.principal is not None
        await send_file(self, await self.gateway.sessions.workspace(self.principal, session_id), path)

    async def put(self, session_id: str, path: str) -> None:
        assert self.principal is not None
        self.require_body_within_limit()
        sink: UploadSink = self.body_sink
        sink.finish()
        content = bytes(sink.head) if sink.size <= INLINE_UPLOAD_LIMIT else None
        result = await self.gateway.sessions.put_file(self.principal, session_id, path, sink.path, size=sink.size,
                                                sha256=sink.digest.hexdigest(), content=content)
        self.write_json(result, status=201)

    async def delete(self, session_id: str, path: str) -> None:
        assert self.principal is not None
        self.write_json(await self.gateway.sessions.delete_file(self.principal, session_id, path))


routes = [
    (rf"/v1/sessions/{SID}/files", FileListHandler),
    (rf"/v1/sessions/{SID}/files/(?P<path>.+)", FileHandler),
]
