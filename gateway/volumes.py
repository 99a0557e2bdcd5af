"""A file system of its own for each isolated workspace, as large as the session's workspace
limit, so the limit holds during a step: a write past it fails in the kernel with ``ENOSPC``.

Each volume is a sparse ext4 image beside its mount point (``<workspace>.img``; it takes only
the disk its files use), made with ``mkfs.ext4`` and mounted on the loop device with
``nosuid,nodev``. Making and mounting one takes about 20 ms. A volume stays mounted while its
session may use it (live, paused, or ended with its files kept) and is unmounted when the server
stops or retention removes the workspace; a later start mounts it again when it is needed. After
a crash the mounts are still there and are used as they are.

Used by the kernel launcher (a volume for every isolated kernel's workspace, pooled ones too),
by the session manager (files of sessions without a kernel) and by retention. Needs root, the
loop driver and ``mkfs.ext4``; ``support()`` says why not.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from gateway import safefs

log = logging.getLogger(__name__)

IMAGE_SUFFIX = ".img"
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"
MINIMUM_BYTES = 1 << 20  # below this ext4 has no room for its own metadata


class VolumeError(Exception):
    """A volume could not be made, mounted or moved; the message says why."""


def image_of(mount_point: Path) -> Path:
    """Where the image of the volume mounted at ``mount_point`` is kept."""
    return mount_point.with_name(mount_point.name + IMAGE_SUFFIX)


def support() -> str | None:
    """Why per-workspace volumes cannot work here, or None when they can."""
    if os.geteuid() != 0:
        return "mounting a volume per workspace needs the gateway to run as root"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH (Debian package e2fsprogs / mount)"
    if not Path("/dev/loop-control").exists():
        return "there is no loop device driver (/dev/loop-control)"
    return None


def is_mounted(mount_point: Path) -> bool:
    return os.path.ismount(mount_point)


def used_bytes(mount_point: Path) -> int:
    """Bytes in use on the volume mounted at ``mount_point`` (files and their metadata)."""
    info = os.statvfs(mount_point)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


def ensure(mount_point: Path, size: int, owner: tuple[int, int]) -> None:
    """Mount the workspace's volume at ``mount_point``, making it first if there is none; files
    already in a plain directory there (a workspace from before volumes) are moved into it."""
    if is_mounted(mount_point):
        return
    mount_point.mkdir(parents=True, exist_ok=True)
    image = image_of(mount_point)
    if not image.exists():
        _make(image, max(size, MINIMUM_BYTES), owner)
    if any(mount_point.iterdir()):
        _adopt_contents(mount_point, image, owner)
    _mount(image, mount_point)


def ensure_existing(mount_point: Path) -> None:
    """Mount an existing volume that is not mounted (after a restart); nothing if it has none."""
    if image_of(mount_point).exists() and not is_mounted(mount_point):
        _mount(image_of(mount_point), mount_point)


def move(current: Path, target: Path) -> None:
    """Move a mounted volume (a pooled kernel's) to its session's workspace, image included."""
    if not is_mounted(current):
        raise VolumeError(f"{current} holds no mounted volume")
    if is_mounted(target) or image_of(target).exists():
        # Its own volume, mounted or not: replacing its image would lose the session's files.
        raise VolumeError(f"{target} already has a volume")
    target.mkdir(parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise VolumeError(f"{target} is not empty")
    _run(["mount", "--move", str(current), str(target)])
    os.replace(image_of(current), image_of(target))
    current.rmdir()


def release(mount_point: Path, *, remove: bool = False) -> None:
    """Unmount a workspace's volume (lazily if something still holds it); with ``remove``, its
    image and files are deleted too."""
    if is_mounted(mount_point):
        try:
            _run(["umount", str(mount_point)])
        except VolumeError:
            _run(["umount", "--lazy", str(mount_point)])
    if remove:
        image_of(mount_point).unlink(missing_ok=True)


def release_all(root: Path) -> int:
    """Unmount every volume mounted below ``root`` (at shutdown); how many."""
    released = 0
    for mount_point in mounted_below(root):
        try:
            release(mount_point)
            released += 1
        except VolumeError as exc:
            log.warning("volume %s could not be unmounted: %s", mount_point, exc)
    return released


def mounted_below(root: Path) -> list[Path]:
    """Mount points below ``root`` (in a data directory: only workspace volumes), deepest first."""
    prefix = str(root.resolve()) + os.sep
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            point = _unescape(line.split()[4])
            if point.startswith(prefix):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _make(image: Path, size: int, owner: tuple[int, int]) -> None:
    partial = image.with_name(image.name + ".partial")
    with open(partial, "wb") as handle:
        handle.truncate(size)
    try:
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal,^resize_inode",
              "-E", f"root_owner={owner[0]}:{owner[1]},lazy_itable_init=1,nodiscard", str(partial)])
        os.replace(partial, image)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    # ext4's lost+found would show in the workspace: the new file system starts empty.
    with tempfile.TemporaryDirectory(prefix=".mount-", dir=image.parent) as scratch:
        _mount(image, Path(scratch))
        try:
            os.rmdir(Path(scratch) / "lost+found")
        finally:
            _run(["umount", scratch])


def _adopt_contents(mount_point: Path, image: Path, owner: tuple[int, int]) -> None:
    """Copy a plain workspace directory's files into its new volume, then empty the directory."""
    with tempfile.TemporaryDirectory(prefix=".mount-", dir=image.parent) as scratch:
        _mount(image, Path(scratch))
        try:
            with safefs.opened(safefs.open_root(mount_point)) as source, \
                    safefs.opened(safefs.open_root(Path(scratch))) as target:
                safefs.copy_tree(source, target, owner)
        finally:
            _run(["umount", scratch])
    with safefs.opened(safefs.open_root(mount_point)) as source:
        for name in os.listdir(source):
            safefs.remove_entry(source, name, missing_ok=True)


def _mount(image: Path, mount_point: Path) -> None:
    """Mount ``image``, which must be a file this process made (root's, one link): an image the
    unprivileged server put in its place is never mounted."""
    info = os.lstat(image)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1:
        raise VolumeError(f"{image} is not a volume image the gateway made; it is not mounted")
    _run(["mount", "-o", MOUNT_OPTIONS, str(image), str(mount_point)])


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VolumeError(f"{argv[0]} failed: {exc}") from None
    if done.returncode != 0:
        raise VolumeError(f"{' '.join(argv[:2])} failed: {(done.stderr or done.stdout).strip()[:300]}")


def _unescape(field: str) -> str:
    """A path from /proc/self/mountinfo, where space, tab, newline and backslash are octal escapes."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)

