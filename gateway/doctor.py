"""``agent-gateway doctor``: which isolation profiles work on this host, and why the others do not.

``diagnose()`` gathers the facts (as a JSON-ready dict); ``format_report()`` words them.
Probing starts a short-lived Python under each profile, so a report takes a second or two.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

from gateway import cgroups, containers, sandbox, volumes


def _tool_version(name: str) -> str | None:
    path = shutil.which(name)
    if path is None:
        return None
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return path
    return f"{path} ({(done.stdout or done.stderr).strip().splitlines()[0]})" if done.stdout or done.stderr else path


def _interpreters() -> dict[str, Any]:
    chosen: dict[str, Any] = {}
    for profile in sandbox.PROFILES:
        try:
            chosen[profile] = sandbox.kernel_interpreter(profile).to_dict()
        except sandbox.IsolationUnavailable as error:
            chosen[profile] = {"executable": None, "reason": str(error)}
    return chosen


def diagnose(cgroup_parent: str = cgroups.DEFAULT_PARENT, refresh: bool = False,
             container_engine: str | None = None) -> dict[str, Any]:
    """Facts about isolation on this host, as a dict that serialises to JSON (``container_engine``:
    the engine the container profile would use)."""
    support = cgroups.detect_cached(cgroup_parent)
    profiles = sandbox.probe_profiles(refresh=refresh, cgroup_parent=cgroup_parent)
    engine, refused = containers.probe(container_engine)
    return {
        "container": {"works": refused is None, "engine": engine, "reason": refused or f"kernels can run on {engine}"},
        "euid": os.geteuid(),
        "python": sys.version.split()[0],
        "tools": {"bwrap": _tool_version("bwrap"), "setpriv": _tool_version("setpriv")},
        "cgroups": support.to_dict(),
        "interpreters": _interpreters(),
        "profiles": {name: status.to_dict() for name, status in profiles.items()},
        "recommended": _recommended(profiles),
        "workspace_volumes": {"works": volumes.support() is None, "reason": volumes.support() or
                              "root, the loop driver and mkfs.ext4 are there: each isolated workspace can "
                              "be a file system of its limit's size"},
    }


def _recommended(profiles: dict[str, sandbox.ProfileStatus]) -> str:
    for profile in ("sandbox", "process", "none"):
        if profiles[profile].works:
            return profile
    return "none"


def _profile_lines(facts: dict[str, Any]) -> list[str]:
    lines = ["Profiles:"]
    for name, status in facts["profiles"].items():
        mark = "works" if status["works"] else "DOES NOT WORK"
        lines.append(f"  {name:8} {mark} ({status['seconds']:.2f} s): {status['reason']}")
        for limit, how in status["enforced"].items():
            lines.append(f"           {limit}: {how}")
    return lines


def _cgroup_lines(facts: dict[str, Any]) -> list[str]:
    found = facts["cgroups"]
    lines = [f"cgroups: {found['mode']} (kernel cgroups go under '{found['parent']}')"]
    for name, where in found["controllers"].items():
        lines.append(f"  {name}: v{where['version']} at {where['path']}")
    lines.append(f"  cgroup.kill: {'yes' if found['cgroup_kill'] else 'no'}"
                 + (f" at {found['v2_parent']}" if found["v2_parent"] else ""))
    lines += [f"  note: {reason}" for reason in found["reasons"]]
    return lines


def _interpreter_lines(facts: dict[str, Any]) -> list[str]:
    lines = ["Kernel interpreters:"]
    for profile, choice in facts["interpreters"].items():
        lines.append(f"  {profile:8} {choice['executable'] or '-'}: {choice['reason']}")
        if choice.get("pythonpath"):
            lines.append(f"           PYTHONPATH={':'.join(choice['pythonpath'])}")
        if choice.get("skipped_pth"):
            lines.append(f"           .pth files not run from PYTHONPATH: {', '.join(choice['skipped_pth'])}")
    return lines


def format_report(facts: dict[str, Any]) -> str:
    """``diagnose()``'s facts as the text ``agent-gateway doctor`` prints."""
    tools = facts["tools"]
    lines = [f"agent-gateway doctor: running as uid {facts['euid']}, Python {facts['python']}",
             f"bwrap: {tools['bwrap'] or 'not installed'}", f"setpriv: {tools['setpriv'] or 'not installed'}", ""]
    lines += _cgroup_lines(facts) + [""] + _interpreter_lines(facts) + [""] + _profile_lines(facts)
    found = facts["workspace_volumes"]
    lines += ["", f"Workspace volumes: {'work' if found['works'] else 'DO NOT WORK'}: {found['reason']}"]
    container = facts["container"]
    lines += ["", f"Container profile: {'works' if container['works'] else 'not available'}: {container['reason']}"]
    lines += ["", f"Recommended profile here: {facts['recommended']}"]
    return "\n".join(lines)


def report(cgroup_parent: str = cgroups.DEFAULT_PARENT) -> str:
    """Diagnose and format in one call."""
    return format_report(diagnose(cgroup_parent))
