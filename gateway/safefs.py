"""File operations on trees a kernel can write, never following a path the kernel can change.

Every operation of the gateway inside a workspace, an exchange directory or a fork copy goes
through this module; nothing else builds a path into such a tree. A tree is reached from the
descriptor of its root, one component at a time, each opened with ``O_NOFOLLOW`` beneath the
descriptor of the one before: a symbolic link anywhere on the way is refused, never followed, so
a kernel that swaps an entry for a link (or a link for a directory) between a check and a use
gains nothing. Files are opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked by ``fstat`` to be
regular; new entries are created with ``O_EXCL`` and moved into place with ``renameat`` between
descriptors; removals use ``unlinkat`` and the descriptor-based ``shutil.rmtree``; ownership is
changed through descriptors or with ``AT_SYMLINK_NOFOLLOW``, and only for entries the gateway
itself wrote.

A file with several hard links is used only if it belongs to the owner of its directory (the
kernel, in its own tree): with ``fs.protected_hardlinks = 1`` (the Linux default) a kernel cannot
link a file it does not own, and this check keeps that true on a host where it is off.

The root of a tree (for example ``sessions/<id>/workspace``) lies in a directory only the
gateway can write, so the root itself is opened by path with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

Parts = tuple[str, ...]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
COPY_CHUNK = 1 << 20
WALK_DEPTH_MAX = 256  # walks go no deeper: a kernel can nest directories without end


class TooDeep(OSError):
    """A tree nests deeper than a walk goes (``WALK_DEPTH_MAX``)."""


class UnsafeEntry(OSError):
    """An entry on the way is a symbolic link, a hard link to a foreign file, or not the kind
    asked for (a directory where a file was expected, a FIFO, a device): it is not used."""


class FileEntry(NamedTuple):
    """A regular file found by a listing: its path components, size in bytes and mtime."""

    parts: Parts
    size: int
    mtime: float


@contextmanager
def opened(fd: int) -> Iterator[int]:
    """Close ``fd`` when the block ends."""
    try:
        yield fd
    finally:
        os.close(fd)


_anchors: list[tuple[Path, int]] = []


def set_anchors(directories: list[Path]) -> None:
    """Reach every tree from now on beneath one of ``directories`` (opened here, once), one
    component at a time without following links: set by the privileged helper, for which even
    the server's own directories (the data directory) are paths another user can change. A root
    outside every anchor is refused."""
    for _path, fd in _anchors:
        os.close(fd)
    _anchors[:] = [(Path(d), os.open(d, DIR_FLAGS)) for d in sorted(directories, key=lambda d: -len(str(d)))]


def anchored(path: Path) -> tuple[int, Parts] | None:
    """The anchor descriptor ``path`` lies beneath and the components from it, or None when no
    anchors are set. Raises ``UnsafeEntry`` for a path outside every anchor or not normalised."""
    if not _anchors:
        return None
    text = str(path)
    if not path.is_absolute() or os.path.normpath(text) != text:
        raise UnsafeEntry(errno.EPERM, "not an absolute, normalised path", text)
    for directory, fd in _anchors:
        if path == directory or directory in path.parents:
            return fd, path.relative_to(directory).parts
    raise UnsafeEntry(errno.EPERM, "outside the directories the gateway manages", text)


def open_root(root: Path, *, create: bool = False, owner: tuple[int, int] | None = None) -> int:
    """The descriptor of a tree's root: beneath an anchor without following links when anchors
    are set (see ``set_anchors``), otherwise by path (its parents are the caller's own)."""
    where = anchored(Path(root))
    if where is not None:
        return open_dir(where[0], where[1], create=create, owner=owner, mode=0o700)
    if create:
        Path(root).mkdir(parents=True, exist_ok=True)
    try:
        return os.open(root, DIR_FLAGS)
    except OSError as exc:
        raise _refusal(exc, str(root)) from None


def open_dir(root_fd: int, parts: Parts, *, create: bool = False, owner: tuple[int, int] | None = None,
             mode: int = 0o755) -> int:
    """A new descriptor of the directory ``parts`` beneath ``root_fd``; with ``create``, missing
    directories are made (and handed to ``owner``). Raises ``UnsafeEntry`` on a link or a file."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                inner = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    pass  # made meanwhile (by the kernel, perhaps as a link): the open below decides
                inner = os.open(part, DIR_FLAGS, dir_fd=fd)
                if owner is not None:
                    os.fchown(inner, *owner)
            except OSError as exc:
                raise _refusal(exc, part) from None
            os.close(fd)
            fd = inner
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_file(root_fd: int, parts: Parts) -> tuple[int, os.stat_result]:
    """A read descriptor of the regular file ``parts`` and its ``fstat``. A directory raises
    ``IsADirectoryError``; a link, FIFO, device or foreign hard link raises ``UnsafeEntry``."""
    with opened(open_dir(root_fd, parts[:-1])) as parent:
        return open_entry(parent, parts[-1])


def open_entry(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    """Like ``open_file`` for one name in an open directory."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _refusal(exc, name) from None
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "is a directory", name)
    if not stat.S_ISREG(info.st_mode) or _foreign_hard_link(info, dir_fd):
        os.close(fd)
        raise UnsafeEntry(errno.EPERM, "not a regular file of the tree", name)
    os.set_blocking(fd, True)
    return fd, info


