"""The kernel image of an environment, for the ``container`` profile: Debian packages plus the
environment, built here and loaded into an engine with no registry.

1. A Debian root file system: ``debootstrap --variant=minbase`` of ``SUITE`` with the libraries
   the interpreter's own modules link (``PACKAGES``), packed once into a tar in the
   environments' ``.images`` directory, keyed by suite, mirror and packages (the cache).
2. The environment's base interpreter (its standard library; not its own site-packages) and the
   environment itself, at the paths they have here: the kernel spec's argv runs unchanged, and
   the environment's packages are the ones its lock pinned and ``env check`` verifies.
3. One tar, written in sorted order, owned by root, the Debian part's times fixed and the
   environment's kept (Python checks its bytecode caches against them): the same inputs give
   the same bytes; imported through the engine's API (``images/create?fromSrc``) and tagged by
   the environment's directory name, which carries its content hash.

Building needs root (debootstrap) and Debian's mirror; loading needs only the engine's API, so
the same tar can be loaded into every engine of a set of hosts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from gateway.containers import Engine, EngineUnavailable
from gateway.environments import Environment

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What the interpreter's extension modules link (ldd of lib-dynload), fonts' configuration, and
# the init the engine runs as pid 1.
PACKAGES = ("ca-certificates", "catatonit", "fontconfig-config", "libbz2-1.0", "libexpat1", "libffi8",
            "libgdbm6", "libgomp1", "liblzma5", "libncursesw6", "libnsl2", "libreadline8", "libsqlite3-0",
            "libssl3", "libstdc++6", "libtirpc3", "libuuid1", "zlib1g")
EPOCH = 1_700_000_000  # the time of the Debian part's files
IMAGE_LAYOUT = 2  # raised when what an image holds, or where, changes
IMAGES_DIR = ".images"
REPOSITORY = "localhost/agent-gateway-kernel"  # a name no engine pulls: it is loaded, never fetched
SKIPPED_ROOTFS = ("proc/", "sys/", "dev/", "run/", "tmp/", "var/cache/apt/", "var/lib/apt/lists/", "var/log/",
                  "var/cache/debconf/", "var/tmp/")
EMPTY_DIRS = ("proc", "sys", "dev", "run", "tmp", "var/tmp", "workspace")  # mount points
MOUNTED_OVER = ("/tmp", "/dev", "/proc", "/sys", "/workspace")  # a kernel's container mounts its own there
SKIPPED_PREFIX = ("site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KernelImage:
    """The image of one environment."""

    environment: Environment

    @property
    def tag(self) -> str:
        return image_tag(self.environment)


def image_tag(environment: Environment) -> str:
    """``localhost/agent-gateway-kernel:<environment directory>-<its path's hash>``: a new build
    of the environment is a new tag, and so is the same one at another path (the image holds it
    where it is here), another Debian base or another layout of the image."""
    where = hashlib.sha256(f"{environment.path}\n{base_key()}\n{IMAGE_LAYOUT}".encode()).hexdigest()[:8]
    return f"{REPOSITORY}:{environment.path.name}-{where}"


def mounted_over(environment: Environment) -> str | None:
    """Why ``environment`` cannot be in an image: it lies where a kernel's container mounts its own."""
    for path in (str(environment.path), environment.base_prefix):
        covered = next((top for top in MOUNTED_OVER if Path(path).is_relative_to(top)), None)
        if covered:
            return (f"{path} lies under {covered}, which a kernel's container mounts its own {covered} over: "
                    "build the environment elsewhere (--envs-dir) for the container profile")
    return None


def base_key() -> str:
    return hashlib.sha256(json.dumps([SUITE, MIRROR, sorted(PACKAGES)]).encode()).hexdigest()[:16]


