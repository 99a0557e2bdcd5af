"""An isolated kernel's connection file, which lies in a directory the kernel can write.

The kernel owns its runtime directory (it creates its ipc sockets there), so whatever sits at
the connection file's name may be the kernel's doing: a link to a host file, a FIFO, a
directory, a file of any size. The gateway reads the file only as a regular file opened without
following links (``read``), and writes it only as a new file it creates itself (``install``):
jupyter_client's own writer removes the old file and then opens the name again, which follows a
link a process of the kernel's uid puts there in between. ``StagedConnectionManager`` is the
kernel manager of an isolated kernel: jupyter_client writes the file (choosing its ports) in a
directory of the server's own, and it is installed from there.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from traitlets import Unicode

from gateway import safefs

CONNECTION_FILE_MAX = 64 * 1024  # bytes: a connection file is a few hundred
INSTALL_ATTEMPTS = 8  # a kernel that keeps putting entries at the name fails its own start


def read(path: Path) -> dict[str, Any]:
    """The connection info in ``path``. Raises ``OSError`` when it is not a regular file of at
    most ``CONNECTION_FILE_MAX`` bytes (a link is never followed, a FIFO never waited on) and
    ``ValueError`` when it does not hold a JSON object."""
    with safefs.opened(safefs.open_root(path.parent)) as directory:
        raw = safefs.read_bytes(directory, path.name, CONNECTION_FILE_MAX)
    info = json.loads(raw)
    if not isinstance(info, dict):
        raise ValueError("a connection file holds a JSON object")
    return info


def install(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` as a new file of the server's (mode 0600), whatever the name
    held before; never through a link. Raises ``OSError`` when the name is taken again every time."""
    with safefs.opened(safefs.open_root(path.parent)) as directory:
        for _ in range(INSTALL_ATTEMPTS):
            safefs.remove_entry(directory, path.name, missing_ok=True)
            try:
                fd = os.open(path.name, safefs.CREATE_FLAGS, 0o600, dir_fd=directory)
            except FileExistsError:
                continue  # something was put there again in between
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return
    raise OSError(errno.EEXIST, "something keeps taking the connection file's name", str(path))


class StagedConnectionManager(AsyncKernelManager):
    """The kernel manager of a kernel whose runtime directory the kernel can write: its
    connection file is written in ``staging_dir`` (the server's) and installed with ``install``."""

    staging_dir = Unicode(help="A directory only the server can write, to write connection files in.")

    def write_connection_file(self, **kwargs: Any) -> None:
        target = self.connection_file
        staged = os.path.join(self.staging_dir, f".staged-{os.path.basename(target)}")
        self.connection_file = staged
        try:
            super().write_connection_file(**kwargs)
            with open(staged, "rb") as handle:
                data = handle.read()
        finally:
            self.connection_file = target
            try:
                os.unlink(staged)
            except FileNotFoundError:
                pass
        install(Path(target), data)