def read_bytes(dir_fd: int, name: str, limit: int) -> bytes:
    """The whole content of a regular file in an open directory, at most ``limit`` bytes."""
    fd, info = open_entry(dir_fd, name)
    with opened(fd):
        if info.st_size > limit:
            raise UnsafeEntry(errno.EFBIG, f"larger than {limit} bytes", name)
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(limit + 1)
    if len(data) > limit:
        raise UnsafeEntry(errno.EFBIG, f"larger than {limit} bytes", name)
    return data


def remove(root_fd: int, parts: Parts) -> str:
    """Remove the file, link (not its target) or whole directory ``parts``; returns which it was.
    A directory nested too deep for ``shutil.rmtree`` raises ``TooDeep``."""
    with opened(open_dir(root_fd, parts[:-1])) as parent:
        info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            _rmtree(parts[-1], parent)
            return "directory"
        os.unlink(parts[-1], dir_fd=parent)
        return "file"


def remove_entry(dir_fd: int, name: str, *, missing_ok: bool = False) -> None:
    """Remove one entry of an open directory, whatever it is (a directory with its contents)."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            _rmtree(name, dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(root: Path) -> None:
    """Remove a whole tree whose root lies in a gateway-only directory (retention, staging)."""
    try:
        with opened(open_root(root.parent)) as parent:
            remove_entry(parent, root.name, missing_ok=True)
    except FileNotFoundError:
        pass


def install_from(root_fd: int, parts: Parts, source_fd: int, owner: tuple[int, int] | None) -> None:
    """Copy the content of ``source_fd`` (an upload, a snapshot file: the gateway's own) to
    ``parts`` in a kernel's tree, creating parent directories; an existing file or link there is
    replaced atomically, a directory is not (``IsADirectoryError``)."""
    with opened(open_dir(root_fd, parts[:-1], create=True, owner=owner)) as parent:
        name = parts[-1]
        partial = f".{name[:200]}.partial-{os.getpid()}-{os.urandom(4).hex()}"
        with opened(os.open(partial, CREATE_FLAGS, 0o644, dir_fd=parent)) as out:
            try:
                os.lseek(source_fd, 0, os.SEEK_SET)
                _copy(source_fd, out)
                if owner is not None:
                    os.fchown(out, *owner)
            except BaseException:
                os.unlink(partial, dir_fd=parent)
                raise
        try:
            os.rename(partial, name, src_dir_fd=parent, dst_dir_fd=parent)
        except OSError as exc:
            os.unlink(partial, dir_fd=parent)
            if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise IsADirectoryError(errno.EISDIR, "is a directory", name) from None
            raise


def _rmtree(name: str, dir_fd: int) -> None:
    try:
        shutil.rmtree(name, dir_fd=dir_fd)
    except RecursionError:
        raise TooDeep(errno.ELOOP, "nested too deep to remove from outside", name) from None
    except OSError as exc:
        if exc.errno == errno.EMFILE:
            raise TooDeep(errno.ELOOP, "nested too deep to remove from outside", name) from None
        raise


def _bounded_walk(root_fd: int) -> Iterator[tuple[list[str], list[str], int]]:
    """``os.fwalk`` of a tree (no link followed), going at most ``WALK_DEPTH_MAX`` levels down."""
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(".", dir_fd=root_fd, follow_symlinks=False):
        if dirpath.count(os.sep) >= WALK_DEPTH_MAX:
            dirnames.clear()
        yield dirnames, filenames, dir_fd


def _ordered_names(dir_fd: int) -> list[str]:
    return sorted(os.listdir(dir_fd))


def list_files(root_fd: int, parts: Parts, *, after: Parts | None, limit: int,
               max_depth: int = WALK_DEPTH_MAX) -> tuple[list[FileEntry], bool]:
    """Up to ``limit`` regular files under directory ``parts``, in path order (component by
    component), starting after ``after``; and whether more follow. Links, special files,
    foreign hard links and what lies deeper than ``max_depth`` names are not listed."""
    found: list[FileEntry] = []

    def visit(fd: int, prefix: Parts) -> bool:
        owner = os.fstat(fd).st_uid
        for name in _ordered_names(fd):
            path = prefix + (name,)
            if after is not None and path <= after[:len(path)] and not _is_ancestor(path, after):
                continue
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode) and (info.st_nlink == 1 or info.st_uid == owner):
                if len(found) == limit:
                    return True
                found.append(FileEntry(path, info.st_size, info.st_mtime))
            elif stat.S_ISDIR(info.st_mode) and len(path) < max_depth:
                try:
                    inner = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue  # swapped for a link, or removed, meanwhile
                with opened(inner):
                    if visit(inner, path):
                        return True
        return False

    with opened(open_dir(root_fd, parts)) as start:
        more = visit(start, parts)
    return found, more


def _is_ancestor(path: Parts, of: Parts) -> bool:
    return len(path) < len(of) and of[:len(path)] == path


def tree_size(root_fd: int) -> int:
    """Bytes held by the regular files of a tree (links not followed, nothing outside it, nothing
    deeper than ``WALK_DEPTH_MAX``: a volume holds the workspace limit whatever the depth)."""
    total = 0
    for _dirnames, filenames, dir_fd in _bounded_walk(root_fd):
        for name in filenames:
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def chown_tree(root_fd: int, uid: int, gid: int) -> int:
    """Give every entry of a kernel's tree to its (new) uid: what the gateway wrote, and what an
    earlier kernel of the session made under another uid. Links are changed themselves, never
    their targets; a file with several hard links is left alone (another of its names may lie
    outside the tree). Returns the count changed."""
    changed = 0
    for _dirnames, filenames, dir_fd in _bounded_walk(root_fd):
        info = os.fstat(dir_fd)
        if (info.st_uid, info.st_gid) != (uid, gid):
            os.fchown(dir_fd, uid, gid)
            changed += 1
        for name in filenames:
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (info.st_uid, info.st_gid) != (uid, gid) and (stat.S_ISLNK(info.st_mode) or info.st_nlink == 1):
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
                changed += 1
    return changed


def copy_tree(source_fd: int, target_fd: int, owner: tuple[int, int] | None, depth: int = 0) -> int:
    """Copy a kernel's tree into another one (a fork): directories, regular files and links
    (as links, never followed), ``WALK_DEPTH_MAX`` levels down; FIFOs, sockets and foreign hard
    links are skipped. Everything
    made is given to ``owner``. Returns the bytes copied."""
    copied = 0
    for name in _ordered_names(source_fd):
        try:
            info = os.stat(name, dir_fd=source_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode):
            if depth >= WALK_DEPTH_MAX:
                continue
            try:
                inner = os.open(name, DIR_FLAGS, dir_fd=source_fd)
            except OSError:
                continue
            with opened(inner):
                with opened(open_dir(target_fd, (name,), create=True, owner=owner, mode=0o755)) as made:
                    copied += copy_tree(inner, made, owner, depth + 1)
        elif stat.S_ISLNK(info.st_mode):
            remove_entry(target_fd, name, missing_ok=True)
            os.symlink(os.readlink(name, dir_fd=source_fd), name, dir_fd=target_fd)
            if owner is not None:
                os.chown(name, *owner, dir_fd=target_fd, follow_symlinks=False)
        elif stat.S_ISREG(info.st_mode):
            try:
                fd, found = open_entry(source_fd, name)
            except (UnsafeEntry, IsADirectoryError, FileNotFoundError):
                continue
            with opened(fd):
                remove_entry(target_fd, name, missing_ok=True)
                with opened(os.open(name, CREATE_FLAGS, stat.S_IMODE(found.st_mode) & 0o777, dir_fd=target_fd)) as out:
                    copied += _copy(fd, out)
                    if owner is not None:
                        os.fchown(out, *owner)
    return copied


def _copy(source: int, target: int) -> int:
    total = 0
    while True:
        chunk = os.read(source, COPY_CHUNK)
        if not chunk:
            return total
        view = memoryview(chunk)
        while view:
            written = os.write(target, view)
            view = view[written:]
        total += len(chunk)


def _foreign_hard_link(info: os.stat_result, dir_fd: int) -> bool:
    return info.st_nlink > 1 and info.st_uid != os.fstat(dir_fd).st_uid


def _refusal(exc: OSError, name: str) -> OSError:
    """A link met on the way (``ELOOP``) or a file where a directory was expected (``ENOTDIR``)
    becomes ``UnsafeEntry``; other errors (not found, ...) keep their type."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return UnsafeEntry(exc.errno, "a symbolic link or a file stands on the way", name)
    return exc
