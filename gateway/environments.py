"""Kernel environments: an interpreter with its packages, kept apart from the gateway's own.

A kernel spec directory holding a ``requirements.lock`` (pinned versions with hashes) defines an
environment of the spec's name. It is built into ``<root>/<name>-<hash>``, a virtual environment
whose name carries the hash of what it was built from (the lock, the interpreter's version and
platform, the kernel extension), so a build is cached, a changed lock builds anew beside the old
one and a session's record names exactly what it ran in. ``environment.json`` inside it, written
last, says the build is complete and what it holds. Operators define their own environments with
``agent-gateway env build NAME --requirements FILE``: the spec goes to ``<root>/kernels/NAME``.

The root and what is in it belong to whoever builds (root, or the operator), never to the server
or a kernel: the helper launches a kernel in an environment only after checking that (``trusted``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_ROOT = "./gateway-envs"
LOCK_FILE = "requirements.lock"
REQUIREMENTS_FILE = "requirements.txt"
MANIFEST = "environment.json"
SPECS = "kernels"  # under the root: the specs of operators' environments
EXTENSION = "agent_gateway_kernel"
FORMAT = "agent-gateway-environment/1"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DIRECTORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}-[0-9a-f]{12}$")
KERNEL_CONFIG = (f"c.InteractiveShellApp.extensions = [{EXTENSION!r}]\n"
                 "c.InteractiveShell.colors = 'nocolor'\n")
Progress = Callable[[str], None]


class EnvironmentProblem(RuntimeError):
    """An environment cannot be built, found or used; the message says why and what to do."""


class EnvironmentNotBuilt(EnvironmentProblem):
    """A spec's environment is defined but not built (or not completely)."""

    def __init__(self, name: str, directory: Path):
        super().__init__(f"The environment of kernel '{name}' is not built: run `agent-gateway env build {name}` "
                         f"(it goes to {directory}).")
        self.name = name


