"""Who the server runs as, and how it gets there when it is started as root.

Started as root, ``agent-gateway serve`` prepares the data directory for its own unprivileged
user, starts the privileged helper (``gateway.host``), and then drops to that user, for good,
before it opens a socket or reads a request: the process that parses HTTP and websocket traffic
holds no root privilege. The user is ``--server-user`` (the account ``agent-gateway`` when it
exists, else uid 999999); it may be neither root nor a kernel uid.
"""

from __future__ import annotations

import os
import pwd
import stat
import struct
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from gateway import safefs
from gateway.volumes import IMAGE_SUFFIX

FALLBACK_UID = 999_999


class PrivilegeError(RuntimeError):
    """The server cannot run as its user here; the message says why and what to change."""


@dataclass(frozen=True)
class Identity:
    """The unprivileged user and group the server runs as."""

    uid: int
    gid: int
    name: str

    @property
    def owner(self) -> tuple[int, int]:
        return self.uid, self.gid


def server_identity(setting: str, kernel_uids: tuple[int, int]) -> Identity | None:
    """The server's user when it runs as root (None otherwise: it then keeps its own)."""
    if os.geteuid() != 0:
        return None
    text = setting.strip()
    if text.replace(":", "").isdigit():
        uid_text, _, gid_text = text.partition(":")
        identity = Identity(int(uid_text), int(gid_text or uid_text), f"uid {uid_text}")
    else:
        try:
            account = pwd.getpwnam(text)
            identity = Identity(account.pw_uid, account.pw_gid, text)
        except KeyError:
            identity = Identity(FALLBACK_UID, FALLBACK_UID, f"uid {FALLBACK_UID} (there is no account {text!r})")
    first, count = kernel_uids
    for number in (identity.uid, identity.gid):
        if number == 0 or first <= number < first + count:
            raise PrivilegeError(f"the server's user must be neither root nor a kernel uid ({first}-"
                                 f"{first + count - 1}), not {identity.name} ({identity.uid}:{identity.gid})")
    return identity


def prepare_data_dir(data: Path, runtime_root: Path, identity: Identity, kernel_uids: tuple[int, int]) -> None:
    """As root, before dropping: make the data directory (and a runtime root outside it) the
    server user's. What a kernel owns (its workspace, its runtime directory) and volume images
    (the helper's) are left as they are; nothing is followed through a link."""
    data.mkdir(parents=True, exist_ok=True)
    with safefs.opened(os.open(data, safefs.DIR_FLAGS)) as root:
        # An earlier root server's tree is adopted whole; after that only the top entries are
        # looked at (a store journal a root-run command left, for one).
        _adopt(root, identity, kernel_uids, safefs.WALK_DEPTH_MAX if os.fstat(root).st_uid != identity.uid else 0)
        os.fchown(root, *identity.owner)
        os.fchmod(root, 0o700)
    home = data / "home"
    home.mkdir(mode=0o700, exist_ok=True)
    os.chown(home, *identity.owner, follow_symlinks=False)
    if not runtime_root.is_relative_to(data):
        runtime_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with safefs.opened(os.open(runtime_root, safefs.DIR_FLAGS)) as fd:
            os.fchown(fd, *identity.owner)


def _adopt(root: int, identity: Identity, kernel_uids: tuple[int, int], depth: int) -> None:
    """Give the server's user every entry of a data directory, ``depth`` levels down, that an
    earlier root server made."""
    first, count = kernel_uids

    def kernels(info: os.stat_result) -> bool:
        return first <= info.st_uid < first + count

    for dirpath, dirnames, filenames, dir_fd in os.fwalk(".", dir_fd=root, follow_symlinks=False):
        names = [*dirnames, *filenames]
        if dirpath.count(os.sep) >= depth:
            dirnames.clear()
        for name in names:
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if kernels(info) or (name.endswith(IMAGE_SUFFIX) and stat.S_ISREG(info.st_mode)):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            if info.st_uid != identity.uid:
                os.chown(name, *identity.owner, dir_fd=dir_fd, follow_symlinks=False)


def drop(identity: Identity, home: Path) -> None:
    """Become ``identity`` for good (no groups, no way back); HOME becomes ``home``."""
    os.setgroups([])
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    if os.geteuid() == 0 or os.getegid() == 0:
        raise PrivilegeError("the server could not drop its root privileges")
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("the server could take root back after dropping it")
    os.environ["HOME"] = str(home)
    for name in ("USER", "LOGNAME"):
        os.environ[name] = identity.name if identity.name.isidentifier() else "agent-gateway"


def passage_needed(identity: Identity, paths: list[Path]) -> list[Path]:
    """The directories above ``paths`` that ``identity`` cannot pass through (no search
    permission for others, not its own, no ACL entry of its own)."""
    blocked: list[Path] = []
    for path in paths:
        for parent in reversed(Path(os.path.realpath(path)).parents):
            info = os.stat(parent)
            if info.st_mode & stat.S_IXOTH or info.st_uid == identity.uid or _acl_lets(parent, identity.uid):
                continue
            if parent not in blocked:
                blocked.append(parent)
    return blocked