def base_rootfs(cache: Path, progress: Progress) -> Path:
    """The Debian root file system's tar (built once per key, then reused)."""
    target = cache / f"debian-{SUITE}-{base_key()}.tar"
    if target.exists():
        progress(f"Debian {SUITE} root file system: cached ({target.name})")
        return target
    if os.geteuid() != 0:
        raise EngineUnavailable("building the Debian root file system needs root (debootstrap)")
    if shutil.which("debootstrap") is None:
        raise EngineUnavailable("building a kernel image needs debootstrap (apt-get install debootstrap)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".rootfs-") as scratch:
        root = Path(scratch) / "root"
        progress(f"Debian {SUITE} root file system: debootstrap --variant=minbase ({len(PACKAGES)} packages more)")
        started = time.monotonic()
        try:
            done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                                   str(root), MIRROR], capture_output=True, text=True, check=False)
        finally:
            _unmount_beneath(root)  # what a failed debootstrap left mounted (proc, sys) is not walked or removed
        if done.returncode:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-10:])
            raise EngineUnavailable(f"debootstrap failed:\n{tail}")
        listing = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package}=${Version}\\n"],
                                 capture_output=True, text=True, check=False).stdout
        (root / "etc" / "agent-gateway-packages.txt").write_text(listing)
        partial = target.with_suffix(".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for path in _walk(root):
                relative = path.relative_to(root).as_posix()
                if relative in (".", *EMPTY_DIRS) or relative.startswith(SKIPPED_ROOTFS):
                    continue
                tar.add(path, arcname=relative, recursive=False, filter=_fixed)
            for empty in EMPTY_DIRS:
                tar.addfile(_directory(empty, 0o1777 if empty.endswith("tmp") else 0o755))
        os.replace(partial, target)
        progress(f"Debian {SUITE} root file system: built in {time.monotonic() - started:.0f} s")
    return target


def _unmount_beneath(root: Path) -> None:
    with open("/proc/self/mounts") as mounts:
        targets = [line.split()[1] for line in mounts if len(line.split()) > 1]
    for target in sorted((t for t in targets if Path(t).is_relative_to(root)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def build(environment: Environment, engine: Engine, cache: Path, progress: Progress) -> KernelImage:
    """Build and load the image of ``environment`` into ``engine`` (nothing when it has it already)."""
    image = KernelImage(environment)
    hidden = mounted_over(environment)
    if hidden:
        raise EngineUnavailable(hidden)
    if engine.has_image(image.tag):
        progress(f"{image.tag}: present on the engine already")
        return image
    base = base_rootfs(cache, progress)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache, prefix=".image-") as scratch:
        tar_path = Path(scratch) / "image.tar"
        progress(f"{image.tag}: the root file system, {environment.base_prefix} and {environment.path}")
        write_image_tar(environment, base, tar_path)
        progress(f"{image.tag}: loading {tar_path.stat().st_size / (1 << 20):.0f} MiB into the engine")
        try:
            # the tag goes with the repository: podman's compatible API ignores a separate one
            engine.client.api.import_image_from_file(str(tar_path), repository=image.tag)
        except Exception as exc:
            raise EngineUnavailable(f"the engine at {engine.url} did not take the image: {exc}") from None
    if not engine.has_image(image.tag):
        raise EngineUnavailable(f"the engine at {engine.url} does not list {image.tag} after loading it")
    progress(f"{image.tag}: built in {time.monotonic() - started:.0f} s")
    return image


def write_image_tar(environment: Environment, base: Path, target: Path) -> None:
    """The base root file system, then the interpreter and the environment at their own paths
    (their parent directories open to every uid: the kernel's is not root)."""
    prefix = Path(environment.base_prefix)
    trees = ((prefix, _skip_in_prefix(prefix, environment)), (environment.path, lambda _p: False))
    on_the_way = {parent.relative_to("/").as_posix() for tree, _ in trees for parent in tree.parents[:-1]}
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        seen: set[str] = set()
        with tarfile.open(base) as rootfs:
            for member in rootfs:
                if member.name in on_the_way and member.isdir():
                    member.mode |= 0o755
                tar.addfile(member, rootfs.extractfile(member) if member.isfile() else None)
                seen.add(member.name)
        for tree, skip in trees:
            for name in sorted(on_the_way - seen):
                if tree.as_posix().startswith(f"/{name}/"):
                    tar.addfile(_directory(name, 0o755))
                    seen.add(name)
            for path in _walk(tree, skip):
                name = path.relative_to("/").as_posix()
                if name not in seen:  # times kept: Python's bytecode caches are checked against them
                    tar.add(path, arcname=name, recursive=False, filter=_owned_by_root)
                    seen.add(name)
        manifest = json.dumps({"environment": environment.identity(), "suite": SUITE, "base": base.name},
                              indent=1, sort_keys=True).encode()
        info = tarfile.TarInfo("etc/agent-gateway-image.json")
        info.size, info.mtime, info.mode = len(manifest), EPOCH, 0o644
        tar.addfile(info, io.BytesIO(manifest))


def _skip_in_prefix(prefix: Path, environment: Environment) -> Callable[[Path], bool]:
    """What of the base interpreter's prefix the image leaves out: its own packages and tests
    (the environment brings its packages), headers and static parts."""
    major, minor = environment.python_version.split(".")[:2]
    stdlib = prefix / "lib" / f"python{major}.{minor}"
    dropped = {stdlib / name for name in SKIPPED_PREFIX} | {prefix / "include", prefix / "share"}

    def skip(path: Path) -> bool:
        return path in dropped or path.name.endswith(".a")
    return skip


def _walk(root: Path, skip: Callable[[Path], bool] = lambda _p: False) -> Iterator[Path]:
    """Every entry under ``root`` (``root`` included), sorted, not following links."""
    yield root
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except NotADirectoryError:
        return
    for entry in entries:
        path = Path(entry.path)
        if skip(path):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(path, skip)
        else:
            yield path


def _fixed(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = EPOCH
    return _owned_by_root(info)


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _directory(name: str, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, EPOCH
    return info