def python_tag(executable: str | None = None) -> str:
    """What a build depends on besides its lock: the interpreter's implementation, X.Y and machine."""
    if executable is None:
        return f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}-{platform.machine()}"
    probe = "import sys, platform; print(f'{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}-" \
            "{platform.machine()}')"
    return subprocess.run([executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()


def extension_source() -> bytes:
    from gateway.kernels import kernels_dir

    return (kernels_dir() / f"{EXTENSION}.py").read_bytes()


def base_python() -> str:
    """The interpreter environments are made from by default: the one the gateway's venv was."""
    return str(getattr(sys, "_base_executable", None) or sys.executable)


@dataclass(frozen=True)
class Definition:
    """What an environment is built from: a kernel spec's lock, for one interpreter."""

    name: str
    spec_dir: Path
    lock: bytes
    python: str  # the interpreter it is built with
    tag: str  # python_tag() of that interpreter

    @functools.cached_property
    def digest(self) -> str:
        content = hashlib.sha256()
        for part in (FORMAT.encode(), self.tag.encode(), self.lock, extension_source()):
            content.update(len(part).to_bytes(8, "big") + part)
        return content.hexdigest()

    @property
    def directory_name(self) -> str:
        return f"{self.name}-{self.digest[:12]}"

    @classmethod
    def of_spec(cls, spec_dir: Path, python: str | None = None) -> "Definition | None":
        """The environment ``spec_dir`` defines (None: the spec has no lock)."""
        lock = spec_dir / LOCK_FILE
        try:
            info = lock.stat()
        except FileNotFoundError:
            return None
        python = python or base_python()
        key = (str(spec_dir), info.st_mtime_ns, info.st_size, info.st_ino, python)
        known = _DEFINITIONS.get(key)
        if known is None:  # read and hashed once per version of the lock: every kernel start asks
            tag = python_tag() if python == base_python() else python_tag(python)
            known = _DEFINITIONS[key] = cls(spec_dir.name, spec_dir, lock.read_bytes(), python, tag)
        return known


_DEFINITIONS: dict[tuple[str, int, int, int, str], Definition] = {}


@dataclass(frozen=True)
class Environment:
    """A built environment, as its manifest describes it."""

    name: str
    digest: str
    path: Path
    python_version: str
    base_prefix: str
    packages: dict[str, str] = field(default_factory=dict)  # distribution name -> version
    built_at: float = 0.0
    tag: str = ""

    @property
    def executable(self) -> str:
        return str(self.path / "bin" / "python")

    @property
    def site_packages(self) -> str:
        major, minor = self.python_version.split(".")[:2]
        return str(self.path / "lib" / f"python{major}.{minor}" / "site-packages")

    @property
    def short_hash(self) -> str:
        return self.digest[:12]

    def identity(self) -> dict[str, Any]:
        """What a session records of the environment it ran in."""
        return {"name": self.name, "hash": self.digest, "python": self.python_version,
                "packages": dict(sorted(self.packages.items()))}

    def to_manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "hash": self.digest, "python": self.python_version,
                "base_prefix": self.base_prefix, "tag": self.tag, "built_at": self.built_at,
                "packages": dict(sorted(self.packages.items()))}

    @classmethod
    def from_manifest(cls, path: Path, raw: dict[str, Any]) -> "Environment":
        if raw.get("format") != FORMAT:
            raise EnvironmentProblem(f"{path / MANIFEST} is not an environment manifest this gateway reads")
        packages = raw.get("packages") or {}
        return cls(name=str(raw["name"]), digest=str(raw["hash"]), path=path, python_version=str(raw["python"]),
                   base_prefix=str(raw["base_prefix"]), packages={str(k): str(v) for k, v in packages.items()},
                   built_at=float(raw.get("built_at") or 0.0), tag=str(raw.get("tag") or ""))


def read(directory: Path) -> Environment | None:
    """The environment built in ``directory``; None when there is none or its build is incomplete."""
    try:
        raw = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        return Environment.from_manifest(directory, raw)
    except (KeyError, TypeError, ValueError, EnvironmentProblem):
        return None


def trusted(root: Path, directory_name: str) -> Environment:
    """The environment ``directory_name`` under ``root``, checked before a kernel is launched in it:
    a directory (not a link) of this process's user or root, that no one else may change, with a
    complete manifest. Raises ``EnvironmentProblem`` naming what is wrong."""
    if not DIRECTORY.fullmatch(directory_name):
        raise EnvironmentProblem("not an environment's directory name")
    me = os.geteuid()
    for path in (root, root / directory_name, root / directory_name / MANIFEST):
        try:
            info = os.lstat(path)
        except OSError as exc:
            raise EnvironmentProblem(f"{path}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            raise EnvironmentProblem(f"{path} is a symbolic link")
        if info.st_uid not in (0, me) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise EnvironmentProblem(f"{path} may be changed by others (owner {info.st_uid}, mode "
                                    f"{stat.S_IMODE(info.st_mode):04o})")
    environment = read(root / directory_name)
    if environment is None or environment.path.name != f"{environment.name}-{environment.short_hash}":
        raise EnvironmentProblem(f"{root / directory_name} holds no complete environment")
    return environment


def _run(command: list[str], progress: Progress, *, quiet: bool, env: dict[str, str] | None = None) -> None:
    """Run a build step; its output shows on a terminal, and is kept for the error otherwise."""
    if not quiet:
        done = subprocess.run(command, env=env, check=False)
        if done.returncode:
            raise EnvironmentProblem(f"`{' '.join(command[:4])} ...` failed with status {done.returncode}")
        return
    captured = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if captured.returncode:
        tail = "\n".join((captured.stdout + captured.stderr).strip().splitlines()[-15:])
        raise EnvironmentProblem(f"`{' '.join(command[:4])} ...` failed with status {captured.returncode}:\n{tail}")


LIST_PACKAGES = ("import importlib.metadata as m, json, sys, platform\n"
                 "print(json.dumps({'python': platform.python_version(), 'base_prefix': sys.base_prefix,\n"
                 " 'packages': {d.metadata['Name']: d.version for d in m.distributions()}}))")


class Environments:
    """The environments under one root directory, and the operations of ``agent-gateway env``."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def specs_dir(self) -> Path:
        return self.root / SPECS

    def spec_dirs(self) -> list[Path]:
        """Where kernel specs are looked for: the gateway's own, then the operators'."""
        from gateway.kernels import kernels_dir

        return [kernels_dir(), self.specs_dir]

    def definitions(self) -> list[Definition]:
        found: dict[str, Definition] = {}
        for directory in self.spec_dirs():
            if not directory.is_dir():
                continue
            for spec in sorted(directory.iterdir()):
                if (spec / "kernel.json").is_file() and spec.name not in found:
                    definition = Definition.of_spec(spec)
                    if definition is not None:
                        found[spec.name] = definition
        return list(found.values())

    def definition(self, name: str) -> Definition:
        for definition in self.definitions():
            if definition.name == name:
                return definition
        known = ", ".join(d.name for d in self.definitions()) or "none"
        raise EnvironmentProblem(f"No kernel spec defines an environment named '{name}' (defined: {known}); "
                                f"define one with `agent-gateway env build {name} --requirements FILE`.")

    def current(self, definition: Definition) -> Environment | None:
        """The built environment of ``definition`` (its lock, this interpreter), if it is built."""
        environment = read(self.root / definition.directory_name)
        return environment if environment is not None and environment.digest == definition.digest else None

    def for_spec(self, spec_dir: Path) -> Environment | None:
        """The environment a kernel of the spec in ``spec_dir`` runs in; None if the spec defines
        none. Raises ``EnvironmentNotBuilt`` when it defines one that is not built."""
        definition = Definition.of_spec(spec_dir)
        if definition is None:
            return None
        environment = self.current(definition)
        if environment is None:
            raise EnvironmentNotBuilt(definition.name, self.root)
        return environment

    def built(self) -> list[Environment]:
        """Every complete environment under the root, current or not."""
        if not self.root.is_dir():
            return []
        found = [read(path) for path in sorted(self.root.iterdir()) if DIRECTORY.fullmatch(path.name)]
        return [environment for environment in found if environment is not None]

    # -- building ----------------------------------------------------------------------------------

    def define(self, name: str, requirements: Path, progress: Progress, python: str | None = None) -> Definition:
        """Make the spec of an operator's environment ``name`` from a requirements file: its
        lock (resolved here, every file pinned by hash) and a kernel.json like python3's."""
        from gateway.kernels import kernels_dir

        if not NAME.fullmatch(name):
            raise EnvironmentProblem(f"'{name}' is not an environment name (letters, digits, '.', '_', '-'; up to 64)")
        if any(d.name == name and d.spec_dir.parent == kernels_dir() for d in self.definitions()):
            raise EnvironmentProblem(f"'{name}' is one of the gateway's own environments; choose another name")
        text = requirements.read_text(encoding="utf-8")
        spec = self.specs_dir / name
        progress(f"resolving {requirements} into {spec / LOCK_FILE}")
        lock = lock_requirements(text, python or base_python())
        kernel = json.loads((kernels_dir() / "python3" / "kernel.json").read_text(encoding="utf-8"))
        kernel["display_name"] = f"Python 3 ({name})"
        _write(spec / REQUIREMENTS_FILE, text.encode())
        _write(spec / LOCK_FILE, lock.encode())
        _write(spec / "kernel.json", (json.dumps(kernel, indent=2) + "\n").encode())
        built = Definition.of_spec(spec, python)
        assert built is not None
        return built

    def build(self, definition: Definition, progress: Progress, *, quiet: bool = True) -> Environment:
        """Build ``definition``'s environment, or return it if it is built already."""
        existing = self.current(definition)
        if existing is not None:
            progress(f"{definition.name}: built already ({existing.path})")
            return existing
        target = self.root / definition.directory_name
        self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        if target.exists():  # an earlier build that did not finish
            shutil.rmtree(target)
        started = time.monotonic()
        umask = os.umask(0o022)  # readable by every kernel's uid, writable by none
        try:
            progress(f"[1/4] {definition.name}: a virtual environment from {definition.python} in {target}")
            _run([definition.python, "-m", "venv", str(target)], progress, quiet=True)
            python = str(target / "bin" / "python")
            progress(f"[2/4] {definition.name}: installing {definition.spec_dir / LOCK_FILE} (pinned, hashes checked)")
            pip = [python, "-m", "pip", "install", "--require-hashes", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "--no-input", "-r", str(definition.spec_dir / LOCK_FILE)]
            _run([*pip, "-q"] if quiet else [*pip, "--progress-bar", "on"], progress, quiet=quiet)
            progress(f"[3/4] {definition.name}: the kernel extension and the font cache")
            described = json.loads(subprocess.run([python, "-c", LIST_PACKAGES], capture_output=True, text=True,
                                                  check=True).stdout)
            environment = Environment(definition.name, definition.digest, target, described["python"],
                                      described["base_prefix"], described["packages"], time.time(), definition.tag)
            self._add_extension(environment)
            progress(f"[4/4] {definition.name}: checking it")
            problems = self.check(environment, verify_files=False)
            if problems:
                raise EnvironmentProblem("; ".join(problems))
            _write(target / MANIFEST, (json.dumps(environment.to_manifest(), indent=2) + "\n").encode())
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        finally:
            os.umask(umask)
        progress(f"{definition.name}: built in {time.monotonic() - started:.0f} s, {len(environment.packages)} "
                 f"packages, {human_size(tree_size(target))} ({target})")
        return environment

    @staticmethod
    def _add_extension(environment: Environment) -> None:
        """The kernel extension into site-packages, IPython's kernel config enabling it, and
        matplotlib's font cache (if it has matplotlib), all inside the environment."""
        site = Path(environment.site_packages)
        _write(site / f"{EXTENSION}.py", extension_source())
        _write(environment.path / "etc" / "ipython" / "ipython_kernel_config.py", KERNEL_CONFIG.encode())
        if "matplotlib" in environment.packages:
            cache = environment.path / "share" / "agent-gateway" / "matplotlib"
            cache.mkdir(parents=True, exist_ok=True)
            subprocess.run([environment.executable, "-c", "import matplotlib.font_manager"], check=True,
                           capture_output=True, env={**_clean_env(), "MPLCONFIGDIR": str(cache)})
            for extra in cache.iterdir():
                if not extra.name.startswith("fontlist-"):
                    shutil.rmtree(extra) if extra.is_dir() else extra.unlink()

    def check(self, environment: Environment, *, verify_files: bool = True) -> list[str]:
        """What is wrong with a built environment: its interpreter cannot start a kernel's
        imports, or (``verify_files``) an installed file differs from its RECORD hash."""
        problems: list[str] = []
        probe = subprocess.run([environment.executable, "-I", "-c", f"import ipykernel, zmq, cloudpickle, {EXTENSION}"],
                               capture_output=True, text=True, check=False, env=_clean_env())
        if probe.returncode:
            problems.append(f"{environment.executable} cannot import the kernel: "
                            f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}")
        if verify_files:
            problems.extend(changed_files(Path(environment.site_packages)))
        return problems

    def remove(self, environment: Environment) -> None:
        shutil.rmtree(environment.path)


def build_missing(environments: Environments, progress: Progress) -> list[Environment]:
    """Build the environments of the gateway's own kernel specs that are not built yet (what
    ``serve`` does at start on a fresh machine); the operators' are built by ``env build``."""
    from gateway.kernels import kernels_dir

    built = []
    for definition in environments.definitions():
        if definition.spec_dir.parent == kernels_dir() and environments.current(definition) is None:
            progress(f"building the {definition.name} environment (once; later starts reuse it)")
            built.append(environments.build(definition, progress))
    return built


def _clean_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items()
            if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MPLBACKEND")}


def _write(path: Path, content: bytes) -> None:
    """Write a file whole (a temporary name, then renamed), readable by all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def lock_requirements(requirements: str, python: str) -> str:
    """Resolve requirements with pip (no install) into a lock: ``name==version --hash=sha256:...``
    for each distribution, wheels only."""
    import tempfile

    options = index_options(requirements)  # refused before pip sees them
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / REQUIREMENTS_FILE
        source.write_text(requirements, encoding="utf-8")
        report = Path(scratch) / "report.json"
        command = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary", ":all:",
                   "--disable-pip-version-check", "--no-input", "-q", "--report", str(report), "-r", str(source)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=_clean_env())
        if done.returncode:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise EnvironmentProblem(f"pip could not resolve the requirements:\n{tail}")
        resolved = json.loads(report.read_text(encoding="utf-8"))
    lines = [f"# Resolved by agent-gateway env build for {python_tag(python)}: every file pinned by its hash.",
             *options]
    for item in sorted(resolved.get("install", []), key=lambda i: i["metadata"]["name"].lower()):
        hashes = item.get("download_info", {}).get("archive_info", {}).get("hashes", {})
        if "sha256" not in hashes:
            raise EnvironmentProblem(f"pip gave no sha256 for {item['metadata']['name']}")
        lines.append(f"{item['metadata']['name']}=={item['metadata']['version']} --hash=sha256:{hashes['sha256']}")
    return "\n".join(lines) + "\n"


INDEX_OPTIONS = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--no-index", "--trusted-host")


def index_options(requirements: str) -> list[str]:
    """The lines of a requirements file that say where packages come from: kept in its lock, so
    the build looks where the resolution did. An index's credentials are refused there (the
    lock is a plain file): pip takes them from the building user's netrc or keyring."""
    kept = []
    for line in requirements.splitlines():
        option = line.split("#", 1)[0].strip()
        if option.startswith(INDEX_OPTIONS):
            if re.search(r"://[^/\s]*@", option):
                raise EnvironmentProblem("an index URL in the requirements carries credentials; give pip them "
                                         "through the building user's ~/.netrc or keyring instead")
            kept.append(option)
    return kept


def changed_files(site_packages: Path) -> list[str]:
    """Installed files whose content differs from the hash in their distribution's RECORD."""
    import base64
    import csv

    problems: list[str] = []
    for record in sorted(site_packages.glob("*.dist-info/RECORD")):
        with open(record, newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle):
                if len(row) < 2 or not row[1].startswith("sha256="):
                    continue
                path = (site_packages / row[0]).resolve()
                if not path.is_relative_to(site_packages.parent.parent.parent):
                    continue  # a script in bin/: checked through its own entry
                try:
                    digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=")
                except OSError as exc:
                    problems.append(f"{row[0]}: {exc.strerror}")
                    continue
                if digest.decode() != row[1][len("sha256="):]:
                    problems.append(f"{row[0]} differs from its RECORD ({record.parent.name})")
    return problems


def tree_size(path: Path) -> int:
    return sum(entry.stat(follow_symlinks=False).st_size for entry in path.rglob("*") if not entry.is_symlink())


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size} B"


def sandbox_paths(environment: Environment) -> tuple[str, ...]:
    """What a sandbox binds read-only for a kernel of this environment: it and its base interpreter."""
    return (str(environment.path), environment.base_prefix)