def grant_passage(directory: Path, uid: int) -> None:
    """Add a POSIX ACL entry letting ``uid`` (only) pass through ``directory``: search, not
    list, not write; other entries are kept."""
    entries = _acl_entries(directory)
    entries[(ACL_USER, uid)] = entries.get((ACL_USER, uid), 0) | 1
    entries[(ACL_MASK, ACL_UNDEFINED_ID)] = entries.get((ACL_MASK, ACL_UNDEFINED_ID),
                                                        entries[(ACL_GROUP_OBJ, ACL_UNDEFINED_ID)]) | 1
    packed = struct.pack("<I", ACL_VERSION) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for (tag, ident), perm in sorted(entries.items()))
    os.setxattr(directory, ACL_XATTR, packed, follow_symlinks=False)


ACL_XATTR = "system.posix_acl_access"
ACL_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF


def _acl_entries(directory: Path) -> dict[tuple[int, int], int]:
    """The access ACL of ``directory`` as {(tag, id): perm}; its mode bits when it has none."""
    try:
        raw = os.getxattr(directory, ACL_XATTR, follow_symlinks=False)
    except OSError:
        raw = b""
    if len(raw) >= 4 and struct.unpack_from("<I", raw)[0] == ACL_VERSION and (len(raw) - 4) % 8 == 0:
        return {(tag, ident): perm for tag, perm, ident in struct.iter_unpack("<HHI", raw[4:])}
    mode = os.stat(directory, follow_symlinks=False).st_mode
    return {(ACL_USER_OBJ, ACL_UNDEFINED_ID): (mode >> 6) & 7, (ACL_GROUP_OBJ, ACL_UNDEFINED_ID): (mode >> 3) & 7,
            (ACL_OTHER, ACL_UNDEFINED_ID): mode & 7}


def _acl_lets(directory: Path, uid: int) -> bool:
    entries = _acl_entries(directory)
    mask = entries.get((ACL_MASK, ACL_UNDEFINED_ID), 7)
    return bool(entries.get((ACL_USER, uid), 0) & mask & 1)


def open_the_way(identity: Identity, data: Path, environments: Path | None = None) -> list[Path]:
    """Make sure the server's user can reach its data directory, the kernel environments' root
    (to read their manifests) and run the gateway's Python and code: directories above them
    that block it get an ACL entry letting that user alone pass (a checkout or a pyenv under
    /root, mode 0700). Returns the directories changed."""
    import gateway
    from gateway.sandbox import site_dirs

    needed = [data, Path(sys.executable), Path(os.path.realpath(sys.executable)),
              Path(sysconfig.get_paths()["stdlib"]), *(Path(p) for p in site_dirs()),
              Path(gateway.__file__).resolve().parent, *([environments] if environments else [])]
    blocked = passage_needed(identity, needed)
    for directory in blocked:
        try:
            grant_passage(directory, identity.uid)
        except OSError as exc:
            raise PrivilegeError(
                f"the server runs as {identity.name}, which cannot pass through {directory} (mode "
                f"{stat.S_IMODE(os.stat(directory).st_mode):04o}) to reach its data directory or the gateway's code, "
                f"and that directory takes no ACL ({exc.strerror}). Choose a --data-dir it can reach (for example "
                "/var/lib/agent-gateway), install the gateway where others can read it, or let others pass through "
                "(chmod o+x).") from None
    return blocked


def check_runs(identity: Identity, data: Path) -> None:
    """Really start the gateway's Python as the server's user: it must import the server and
    list its data directory. Raises ``PrivilegeError`` with what went wrong."""
    probe = f"import gateway, tornado, zmq, os; os.listdir({str(data)!r}); print('server-user-ok')"
    done = subprocess.run(["setpriv", f"--reuid={identity.uid}", f"--regid={identity.gid}", "--clear-groups", "--",
                           sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False,
                          cwd="/", env={**os.environ, "HOME": str(data / "home")})
    if "server-user-ok" not in done.stdout:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise PrivilegeError(f"the server's user {identity.name} cannot run the gateway here: {tail or 'no output'}")


def become(identity: Identity, home: Path, extra_env: dict[str, str]) -> NoReturn:
    """Drop to ``identity`` and run the server again as that user (``open_the_way`` and
    ``check_runs`` made sure it can), so nothing of the root process's memory carries over.
    ``extra_env`` passes the helper's connection on."""
    drop(identity, home)
    env = {**os.environ, **extra_env}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "gateway", *sys.argv[1:]], env)


def act_as_owner(directory: Path) -> None:
    """A command run as root on a data directory a server user owns becomes that user, so the
    files it makes (a store's journal) stay the server's."""
    if os.geteuid() != 0:
        return
    info = os.stat(directory)
    if info.st_uid != 0:
        os.setgroups([])
        os.setresgid(info.st_gid, info.st_gid, info.st_gid)
        os.setresuid(info.st_uid, info.st_uid, info.st_uid)

